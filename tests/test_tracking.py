"""WandB dashboards that line up without editing a panel, read back from the offline `.wandb` records with wandb's
own protobuf types: metric axes, the derived config, per-step train rows, identity, one run across a kill and
--resume, the environment switches, and no secret in any file."""

import json
import time
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import tiny_config
from exp_1 import main as exp1
from imdb_grad_accum.rundir import RunDir
from exp_2 import main as exp2

TRAIN_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/samples", "train/epoch", "train/tokens_per_s"}


def wandb_records(run: Path) -> list[list]:
    """The records of each offline WandB run in a run directory, oldest first. A `.wandb` file is a 7-byte header
    then a LevelDB-style log: 32 KiB blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: whole, first,
    middle, last), each record a serialized wandb_internal_pb2.Record."""
    runs = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, chunks, pending = 7, [], b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            if left < 7:  # a block's tail too short for a chunk header is padding
                position += left
                continue
            length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
            chunk = data[position + 7:position + 7 + length]
            position += 7 + length
            if kind == 0:
                break
            if kind in (1, 4):
                chunks.append(pending + chunk if kind == 4 else chunk)
            pending = chunk if kind == 2 else pending + chunk if kind == 3 else b""
        runs.append([wandb_internal_pb2.Record.FromString(chunk) for chunk in chunks])
    return runs


def of_type(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
            for h in of_type(records, "history")]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, tiny_bert):
    """An exp_2 run (accumulation 2) logged offline, as `wandb sync` would later upload it."""
    from conftest import write_reviews

    root = tmp_path_factory.mktemp("tracking")
    config = tiny_config(root, tiny_bert, write_reviews(root / "reviews"), tracking={"wandb_mode": "offline"},
                         train={"batch_size": 4, "grad_accum_steps": 2}, seed=3)
    exp2.main(["--config", str(config), "tracking.group=sweep-a", "tracking.tags=[mine]", "tracking.log_model=best"])
    (records,) = wandb_records(root / "runs" / "tiny")
    return root / "runs" / "tiny", records


def test_axes_line_up_runs_of_any_effective_batch(offline_run):
    _, records = offline_run
    metrics = {m.name or m.glob_name: m for m in of_type(records, "metric")}
    assert metrics["train/*"].step_metric == "train/samples"
    assert metrics["val/*"].step_metric == "epoch"
    assert metrics["val/accuracy"].summary.max and metrics["val/f1"].summary.max and metrics["val/loss"].summary.min
    assert metrics["train/samples"].options.hidden and metrics["epoch"].options.hidden


def test_every_optimizer_step_has_its_train_row_with_grad_norm_and_samples_seen(offline_run):
    run, records = offline_run
    metrics = json.loads((run / "metrics.json").read_text())
    train = [row for row in history_rows(records) if "train/loss" in row]
    assert [row["_step"] for row in train] == list(range(1, metrics["optimizer_steps"] + 1))
    for row in train:
        assert TRAIN_KEYS <= set(row), row
        assert row["train/grad_norm"] > 0
    assert train[-1]["train/samples"] == metrics["split_sizes"]["train"] * metrics["epochs"]
    assert train[-1]["train/epoch"] == metrics["epochs"]
    validation = [row for row in history_rows(records) if "val/loss" in row]
    assert [row["epoch"] for row in validation] == [1, 2] and not any("val/n" in row for row in validation)


def test_the_config_holds_what_the_run_derived(offline_run):
    run, records = offline_run
    (run_record,) = of_type(records, "run")
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    derived = config["derived"]
    assert derived["grad_accum_steps"] == 2 and derived["micro_batch_tokens"] is None and derived["effective_batch_size"] == 8 and derived["num_processes"] == 1
    assert derived["lr"] == config["train"]["lr"] and derived["device"] == "cpu" and derived["precision"] == "fp32"
    assert (derived["experiment"], derived["trainer"]) == ("exp_2", "pytorch")
    assert set(derived["versions"]) == {"torch", "transformers", "accelerate"}
    assert "git_commit" in derived and derived["split_sizes"] == {"train": 180, "validation": 20, "test": 20}
    assert derived["split_fingerprint"] == json.loads((run / "metrics.json").read_text())["split_fingerprint"]


def test_identity_group_job_type_and_tags(offline_run):
    run, records = offline_run
    (run_record,) = of_type(records, "run")
    assert run_record.run_group == "sweep-a" and run_record.job_type == "exp_2/pytorch"
    assert list(run_record.tags) == [Path(json.loads((run / "metrics.json").read_text())["model"]).name, "eb8",
                                     "seed3", "mine"]
    assert run_record.run_id == RunDir(run).marker()["wandb_ids"][0]


