#!/usr/bin/env bash
# One GPU session for the packed path (README: Performance), most important first, inside a time budget:
# correctness of flash varlen against padded SDPA, then bench/train_throughput.py on ModernBERT-base and
# all-MiniLM-L6-v2 shapes (random weights), at exp_1's batch 32 and exp_2's effective batch 256.
#
#   bash bench/gpu_session.sh [seconds [stage ...]]    # default 480 s, all stages; a stage that would not fit the
#                                                      # seconds left is skipped and named
#
# Needs, in the repository root: .whl/ (wheels of what the GPU image lacks: datasets, dill, multiprocess, omegaconf,
# fsspec, and the transformers version the tests use), .gpu/imdb/plain_text/*.parquet (the IMDB parquet files) and
# .gpu/minilm/ (all-MiniLM-L6-v2's config and tokenizer, no weights). Writes logs and JSON figures to $OUT.
set -u
BUDGET=${1:-480}
ONLY=" ${*:2} "
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
started=$(date +%s)
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_target /tmp/site $(ls .whl/*.whl | grep -v transformers) && pip_target /tmp/transformers .whl/transformers-*.whl || exit 1
export PYTHONPATH=/tmp/transformers:/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG=$OUT/session.log
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
  python3 -c "import inspect, torch.nn.attention.varlen as v; print('varlen_attn', inspect.signature(v.varlen_attn))"
} 2>&1 | tee "$LOG"

stage() {  # stage NAME SECONDS_NEEDED COMMAND...: runs it if the budget still holds that many seconds
  local name=$1 need=$2 left=$((BUDGET - ($(date +%s) - started)))
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  if [ "$left" -lt "$need" ]; then echo "== SKIPPED $name: ${left}s left, needs ~${need}s" | tee -a "$LOG"; return; fi
  echo "== $name (${left}s left)" | tee -a "$LOG"
  local t=$(date +%s)
  "$@" 2>&1 | grep -v -E "Loading weights|Writing model|it/s\]$" | tee -a "$LOG"
  echo "== $name took $(( $(date +%s) - t ))s" | tee -a "$LOG"
}

BENCH="python3 bench/train_throughput.py --model .gpu/minilm --data .gpu/imdb --max-length 512 --warmup 3"
stage check 60 python3 bench/gpu_check.py --tokenizer .gpu/minilm
stage check_compile 40 python3 bench/gpu_check.py --tokenizer .gpu/minilm --compile-only
stage modernbert_b32 170 $BENCH --random-modernbert --batch-size 32 --steps 200 --json "$OUT/modernbert_b32.json" \
  --only "this project, packed" "this project, packed + compiled" "HF Trainer, same settings" "HF Trainer, padding-free"
stage modernbert_b256 130 $BENCH --random-modernbert --batch-size 256 --micro-batch 32 --steps 12 \
  --json "$OUT/modernbert_b256.json" --only "this project, packed + compiled" "HF Trainer, same settings"
stage minilm_b32 90 $BENCH --random-weights --batch-size 32 --steps 200 --json "$OUT/minilm_b32.json" \
  --only "this project, packed + compiled" "HF Trainer, same settings"
stage minilm_b256 70 $BENCH --random-weights --batch-size 256 --micro-batch 32 --steps 12 \
  --json "$OUT/minilm_b256.json" --only "this project, packed + compiled" "HF Trainer, same settings"
stage eager_b256 90 $BENCH --random-modernbert --batch-size 256 --micro-batch 32 --steps 12 \
  --json "$OUT/eager_b256.json" --only "this project, packed" "this project"
# the lowest transformers pyproject.toml allows: the image's own
stage check_image_transformers 50 env PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --tokenizer .gpu/minilm
echo "== done in $(( $(date +%s) - started ))s" | tee -a "$LOG"
