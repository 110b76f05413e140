#!/usr/bin/env bash
# The whole GPU check of issue 20 in one run: build the random-weight full-depth BLIP-2 OPT-2.7B
# artifact in the background, run the suite's CUDA tests and the embedded demo model's CPU/GPU caption
# parity while it builds, then benchmark lite against the fp16 reference on the GPU. Reports and logs
# go to OUT (at most 8 files, named after the GPU).
#
#   benchmarks/gpu_check.sh OUT          # everything (an H200: ~6.5 min build, ~1.5 min benchmark)
#   benchmarks/gpu_check.sh OUT build    # only start the build in the background, then return
#   benchmarks/gpu_check.sh OUT check    # the rest: tests, parity, then the benchmark once the build is done
#
# `build` needs no GPU runtime for ONNX (the export runs on ONNX Runtime's CPU provider), so it can
# start before onnxruntime-gpu is installed; `check` waits for a build that `build` started.
#
# Assumes installed, on a Linux machine with an NVIDIA GPU: python3 (or $PYTHON) with torch (CUDA),
# transformers 5, onnx, onnxscript, onnxruntime-gpu (CUDA provider; `build` alone also runs with the
# CPU onnxruntime), typer, pillow, safetensors, tokenizers, peft, numpy, matplotlib, psutil,
# nvidia-ml-py and pytest (the versions pyproject.toml asks for); nvidia-smi. Run it from the
# repository root (the package need not be installed). The full-depth build needs ~38 GiB of host
# memory and ~25 GiB of disk under $IDC_GPU_WORK; the benchmark ~9 GiB of GPU memory per process.
#
# Settings (environment):
#   PYTHON         the interpreter (python3)
#   IDC_GPU_WORK   build cache, logs and scratch (/tmp/idc-gpu-check); `build` and `check` must agree
#   BENCH_ARGS     what to benchmark (default below); e.g. add "--ort-symmetric --ort-block-size 64"
#                  and set ORT_FPA_INTB_GEMM=1 for ONNX Runtime's CUTLASS weight-only GEMM
#   NAME           stem of the report files (blip2-opt-2.7b-cuda-<gpu>)
#   DEMO_ARTIFACT  the parity check's model (the embedded demo; the check is skipped when absent)
#   PARITY_PAIRS   synthetic test pairs the parity check captions (200)
#   BUILD_WAIT_S   longest wait for the background build (1800)
#   DEVICE         where the benchmark and parity's second run go (cuda; "cpu" dry-runs this script
#                  on a machine without a GPU)
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT [all|build|check]}
PHASE=${2:-all}
PYTHON=${PYTHON:-python3}
WORK=${IDC_GPU_WORK:-/tmp/idc-gpu-check}
BENCH_ARGS=${BENCH_ARGS:---config blip2-opt-2.7b --encoder-precision int4 --decoders ort-int4-fp16}
DEMO_ARTIFACT=${DEMO_ARTIFACT:-idc_lite/models/default}
PARITY_PAIRS=${PARITY_PAIRS:-200}
BUILD_WAIT_S=${BUILD_WAIT_S:-1800}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
read -r -a bench_args <<<"$BENCH_ARGS"

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-check.log
say() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }

gpu_slug() {  # "NVIDIA H200" -> h200
    local name
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
    name=${name:-unknown-gpu}
    name=${name#NVIDIA }
    echo "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-' | sed 's/-*$//'
}

# The random model and its artifact, built and cached exactly as `python -m benchmarks BENCH_ARGS`
# would build them (same cache key), so that the benchmark later finds them.
build_now() {
    "$PYTHON" - "${bench_args[@]}" --cache-dir "$WORK/cache" --out "$WORK/prebuild" <<'EOF'
import logging
import sys

from benchmarks.__main__ import parser
from benchmarks.models import DEFAULT_DECODERS, random_subject
from idc_lite.tools.memory import config_path

args = parser().parse_args(sys.argv[1:])
if not (args.config or args.tiny):
    sys.exit("gpu_check.sh builds random models only: give --config or --tiny in BENCH_ARGS")
logging.basicConfig(level=logging.INFO, format="%(message)s")
(args.out / "logs").mkdir(parents=True, exist_ok=True)
subject = random_subject(None if args.tiny else config_path(args.config), args.cache_dir, args.out / "logs",
                         decoders=tuple(args.decoders or DEFAULT_DECODERS), depth_scale=args.depth_scale,
                         seed=args.seed, rebuild=args.rebuild, encoder_precision=args.encoder_precision,
                         ort_block_size=args.ort_block_size, ort_symmetric=args.ort_symmetric)
print("built", subject.artifact, subject.build)
EOF
}

start_build() {
    rm -f "$WORK/build.rc"
    say "build starts in the background (log: $WORK/build.log): $BENCH_ARGS"
    # A session of its own, so that the build outlives this shell when `build` returns.
    setsid bash "$SELF" "$WORK" _build >"$WORK/build.log" 2>&1 </dev/null &
    echo $! >"$WORK/build.pid"
}

wait_build() {
    local waited=0
    while [ ! -f "$WORK/build.rc" ]; do
        if [ ! -f "$WORK/build.pid" ]; then say "no build was started (run 'build' first, or 'all')"; return 1; fi
        if ! kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null && [ ! -f "$WORK/build.rc" ]; then
            say "the build process ended without an exit code"; return 1
        fi
        if [ "$waited" -ge "$BUILD_WAIT_S" ]; then say "the build is still running after ${waited}s"; return 1; fi
        sleep 5; waited=$((waited + 5))
    done
    say "build finished, exit code $(cat "$WORK/build.rc") (waited ${waited}s here)"
    [ "$(cat "$WORK/build.rc")" = 0 ]
}

versions() {
    say "machine and versions"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PYTHON" - <<'EOF'
import platform

import onnxruntime as ort
import torch
import transformers

print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| onnxruntime", ort.__version__, ort.__file__)
print("onnxruntime providers:", ort.get_available_providers())
EOF
    } 2>&1 | tee -a "$LOG"
}

