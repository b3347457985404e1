"""Packed micro-batches (imdb_grad_accum/packing.py) give the padded batch's logits, loss and gradients, in fp32 on CPU, for
BERT and for ModernBERT with its sliding-window layers active."""

import shutil

import pytest
import torch
from transformers import AutoConfig

from conftest import model_config, packed_batch as pack
from imdb_grad_accum.model import load_model, model_inputs
from imdb_grad_accum.training import weighted_loss
from imdb_grad_accum.packing import PACKED, packed_logits

WINDOW = 8  # ModernBERT local_attention: a token sees 4 tokens each side in the sliding-window layers
TEXTS = ["dull", "a truly wonderful film with a moving story", "the plot was clumsy and tedious, " * 4,
         "brilliant acting and a delightful score, though the ending drags a little " * 4]
LOSS_WEIGHTS = [0.1, 0.4, 0.2, 0.3]
SHARPEN = 10.0


@pytest.fixture(scope="module")
def windowed_modernbert(tiny_modernbert, tmp_path_factory) -> str:
    """The tiny ModernBERT with a window short enough for the reviews to exceed it."""
    folder = tmp_path_factory.mktemp("windowed_modernbert") / "model"
    shutil.copytree(tiny_modernbert, folder)
    config = AutoConfig.from_pretrained(folder)
    config.local_attention = WINDOW
    config.save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=["tiny_bert", "windowed_modernbert"])
def model_path(request) -> str:
    return request.getfixturevalue(request.param)


def _load(path, pooling, attn_implementation=None):
    return load_model(model_config(path, pooling=pooling, dropout=0.0, encoder_dropout=0.0,
                                   attn_implementation=attn_implementation))


def _models(path, pooling):
    """The padded reference (the model's default attention) and a PACKED twin with the same weights. Query and key
    weights are scaled up: a freshly initialised model attends almost uniformly, which would hide attention errors."""
    tokenizer, padded = _load(path, pooling)
    with torch.no_grad():
        for name, p in padded.encoder.named_parameters():
            if name.endswith(("Wqkv.weight", "query.weight", "key.weight")):
                p.mul_(SHARPEN)
    _, packed = _load(path, pooling, PACKED)
    packed.load_state_dict(padded.state_dict())
    return tokenizer, padded, packed


def _features(tokenizer):
    encoded = tokenizer(TEXTS, truncation=True, max_length=64)
    return [{**{name: values[i] for name, values in encoded.items()}, "label": i % 2, "loss_weight": w}
            for i, w in enumerate(LOSS_WEIGHTS)]


def _padded_batch(tokenizer, model, features):
    padded = tokenizer.pad([{name: f[name] for name in model.input_names} for f in features], return_tensors="pt")
    return {**padded, "labels": torch.tensor([f["label"] for f in features]),
            "loss_weight": torch.tensor([f["loss_weight"] for f in features])}


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_pack_layout():
    features = [{"input_ids": [101, 7, 102], "token_type_ids": [0, 0, 0], "label": 1, "loss_weight": 0.5},
                {"input_ids": [101, 8, 9, 102], "token_type_ids": [0, 0, 0, 0], "label": 0, "loss_weight": 0.5}]
    batch = pack(features)
    assert batch["input_ids"].tolist() == [[101, 7, 102, 101, 8, 9, 102]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["token_type_ids"].shape == (1, 7)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 3, 7]
    assert (batch["max_seqlen"], batch["num_tokens"]) == (4, 7)
    assert batch["labels"].tolist() == [1, 0] and batch["loss_weight"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_equals_padded(model_path, pooling):
    tokenizer, padded, packed = _models(model_path, pooling)
    features = _features(tokenizer)
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) == len(lengths) and max(lengths) > 4 * min(lengths)
    reference = _padded_batch(tokenizer, padded, features)
    logits = padded(**{name: reference[name] for name in padded.input_names})
    loss = weighted_loss(logits, reference)
    loss.backward()

    batch = pack(features)
    packed_out = packed_logits(packed, batch)
    packed_loss = weighted_loss(packed_out, batch)
    packed_loss.backward()

    assert _relative(packed_out, logits) < 1e-5
    assert abs(packed_loss.item() - loss.item()) < 1e-5 * loss.item()
    grads = dict(packed.named_parameters())
    for name, p in padded.named_parameters():
        g_ref, g = p.grad, grads[name].grad
        if g_ref.norm() < 1e-8:  # e.g. attention key biases: softmax ignores them, their gradient is rounding noise
            assert g.norm() < 1e-8, name
        else:
            assert _relative(g, g_ref) < 1e-5, name


