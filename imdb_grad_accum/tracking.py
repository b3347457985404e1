"""What a run records: history.jsonl (always), WandB (best effort: it never stops training), and run facts."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from imdb_grad_accum.config import PROJECT_NAME, PROJECT_ROOT, StepLayout, to_plain_dict
from imdb_grad_accum.rundir import LABELS, split_fingerprint
from imdb_grad_accum.writer import RunWriter

RECIPE_KEYS = ("layer_lr_decay", "freeze", "label_smoothing")  # recorded in metrics.json and tagged when set


def run_facts(trainer: tuple[str, str], layout: StepLayout, lr: float, device, precision: str, split: dict,
              packed: bool, train: DictConfig) -> dict:
    import accelerate
    import torch
    import transformers

    recipe = {key: train[key] for key in RECIPE_KEYS if train[key] not in (None, 0, 0.0)}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    return {"experiment": trainer[0], "trainer": trainer[1], "effective_batch_size": layout.effective_batch,
            "grad_accum_steps": layout.grad_accum_steps, "micro_batch_tokens": layout.micro_batch_tokens,
            "num_processes": layout.processes, "lr": lr, "device": device.type, "precision": precision,
            "packed": packed, **recipe, "versions": versions, "git_commit": git_commit(),
            "split_sizes": {name: len(split[name]) for name in ("train", "validation", "test")},
            "split_fingerprint": split_fingerprint(split), "test_sha256": split["test_sha256"]}


def git_commit() -> Optional[str]:
    """The project's commit (with -dirty when files changed), or None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe(cfg: DictConfig, facts: dict, steps_per_epoch: int, split: dict) -> str:
    sizes = facts["split_sizes"]
    batch, tokens = facts["effective_batch_size"], facts["micro_batch_tokens"]
    made = (f"{batch // facts['num_processes']} x {facts['num_processes']} process(es), in forward passes of "
            + ("as many tokens as fit" if tokens == "auto" else f"at most {tokens} tokens") if tokens else
            f"{cfg.train.batch_size} x {facts['grad_accum_steps']} accumulation x {facts['num_processes']} process(es)")
    recipe = "".join(f"; {key} {facts[key]}" for key in RECIPE_KEYS if key in facts)
    lines = [f"{cfg.model.name} on {facts['device']} ({facts['precision']}): {sizes['train']} train / "
             f"{sizes['validation']} val / {sizes['test']} test reviews; effective batch {batch} = {made}; "
             f"lr {facts['lr']:.3g}{recipe}; {steps_per_epoch} optimizer steps/epoch"]
    if split.get("label_conflicts"):
        lines.append(f"note: {split['label_conflicts']} text(s) appear in the data with both labels; each is kept "
                     "once, with the label of its first row (split.json counts them as label_conflicts)")
    return "\n".join(lines)


def wandb_choices(tracking: DictConfig) -> dict:
    """A config key that is set wins, then WandB's own environment variable, then the default."""
    env = os.environ
    mode = tracking.wandb_mode or {"dryrun": "offline", "run": "online"}.get(env.get("WANDB_MODE", ""),
                                                                             env.get("WANDB_MODE")) or "auto"
    tags = list(tracking.tags) or [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"mode": mode, "project": tracking.wandb_project or env.get("WANDB_PROJECT") or PROJECT_NAME,
            "entity": tracking.wandb_entity or env.get("WANDB_ENTITY") or None,
            "group": tracking.group or env.get("WANDB_RUN_GROUP") or None, "tags": tags}


def wandb_run_id(run) -> str:
    """The run's own WandB id (run.json), or a sweep agent's, since WandB ignores any other id there."""
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return run.marker()["wandb_ids"][0]


