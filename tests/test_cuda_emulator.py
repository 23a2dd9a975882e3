"""The CUDA CPU emulator itself (kernels/emu/): intrinsic semantics, error detection, argument and launch checks,
the bug fixtures in kernels/bugs/, the sanitizer mode and the build cache.

The semantic tests run the kernels of kernels/emu/selftest.cu against small Python models of the PTX rules (written
here from the PTX ISA text, independently of cuda_emu.h). Both come from the same specification, so on a machine
without a GPU this is a consistency check; the same tests run on a real GPU (target "gpu", marker `gpu`,
scripts/gpu_check.sh), which is what confirms the model against the hardware.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minisd.cuda import sources as kernels
from minisd.cuda.emu import (EmuArgumentError, EmuBuildError, EmuError, EmuKernelError, EmuLaunchError, EmuRawModule,
                         asan_loaded)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="the CUDA emulator needs g++ (C++20)")


class Target:
    """selftest.cu on the emulator (NumPy arrays) or on a real GPU (CuPy arrays), with one calling convention."""

    def __init__(self, kind, **emu_kwargs):
        code = kernels.source("emu/selftest")
        self.kind = kind
        if kind == "emu":
            self.mod = EmuRawModule(code, name="kernels/emu/selftest.cu", **emu_kwargs)
            self.put, self.get = np.asarray, np.asarray
        else:
            import cupy
            self.mod = cupy.RawModule(code=code, options=kernels.NVRTC_OPTIONS)
            self.put, self.get = cupy.asarray, cupy.asnumpy

    def __call__(self, name, grid, block, args, shared_mem=0):
        self.mod.get_function(name)(grid, block, args, shared_mem=shared_mem)


@pytest.fixture(scope="module", params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def target(request):
    return Target(request.param)


@pytest.fixture(scope="module")
def emu():
    return Target("emu")


# ----------------------------------------------------------------------------------------------------------------
# Python model of the PTX rules (PTX ISA: shfl.sync, vote.sync)

def ptx_shfl_source(mode, lane, b, width):
    """The lane that `lane` reads in shfl.sync.<mode> with operand b and the c operand CUDA's __shfl*_sync builds
    from width: c = ((32 - width) << 8) | clamp, clamp = 0 for up, 31 otherwise. Only b's low 5 bits count."""
    bval = b & 0x1F
    segmask = (32 - width) & 0x1F
    cval = 0 if mode == "up" else 0x1F
    max_lane = (lane & segmask) | (cval & ~segmask & 0x1F)
    min_lane = lane & segmask
    if mode == "idx":
        j = min_lane | (bval & ~segmask & 0x1F)
        ok = j <= max_lane
    elif mode == "up":
        j = lane - bval
        ok = j >= max_lane
    elif mode == "down":
        j = lane + bval
        ok = j <= max_lane
    else:  # bfly
        j = lane ^ bval
        ok = j <= max_lane
    return j if ok else lane


@pytest.mark.parametrize("width", [2, 4, 8, 16, 32])
def test_shuffles_match_ptx_model(target, rng, width):
    vals = rng.integers(-1000, 1000, 32).astype(np.int32)
    mismatches = []
    for b in range(0, 34):  # 32 and 33: only the low 5 bits of the operand count
        out = target.put(np.zeros(5 * 32, np.int32))
        target("shfl_modes", (1,), (32,), (target.put(vals), out, np.int32(width), np.int32(b)))
        out = target.get(out).reshape(5, 32)
        for row, mode in enumerate(("idx", "up", "down", "bfly")):
            want = [vals[ptx_shfl_source(mode, lane, b, width)] for lane in range(32)]
            if list(out[row]) != want:
                mismatches.append((mode, b, list(out[row]), want))
        ballot = sum(1 << lane for lane in range(32) if vals[lane] & 1)
        assert np.uint32(out[4, 0].astype(np.int64) & 0xFFFFFFFF) == ballot
    assert not mismatches, mismatches[:3]


