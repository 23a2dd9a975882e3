"""Shared pieces of the CUDA op tests (tests/test_cuda_conv.py, test_cuda_attention.py, test_cuda_unet.py).

The same conventions as tests/test_cuda_kernels.py: the `dev` fixture runs a test under the three emulator thread
orders (`emu_forward`, `emu_reverse`, `emu_random`) and on a real GPU (`gpu`, marker `gpu`, skipped without one);
outputs are NaN-filled before each launch, so `check` asserting "finite" also means "every element was written";
`spec` runs a NumPy op (the spec) with the CUDA dispatch switched off; SANITIZE is true in the subprocess that
`run_under_sanitizer` starts (kernels built with ASan + UBSan, forward thread order only).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisd.cuda

REPO = Path(__file__).resolve().parent.parent
SANITIZE = os.environ.get("MINISD_CUDA_EMULATE", "").lower() == "sanitize"
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None

TARGETS = [pytest.param(("emu", "forward"), id="emu_forward"),
           pytest.param(("emu", "reverse"), id="emu_reverse"),
           pytest.param(("emu", "random"), id="emu_random"),
           pytest.param(("gpu", None), id="gpu", marks=pytest.mark.gpu)]


class Device:
    """Moves test arrays to the target (NumPy for the emulator, CuPy for the GPU) and results back."""

    def __init__(self, put, get, kind):
        self.put, self.get, self.kind = put, get, kind


@pytest.fixture(params=TARGETS)
def dev(request, monkeypatch):
    kind, sched = request.param
    if kind == "emu":
        if not HAVE_CXX:
            pytest.skip("the CUDA emulator needs g++")
        monkeypatch.setenv("EMU_SCHED", sched)
        with minisd.cuda.emulate(sanitize=SANITIZE):
            yield Device(np.asarray, np.asarray, "emu")
    else:
        import cupy
        monkeypatch.setenv("MINISD_CUDA_POISON", "1")  # NaN-filled outputs on the GPU too
        yield Device(cupy.asarray, cupy.asnumpy, "gpu")


@pytest.fixture
def emu_forward():
    """Emulator, default thread order: for the tests that are about launch code rather than races."""
    if not HAVE_CXX:
        pytest.skip("the CUDA emulator needs g++")
    with minisd.cuda.emulate(sanitize=SANITIZE):
        yield


def check(name, got, ref, tol=1e-5, scale=None):
    """Every element finite (written) and |got - ref| <= tol * scale + 1e-6 |ref|, scale = max|ref| unless given;
    prints the first misses. Returns the largest error relative to scale (for reports)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    not_finite = ~np.isfinite(got)
    assert not not_finite.any(), (f"{name}: {int(not_finite.sum())} of {got.size} elements not written or not "
                                  f"finite, first at {np.argwhere(not_finite)[0].tolist()}")
    scale = (np.abs(ref).max() if ref.size else 1.0) if scale is None else scale
    bound = tol * scale + 1e-6 * np.abs(ref)
    bad = np.abs(got - ref) > bound
    if bad.any():
        lines = [f"  at {i.tolist()}: got {got[tuple(i)]:.8g}, expected {ref[tuple(i)]:.8g}"
                 for i in np.argwhere(bad)[:5]]
        pytest.fail(f"{name}: {int(bad.sum())} of {got.size} elements differ (tolerance {tol:g} x {scale:.3g}):\n"
                    + "\n".join(lines))
    return float(np.abs(got - ref).max() / scale) if got.size and scale else 0.0


def spec(fn, *args, **kwargs):
    """Run a NumPy op (the spec) on host arrays with the CUDA dispatch off, so it never runs the kernel itself."""
    with minisd.cuda.emulate(enabled=False):
        return fn(*args, **kwargs)


def f32(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def run_under_sanitizer(test_file, extra_k=None, timeout=600):
    """Rerun `test_file` in a subprocess with the kernels built with ASan + UBSan (MINISD_CUDA_EMULATE=sanitize under
    python -m minisd.cuda.emu.asan), forward thread order only; fail with the tail of its output on any report."""
    if not HAVE_CXX:
        pytest.skip("the CUDA emulator needs g++")
    from minisd.cuda.emu.asan import sanitizer_env
    env = sanitizer_env()
    env["MINISD_CUDA_EMULATE"] = "sanitize"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    k = "not emu_reverse and not emu_random and not gpu and not sanitizer" + (f" and ({extra_k})" if extra_k else "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file), "-k", k,
           "-m", "not slow"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert " passed" in out and "AddressSanitizer" not in out and "runtime error" not in out, out[-3000:]
    return out