class Tracker:
    """history.jsonl and WandB for one run. On processes other than the first (`active=False`) it does nothing."""

    def __init__(self, run: RunWriter, cfg: DictConfig, facts: dict, active: bool = True):
        self.run, self.cfg, self.facts, self.active = run, cfg, facts, active
        self.earlier = run.history() if active else []  # up to the resume point: WandB gets what it lacks
        self.new_from_step = 0  # WandB holds the steps below it already
        self.wandb_run = None
        if active:
            self._start_wandb()

    def log(self, values: dict, step: int) -> None:
        """Everything to history.jsonl; to WandB all but counts (val/n), and only steps it has not seen yet."""
        if not self.active:
            return
        self.run.append_history(step, values)
        if self.wandb_run is not None and step >= self.new_from_step:
            with self._guard():
                self.wandb_run.log({k: v for k, v in values.items() if not k.endswith("/n")}, step=step)

    def preempted(self) -> None:
        """Before stopping for SIGTERM: a WandB sweep then gives the run to an agent again, which resumes it."""
        if self.active and self.wandb_run is not None and os.environ.get("WANDB_SWEEP_ID"):
            with self._guard():
                self.wandb_run.mark_preempting()

    def finish(self, metrics: dict, test_rows: dict, texts: list[str], step: int) -> None:
        """The test record; in WandB also a confusion matrix, the worst mistakes and (log_model=best) the model."""
        if not self.active:
            return
        test = {f"test/{k[5:]}": v for k, v in metrics.items() if k.startswith("test_") and k != "test_sha256"}
        self.run.append_history(step, {**test, "test/n": metrics["n_test"]})
        if self.wandb_run is None:
            return
        import wandb

        with self._guard():
            self.wandb_run.summary.update({**test, **{k: v for k, v in metrics.items()
                                                      if not k.startswith("test_") and k not in self.facts}})
            labels, predicted, positive = test_rows["label"], test_rows["predicted"], test_rows["prob_positive"]
            wrong = [i for i in sorted(range(len(labels)), key=lambda i: -abs(positive[i] - 0.5))
                     if predicted[i] != labels[i]][:20]
            table = wandb.Table(columns=["index", "review (start)", "label", "predicted", "probability positive"],
                                data=[[int(test_rows["index"][i]), texts[i][:200], LABELS[labels[i]],
                                       LABELS[predicted[i]], float(positive[i])] for i in wrong])
            self.wandb_run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=[int(v) for v in labels], preds=[int(v) for v in predicted], class_names=list(LABELS)),
                "test/most_confident_mistakes": table})
            if self.cfg.tracking.log_model == "best":
                artifact = wandb.Artifact(f"model-{self.wandb_run.id}", type="model",
                                          metadata={"best_epoch": metrics["best_epoch"], **test})
                artifact.add_file(str(self.run.best))
                artifact.add_dir(str(self.run.model_dir), name="model")
                self.wandb_run.log_artifact(artifact)
            self.wandb_run.finish()
        self.wandb_run = None

    def _start_wandb(self) -> None:
        """auto: online when WandB can start online, else offline."""
        choices = wandb_choices(self.cfg.tracking)
        if choices["mode"] == "disabled":
            return
        run_id = wandb_run_id(self.run)
        self.run.add_wandb_id(run_id)
        self.run.folder("wandb")
        model = self.cfg.model.name.rstrip("/").split("/")[-1]
        tags = [model[:64], f"eb{self.facts['effective_batch_size']}", f"seed{self.cfg.seed}", *choices["tags"],
                *(f"{key}={self.facts[key]}" for key in RECIPE_KEYS if key in self.facts)]
        mode, job_type = choices["mode"], f"{self.facts['experiment']}/{self.facts['trainer']}"
        attempts = ("online", "offline") if mode in ("auto", "online") else (mode,)
        for attempt in attempts:
            try:
                import wandb

                # an online start may take WANDB_INIT_TIMEOUT seconds, else 15, not WandB's 90: a run without a
                # network would wait a minute and a half before its first step
                self.wandb_run = wandb.init(
                    id=run_id, resume="allow", reinit="finish_previous", name=self.cfg.name, tags=tags, mode=attempt,
                    project=choices["project"], entity=choices["entity"], group=choices["group"], job_type=job_type,
                    dir=str(self.run.path), config={**to_plain_dict(self.cfg), "derived": self.facts},
                    settings=wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT") or 15),
                                            silent=True))
                for axis, metrics in (("train/samples", "train/*"), ("epoch", "val/*")):  # shared across batch sizes
                    self.wandb_run.define_metric(axis, hidden=True)
                    self.wandb_run.define_metric(metrics, step_metric=axis)
                for name, summary in (("val/accuracy", "max"), ("val/f1", "max"), ("val/loss", "min")):
                    self.wandb_run.define_metric(name, step_metric="epoch", summary=summary)
                self._send_earlier(attempt)
            except Exception as err:  # wandb raises many types; none of them may stop training
                if attempt == attempts[-1] or mode == "online":  # auto going offline is no news
                    self._wandb_failed(err)
                self.wandb_run = None
                with contextlib.suppress(Exception):
                    wandb.teardown()  # else the failed start keeps the run id "in use" for the next attempt
                continue
            print(f"WandB: {self.wandb_run.url}" if attempt == "online" else
                  f"WandB: offline run in {self.run.path / 'wandb'} (upload it later with `wandb sync`, see "
                  "docs/wandb.md)")
            return

    def _send_earlier(self, mode: str) -> None:
        """Offline, the new run gets the whole history and replaces earlier partial ones, for one `wandb sync`."""
        if mode == "offline":
            current = Path(self.wandb_run.dir).parent
            for earlier in (self.run.path / "wandb").glob(f"offline-run-*-{self.wandb_run.id}"):
                if earlier != current and not earlier.is_symlink():
                    shutil.rmtree(earlier, ignore_errors=True)
        self.new_from_step = self.wandb_run.step
        for record in self.earlier:
            if record["step"] >= self.new_from_step:
                self.wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time") and
                                    not k.endswith("/n")}, step=record["step"])
        if self.earlier:
            self.new_from_step = max(self.new_from_step, self.earlier[-1]["step"])

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except Exception as err:
            self._wandb_failed(err)
            self.wandb_run = None

    @staticmethod
    def _wandb_failed(err: Exception) -> None:
        print(f"WandB unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
              "training continues, history.jsonl still records everything", file=sys.stderr)