def test_shuffles_move_64_bit_values(target, rng):
    d = rng.standard_normal(32)
    q = rng.integers(-2 ** 62, 2 ** 62, 32, dtype=np.int64)
    od, oq = target.put(np.zeros(32)), target.put(np.zeros(32, np.int64))
    target("shfl_wide", (1,), (32,), (target.put(d), od, target.put(q), oq))
    want_d = [d[ptx_shfl_source("down", lane, 3, 32)] for lane in range(32)]
    want_q = [q[ptx_shfl_source("bfly", lane, 5, 32)] for lane in range(32)]
    np.testing.assert_array_equal(target.get(od), want_d)
    np.testing.assert_array_equal(target.get(oq), want_q)


@pytest.mark.parametrize("block", [64, 48])  # 48: the second warp has 16 lanes (a partial warp)
@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0000FFFF, 0xAAAAAAAA, 0x00000001])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_votes_match_model(target, rng, block, mask, density):
    pred = (rng.random(block) < density).astype(np.int32)
    out = target.put(np.zeros(3 * block, np.int32))
    target("votes", (1,), (block,), (target.put(pred), np.uint32(mask), out))
    out = target.get(out).reshape(block, 3)
    for t in range(block):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            assert list(out[t]) == [-7, -7, -7]
            continue
        # members: lanes named in mask that exist (a partial warp's missing lanes count as exited)
        members = [j for j in range(32) if (mask >> j) & 1 and base + j < block]
        ballot = sum(1 << j for j in members if pred[base + j])
        assert np.uint32(np.int64(out[t, 0]) & 0xFFFFFFFF) == ballot, (t, hex(mask))
        assert out[t, 1] == int(ballot != 0)
        assert out[t, 2] == int(all(pred[base + j] for j in members))


def test_partial_warp_reduction(target):
    out = target.put(np.zeros(48, np.int32))
    target("partial_warp_sum", (1,), (48,), (out,))
    want = [sum(range(t - t % 16, t - t % 16 + 16)) for t in range(48)]  # xor 8,4,2,1 stays in 16-lane segments
    assert list(target.get(out)) == want


@pytest.mark.parametrize("block", [32, 100])  # 100: not a multiple of the warp size
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_syncthreads_count_and_or(target, rng, block, density):
    pred = (rng.random(2 * block) < density).astype(np.int32)
    out = target.put(np.zeros(3 * 2 * block, np.int32))
    target("block_votes", (2,), (block,), (target.put(pred), out))
    out = target.get(out).reshape(2, block, 3)
    for b in range(2):
        p = pred[b * block:(b + 1) * block]
        assert (out[b, :, 0] == p.sum()).all()
        assert (out[b, :, 1] == int(p.all())).all()
        assert (out[b, :, 2] == int(p.any())).all()


def test_syncwarp_orders_shared_memory_within_a_warp(target, monkeypatch):
    """__syncwarp separates the steps of a warp-synchronous reduction; without it (the pre-Volta idiom) the result
    depends on the order of the lanes, which the emulator's forward order exposes."""
    x = np.arange(32, dtype=np.float32)
    for sched in ("forward", "reverse", "random"):
        monkeypatch.setenv("EMU_SCHED", sched)
        out = target.put(np.zeros(1, np.float32))
        target("warp_tree_sum", (1,), (32,), (target.put(x), out, np.int32(1)))
        assert target.get(out)[0] == x.sum(), sched
    if target.kind == "emu":  # on a GPU the race may or may not show
        monkeypatch.setenv("EMU_SCHED", "forward")
        out = np.zeros(1, np.float32)
        target("warp_tree_sum", (1,), (32,), (x, out, np.int32(0)))
        assert out[0] != x.sum()


