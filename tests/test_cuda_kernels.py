"""minisd.cuda.ops (the CUDA kernels in kernels/*.cu) against references, on the emulator and on a real GPU.

Every kernel version, forward and backward, on small and ragged shapes (sizes that are not multiples of the
block or warp size), batch 1 and 3, under the three emulator thread orders (`emu_forward`, `emu_reverse`,
`emu_random`), and on a real GPU (`gpu`, marker `gpu`, skipped without one). Outputs are NaN-filled before each
launch (launch.empty), so "finite" also means "every element was written".

References: PyTorch in float64 (an independent computation), and minisd's NumPy ops in float32 (the spec), run
with the CUDA dispatch switched off (spec()).
Tolerance (check() below): |got - ref| <= 1e-5 * max|ref| + 1e-6 * |ref| elementwise, with ref in float64: the
kernels accumulate in float32 over at most a few thousand terms (measured: <= 5e-7 relative to the output scale);
a wrong sign, index or missing term gives errors of order 1. Softmax backward uses the scale of its terms y*dy
instead of the result's (cancellation in nearly one-hot rows, see test_softmax_backward).

Sanitizer mode: test_kernels_under_sanitizer reruns this file in a subprocess, forward thread order only, with the
kernels built with ASan+UBSan (MINISD_CUDA_EMULATE=sanitize under python -m minisd.cuda.emu.asan).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisd.cuda
from minisd import backend
from minisd.cuda import ops
from minisd.errors import UserError
from minisd.ops import activations as np_act
from minisd.ops import norm as np_norm

torch = pytest.importorskip("torch")
F = torch.nn.functional
REPO = Path(__file__).resolve().parent.parent
SANITIZE = os.environ.get("MINISD_CUDA_EMULATE", "").lower() == "sanitize"
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None

TARGETS = [pytest.param(("emu", "forward"), id="emu_forward"),
           pytest.param(("emu", "reverse"), id="emu_reverse"),
           pytest.param(("emu", "random"), id="emu_random"),
           pytest.param(("gpu", None), id="gpu", marks=pytest.mark.gpu)]


class Device:
    """Moves test arrays to the target (NumPy for the emulator, CuPy for the GPU) and results back."""

    def __init__(self, put, get):
        self.put, self.get = put, get


@pytest.fixture(params=TARGETS)
def dev(request, monkeypatch):
    kind, sched = request.param
    if kind == "emu":
        if not HAVE_CXX:
            pytest.skip("the CUDA emulator needs g++")
        monkeypatch.setenv("EMU_SCHED", sched)
        with minisd.cuda.emulate(sanitize=SANITIZE):
            yield Device(np.asarray, np.asarray)
    else:
        import cupy
        monkeypatch.setenv("MINISD_CUDA_POISON", "1")  # NaN-filled outputs on the GPU too
        yield Device(cupy.asarray, cupy.asnumpy)


@pytest.fixture
def emu_forward():
    """Emulator, default thread order: for the tests that are about launch code rather than races."""
    if not HAVE_CXX:
        pytest.skip("the CUDA emulator needs g++")
    with minisd.cuda.emulate(sanitize=SANITIZE):
        yield


def check(name, got, ref, tol=1e-5, scale=None):
    """Every element finite (written) and |got - ref| <= tol * scale + 1e-6 |ref|, scale = max|ref| unless given;
    prints the first misses."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    not_finite = ~np.isfinite(got)
    assert not not_finite.any(), (f"{name}: {int(not_finite.sum())} of {got.size} elements not written or not "
                                  f"finite, first at {np.argwhere(not_finite)[0].tolist()}")
    scale = np.abs(ref).max() if scale is None else scale
    bound = tol * scale + 1e-6 * np.abs(ref)
    bad = np.abs(got - ref) > bound
    if bad.any():
        lines = [f"  at {i.tolist()}: got {got[tuple(i)]:.8g}, expected {ref[tuple(i)]:.8g}"
                 for i in np.argwhere(bad)[:5]]
        pytest.fail(f"{name}: {int(bad.sum())} of {got.size} elements differ (tolerance {tol:g} x {scale:.3g}):\n"
                    + "\n".join(lines))


def spec(fn, *args, **kwargs):
    """Run a NumPy op (the spec) on host arrays with the CUDA dispatch off, so it never runs the kernel itself."""
    with minisd.cuda.emulate(enabled=False):
        return fn(*args, **kwargs)


