#!/usr/bin/env bash
# gpu_check.sh -- the whole GPU check of minisd's CUDA kernels. Run it from anywhere on a machine with an NVIDIA GPU,
# CuPy (pip install cupy-cuda13x) and compute-sanitizer (CUDA toolkit, or pip install nvidia-cuda-sanitizer-api):
#
#     bash scripts/gpu_check.sh            # everything (~5-10 minutes on an H100)
#     PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#
# Steps (logs in $GPU_CHECK_OUT, default ./gpu_check_out/):
#   env         nvidia-smi, CuPy / NVRTC / driver versions
#   gate        python -m minisd.cuda.gate (NVRTC compile gate, sm_80 + sm_90, resource baseline)
#   cpu-tests   the emulator test suite (what CI runs without a GPU)
#   gpu-tests   tests/test_cuda_kernels.py, test_cuda_conv.py, test_cuda_attention.py, test_cuda_unet.py and
#               test_cuda_emulator.py on real CuPy (-m gpu): every kernel version against PyTorch float64 with
#               NaN-filled outputs; the tiny U-Net / VAE / CLIP with every array on the GPU against the NumPy models;
#               the warp-intrinsic semantics against the Python PTX model (confirms the emulator's warp model)
#   memcheck    compute-sanitizer --tool memcheck on small cases of every op (out-of-bounds / misaligned accesses)
#   racecheck   compute-sanitizer --tool racecheck on the same cases (shared-memory hazards)
#   synccheck, initcheck   the same, informational (racecheck/synccheck were refused on some H200s: prefer an H100)
#   fixtures    the bug fixtures of kernels/bugs/ under compute-sanitizer: the OOB write must be reported by
#               memcheck, the missing __syncthreads by racecheck; the divergent barrier is run under synccheck and
#               its outcome recorded (informational: what the hardware does there is undefined)
#   bench       benchmarks/gpu.py --all-versions (timings against torch when torch has CUDA, and plain CuPy):
#               conv forward/backward as % of cuDNN, attention as % of SDPA, the SD 1.5 U-Net step and training step
#               vs diffusers (needs diffusers and a CUDA build of torch for the torch columns)
# Results for the lead: $OUT/summary.md (the step summary and the benchmark table, ready to paste); every step's log
# in $OUT/<step>.log.
# Exit status: 0 when every required step passed, 1 otherwise; the summary at the end lists each step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
mkdir -p "$OUT"
export MINISD_CUDA_POISON=1  # kernel outputs start as NaN: "finite" in the tests means "written"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the `kernels` package, also for processes under the sanitizer
summary=()
failed=0

# step NAME REQUIRED(1/0) COMMAND...: run, log to $OUT/NAME.log, record the outcome
step() {
    local name=$1 required=$2
    shift 2
    echo "=== $name: $*"
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        summary+=("ok      $name")
    elif [ "$required" = 1 ]; then
        summary+=("FAILED  $name (see $OUT/$name.log)")
        failed=1
    else
        summary+=("note    $name exited non-zero (informational; see $OUT/$name.log)")
    fi
}

SAN=$(command -v compute-sanitizer || true)
if [ -z "$SAN" ]; then  # the pip wheel nvidia-cuda-sanitizer-api puts it under site-packages/nvidia/cu*/bin
    SAN=$(find "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia" \
        -name compute-sanitizer -type f 2>/dev/null | head -n 1)
fi