def test_sliding_window_is_exercised_and_would_be_caught(windowed_modernbert):
    """The reviews exceed the window in a local layer, and a window ignored, or one token narrower or wider on each
    side, changes the logits far beyond the tolerance of test_packed_equals_padded."""
    tokenizer, padded, packed = _models(windowed_modernbert, "mean")
    padded.eval(), packed.eval()
    layers = [layer.attn for layer in packed.encoder.layers]
    assert any(a.sliding_window == WINDOW // 2 + 1 for a in layers) and any(a.sliding_window is None for a in layers)
    features = _features(tokenizer)
    assert max(len(f["input_ids"]) for f in features) > 4 * WINDOW
    reference = _padded_batch(tokenizer, padded, features)
    batch = pack(features)
    with torch.no_grad():
        logits = padded(**{name: reference[name] for name in padded.input_names})
        assert _relative(packed_logits(packed, batch), logits) < 1e-5
        local = [a for a in layers if a.sliding_window is not None]
        for wrong in (None, WINDOW // 2, WINDOW // 2 + 2):  # the right value is WINDOW // 2 + 1
            for a in local:
                a.sliding_window = wrong
            assert _relative(packed_logits(packed, batch), logits) > 1e-3, wrong


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_fixed_shape_buckets_give_the_packed_rows_logits_loss_and_gradients(model_path, pooling):
    """train.cuda_graphs' rows: tokens padded to a bucket, empty review slots, padding cut into sequences of at most
    max_length, max_seqlen fixed. The reviews' logits, the loss and every gradient equal the tight packed row's."""
    import datasets

    from imdb_grad_accum.batching import PackedRows
    from imdb_grad_accum.packing import BUCKET

    tokenizer, _, packed = _models(model_path, pooling)
    features = _features(tokenizer)
    rows = datasets.Dataset.from_list([{k: f[k] for k in ("input_ids", "token_type_ids", "label") if k in f}
                                       for f in features])
    keys = [(i, w) for i, w in enumerate(LOSS_WEIGHTS)]
    tight = PackedRows(rows).__getitems__(keys)
    bucketed = PackedRows(rows, slots=7, max_length=64).__getitems__(keys)
    assert bucketed["input_ids"].shape == (1, BUCKET) and bucketed["max_seqlen"] == 64
    assert bucketed["cu_seqlens"].shape == (7 + 1 + 16,) and bucketed["num_reviews"] == 7
    assert bucketed["loss_weight"][4:].tolist() == [0.0] * 3
    results = []
    for batch in (tight, bucketed):
        packed.zero_grad(set_to_none=True)
        logits = packed_logits(packed, batch)
        loss = weighted_loss(logits, batch)
        loss.backward()
        results.append((logits[:len(features)], loss, {n: p.grad.clone() for n, p in packed.named_parameters()}))
    (logits, loss, grads), (b_logits, b_loss, b_grads) = results
    assert _relative(b_logits, logits) < 1e-6 and abs(b_loss.item() - loss.item()) < 1e-6 * loss.item()
    for name, g in grads.items():
        assert torch.allclose(b_grads[name], g, atol=1e-7, rtol=1e-5), name


@pytest.mark.slow
def test_compiled_bucketed_steps_use_one_graph_without_recompiling(tiny_modernbert):
    """Steps of changing review counts and lengths, in two token buckets, through the compiled packed model (mode
    reduce-overhead, whose CUDA graphs a CPU skips): one graph, no recompilation, no graph break."""
    import datasets
    import numpy as np
    import torch._dynamo

    from imdb_grad_accum.batching import PackedRows
    from imdb_grad_accum.model import compile_model

    tokenizer, model = _load(tiny_modernbert, "mean", PACKED)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_model(model, packed=True, cuda_graphs=True)
    rng = np.random.default_rng(0)
    ids = [[101] + rng.integers(1000, 20000, int(n)).tolist() + [102] for n in rng.integers(20, 120, 200)]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "label": [i % 2 for i in range(len(ids))]})
    data = PackedRows(rows, slots=24, max_length=128)
    shapes = set()
    model.train()
    for step in range(6):
        count = int(rng.integers(6, 25))
        batch = data.__getitems__([(int(i), 1 / count) for i in rng.choice(len(ids), count, replace=False)])
        shapes.add(batch["input_ids"].shape[1])
        torch.compiler.cudagraph_mark_step_begin()
        weighted_loss(model(**model_inputs(batch)), batch).backward()
    counters = torch._dynamo.utils.counters
    print(f"buckets {sorted(shapes)}: unique graphs {counters['stats']['unique_graphs']}, recompiles "
          f"{dict(counters['recompiles'])}, graph breaks {dict(counters['graph_break'])}")
    assert len(shapes) > 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"] and not counters["graph_break"]


def test_packed_model_still_runs_padded_batches(model_path):
    """Evaluation may keep padded batches on a PACKED model: padded rows, and unpadded rows longer than the window."""
    tokenizer, padded, packed = _models(model_path, "mean")
    padded.eval(), packed.eval()
    features = _features(tokenizer)
    for rows in (features, features[-1:]):
        batch = _padded_batch(tokenizer, padded, rows)
        inputs = {name: batch[name] for name in padded.input_names}
        with torch.no_grad():
            torch.testing.assert_close(packed(**inputs), padded(**inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("script", [pytest.param("exp_1", marks=pytest.mark.slow), "exp_2"])
def test_training_on_packed_micro_batches_ends_like_training_on_padded_ones(script, tmp_path, tiny_bert, reviews_dir):
    """train.packing=true changes how a micro-batch is laid out, not what is learned (fp32, dropout 0)."""
    import json

    from safetensors.torch import load_file

    from conftest import tiny_config
    from exp_1 import main as exp1
    from exp_2 import main as exp2

    config = tiny_config(tmp_path, tiny_bert, reviews_dir)
    main, extra = (exp1.main, []) if script == "exp_1" else (exp2.main, ["train.batch_size=4", "train.grad_accum_steps=2"])
    padded = main(["--config", str(config), "name=padded", "train.packing=false", *extra])
    packed = main(["--config", str(config), "name=packed", "train.packing=true", *extra])
    assert json.loads((tmp_path / "runs" / "packed" / "metrics.json").read_text())["packed"] is True
    assert packed["test_accuracy"] == padded["test_accuracy"]
    assert packed["test_loss"] == pytest.approx(padded["test_loss"], rel=1e-4)
    weights = [load_file(tmp_path / "runs" / name / "checkpoints" / "last.safetensors") for name in ("padded", "packed")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4