def test_dynamic_shared_memory_reduction(target, rng):
    x = rng.standard_normal(3 * 128).astype(np.float32)
    out = target.put(np.zeros(3, np.float32))
    target("dyn_smem_sum", (3,), (128,), (target.put(x), out), shared_mem=128 * 4)
    np.testing.assert_allclose(target.get(out), x.reshape(3, 128).astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)


def test_atomics(target):
    total, hist = target.put(np.zeros(1, np.float32)), target.put(np.zeros(4, np.int32))
    target("atomics", (5,), (96,), (total, hist))
    assert target.get(total)[0] == 480
    assert list(target.get(hist)) == [120] * 4


def test_shared_memory_is_poisoned_before_every_block(emu):
    """Block 0 writes static and dynamic shared memory; blocks 1 and 2 only read: they must see NaN (poison), not
    block 0's values (on a GPU shared memory is uninitialised; a kernel must not rely on it)."""
    st, dy = np.zeros(3 * 64, np.float32), np.zeros(3 * 64, np.float32)
    emu("smem_poison", (3,), (64,), (st, dy), shared_mem=64 * 4)
    np.testing.assert_array_equal(st[:64], np.arange(64))
    np.testing.assert_array_equal(dy[:64], 2 * np.arange(64))
    assert np.isnan(st[64:]).all() and np.isnan(dy[64:]).all()


# ----------------------------------------------------------------------------------------------------------------
# errors the emulator reports

@pytest.mark.parametrize("kernel, block, message", [
    ("shfl_reads_exited_lane", 32, r"selftest\.cu:\d+: lane 0 reads lane 16, which has exited"),
    ("own_lane_not_in_mask", 32, r"the calling lane 1 is not in mask 0x00000001"),
    ("mixed_warp_ops", 32, r"different warp intrinsics .* __ballot_sync .* __any_sync"),
    ("barrier_two_sites", 32, r"divergent __syncthreads .* \(kernels/emu/selftest\.cu:\d+\) but thread 16 waits at "
                              r"__syncthreads \(kernels/emu/selftest\.cu:\d+\)"),
    ("warp_vs_block_deadlock", 64, r"deadlock in block \(0,0,0\).*1 at __shfl\*_sync.*63 at __syncthreads"),
    ("traps", 32, r"__trap\(\) at kernels/emu/selftest\.cu:\d+, block \(0,0,0\) thread \(5,0,0\)"),
])
def test_runtime_errors_are_reported(emu, kernel, block, message):
    with pytest.raises(EmuKernelError, match=message):
        emu(kernel, (1,), (block,), (np.zeros(64, np.int32),))


def test_argument_checks(emu):
    x, out = np.ones(4, np.float32), np.zeros(8)
    good = (x, out, np.int32(3), np.int64(2 ** 40), np.float32(1.5), np.float64(2.5), np.uint32(7), np.bool_(True))
    emu("scalar_args", (1,), (1,), good)
    np.testing.assert_array_equal(out[:7], [1, 3, 2 ** 40, 1.5, 2.5, 7, 1])
    # Python int for `long long` and Python float for `double` are exactly what CuPy passes: accepted
    emu("scalar_args", (1,), (1,), good[:3] + (2 ** 40, np.float32(1.5), 2.5) + good[6:])
    # everything else that CuPy would pass with the wrong size or type is refused before the launch
    bad = {
        4: (1.5, r"argument 4 \(float\): got a Python float \(CuPy passes it as double\); pass np\.float32"),
        2: (3, r"argument 2 \(int\): got a Python int \(CuPy passes it as long long\); pass np\.int32"),
        6: (np.int32(7), r"argument 6 \(unsigned int\): got a NumPy scalar of dtype int32"),
        0: (np.ones(4), r"argument 0 \(const float\*\): array of dtype float64, expected float32"),
        1: (np.zeros((8, 2))[:, 0], r"argument 1 \(double\*\): array is not C-contiguous"),
    }
    for i, (value, message) in bad.items():
        args = list(good)
        args[i] = value
        with pytest.raises(EmuArgumentError, match=message):
            emu("scalar_args", (1,), (1,), tuple(args))
    ro = np.zeros(8)
    ro.flags.writeable = False
    with pytest.raises(EmuArgumentError, match=r"read-only array for a non-const pointer"):
        emu("scalar_args", (1,), (1,), (x, ro) + good[2:])
    with pytest.raises(EmuArgumentError, match=r"takes 8 arguments .*got 7"):
        emu("scalar_args", (1,), (1,), good[:7])
    with pytest.raises(EmuArgumentError, match=r"expected a NumPy array"):
        emu("scalar_args", (1,), (1,), ([1.0],) + good[1:])
    assert isinstance(EmuArgumentError("x"), TypeError)  # as a wrong argument type is in Python


