"""The packed path on a GPU: flash varlen attention against the padded path, and torch.compile on packed rows.

    python bench/gpu_check.py --tokenizer /path/to/a/bert/tokenizer

For a small random BERT and a small random ModernBERT (reviews longer than its sliding window, so its local layers
are exercised), one packed micro-batch through PACKED attention (flash varlen in bf16 on CUDA) is compared with the
same reviews padded through SDPA: logits, loss and every parameter's gradient, in bf16 autocast (so both sides round
alike) and against the fp32 padded reference. The fixed-shape rows of train.cuda_graphs (tokens padded to a bucket,
empty review slots) are compared with the tight packed row the same way. Then the packed model is compiled and
trained on packed rows of changing length and review count, counting how often it compiled, and compiled with CUDA
graphs (mode reduce-overhead) over bucketed rows, timing a replayed step against the compiled one. Prints one line
per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf
from transformers import AutoModel, AutoTokenizer, BertConfig, ModernBertConfig

from imdb_grad_accum.model import compile_model, load_model, model_inputs
from imdb_grad_accum.schema import Config
from imdb_grad_accum.training import weighted_loss
from imdb_grad_accum.packing import BUCKET, PACKED

BF16_TOLERANCE = 3e-2  # relative error of bf16 operands: between 1e-3 and 1e-2 per op, a few layers deep


def small_model(kind: str, tokenizer) -> str:
    folder = tempfile.mkdtemp(prefix=f"{kind}-")
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if kind == "bert":
        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, **ids)
    else:  # local window 64: the reviews below (up to 256 tokens) reach well past it
        config = ModernBertConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                                  local_attention=64, global_attn_every_n_layers=3, cls_token_id=tokenizer.cls_token_id,
                                  sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                                  eos_token_id=tokenizer.sep_token_id, **ids)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    with torch.no_grad():  # sharper attention than a fresh init's near-uniform one, so attention errors show
        for name, p in model.named_parameters():
            if name.endswith(("Wqkv.weight", "query.weight", "key.weight")):
                p.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(path: str, attention: str | None):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": {
        "name": path, "pooling": "mean", "dropout": 0.0, "encoder_dropout": 0.0, "attention_dropout": 0.0,
        "attn_implementation": attention}})
    return load_model(cfg)


def features(tokenizer, lengths: list[int], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = [tokenizer.cls_token_id] + torch.randint(1000, 20000, (n - 2,), generator=g).tolist() + [tokenizer.sep_token_id]
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "label": i % 2, "loss_weight": 1 / len(lengths)})
    return rows


def pack(rows: list[dict], slots: int | None = None, max_length: int = 512) -> dict:
    """These reviews as one packed row, as the training loader builds it (imdb_grad_accum.batching.PackedRows); with `slots`, the
    fixed-shape row of train.cuda_graphs."""
    import datasets

    from imdb_grad_accum.batching import PackedRows

    data = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "label": r["label"]} for r in rows])
    return PackedRows(data, slots, max_length).__getitems__([(i, r["loss_weight"]) for i, r in enumerate(rows)])


def run(model, batch, device, precision):
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    inputs = model_inputs(batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(**inputs)
    loss = weighted_loss(logits, batch)
    loss.backward()
    return logits.float(), loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                   if p.grad is not None}


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def compare(name: str, path: str, device) -> bool:
    tokenizer, padded = load(path, "sdpa")
    _, packed = load(path, PACKED)
    packed.load_state_dict(padded.state_dict())
    padded.to(device).train()
    packed.to(device).train()
    rows = features(tokenizer, [256, 17, 130, 64, 200, 3], seed=1)
    padded_batch = {**tokenizer.pad([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                                    return_tensors="pt"),
                    "labels": torch.tensor([r["label"] for r in rows]),
                    "loss_weight": torch.tensor([r["loss_weight"] for r in rows])}
    packed_batch = pack([{k: v for k, v in r.items() if k != "attention_mask"} for r in rows])
    reference = run(padded, padded_batch, device, "fp32")
    ok = True
    for precision in ("bf16",):
        ours = run(packed, packed_batch, device, precision)
        theirs = run(padded, padded_batch, device, precision)
        for label, (a, b) in {"logits": (ours[0], theirs[0]), "loss": (ours[1], theirs[1])}.items():
            error, error_ref = relative(a, b), relative(a, reference[{"logits": 0, "loss": 1}[label]])
            good = error < BF16_TOLERANCE
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {name} {label}: packed flash vs padded sdpa (bf16) {error:.2e}; "
                  f"vs padded fp32 {error_ref:.2e}; padded bf16 vs fp32 {relative(b, reference[0 if label == 'logits' else 1]):.2e}")
        # all gradients as one vector, and the worst parameter among those with a real gradient (a key bias gets
        # none: softmax ignores a constant added to every score, so its gradient is rounding noise)
        names = sorted(theirs[2])
        flat = [torch.cat([grads[2][n].flatten() for n in names]) for grads in (ours, theirs, reference)]
        scale = max(reference[2][n].norm().item() for n in names)
        real = [n for n in names if reference[2][n].norm().item() > 1e-3 * scale]
        worst = max((relative(ours[2][n], theirs[2][n]), n) for n in real)
        worst_padded = max(relative(theirs[2][n], reference[2][n]) for n in real)
        good = relative(flat[0], flat[1]) < BF16_TOLERANCE and worst[0] < max(3 * worst_padded, BF16_TOLERANCE)
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name} gradients: all packed vs padded (bf16) {relative(flat[0], flat[1]):.2e}, "
              f"padded bf16 vs fp32 {relative(flat[1], flat[2]):.2e}; worst parameter packed vs padded {worst[0]:.2e} "
              f"({worst[1]}), padded bf16 vs fp32 {worst_padded:.2e}")
    if device.type != "cuda":  # a dry run: the reference attention would build the mask this check rules out
        return ok
    # the kernel really is the flash varlen one: a packed row through it must not build a tokens x tokens mask
    torch.cuda.reset_peak_memory_stats()
    big = pack([{k: v for k, v in r.items() if k != "attention_mask"} for r in features(tokenizer, [512] * 64, seed=2)])
    run(packed, big, device, "bf16")
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    good = peak_gb < 8  # a 32k x 32k boolean mask alone would take 1 GiB per head-less copy, attention scores far more
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} {name} 32,768-token packed row: peak memory {peak_gb:.2f} GiB")
    return ok


def buckets(name: str, path: str, device) -> bool:
    """train.cuda_graphs' fixed-shape row (tokens padded to a multiple of BUCKET, 4 empty review slots, the padding
    cut into sequences of at most max_length) against the tight packed row, both through the flash kernel in bf16:
    the reviews' logits, the loss and every gradient."""
    tokenizer, model = load(path, PACKED)
    model.to(device).train()
    rows = [{k: v for k, v in r.items() if k != "attention_mask"}
            for r in features(tokenizer, [256, 17, 130, 64, 200, 3], seed=1)]
    tight, bucketed = pack(rows), pack(rows, slots=len(rows) + 4, max_length=512)
    ours, theirs = run(model, bucketed, device, "bf16"), run(model, tight, device, "bf16")
    names = sorted(theirs[2])
    errors = {"logits": relative(ours[0][:len(rows)], theirs[0]), "loss": relative(ours[1], theirs[1]),
              "gradients": relative(torch.cat([ours[2][n].flatten() for n in names]),
                                    torch.cat([theirs[2][n].flatten() for n in names]))}
    good = max(errors.values()) < BF16_TOLERANCE and bucketed["input_ids"].shape[1] % BUCKET == 0
    print(f"{'ok  ' if good else 'FAIL'} {name} bucketed row ({bucketed['input_ids'].shape[1]} tokens for "
          f"{tight['input_ids'].shape[1]}) vs tight packed row (bf16): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return good


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_packed(path: str, device, graphs: bool = False) -> bool:
    """Train a compiled packed model on rows of changing length and review count; count compilations and time the
    steps after the first three. With `graphs`, compiled with CUDA graphs (mode reduce-overhead) on train.cuda_graphs'
    bucketed rows, each step begun with cudagraph_mark_step_begin as the training loops do."""
    import statistics

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tokenizer, model = load(path, PACKED)
    _, eager = load(path, PACKED)
    eager.load_state_dict(model.state_dict())  # the head is initialised afresh at each load
    model.to(device).train()
    eager.to(device).train()
    compile_model(model, packed=True, cuda_graphs=graphs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    longest = 512 if device.type == "cuda" else 64
    started = time.perf_counter()
    ok, times, shapes = True, [], set()
    for step in range(12):
        g = torch.Generator().manual_seed(step)
        lengths = torch.randint(3, longest, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
        rows = features(tokenizer, lengths, seed=step)
        batch = pack(rows, slots=40, max_length=longest) if graphs else pack(rows)
        shapes.add(batch["input_ids"].shape[1])
        sync(device)
        t = time.perf_counter()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, loss, grads = run(model, batch, device, "bf16")
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - t)
        if step == 0:
            first = time.perf_counter() - started
            reference = run(eager, batch, device, "bf16")
            errors = [relative(logits[:len(rows)], reference[0][:len(rows)]),
                      relative(torch.cat([grads[n].flatten() for n in sorted(grads)]),
                               torch.cat([reference[2][n].flatten() for n in sorted(grads)]))]
            ok = max(errors) < BF16_TOLERANCE
            print(f"{'ok  ' if ok else 'FAIL'} compiled packed{' + CUDA graphs' if graphs else ''} vs eager packed, "
                  f"first step: logits {errors[0]:.2e}, gradients {errors[1]:.2e}")
    counters = torch._dynamo.utils.counters
    frames = counters["stats"]["unique_graphs"]
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    breaks = dict(counters["graph_break"])
    good = recompiles <= 1 and ok
    print(f"{'ok  ' if recompiles <= 1 else 'FAIL'} compiled packed training{' with CUDA graphs' if graphs else ''}, "
          f"12 steps of changing shape ({len(shapes)} token shapes): {frames} graphs, {recompiles} recompilations, "
          f"first step {first:.1f} s, median later step {1e3 * statistics.median(times[3:]):.1f} ms; "
          f"graph breaks: {breaks or 'none'}")
    return good


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a folder with a BERT-style tokenizer, or a model this project "
                   "resolves (sentence-transformers/all-MiniLM-L6-v2 comes from its package)")
    p.add_argument("--compile-only", action="store_true", help="only the torch.compile check")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (reference attention)")
    args = p.parse_args()
    device = torch.device(args.device)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    from imdb_grad_accum.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    ok = True
    paths = {kind: small_model(kind, tokenizer) for kind in ("bert", "modernbert")}
    for kind, path in paths.items():
        if args.compile_only:
            break
        try:
            ok &= compare(kind, path, device)
            ok &= buckets(kind, path, device)
        except Exception as err:  # report and go on to the next check
            ok = False
            print(f"FAIL {kind}: {type(err).__name__}: {err}")
    for graphs in (False, True):
        try:
            ok &= compiled_packed(paths["modernbert"], device, graphs)
        except Exception as err:
            ok = False
            print(f"FAIL compiled packed training{' with CUDA graphs' if graphs else ''}: {type(err).__name__}: "
                  f"{str(err)[:2000]}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