step env 1 bash -c "nvidia-smi && $PY -c 'import cupy; from cupy.cuda import nvrtc, runtime
print(\"CuPy\", cupy.__version__, \"NVRTC\", nvrtc.getVersion(), \"driver\", runtime.driverGetVersion(),
      \"device\", runtime.getDeviceProperties(0)[\"name\"].decode())' && echo compute-sanitizer: ${SAN:-not found}"
step gate 1 "$PY" -m minisd.cuda.gate
CUDA_TESTS="tests/test_cuda_kernels.py tests/test_cuda_conv.py tests/test_cuda_attention.py tests/test_cuda_unet.py"
step cpu-tests 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_gate.py tests/test_cuda_emulator.py \
    $CUDA_TESTS -m "not gpu"
step gpu-tests 1 "$PY" -m pytest -q -p no:cacheprovider -m gpu $CUDA_TESTS tests/test_cuda_emulator.py

# small cases of every op and every version (test ids contain the shapes): norms, softmax, GEGLU; conv (3x3
# ragged, the VAE's stride-2 asymmetric padding, 1x1); attention (d = 40, cross with odd d, causal d = 64)
SMALL="gpu and (3x6x7x5 or 3x5x33 or 3x1000 or 3x5x31 or 3x5x74 or 1x5x7x11_w13 or 3x5x7x11_w13 or 3x13x7x11 \
or N1_L5_S5_h1_d40 or N3_L70_S77_h3_d13 or N2_L37_S37_h2_d64_causal)"
SMALL_TESTS="tests/test_cuda_kernels.py tests/test_cuda_conv.py tests/test_cuda_attention.py"
if [ -n "$SAN" ]; then
    for tool in memcheck racecheck; do
        step "$tool" 1 "$SAN" --tool "$tool" --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
            $SMALL_TESTS -k "$SMALL"
    done
    for tool in synccheck initcheck; do
        step "$tool" 0 "$SAN" --tool "$tool" --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
            $SMALL_TESTS -k "$SMALL"
    done

    # The bug fixtures on the hardware. CuPy's memory pool is switched off so that each array is its own
    # cudaMalloc and an access one element past its end is outside any allocation memcheck knows.
    cat > "$OUT/fixture.py" <<'EOF'
import sys
import cupy
import numpy as np
from minisd.cuda import sources as kernels
cupy.cuda.set_allocator(None)
name, kernel = sys.argv[1], sys.argv[2]
mod = cupy.RawModule(code=kernels.source("bugs/" + name), options=kernels.NVRTC_OPTIONS)
k = mod.get_function(kernel)
if name == "oob_write":          # n = 1024 floats = 4096 bytes: y[1024] is just past the allocation
    x, y = cupy.ones(1024, cupy.float32), cupy.zeros(1024, cupy.float32)
    k((5,), (256,), (x, y, np.float32(2), np.int32(1024)))
elif name == "missing_sync":     # 4 warps per row: the shared partials are overwritten while being read
    x = cupy.random.standard_normal((64, 4096), dtype=cupy.float32)
    mean, var = cupy.zeros(64, cupy.float32), cupy.zeros(64, cupy.float32)
    k((64,), (128,), (x, mean, var, np.int32(4096)))
    print("max |mean error|", float(abs(mean - x.mean(1)).max()), "max |var error|", float(abs(var - x.var(1)).max()))
elif name == "divergent_barrier":
    x, y = cupy.arange(1000, dtype=cupy.float32), cupy.zeros(1000, cupy.float32)
    k((4,), (256,), (x, y, np.int32(1000)))
cupy.cuda.runtime.deviceSynchronize()
print("fixture", name, kernel, "finished")
EOF
    # expect_report NAME TOOL PATTERN ARGS...: the tool must exit with an error and its log must match PATTERN
    expect_report() {
        local name=$1 tool=$2 pattern=$3
        shift 3
        echo "=== $name: expecting '$pattern' from compute-sanitizer --tool $tool"
        timeout 300 "$SAN" --tool "$tool" --error-exitcode 99 "$PY" "$OUT/fixture.py" "$@" \
            > "$OUT/$name.log" 2>&1
        local rc=$?
        tail -n 25 "$OUT/$name.log"
        if [ $rc -ne 0 ] && grep -Eq "$pattern" "$OUT/$name.log"; then
            summary+=("ok      $name (reported, exit $rc)")
        else
            summary+=("FAILED  $name: expected '$pattern' and a non-zero exit, got exit $rc (see $OUT/$name.log)")
            failed=1
        fi
    }
    step fixture-clean 1 "$SAN" --tool memcheck --error-exitcode 99 "$PY" "$OUT/fixture.py" oob_write scale_rows_v1
    expect_report fixture-oob-memcheck memcheck "Invalid __global__ write" oob_write scale_rows_oob
    expect_report fixture-missing-sync-racecheck racecheck "[Hh]azard" missing_sync row_stats_nosync
    step fixture-divergent-synccheck 0 timeout 300 "$SAN" --tool synccheck --error-exitcode 99 \
        "$PY" "$OUT/fixture.py" divergent_barrier shift_left_divergent
else
    summary+=("FAILED  compute-sanitizer not found: install the CUDA toolkit or pip install nvidia-cuda-sanitizer-api")
    failed=1
fi

step bench 1 "$PY" benchmarks/gpu.py --all-versions --out "$OUT/bench.md"

echo
echo "=== summary (logs in $OUT/)"
printf '%s\n' "${summary[@]}"
{   # one file for the lead: the step outcomes, then the benchmark table (markdown)
    echo "# scripts/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo '```'
    printf '%s\n' "${summary[@]}"
    echo '```'
    echo
    cat "$OUT/bench.md" 2>/dev/null || echo "(no benchmark table: see $OUT/bench.log)"
} > "$OUT/summary.md"
echo "results for the lead: $OUT/summary.md"
exit $failed