def test_launch_limits():
    mod = EmuRawModule(kernels.source("emu/selftest"), name="kernels/emu/selftest.cu",
                       resources={"dyn_smem_sum": {"regs": 128, "smem": 0}, "bounded": {"regs": 10, "smem": 1024}})
    out = np.zeros(2048, np.float32)
    with pytest.raises(EmuLaunchError, match=r"block\.x = 1025"):
        mod.get_function("atomics")((1,), (1025,), (out, np.zeros(4, np.int32)))
    with pytest.raises(EmuLaunchError, match=r"block \(512, 3, 1\) has 1536 threads, more than the 1024"):
        mod.get_function("atomics")((1,), (512, 3), (out, np.zeros(4, np.int32)))
    with pytest.raises(EmuLaunchError, match=r"block\.z = 65"):
        mod.get_function("bounded")((1,), (1, 1, 65), (out,))
    with pytest.raises(EmuLaunchError, match=r"grid\.y = 65536"):
        mod.get_function("bounded")((1, 65536), (1,), (out,))
    with pytest.raises(EmuLaunchError, match=r"__launch_bounds__\(64\)"):
        mod.get_function("bounded")((1,), (128,), (out,))
    mod.get_function("bounded")((1,), (64,), (out,))
    k = mod.get_function("dyn_smem_sum")
    x = np.ones(1024, np.float32)
    with pytest.raises(EmuLaunchError, match=r"128 registers x 1024 threads needs 131072 registers"):
        k((1,), (1024,), (x, out), shared_mem=4096)
    k((1,), (512,), (x, out), shared_mem=2048)  # 128 x 512 = 65536: exactly fits
    assert out[0] == 512
    with pytest.raises(EmuLaunchError, match=r"0 bytes static \+ 49156 bytes dynamic .* exceeds 49152 .*"
                                             r"max_dynamic_shared_size_bytes"):
        k((1,), (32,), (x, out), shared_mem=48 * 1024 + 4)
    k.max_dynamic_shared_size_bytes = 64 * 1024  # the opt-in, as cupy.RawKernel's attribute
    k((1,), (32,), (x, out), shared_mem=48 * 1024 + 4)
    assert out[0] == 32


def test_schedules_expose_the_missing_sync_fixture(monkeypatch, rng):
    """kernels/bugs/missing_sync.cu: the correct twin gives the right mean and variance under every thread order;
    the fixture (one barrier removed) is wrong under at least one order."""
    mod = EmuRawModule(kernels.source("bugs/missing_sync"), name="kernels/bugs/missing_sync.cu")
    x = (rng.standard_normal((3, 1000)) + 2).astype(np.float32)
    ref_mean, ref_var = x.astype(np.float64).mean(1), x.astype(np.float64).var(1)
    wrong = []
    for sched in ("forward", "reverse", "random"):
        monkeypatch.setenv("EMU_SCHED", sched)
        for kernel in ("row_stats_v1", "row_stats_nosync"):
            mean, var = np.full(3, np.nan, np.float32), np.full(3, np.nan, np.float32)
            mod.get_function(kernel)((3,), (128,), (x, mean, var, np.int32(1000)))
            err = max(np.abs(mean - ref_mean).max() / 2, np.abs(var - ref_var).max())
            if kernel == "row_stats_v1":
                assert err < 1e-5, sched
            elif not err < 1e-3:
                wrong.append(sched)
    assert wrong, "the missing __syncthreads went unnoticed under every thread order"
    assert "forward" in wrong  # the default order catches it (measured: forward and reverse do, random not)


