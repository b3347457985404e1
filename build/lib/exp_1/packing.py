"""Padding-free micro-batches: a micro-batch's reviews concatenated into one row, attention kept within each review.

`pack` builds the row (per-review position ids, `cu_seqlens` boundaries, optional tail padding to a fixed token
budget); `packed_logits` runs a SentimentClassifier on it. The encoder must use the attention implementation
registered here, PACKED (`enable_packed_attention(encoder)`, or `attn_implementation=PACKED` when loading): on CUDA in
fp16/bf16 it calls the flash varlen kernel, elsewhere a block-diagonal SDPA reference. A model switched to it still
runs ordinary padded batches exactly as SDPA does, so evaluation and prediction need not pack.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED = "packed_varlen"


def pack(features: list[dict], budget: int | None = None) -> dict:
    """One row of all reviews' tokens (as tokenised, special tokens included), padded at the end to `budget` tokens
    when given. `cu_seqlens` (int32, n+1) bounds the reviews only; tokens past `num_tokens` are padding."""
    lengths = [len(f["input_ids"]) for f in features]
    num_tokens = sum(lengths)
    if budget is not None and num_tokens > budget:
        raise ValueError(f"{len(features)} reviews of {num_tokens} tokens do not fit a budget of {budget} tokens")
    pad = (budget or num_tokens) - num_tokens

    def row(values) -> torch.Tensor:  # padding takes id 0 and position 0: it only ever attends to itself
        return torch.tensor([list(itertools.chain(*values)) + [0] * pad])

    batch = {
        "input_ids": row(f["input_ids"] for f in features),
        "position_ids": row(range(n) for n in lengths),
        "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        "max_seqlen": max(lengths),
        "num_tokens": num_tokens,
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = row(f["token_type_ids"] for f in features)
    if "labels" in features[0] or "label" in features[0]:  # raw dataset rows say `label`, like the padding collator
        batch["labels"] = torch.tensor([f.get("labels", f.get("label")) for f in features])
    if "loss_weight" in features[0]:
        batch["loss_weight"] = torch.tensor([f["loss_weight"] for f in features], dtype=torch.float32)
    return batch


def select(batch: dict, first: int, stop: int) -> dict:
    """Reviews first..stop-1 of a packed batch (without tail padding), as a packed batch of their own."""
    cu = batch["cu_seqlens"]
    start, end = int(cu[first]), int(cu[stop])
    part = {**batch, "cu_seqlens": cu[first:stop + 1] - start, "num_tokens": end - start}
    part["max_seqlen"] = int(part["cu_seqlens"].diff().max())
    for name in ("input_ids", "position_ids", "token_type_ids"):
        if name in batch:
            part[name] = batch[name][:, start:end]
    for name in ("labels", "loss_weight"):
        if name in batch:
            part[name] = batch[name][first:stop]
    return part


def packed_logits(classifier, batch: dict) -> torch.Tensor:
    """Logits (n reviews, labels) of a packed batch, pooled per review like SentimentClassifier.forward pools rows."""
    input_ids = batch["input_ids"]
    total = input_ids.shape[1]
    cu, max_len = batch["cu_seqlens"], batch["max_seqlen"]
    if total > batch["num_tokens"]:  # the tail padding becomes a sequence of its own, so every token has a segment
        cu = F.pad(cu, (0, 1), value=total)
        max_len = max(max_len, total - batch["num_tokens"])
    takes_types = classifier.takes_token_type_ids and "token_type_ids" in batch
    extra = {"token_type_ids": batch["token_type_ids"]} if takes_types else {}
    # no attention_mask: nothing is padded within a review, and the PACKED mask builder then builds no mask at all
    hidden = classifier.encoder(input_ids=input_ids, position_ids=batch["position_ids"], cu_seq_lens_q=cu,
                                cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len,
                                **extra).last_hidden_state[0]
    starts = batch["cu_seqlens"].long()
    n = starts.shape[0] - 1
    if classifier.pooling == "cls":
        pooled = hidden[starts[:-1]]
    else:  # segment mean; padding tokens fall in segment n and are dropped
        segment = segment_ids(batch["cu_seqlens"], total)
        sums = hidden.new_zeros(n + 1, hidden.shape[-1]).index_add_(0, segment, hidden)[:n]
        pooled = sums / (starts[1:] - starts[:-1]).unsqueeze(-1).to(hidden.dtype)
    return classifier.head(classifier.dropout(pooled))


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each of `total` tokens' review number (tokens past the last boundary: the number of reviews). Counted by a
    cumulative sum of boundary marks, which torch.compile handles for any length (its searchsorted lowering fails on
    a sliced boundary tensor)."""
    marks = torch.zeros(total + 1, dtype=torch.int64, device=cu_seqlens.device)
    marks.index_add_(0, cu_seqlens[1:].long(), torch.ones_like(cu_seqlens[1:], dtype=torch.int64))
    return marks.cumsum(0)[:total]


def enable_packed_attention(encoder) -> None:
    """Switch a loaded HF encoder to PACKED attention (in place)."""
    encoder.set_attn_implementation(PACKED)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """The AttentionInterface function (query/key/value: batch, heads, tokens, head_dim). With `cu_seq_lens_q`, each
    sequence of the flattened tokens attends only within itself; `sliding_window` is ModernBERT's flash-style value,
    half window + 1, so a token sees the tokens at most `sliding_window - 1` positions away."""
    if cu_seq_lens_q is None:
        if attention_mask is not None:  # an ordinary padded batch
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        # unpadded rows without boundaries: each row is one sequence (sliding windows still apply)
        rows, length = query.shape[0], query.shape[2]
        cu_seq_lens_q = torch.arange(0, (rows + 1) * length, length, dtype=torch.int32, device=query.device)
        max_length_q = length
    batch, heads, length, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, head_dim) for t in (query, key, value))
    half = -1 if sliding_window is None else sliding_window - 1
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        # flash varlen kernel; UNTESTED on CPU-only machines (varlen_attn raises there), check on a GPU
        from torch.nn.attention.varlen import varlen_attn

        if dropout > 0:
            raise ValueError("varlen_attn has no attention dropout; set model.attention_dropout=0 to train packed")
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=(half, half))
    else:
        out = _reference_attention(q, k, v, cu_seq_lens_q, scaling, dropout, half)
    return out.reshape(batch, length, heads, head_dim), None


def _reference_attention(q, k, v, cu_seqlens, scaling, dropout, half_window):
    """SDPA over all tokens (tokens, heads, head_dim) with a block-diagonal mask: same sequence, and within
    `half_window` positions (both sides, inclusive) when not -1, like ModernBERT's padded sliding-window mask."""
    positions = torch.arange(q.shape[0], device=q.device)
    segment = segment_ids(cu_seqlens, q.shape[0])
    allowed = segment[:, None] == segment[None, :]
    if half_window >= 0:
        allowed &= (positions[:, None] - positions[None, :]).abs() <= half_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(0, 1)


def _packed_mask(*args, attention_mask=None, **kwargs):
    """Mask builder for PACKED: SDPA's for padded batches; none for packed rows, whose attention masks per sequence."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, _packed_mask)
