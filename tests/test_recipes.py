"""The fine-tuning recipes: layer-wise lr decay, freezing, label smoothing (its exact accumulation is in
test_accumulation.py) and long inputs, each checked on what it does to training, and exact resume with them on."""

import json
import shutil
import signal
import time

import pytest
import torch

from conftest import IMDB, model_config, needs_imdb, synthetic_reviews, tiny_config
from exp_1 import main as exp1
from imdb_grad_accum.errors import UserError
from imdb_grad_accum.model import encoder_layers, load_model
from imdb_grad_accum.training import build_optimizer


def _lr_by_parameter(model, optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert", "minilm"])
def test_layer_lr_decay_gives_each_layer_the_lr_of_the_one_above_times_the_decay(fixture, request):
    """Counting down from the head (lr): the top layer lr x 0.8, the next x 0.8^2, ..., the embeddings below the
    lowest layer. BERT and MiniLM name their layers encoder.layer.N, ModernBERT layers.N."""
    name = "sentence-transformers/all-MiniLM-L6-v2" if fixture == "minilm" else request.getfixturevalue(fixture)
    cfg = model_config(name)
    cfg.train.layer_lr_decay = 0.8
    _, model = load_model(cfg)
    lrs = _lr_by_parameter(model, build_optimizer(model, cfg.train, 1e-3, torch.device("cpu")))
    count = len(encoder_layers(model))
    assert count == (6 if fixture == "minilm" else 2)
    for parameter, lr in lrs.items():
        if parameter.startswith("head."):
            expected = 1e-3
        elif ".embeddings." in f".{parameter}":
            expected = 1e-3 * 0.8 ** (count + 1)
        else:
            layer = next((int(part) for part in parameter.split(".") if part.isdigit()), None)
            expected = 1e-3 if layer is None else 1e-3 * 0.8 ** (count - layer)  # e.g. ModernBERT's final norm: top
        assert lr == pytest.approx(expected), parameter
    assert len({round(lr, 12) for lr in lrs.values()}) == count + 2


def test_a_model_whose_layers_cannot_be_found_is_refused(tiny_bert):
    for damage in ("no embeddings", "no stack of num_hidden_layers layers"):
        _, model = load_model(model_config(tiny_bert))
        if damage == "no embeddings":
            model.encoder.embeddings = None
        else:
            model.encoder.config.num_hidden_layers = 5
        with pytest.raises(UserError, match="its encoder layers or embeddings cannot be found"):
            encoder_layers(model)


FROZEN = {"embeddings": ("encoder.embeddings.",), "1": ("encoder.embeddings.", "encoder.encoder.layer.0."),
          "encoder": ("encoder.",)}


@pytest.mark.parametrize("freeze", list(FROZEN))
def test_frozen_parameters_do_not_train_and_the_optimizer_keeps_no_state_for_them(freeze, tiny_bert):
    cfg = model_config(tiny_bert)
    cfg.train.freeze = freeze
    _, model = load_model(cfg)
    optimizer = build_optimizer(model, cfg.train, 1e-2, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[101, 2307, 3185, 102], [101, 2919, 3185, 102]])
    torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([1, 0])).backward()
    optimizer.step()
    state = {id(p) for p in optimizer.state}
    for name, p in model.named_parameters():
        frozen = name.startswith(FROZEN[freeze])
        assert p.requires_grad != frozen and (id(p) in state) != frozen, name
        assert not frozen or torch.equal(p.detach(), before[name]), name
    assert any(not name.startswith(FROZEN[freeze]) for name, _ in model.named_parameters())
    cfg.train.freeze = "3"
    with pytest.raises(UserError, match="train.freeze=3: .* has 2 encoder layers"):
        load_model(cfg)