def test_divergent_barrier_fixture():
    mod = EmuRawModule(kernels.source("bugs/divergent_barrier"), name="kernels/bugs/divergent_barrier.cu")
    x, y = np.arange(1000, dtype=np.float32), np.full(1000, np.nan, np.float32)
    mod.get_function("shift_left_v1")((4,), (256,), (x, y, np.int32(1000)))
    want = np.where(np.arange(1000) % 256 == 255, x, x + 1)  # the last thread of a block reads its own value
    want[-1] = 0.0  # thread 231 of the last block reads s[232], which the threads past the data set to 0
    np.testing.assert_array_equal(y, want)
    with pytest.raises(EmuKernelError, match=r"divergent __syncthreads in block \(3,0,0\): 232 threads wait at "
                                             r"__syncthreads \(kernels/bugs/divergent_barrier\.cu:\d+\) but 24 "
                                             r"threads of the block have exited"):
        mod.get_function("shift_left_divergent")((4,), (256,), (x, y, np.int32(1000)))


_SANITIZED_RUN = textwrap.dedent("""
    import sys, numpy as np
    from minisd.cuda import sources as kernels
    from minisd.cuda.emu import EmuRawModule
    mod = EmuRawModule(kernels.source("bugs/oob_write"), name="kernels/bugs/oob_write.cu", sanitize=True)
    x, y = np.ones(1000, np.float32), np.zeros(1000, np.float32)
    mod.get_function(sys.argv[1])((4,), (256,), (x, y, np.float32(2), np.int32(1000)))
    assert (y == 2).all()
    print("finished without a report")
""")


def _run_sanitized(args, timeout=300):
    from minisd.cuda.emu.asan import sanitizer_env
    env = sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_sanitizer_reports_the_oob_write_fixture():
    """kernels/bugs/oob_write.cu under ASan (in a subprocess: ASan aborts the process it finds an error in)."""
    ok = _run_sanitized(["-c", _SANITIZED_RUN, "scale_rows_v1"])
    assert ok.returncode == 0 and "finished without a report" in ok.stdout, ok.stderr[-3000:]
    bad = _run_sanitized(["-c", _SANITIZED_RUN, "scale_rows_oob"])
    assert bad.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "WRITE of size 4" in bad.stderr
    src = kernels.source("bugs/oob_write").splitlines()
    line = 1 + next(i for i, t in enumerate(src) if "if (i <= n) y[i]" in t)  # the fixture's faulty write
    assert f"in scale_rows_oob kernels/bugs/oob_write.cu:{line}" in bad.stderr, bad.stderr[-3000:]


_UB_KERNELS = textwrap.dedent('''
    import sys, numpy as np
    from minisd.cuda.emu import EmuRawModule
    code = """extern "C" __global__ void smem_oob_v1(float* y) {
        __shared__ float s[64];
        s[threadIdx.x] = 1.0f;
        __syncthreads();
        y[threadIdx.x] = s[threadIdx.x + 1];  // thread 63 reads s[64]
    }
    extern "C" __global__ void index_overflow_v1(float* y, int C, int HW) {
        int b = blockIdx.x;
        int offset = b * C * HW;  // 32-bit index math: overflows for big tensors
        y[threadIdx.x] = (float)(offset & 1);
    }"""
    mod = EmuRawModule(code, name="ub.cu", sanitize=True)
    y = np.zeros(64, np.float32)
    if sys.argv[1] == "smem":
        mod.get_function("smem_oob_v1")((1,), (64,), (y,))
    else:
        mod.get_function("index_overflow_v1")((4,), (32,), (y, np.int32(320), np.int32(4096 * 1024)))
    print("finished without a report")
''')


