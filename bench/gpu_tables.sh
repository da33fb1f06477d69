#!/usr/bin/env bash
# The GPU engine's checks and tables in one go, on a machine with a CUDA GPU:
#
#     bash bench/gpu_tables.sh OUTDIR STAGE...     # e.g. tests step gemv served
#
# Each stage prints its numbers and keeps its log in OUTDIR. Stages:
#   tests   the engine tests that exercise the kernels on the GPU, CUDA graphs on
#           (kernels, paged engine; bf16 attention included, which CPU CI skips)
#   hftests the hf and vLLM engine test files (several minutes)
#   step    the decode step alone, Triton kernels, batches 1, 4, 64, 256, the three models
#   prof    one step's kernels at batch 1 (what a step spends, kernel by kernel)
#   gemv    the one-row products against cuBLAS
#   served  the 16-layer GQA model served, distinct prompts, concurrency 1, 64, 256
#   wide    the same with the 128k vocabulary, and the 24-layer MHA model
#   long    a 4,000-token uncached prompt's TTFT
#   ab      `served` against the segue source in $BASE (e.g. `git archive OLD segue | tar
#           -x -C base`), in one run
#
# Needs segue's dependencies importable (PYTHONPATH); nothing here fetches anything.
set -euo pipefail
out=${1:?usage: gpu_tables.sh OUTDIR STAGE...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
load=(--frontend-processes 4 --no-generate --dtypes bfloat16 --duration 8 --warmup 3
    --distinct-prompts)
served=(--hidden-size 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate-size 8192
    "${load[@]}")

run() {  # run NAME CMD...: the command's output on the terminal and in OUTDIR/NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
}

for stage in "$@"; do
    case $stage in
    tests) run tests "$py" -m pytest -q -p no:cacheprovider -m engine \
        tests/engines/test_kernels.py tests/engines/test_paged_engine.py ;;
    hftests) run hftests "$py" -m pytest -q -p no:cacheprovider -m engine \
        tests/engines/test_hf_engine.py tests/engines/test_vllm_engine.py ;;
    step) run step "$py" bench/engine_step.py --kernels triton --batches 1,4,64,256 ;;
    prof) run prof "$py" bench/engine_step.py --kernels triton --batches 1 --models 1b-gqa \
        --profile ;;
    gemv) run gemv "$py" bench/gemv.py ;;
    served) run served "$py" bench/engine_gpu.py "${served[@]}" --concurrency 1,64,256 ;;
    wide)
        run wide-128k "$py" bench/engine_gpu.py "${served[@]}" --vocab-size 128256 \
            --concurrency 1,256
        run wide-mha "$py" bench/engine_gpu.py --hidden-size 2048 --layers 24 --heads 16 \
            "${load[@]}" --concurrency 1,256
        ;;
    long) run long "$py" bench/engine_gpu.py "${served[@]}" --prompt-words 4000 \
        --context-length 8192 --concurrency 1 --max-tokens 16 ;;
    ab) run ab "$py" bench/engine_gpu.py "${served[@]}" --concurrency 1,64,256 \
        --baseline-tree "${BASE:?ab needs BASE=the baseline tree}" ;;
    *)
        echo "unknown stage: $stage" >&2
        exit 2
        ;;
    esac
done
