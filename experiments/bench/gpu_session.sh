#!/usr/bin/env bash
# All GPU benchmarks of issue 7 in one prepared session of under 10 minutes (one H100/H200), released sizes:
# Vicuna-7B and FlanT5-XL configurations with random weights, bf16 autocast, frozen towers in bf16.
#
#   bash experiments/bench/gpu_session.sh            # results in $OUT (the device tool) or experiments/results/gpu
#   PEAK_TFLOPS=989 PYTHON=.venv/bin/python bash experiments/bench/gpu_session.sh
#
# Needs torch (>= 2.11), transformers (>= 5.17), timm, safetensors, tokenizers: the GPU image has them. The package
# is used from src/ (PYTHONPATH), nothing is installed. Each job has its own time limit, most important first, so
# one slow compile cannot eat the session; a job that runs out leaves its log line and the others still run.
# PEAK_TFLOPS: the dense bf16 peak the utilisation is computed against (790 = what an 8192^3 bf16 matmul reaches
# on these cards, the figure issue 7 quotes).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
PEAK=${PEAK_TFLOPS:-790}
DEST=${OUT:-experiments/results/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$DEST/gpu_session.log"
STAMP=$(date -u +%Y-%m-%d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
"$PY" -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$LOG"

job() {  # job SECONDS NAME SCRIPT FLAGS...
    local limit=$1 name=$2 script=$3; shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $script $*" | tee -a "$LOG"
    if timeout "$limit" "$PY" "experiments/bench/$script" "$@" >"$DEST/$name-$STAMP.json" 2>>"$LOG"; then
        echo "== $name done in $((SECONDS - start))s" | tee -a "$LOG"
    else
        echo "== $name FAILED or timed out after $((SECONDS - start))s" | tee -a "$LOG"
    fi
}

# 1. Training, Vicuna-7B: ours vs transformers as it is and compiled, batch 8/16/32, FLOPs and utilisation.
job 230 train_throughput-released-llama-cuda train_throughput.py --size released --llm llama --device cuda \
    --batch-sizes 8,16,32 --compile --no-full-logits --warmup 3 --repeats 5 --peak-tflops "$PEAK"
# 2. Generation, Vicuna-7B: greedy (ours' lean loop, dynamic cache) and 5-beam search, batch 1/16/64.
job 130 generate_throughput-released-llama-cuda generate_throughput.py --size released --llm llama --device cuda \
    --batch-sizes 1,16,64 --beams 5 --warmup 1 --repeats 3
# 3. Training, FlanT5-XL, batch 8/16/32 (eager on both sides).
job 100 train_throughput-released-t5-cuda train_throughput.py --size released --llm t5 --device cuda \
    --batch-sizes 8,16,32 --no-full-logits --warmup 2 --repeats 5 --peak-tflops "$PEAK"
# 4. Greedy generation with static caches and compiled decode steps on both sides, batch 1/16.
job 130 generate_throughput-released-llama-cuda-static generate_throughput.py --size released --llm llama \
    --device cuda --batch-sizes 1,16 --beams 0 --static --warmup 1 --repeats 3
echo "== session done in ${SECONDS}s" | tee -a "$LOG"
