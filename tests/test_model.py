"""Model behaviour: pooling ignores padding, token_type_ids only where the encoder takes them, dropout overrides,
packaged weights without the hub."""

from pathlib import Path

import pytest
import torch

from imdb_grad_accum.errors import UserError
from conftest import model_config
from imdb_grad_accum.model import load_model, resolve_model_path


def _load(name, **overrides):
    return load_model(model_config(name, **overrides))


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert"])
def test_masked_mean_pooling_is_unchanged_by_extra_padding(fixture, request):
    tokenizer, model = _load(request.getfixturevalue(fixture), pooling="mean", dropout=0.0)
    model.eval()
    texts = ["a truly wonderful film", "dull"]
    short = tokenizer(texts, padding=True, return_tensors="pt")
    long = tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        a = model(short["input_ids"], short["attention_mask"])
        b = model(long["input_ids"], long["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_type_ids_reach_bert_only(tiny_bert, tiny_modernbert):
    _, bert = _load(tiny_bert)
    _, modernbert = _load(tiny_modernbert)
    assert bert.takes_token_type_ids and not modernbert.takes_token_type_ids
    # BERT really uses them: a different segment id changes its output
    bert.eval()
    ids = torch.tensor([[101, 2307, 3185, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert not torch.allclose(bert(ids, mask, torch.zeros_like(ids)), bert(ids, mask, torch.ones_like(ids)))


def _dropout_in_the_modules(model) -> set[float]:
    """The probabilities the encoder's modules apply: nn.Dropout layers, and ModernBERT's attention, which applies
    its own `attention_dropout` in the attention function."""
    found = {m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)}
    return found | {m.attention_dropout for m in model.encoder.modules() if isinstance(getattr(m, "attention_dropout",
                                                                                             None), float)}


def test_encoder_dropout_sets_every_dropout_the_encoder_applies(tiny_bert, tiny_modernbert):
    assert _dropout_in_the_modules(_load(tiny_bert, encoder_dropout=0.0)[1]) == {0.0}
    assert _dropout_in_the_modules(_load(tiny_modernbert, encoder_dropout=0.2)[1]) == {0.2}
    assert _dropout_in_the_modules(_load(tiny_bert)[1]) == {0.1}  # null keeps the checkpoint's


def test_minilm_resolves_to_the_packaged_copy():
    path = Path(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file()
    tokenizer, model = _load("sentence-transformers/all-MiniLM-L6-v2")
    assert model.encoder.config.hidden_size == 384 and tokenizer.is_fast


def test_unreachable_hub_model_is_a_user_error():
    with pytest.raises(UserError, match="model.name=no-such-org/no-such-model: cannot load it"):
        _load("no-such-org/no-such-model")


def test_attention_dropout_changes_only_attention(tiny_bert, tiny_modernbert):
    bert = _load(tiny_bert, attention_dropout=0.0)[1]
    attention = {m.dropout.p for m in bert.encoder.modules() if type(m).__name__.endswith("SelfAttention")}
    assert attention == {0.0} and 0.1 in _dropout_in_the_modules(bert)  # the hidden-state dropout stays
    modernbert = _load(tiny_modernbert, attention_dropout=0.3)[1]
    assert _dropout_in_the_modules(modernbert) == {0.0, 0.3}


def test_training_runs_with_the_encoder_dropout_on(tmp_path, tiny_bert, reviews_dir, monkeypatch):
    """from_pretrained hands the encoder back in eval mode; every training step must run it in train mode, so that
    its dropout (0.1, the checkpoint's) is on."""
    from conftest import tiny_config
    from exp_1 import main as exp1
    from imdb_grad_accum.training import Stepper

    modes = []
    real = Stepper.forward_backward

    def spy(self, batch):
        modes.append(all(m.training for m in self.model.modules()))
        return real(self, batch)

    monkeypatch.setattr(Stepper, "forward_backward", spy)
    exp1.main(["--config", str(tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 2},
                                           model={"encoder_dropout": None}))])
    assert len(modes) == 2 * 23 and all(modes)
