"""Padding-free micro-batches: a micro-batch's reviews in one row, attention kept within each review (PACKED)."""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from imdb_grad_accum.errors import UserError

PACKED = "packed_varlen"
BUCKET = 1024  # train.cuda_graphs pads packed rows to a multiple: few shapes (CUDA graphs), ~6% padding at batch 32


def select(batch: dict, first: int, stop: int) -> dict:
    """Reviews first..stop-1 of a packed batch, as a packed batch of their own."""
    cu = batch["cu_seqlens"]
    start, end = int(cu[first]), int(cu[stop])
    part = {**batch, "cu_seqlens": cu[first:stop + 1] - start, "num_tokens": end - start}
    part["max_seqlen"] = int(part["cu_seqlens"].diff().max())
    for name in set(batch) & {"input_ids", "position_ids", "token_type_ids"}:
        part[name] = batch[name][:, start:end]
    for name in set(batch) & {"labels", "loss_weight"}:
        part[name] = batch[name][first:stop]
    return part


def packed_logits(classifier, batch: dict) -> torch.Tensor:
    """Logits of a packed batch, one per review slot; a bucketed row's empty slots and padding get loss weight 0."""
    total = batch["input_ids"].shape[1]
    cu, max_len = batch["cu_seqlens"], batch["max_seqlen"]
    takes_types = classifier.takes_token_type_ids and "token_type_ids" in batch
    extra = {"token_type_ids": batch["token_type_ids"]} if takes_types else {}
    # no attention_mask: nothing is padded within a review, and the PACKED mask builder then builds no mask at all
    hidden = classifier.encoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=cu,
                                cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len,
                                **extra).last_hidden_state[0]
    n = batch.get("num_reviews") or cu.shape[0] - 1
    reviews = cu[:n + 1]
    starts = reviews.long()
    if classifier.head.pooling == "cls":
        pooled = hidden[starts[:-1].clamp(max=total - 1)]  # an empty slot past the last token: weight 0 anyway
    else:  # segment mean; tokens after the last review (padding) fall in segment n and are dropped
        segment = segment_ids(reviews, total)
        sums = hidden.new_zeros(n + 1, hidden.shape[-1]).index_add_(0, segment, hidden)[:n]
        pooled = sums / (starts[1:] - starts[:-1]).clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    return classifier.head.classify(pooled)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's review number, by a cumsum of boundary marks (compile's searchsorted fails on a sliced tensor)."""
    marks = torch.zeros(total + 1, dtype=torch.int64, device=cu_seqlens.device)
    marks.index_add_(0, cu_seqlens[1:].long(), torch.ones_like(cu_seqlens[1:], dtype=torch.int64))
    return marks.cumsum(0)[:total]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Each sequence of `cu_seq_lens_q` attends only within itself; `sliding_window` is ModernBERT's half window + 1."""
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
        # the flash varlen kernel (CUDA only: varlen_attn raises on a CPU); bench/gpu_check.py compares it with SDPA
        from torch.nn.attention.varlen import varlen_attn

        if dropout > 0:
            raise ValueError("varlen_attn has no attention dropout; set model.attention_dropout=0 to train packed")
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=(half, half))
    else:
        out = _reference_attention(q, k, v, cu_seq_lens_q, scaling, dropout, half)
    return out.reshape(batch, length, heads, head_dim), None


def _reference_attention(q, k, v, cu_seqlens, scaling, dropout, half_window):
    """SDPA over all tokens with a block-diagonal mask, within `half_window` positions when not -1."""
    positions = torch.arange(q.shape[0], device=q.device)
    segment = segment_ids(cu_seqlens, q.shape[0])
    allowed = segment[:, None] == segment[None, :]
    if half_window >= 0:
        allowed &= (positions[:, None] - positions[None, :]).abs() <= half_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(0, 1)


def _packed_mask(*args, attention_mask=None, **kwargs):
    """SDPA's mask for padded batches; none for packed rows, whose attention masks per sequence."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packing(cfg, device: torch.device, precision: str) -> bool:
    """train.packing=auto packs where the flash varlen kernel runs and was measured faster (docs/performance.md)."""
    setting, model = cfg.train.packing.lower(), cfg.model
    if setting == "true" and device.type == "cuda" and (model.attention_dropout or 0) > 0:
        raise UserError("train.packing=true on a GPU needs model.attention_dropout=0: the flash varlen kernel has no "
                        "attention dropout")
    packed = setting == "true" or (setting == "auto" and device.type == "cuda" and precision in ("bf16", "fp16")
                                   and model.attention_dropout == 0 and not model.attn_implementation)
    if cfg.train.cuda_graphs and not packed:
        raise UserError("train.cuda_graphs replays compiled packed steps: it needs packed rows (train.packing=true, or "
                        "auto on a GPU in bf16/fp16 with model.attention_dropout=0)")
    return packed


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, _packed_mask)