def test_resume_is_exact_with_every_recipe_on(tmp_path, tiny_bert, reviews_dir, fork_server):
    """Layer-wise lr decay, the lowest layer frozen and label smoothing, dropout on: killed (SIGKILL) once two resume
    points were saved, resumed, it ends exactly as the same run uninterrupted."""
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, checkpoint={"every_steps": 4},
                         model={"dropout": 0.1, "encoder_dropout": None},
                         train={"epochs": 2, "batch_size": 4, "layer_lr_decay": 0.9, "freeze": "1",
                                "label_smoothing": 0.1})
    code, output = fork_server.start("exp1", ["--config", config, "name=whole"]).wait(300)
    assert code == 0, output[-3000:]
    killed = fork_server.start("exp1", ["--config", config, "name=killed"])
    run = tmp_path / "runs" / "killed"
    from imdb_grad_accum.rundir import RunDir

    while killed.running() and len(RunDir(run).resume_points()) < 2:
        time.sleep(0.005)
    killed.signal(signal.SIGKILL)
    assert killed.wait()[0] is None, "the run ended before it was killed"
    code, output = fork_server.start("exp1", ["--config", config, "name=killed", "--resume"]).wait(300)
    assert code == 0 and "resuming" in output, output[-3000:]
    whole, resumed = (json.loads((tmp_path / "runs" / n / "metrics.json").read_text()) for n in ("whole", "killed"))
    for key in ("test_loss", "test_accuracy", "best_step", "optimizer_steps", "best_sha256"):
        assert whole[key] == resumed[key], key
    assert whole["layer_lr_decay"] == 0.9 and whole["freeze"] == "1" and whole["label_smoothing"] == 0.1


@pytest.fixture(scope="module")
def long_modernbert(tiny_modernbert, tmp_path_factory) -> str:
    """The tiny ModernBERT with ModernBERT-base's 8,192 positions, its tokenizer allowing them too."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path_factory.mktemp("long_modernbert") / "model"
    shutil.copytree(tiny_modernbert, folder)
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = 8192
    config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(folder)
    return str(folder)


def _long_reviews(folder):
    """Synthetic reviews, a third of them 1,250-5,000 words long: all longer than 512 tokens, most than 2,048."""
    import csv

    folder.mkdir()
    rows = synthetic_reviews(60, seed=4)
    for i, row in enumerate(rows[::3]):
        row["text"] += " and the story went on" * (250 + 40 * i)
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.mark.parametrize("data", ["synthetic", pytest.param("real", marks=[needs_imdb, pytest.mark.slow])])
def test_long_reviews_train_and_evaluate_padded_or_packed_alike_in_passes_of_the_token_budget(
        data, long_modernbert, tmp_path, monkeypatch):
    """At max_length 2,048: reviews longer than 512 tokens are kept whole up to 2,048, training and evaluation run,
    packed and padded runs end alike, and no forward pass holds more than train.micro_batch_tokens tokens (plus one
    review), which is what bounds activation memory, whatever the longest review."""
    from imdb_grad_accum.model import SentimentClassifier

    path = _long_reviews(tmp_path / "long") if data == "synthetic" else IMDB
    subset = {} if data == "synthetic" else {"max_train_samples": 24, "max_val_samples": 8, "max_test_samples": 200}
    passes, forward = [], SentimentClassifier.forward

    def counted(self, input_ids, *args, **kwargs):
        if self.training:
            passes.append(input_ids.numel())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(SentimentClassifier, "forward", counted)
    metrics = {}
    for packing in ("false", "true"):
        config = tiny_config(tmp_path, long_modernbert, path, name=f"packing_{packing}",
                             data={"max_length": 2048, **subset},
                             train={"epochs": 1, "batch_size": 8, "micro_batch_tokens": "3000", "packing": packing})
        metrics[packing] = exp1.main(["--config", str(config)])
        assert max(passes) <= 3000 + 2048
        passes.clear()
    predictions = (tmp_path / "runs" / "packing_true" / "predictions" / "test.csv").read_text().splitlines()
    lengths = [int(line.split(",")[5]) for line in predictions[1:]]
    assert max(lengths) > 512  # reviews longer than BERT's limit were read
    assert metrics["true"]["test_accuracy"] == metrics["false"]["test_accuracy"]
    assert metrics["true"]["test_loss"] == pytest.approx(metrics["false"]["test_loss"], rel=1e-3)