cuda_tests() {
    say "the suite's CUDA tests"
    "$PYTHON" -m pytest -p no:cacheprovider -v -rfEs tests/test_ort_decoder.py -k cuda 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "CUDA tests: exit code $rc"
    return "$rc"
}

# The embedded demo model's captions on synthetic test pairs: ort-int4 on the CPU against $DEVICE.
parity() {
    if [ ! -f "$DEMO_ARTIFACT/manifest.json" ]; then
        say "demo parity skipped: no artifact at $DEMO_ARTIFACT"; return 0
    fi
    say "demo parity: $PARITY_PAIRS synthetic test pairs, ort-int4 on cpu and $DEVICE ($DEMO_ARTIFACT)"
    local pairs=$WORK/parity/pairs run device
    rm -rf "$WORK/parity" && mkdir -p "$WORK/parity"
    "$PYTHON" -m idc_lite synth "$pairs" --n "$PARITY_PAIRS" --split test >>"$LOG" 2>&1 || return 1
    for run in cpu gpu; do
        device=$([ $run = cpu ] && echo cpu || echo "$DEVICE")
        "$PYTHON" -m idc_lite -v eval "$pairs/test.jsonl" --model "$DEMO_ARTIFACT" --device "$device" \
            --decoder ort-int4 --no-meteor -o "$WORK/parity/$run.json" >"$WORK/parity/$run.log" 2>&1 \
            || { cat "$WORK/parity/$run.log" >>"$LOG"; return 1; }
    done
    "$PYTHON" - "$WORK/parity" "$DEVICE" "$OUT/demo-ort-int4-parity-cuda-$GPU.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import sys
from pathlib import Path

folder, device, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
reports = {run: json.loads((folder / f"{run}.json").read_text()) for run in ("cpu", "gpu")}
captions = {run: {(p := json.loads(line))["id"]: p.get("caption") for line in Path(r["predictions"]).read_text().splitlines()}
            for run, r in reports.items()}
same = sum(captions["gpu"].get(key) == caption for key, caption in captions["cpu"].items())
fell_back = "runs on the CPU, not" in (folder / "gpu.log").read_text()
result = {
    "artifact": reports["cpu"]["model"], "decoder": "ort-int4", "devices": {"cpu": "cpu", "gpu": device},
    "pairs": len(captions["cpu"]), "identical_captions": same, "identical_fraction": round(same / len(captions["cpu"]), 4),
    "cider_x100": {run: r["table_x100"]["overall"]["CIDEr"] if r["table_x100"]["overall"] else None
                   for run, r in reports.items()},
    "describe_s": {run: r["timing"]["describe_s"] for run, r in reports.items()},
    "gpu_session_fell_back_to_cpu": fell_back,
    "captions": captions,
}
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"demo parity: {same}/{len(captions['cpu'])} captions identical (cpu vs {device}), CIDEr x100 "
      f"{result['cider_x100']}, describe s {result['describe_s']}, fell back to the CPU: {fell_back}")
sys.exit(1 if fell_back else 0)
EOF
    return "${PIPESTATUS[0]}"
}

benchmark() {
    say "benchmark: python -m benchmarks $BENCH_ARGS --devices $DEVICE"
    rm -rf "$WORK/bench"
    "$PYTHON" -m benchmarks "${bench_args[@]}" --devices $DEVICE --cache-dir "$WORK/cache" --out "$WORK/bench" 2>&1 \
        | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "benchmark: exit code $rc"
    local ext
    for ext in json md png; do
        [ -f "$WORK/bench/results.$ext" ] && cp "$WORK/bench/results.$ext" "$OUT/$NAME.$ext"
    done
    return "$rc"
}

finish() {  # the build's and the benchmark's own logs, in one file
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d build.log prebuild/logs bench/logs parity/*.log 2>/dev/null) \
        2>/dev/null || true
}

GPU=$(gpu_slug)
NAME=${NAME:-$(echo "${bench_args[*]}" | sed -n 's/.*--config \([^ ]*\).*/\1/p' | sed 's#.*/##; s/\.json$//')}
NAME=${NAME:-tiny}-cuda-$GPU
[ -n "${ORT_FPA_INTB_GEMM:-}" ] && say "ORT_FPA_INTB_GEMM=$ORT_FPA_INTB_GEMM"

case $PHASE in
_build)  # start_build's background process: the exit code goes to $WORK/build.rc
    build_now
    echo $? >"$WORK/build.rc.tmp" && mv "$WORK/build.rc.tmp" "$WORK/build.rc"
    exit 0 ;;
build)
    start_build
    exit 0 ;;
check | all)
    [ "$PHASE" = all ] && start_build
    failed=()
    versions
    cuda_tests || failed+=(cuda-tests)
    parity || failed+=(parity)
    if wait_build; then
        benchmark || failed+=(benchmark)
    else
        failed+=(build); tail -n 40 "$WORK/build.log" | tee -a "$LOG"
    fi
    finish
    say "done; failed: ${failed[*]:-none}; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    [ ${#failed[@]} -eq 0 ] ;;
*)
    echo "unknown phase $PHASE (all, build or check)" >&2; exit 2 ;;
esac