@pytest.mark.parametrize("case, report", [
    ("smem", r"ub\.cu:5:\d+: runtime error: index 64 out of bounds for type 'float \[64\]'"),
    ("overflow", r"ub\.cu:9:\d+: runtime error: signed integer overflow: 640 \* 4194304 cannot be represented"),
])
def test_sanitizer_reports_static_smem_overrun_and_index_overflow(case, report):
    r = _run_sanitized(["-c", _UB_KERNELS, case])
    assert r.returncode != 0 and re.search(report, r.stderr), r.stdout + r.stderr[-3000:]


def test_sanitize_mode_needs_the_preloaded_runtime():
    if asan_loaded():
        pytest.skip("this process runs under the ASan runtime")
    with pytest.raises(EmuError, match=r"python -m minisd\.cuda\.emu\.asan"):
        EmuRawModule(kernels.source("bugs/oob_write"), name="kernels/bugs/oob_write.cu", sanitize=True)


# ----------------------------------------------------------------------------------------------------------------
# building

_TINY = 'extern "C" __global__ void add_v1(float* y, float a) { y[threadIdx.x] += a + VALUE; }\n'


def test_build_cache_and_defines(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE_DIR", str(tmp_path))
    first = EmuRawModule(_TINY, options=("-DVALUE=1",), name="tiny.cu")
    again = EmuRawModule(_TINY, options=("-DVALUE=1",), name="tiny.cu")
    other = EmuRawModule(_TINY, options=("-D", "VALUE=10"), name="tiny.cu")
    assert first.built and not again.built and other.built
    assert first.path == again.path != other.path
    assert first.path.parent == tmp_path / "cuda_emu"
    y = np.zeros(4, np.float32)
    again.get_function("add_v1")((1,), (4,), (y, np.float32(0.5)))
    other.get_function("add_v1")((1,), (4,), (y, np.float32(0.5)))
    np.testing.assert_array_equal(y, [12.0] * 4)


def test_build_errors_name_the_cu_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE_DIR", str(tmp_path))
    with pytest.raises(EmuBuildError, match=r"kernels/broken\.cu:3"):
        EmuRawModule('extern "C" __global__ void k_v1(float* y) {\n  float a = 1;\n  y[0] = a +;\n}\n',
                     name="kernels/broken.cu")
    with pytest.raises(ValueError, match=r'kernel \'k\' must be declared extern "C"'):
        EmuRawModule("__global__ void k(float* y) { y[0] = 1; }", name="x.cu")
    mod = EmuRawModule(_TINY, options=("-DVALUE=0",), name="tiny.cu")
    with pytest.raises(EmuError, match=r"no kernel 'add_v2'.*\['add_v1'\]"):
        mod.get_function("add_v2")


def test_portable_ucontext_switch_gives_the_same_results(tmp_path, monkeypatch, rng):
    """The ucontext fallback (non-x86-64 hosts) against the assembly switch, on shuffles and block barriers."""
    monkeypatch.setenv("MINISD_CACHE_DIR", str(tmp_path))
    results = []
    for defines in ((), ("EMU_USE_UCONTEXT",)):
        t = Target("emu", defines=defines)
        vals = rng.integers(0, 100, 32).astype(np.int32) if not results else results[0][0]
        out = np.zeros(160, np.int32)
        t("shfl_modes", (1,), (32,), (vals, out, np.int32(8), np.int32(3)))
        pred = (np.arange(200) % 3 == 0).astype(np.int32)
        votes = np.zeros(600, np.int32)
        t("block_votes", (2,), (100,), (pred, votes))
        results.append((vals, out, votes))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