def test_the_summary_has_each_test_metric_once_and_the_end_tables(offline_run):
    run, records = offline_run
    summary = {}
    for record in of_type(records, "summary"):
        summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.update})
    metrics = json.loads((run / "metrics.json").read_text())
    assert float(summary["test/accuracy"]) == metrics["test_accuracy"]
    assert not any(key.startswith("test_") for key in summary)  # no second copy under metrics.json's names
    assert not any("test/accuracy" in row for row in history_rows(records))
    logged = {key for row in history_rows(records) for key in row}
    assert any(key.startswith("test/confusion_matrix") for key in logged)
    assert any(key.startswith("test/most_confident_mistakes") for key in logged)


def test_log_model_best_uploads_the_best_checkpoint_as_an_artifact(offline_run):
    run, records = offline_run
    models = [a for a in of_type(records, "artifact") if a.type == "model"]
    assert len(models) == 1 and models[0].name.startswith("model-")
    files = {entry.path for entry in models[0].manifest.contents}
    assert "best.safetensors" in files and "model/config.json" in files and "model/tokenizer.json" in files


def test_a_killed_and_resumed_run_is_one_wandb_run_with_every_step_once(tmp_path, tiny_bert, reviews_dir, fork_server):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, tracking={"wandb_mode": "offline"},
                         checkpoint={"every_steps": 3}, train={"epochs": 1, "batch_size": 4})
    run = tmp_path / "runs" / "tiny"
    # killed after step 8, past the newest point (step 6): steps 7 and 8 were logged, and will be trained again
    assert fork_server.start("exp1", ["--config", config], kill_at=("step", 8)).wait()[0] is None
    code, output = fork_server.start("exp1", ["--config", config, "--resume"]).wait()
    assert code == 0, output[-3000:]
    # the killed process's offline file holds what it flushed (often nothing); the resumed run's file replaces it
    # with the whole history, so `wandb sync` uploads one complete run
    (records,) = wandb_records(run)
    assert of_type(records, "run")[0].run_id == RunDir(run).marker()["wandb_ids"][0]
    steps = [row["_step"] for row in history_rows(records) if "train/loss" in row]
    assert steps == list(range(1, json.loads((run / "metrics.json").read_text())["optimizer_steps"] + 1))


@pytest.mark.parametrize("environment, config, expected", [
    ({"WANDB_MODE": "disabled"}, {}, None),
    pytest.param({"WANDB_MODE": "disabled"}, {"wandb_mode": "offline"}, {}, marks=pytest.mark.slow),
    pytest.param({"WANDB_PROJECT": "from-env", "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "a,b"}, {},
                 {"project": "from-env", "run_group": "env-group", "tags": ["a", "b"]}, marks=pytest.mark.slow),
    ({"WANDB_PROJECT": "from-env", "WANDB_RUN_GROUP": "env-group"}, {"wandb_project": "from-config", "group": "mine"},
     {"project": "from-config", "run_group": "mine"}),
], ids=["WANDB_MODE=disabled", "config wins over WANDB_MODE", "WANDB_* when the config is unset", "config wins"])
def test_wandb_environment_switches_work_unless_the_config_sets_the_key(environment, config, expected, tmp_path,
                                                                        tiny_bert, reviews_dir, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"WANDB_MODE": "offline", **environment}.items():
        monkeypatch.setenv(key, value)
    path = tiny_config(tmp_path, tiny_bert, reviews_dir, tracking={"wandb_mode": None, **config}, train={"epochs": 1})
    exp1.main(["--config", str(path)])
    run = tmp_path / "runs" / "tiny"
    if expected is None:
        assert not (run / "wandb").exists()
        return
    (run_record,) = of_type(wandb_records(run)[0], "run")
    for key, value in expected.items():
        actual = getattr(run_record, key)
        assert (list(actual)[-len(value):] if key == "tags" else actual) == value, key


def test_wandb_auto_without_network_finishes_offline_and_keeps_secrets_out(tmp_path, tiny_bert, reviews_dir,
                                                                           fork_server):
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, tracking={"wandb_mode": "auto"}, train={"epochs": 1})
    secret = "0123456789abcdef0123456789abcdef01234567"
    started = time.perf_counter()
    code, output = fork_server.start("exp1", ["--config", config], env={
        "WANDB_API_KEY": secret, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_SILENT": "true",
        "WANDB_INIT_TIMEOUT": "2"}).wait(300)
    assert code == 0, output[-3000:]
    assert time.perf_counter() - started < 120
    run = tmp_path / "runs" / "tiny"
    assert list((run / "wandb").glob("offline-run-*")), "no offline WandB run to `wandb sync` later"
    assert "WandB: offline run in" in output
    for file in run.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