def t64(a, grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def f32(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# GroupNorm

GN_SHAPES = [((1, 6, 7, 5), 3), ((3, 6, 7, 5), 3), ((2, 8, 33), 4), ((1, 64, 9, 9), 32), ((3, 4, 1, 1), 1)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("shape, G", GN_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_group_norm(dev, rng, version, act, shape, G):
    x = f32(rng, *shape, scale=2.0, shift=0.5)  # a mean offset: the variance must be computed stably
    gamma, beta = f32(rng, shape[1]), f32(rng, shape[1])
    dy = f32(rng, *shape)
    eps = 1e-6 if act else 1e-5
    y, cache = ops.group_norm_forward(dev.put(x), dev.put(gamma), dev.put(beta), G, eps, act, version=version)
    dx, dgamma, dbeta = ops.group_norm_backward(dev.put(dy), cache, version=version)
    tx, tg, tb = t64(x), t64(gamma), t64(beta)
    ty = F.group_norm(tx, G, tg, tb, eps)
    ty = F.silu(ty) if act else ty
    ty.backward(t64(dy, False))
    check("y", dev.get(y), ty.detach())
    check("mean", dev.get(cache.mean), x.astype(np.float64).reshape(shape[0], G, -1).mean(-1))
    check("dx", dev.get(dx), tx.grad)
    check("dgamma", dev.get(dgamma), tg.grad)
    check("dbeta", dev.get(dbeta), tb.grad)
    y_np, c_np = spec(np_norm.group_norm_forward, x, gamma, beta, G, eps, act)
    check("y vs NumPy op", dev.get(y), y_np)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta),
                               spec(np_norm.group_norm_backward, dy, c_np)):
        check(f"{name} vs NumPy op", dev.get(got), want)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm

LN_SHAPES = [(1, 3), (1, 31), (3, 33), (3, 5, 33), (2, 3, 1000), (1, 77, 40)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm(dev, rng, version, shape):
    D = shape[-1]
    x, gamma, beta, dy = f32(rng, *shape, shift=1.0), f32(rng, D), f32(rng, D), f32(rng, *shape)
    y, cache = ops.layer_norm_forward(dev.put(x), dev.put(gamma), dev.put(beta), 1e-5, version=version)
    dx, dgamma, dbeta = ops.layer_norm_backward(dev.put(dy), cache, version=version)
    tx, tg, tb = t64(x), t64(gamma), t64(beta)
    ty = F.layer_norm(tx, (D,), tg, tb, 1e-5)
    ty.backward(t64(dy, False))
    check("y", dev.get(y), ty.detach())
    check("dx", dev.get(dx), tx.grad)
    check("dgamma", dev.get(dgamma), tg.grad)
    check("dbeta", dev.get(dbeta), tb.grad)
    y_np, c_np = spec(np_norm.layer_norm_forward, x, gamma, beta, 1e-5)
    check("y vs NumPy op", dev.get(y), y_np)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta),
                               spec(np_norm.layer_norm_backward, dy, c_np)):
        check(f"{name} vs NumPy op", dev.get(got), want)


# ----------------------------------------------------------------------------------------------------------------
# softmax

SM_SHAPES = [(1, 1), (1, 31), (1, 33), (1, 1000), (3, 1), (3, 5, 31), (3, 2, 33), (3, 1000), (2, 4, 77)]


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("shape", SM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_forward(dev, rng, version, shape):
    x = f32(rng, *shape, scale=4.0)
    y, cache = ops.softmax_forward(dev.put(x), version=version)
    check("y", dev.get(y), torch.softmax(t64(x, False), -1))
    check("y vs NumPy op", dev.get(y), spec(np_act.softmax_forward, x)[0])
    assert cache.axis == len(shape) - 1


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", SM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_backward(dev, rng, version, shape):
    x, dy = f32(rng, *shape, scale=4.0), f32(rng, *shape)
    tx = t64(x)
    ty = torch.softmax(tx, -1)
    ty.backward(t64(dy, False))
    y = ty.detach().numpy().astype(np.float32)  # the backward takes y (as the NumPy op's cache holds it)
    dx = ops.softmax_backward(dev.put(dy), np_act.SoftmaxCache(dev.put(y), len(shape) - 1), version=version)
    # dx = y (dy - sum(dy y)) cancels where a row is nearly one-hot (dy_k - dot ~ 0): the float32 rounding of y and
    # of the dot product are then relative to the terms y*dy, not to the small result, hence that scale
    terms = np.abs(y * dy).max()
    check("dx", dev.get(dx), tx.grad, scale=terms)
    check("dx vs NumPy op", dev.get(dx), spec(np_act.softmax_backward, dy, np_act.SoftmaxCache(y, len(shape) - 1)),
          scale=terms)


# ----------------------------------------------------------------------------------------------------------------
# GEGLU

GEGLU_SHAPES = [(1, 2), (3, 5, 74), (2, 1, 66), (1, 3, 600), (4, 2)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", GEGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu(dev, rng, version, shape):
    h = f32(rng, *shape, scale=2.0)
    dy = f32(rng, *shape[:-1], shape[-1] // 2)
    y, cache = ops.geglu_forward(dev.put(h), version=version)
    dh = ops.geglu_backward(dev.put(dy), cache, version=version)
    th = t64(h)
    value, gate = th.chunk(2, -1)  # value first, gate second (SD's GEGLU)
    ty = value * F.gelu(gate)
    ty.backward(t64(dy, False))
    check("y", dev.get(y), ty.detach())
    check("dh", dev.get(dh), th.grad)
    y_np, c_np = spec(np_act.geglu_forward, h)
    check("y vs NumPy op", dev.get(y), y_np)
    check("dh vs NumPy op", dev.get(dh), spec(np_act.geglu_backward, dy, c_np))


# ----------------------------------------------------------------------------------------------------------------
# launch configurations: block sizes other than the defaults, on the production kernels

@pytest.mark.parametrize("threads", [32, 96, 1024])
def test_block_sizes(emu_forward, rng, threads):
    x, g, b = f32(rng, 2, 6, 11, 13), f32(rng, 6), f32(rng, 6)
    y, cache = ops.group_norm_forward(x, g, b, 3, 1e-5, "silu", threads=threads)
    dx, dg, db = ops.group_norm_backward(f32(rng, 2, 6, 11, 13), cache, threads=threads)
    ty = F.silu(F.group_norm(t64(x, False), 3, t64(g, False), t64(b, False), 1e-5))
    check("groupnorm y", y, ty)
    assert np.isfinite(dx).all() and np.isfinite(dg).all() and np.isfinite(db).all()
    xs = f32(rng, 7, 333, scale=3.0)
    ref = torch.softmax(t64(xs, False), -1)
    check("softmax v2", ops.softmax_forward(xs, version=2, threads=threads)[0], ref)
    check("softmax v3", ops.softmax_forward(xs, version=3, threads=threads)[0], ref)
    xl, gl, bl = f32(rng, 9, 70), f32(rng, 70), f32(rng, 70)
    check("layernorm", ops.layer_norm_forward(xl, gl, bl, 1e-5, threads=threads)[0],
          F.layer_norm(t64(xl, False), (70,), t64(gl, False), t64(bl, False), 1e-5))
    h = f32(rng, 5, 2 * 45)
    check("geglu", ops.geglu_forward(h, threads=threads)[0], t64(h[:, :45], False) * F.gelu(t64(h[:, 45:], False)))


def test_layer_norm_dparams_many_row_chunks(emu_forward, rng):
    """M = 2100 rows: the v2 parameter gradient runs 262 row chunks of 8 rows (and a ragged last one)."""
    x, g, b, dy = f32(rng, 3, 700, 35), f32(rng, 35), f32(rng, 35), f32(rng, 3, 700, 35)
    _, cache = ops.layer_norm_forward(x, g, b, 1e-5)
    _, dgamma, dbeta = ops.layer_norm_backward(dy, cache)
    tx, tg, tb = t64(x), t64(g), t64(b)
    F.layer_norm(tx, (35,), tg, tb, 1e-5).backward(t64(dy, False))
    check("dgamma", dgamma, tg.grad)
    check("dbeta", dbeta, tb.grad)


def test_softmax_large_inputs_and_other_axes(emu_forward, rng):
    big = f32(rng, 3, 4, 5, scale=60.0)  # exp(x) overflows float32 without the max subtraction
    check("y of large inputs", ops.softmax_forward(big)[0], torch.softmax(t64(big, False), -1))
    x = f32(rng, 3, 4, 5, scale=3.0)
    for axis in (0, 1, 2, -2):
        y, cache = ops.softmax_forward(x, axis=axis)
        check(f"y axis {axis}", y, torch.softmax(t64(x, False), axis))
        assert y.flags.c_contiguous and cache.axis == axis % 3
        dy = f32(rng, 3, 4, 5)
        tx = t64(x)
        torch.softmax(tx, axis).backward(t64(dy, False))
        check(f"dx axis {axis}", ops.softmax_backward(dy, cache), tx.grad)


def test_non_contiguous_inputs_are_copied(emu_forward, rng):
    x = f32(rng, 6, 4, 5).transpose(1, 0, 2)  # (4, 6, 5), not C-contiguous
    g, b = f32(rng, 6), f32(rng, 6)
    y, _ = ops.group_norm_forward(x, g, b, 2, 1e-5)
    check("groupnorm", y, F.group_norm(t64(x, False), 2, t64(g, False), t64(b, False), 1e-5))
    h = f32(rng, 8, 6)[:, ::1].T  # (6, 8)
    check("geglu", ops.geglu_forward(h)[0], t64(h[:, :4], False) * F.gelu(t64(h[:, 4:], False)))


@pytest.mark.slow
def test_geglu_more_rows_than_grid_y(emu_forward, rng):
    """v2 caps gridDim.y at 65535 and strides over the remaining rows."""
    h = f32(rng, 65600, 2)
    check("geglu", ops.geglu_forward(h)[0], t64(h[:, :1], False) * F.gelu(t64(h[:, 1:], False)))


# ----------------------------------------------------------------------------------------------------------------
# the caches are the NumPy ops' own: a forward on one path feeds a backward on the other

def test_caches_interoperate_with_the_numpy_ops(emu_forward, rng):
    x, g, b, dy = f32(rng, 3, 6, 7, 5), f32(rng, 6), f32(rng, 6), f32(rng, 3, 6, 7, 5)
    _, c_np = spec(np_norm.group_norm_forward, x, g, b, 3, 1e-6, act="silu")
    _, c_cu = ops.group_norm_forward(x, g, b, 3, 1e-6, act="silu")
    assert type(c_cu) is type(c_np)
    for a, want in zip(ops.group_norm_backward(dy, c_np), spec(np_norm.group_norm_backward, dy, c_cu)):
        check("groupnorm, crossed caches", a, want)
    x, g, b, dy = f32(rng, 3, 5, 33), f32(rng, 33), f32(rng, 33), f32(rng, 3, 5, 33)
    _, c_np = spec(np_norm.layer_norm_forward, x, g, b, 1e-5)
    _, c_cu = ops.layer_norm_forward(x, g, b, 1e-5)
    assert type(c_cu) is type(c_np)
    for a, want in zip(ops.layer_norm_backward(dy, c_np), spec(np_norm.layer_norm_backward, dy, c_cu)):
        check("layernorm, crossed caches", a, want)
    x, dy = f32(rng, 3, 7, 33, scale=3.0), f32(rng, 3, 7, 33)
    _, c_np = spec(np_act.softmax_forward, x)
    _, c_cu = ops.softmax_forward(x)
    check("softmax, crossed caches", ops.softmax_backward(dy, c_np), spec(np_act.softmax_backward, dy, c_cu))
    h, dyh = f32(rng, 3, 5, 2 * 37, scale=2.0), f32(rng, 3, 5, 37)
    _, c_np = spec(np_act.geglu_forward, h)
    _, c_cu = ops.geglu_forward(h)
    check("geglu, crossed caches", ops.geglu_backward(dyh, c_np), spec(np_act.geglu_backward, dyh, c_cu))


# ----------------------------------------------------------------------------------------------------------------
# validation, the backend switch, and errors for users

def test_bad_input_is_refused_before_launch(emu_forward):
    x = np.zeros((2, 6, 3, 3), np.float32)
    g = np.ones(6, np.float32)
    with pytest.raises(ValueError, match=r"group_norm \(cuda\): argument 'x' must be float32 .* got float64"):
        ops.group_norm_forward(x.astype(np.float64), g.astype(np.float64), g.astype(np.float64), 3, 1e-5)
    with pytest.raises(ValueError, match=r"num_groups=4 must divide the 6 channels"):
        ops.group_norm_forward(x, g, g, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'gamma' must have shape \(6,\), got \(5,\)"):
        ops.group_norm_forward(x, g[:5], g, 3, 1e-5)
    with pytest.raises(ValueError, match=r"act must be None or 'silu'"):
        ops.group_norm_forward(x, g, g, 3, 1e-5, act="gelu")
    _, cache = ops.group_norm_forward(x, g, g, 3, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'dy' must have shape \(2, 6, 3, 3\), got \(2, 6, 3\)"):
        ops.group_norm_backward(x[..., 0], cache)
    with pytest.raises(ValueError, match=r"version 5 does not exist; available: \(1, 2, 3\)"):
        ops.softmax_forward(x, version=5)
    with pytest.raises(ValueError, match=r"threads=48 must be a multiple of 32"):
        ops.layer_norm_forward(x, g[:3], g[:3], 1e-5, threads=48)
    with pytest.raises(ValueError, match=r"even last dimension"):
        ops.geglu_forward(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"axis 3 out of range"):
        ops.softmax_forward(np.zeros((2, 5), np.float32), axis=3)


def test_numpy_arrays_need_emulation(rng, monkeypatch):
    monkeypatch.delenv("MINISD_CUDA_EMULATE", raising=False)
    assert backend.emulation_mode() is None
    with pytest.raises(ValueError, match=r"softmax_forward_v3: got a numpy\.ndarray; the CUDA ops take CuPy arrays "
                                         r"\(or NumPy arrays inside `with minisd\.cuda\.emulate\(\):`"):
        ops.softmax_forward(f32(rng, 2, 3))


def test_use_cuda_ops_switch(monkeypatch):
    x32, x64 = np.zeros(3, np.float32), np.zeros(3)
    monkeypatch.delenv("MINISD_CUDA_EMULATE", raising=False)
    assert not backend.use_cuda_ops(x32) and backend.emulation_mode() is None
    with minisd.cuda.emulate():
        assert backend.use_cuda_ops(x32) and backend.emulation_mode() == "emulate"
        assert not backend.use_cuda_ops(x64)  # float64 (gradient checks) keeps the NumPy path
        with minisd.cuda.emulate(sanitize=True):
            assert backend.emulation_mode() == "sanitize"
        assert backend.emulation_mode() == "emulate"
    assert not backend.use_cuda_ops(x32)
    with minisd.cuda.emulate(enabled=False):
        assert backend.emulation_mode() is None and not backend.use_cuda_ops(x32)
    for value, mode in (("1", "emulate"), ("sanitize", "sanitize"), ("0", None), ("", None)):
        monkeypatch.setenv("MINISD_CUDA_EMULATE", value)
        assert backend.emulation_mode() == mode
        assert backend.use_cuda_ops(x32) == (mode is not None)
        with minisd.cuda.emulate(enabled=False):  # overrides the environment
            assert backend.emulation_mode() is None


def test_gpu_request_without_cupy_or_device_is_a_user_error(monkeypatch):
    if minisd.cuda.gpu_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(UserError, match=r"nvidia-smi|pip install cupy-cuda13x"):
        minisd.cuda.require_gpu()
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    with pytest.raises(UserError, match=r"needs CuPy, which is not installed: install CuPy .*pip install cupy-cuda13x"):
        minisd.cuda.require_gpu()
    assert not minisd.cuda.gpu_available()


def test_minisd_cuda_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import minisd.cuda, minisd.cuda.ops, minisd.backend\n"
            "assert 'cupy' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ----------------------------------------------------------------------------------------------------------------
# sanitizer mode: this file again (forward thread order only), with ASan + UBSan builds of the kernels

@pytest.mark.skipif(SANITIZE, reason="already running under the sanitizer")
def test_kernels_under_sanitizer():
    if not HAVE_CXX:
        pytest.skip("the CUDA emulator needs g++")
    from minisd.cuda.emu.asan import sanitizer_env
    env = sanitizer_env()
    env["MINISD_CUDA_EMULATE"] = "sanitize"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
           "-k", "not emu_reverse and not emu_random and not gpu and not sanitizer", "-m", "not slow"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert " passed" in out and "AddressSanitizer" not in out and "runtime error" not in out, out[-3000:]
