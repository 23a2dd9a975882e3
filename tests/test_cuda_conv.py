"""conv2d on the GPU path (kernels/conv2d.cu through minisd/cuda/conv.py) against PyTorch and the NumPy op.

Every kernel version, forward and backward (dx, dw, db), on small and ragged shapes: batch 1, 2 and 3, channel
counts 3/4/5/7/13/67/70 (not multiples of the 64-wide tiles), 7x11 and other non-square images, 1x1, 3x3, 5x5 and
2x3 kernels, stride 1, 2 and 3, symmetric and asymmetric padding (the VAE's ((0, 1), (0, 1))), with and without
bias; under the three emulator thread orders and on a real GPU (`dev`, see tests/cuda_testing.py), and once more
with ASan + UBSan (test_conv_under_sanitizer). Outputs start NaN-filled, so "finite" means "written".

References: PyTorch float64 (F.conv2d on the explicitly padded input, autograd for the gradients) and minisd's
NumPy op in float32 (the spec). Tolerance (cuda_testing.check): 1e-5 x max|ref| + 1e-6 |ref| elementwise; the
kernels sum at most 630 float32 products per output here (measured errors <= 1e-6 relative); a wrong tap, sign or
missing term is an error of order 1.
"""

import numpy as np
import pytest

from minisd.cuda import conv as cuda_conv
from minisd.cuda import ops
from minisd.ops import conv as np_conv

from cuda_testing import check, dev, emu_forward, f32, run_under_sanitizer, spec, SANITIZE  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (x shape, w shape, stride, padding, bias)
CASES = [
    ((1, 5, 7, 11), (13, 5, 3, 3), 1, 1, True),  # SD's 3x3 "same" conv, ragged everything
    ((3, 5, 7, 11), (13, 5, 3, 3), 2, ((0, 1), (0, 1)), True),  # the VAE Downsample: right/bottom padding only
    ((3, 13, 7, 11), (5, 13, 1, 1), 1, 0, True),  # 1x1 (skip connections, proj_in/out of SD 1.x)
    ((2, 3, 9, 8), (7, 3, 3, 3), 2, 1, False),  # the U-Net Downsample (symmetric padding), no bias
    ((2, 4, 6, 9), (3, 4, 5, 5), 1, ((2, 1), (0, 3)), True),  # 5x5, every side padded differently
    ((1, 3, 8, 7), (4, 3, 2, 3), 3, ((1, 0), (2, 2)), True),  # non-square kernel, stride 3
    ((1, 70, 9, 9), (67, 70, 3, 3), 1, 1, True),  # two tiles each way, 40 K slices: split-K is chosen
]


def _pads(padding):
    return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


def torch_conv(x, w, b, stride, padding, dy):
    """float64 reference: y, dx, dw, db (db None without bias)."""
    (top, bottom), (left, right) = _pads(padding)
    tx, tw = (torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=True) for a in (x, w))
    tb = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
    ty = F.conv2d(F.pad(tx, (left, right, top, bottom)), tw, tb, stride=stride)
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    return ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), None if tb is None else tb.grad.numpy()


def _case_id(v):
    if isinstance(v, tuple) and len(v) == 5:
        x, w, s, p, b = v
        return f"{'x'.join(map(str, x))}_w{'x'.join(map(str, w))}_s{s}_p{p}{'' if b else '_nobias'}".replace(" ", "")
    return str(v)


@pytest.mark.parametrize("version", [1, 2, 3])  # 3: forward only (the backward runs v2 then)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv2d(dev, rng, version, case):
    xs, ws, stride, padding, has_bias = case
    x, w = f32(rng, *xs), f32(rng, *ws, scale=0.5)
    b = f32(rng, ws[0]) if has_bias else None
    y, cache = ops.conv2d_forward(dev.put(x), dev.put(w), None if b is None else dev.put(b), stride, padding,
                                  version=version)
    dy = f32(rng, *y.shape)
    dx, dw, db = ops.conv2d_backward(dev.put(dy), cache, version=min(version, 2))
    ty, tdx, tdw, tdb = torch_conv(x, w, b, stride, padding, dy)
    check("y", dev.get(y), ty)
    check("dx", dev.get(dx), tdx)
    check("dw", dev.get(dw), tdw)
    y_np, c_np = spec(np_conv.conv2d_forward, x, w, b, stride, padding)
    dx_np, dw_np, db_np = spec(np_conv.conv2d_backward, dy, c_np)
    check("y vs NumPy op", dev.get(y), y_np)
    check("dx vs NumPy op", dev.get(dx), dx_np)
    check("dw vs NumPy op", dev.get(dw), dw_np)
    if has_bias:
        check("db", dev.get(db), tdb)
        check("db vs NumPy op", dev.get(db), db_np)
    else:
        assert db is None and db_np is None


@pytest.mark.parametrize("forward_version", [2, 3])
@pytest.mark.parametrize("splits", [1, 2, 3, 40, 1000])
def test_split_k_gives_the_same_result(emu_forward, rng, splits, forward_version):
    """v2/v3 with K split over 1 .. all slices (1000 is capped at the slice count): same y, dx, dw."""
    x, w, b = f32(rng, 2, 9, 6, 7), f32(rng, 11, 9, 3, 3, scale=0.5), f32(rng, 11)  # K = 81: 6 slices of 16, 11 of 8
    y, cache = ops.conv2d_forward(x, w, b, 1, 1, splits=splits, version=forward_version)
    dy = f32(rng, *y.shape)
    dx, dw, db = ops.conv2d_backward(dy, cache, splits=splits)
    ty, tdx, tdw, tdb = torch_conv(x, w, b, 1, 1, dy)
    for name, got, ref in (("y", y, ty), ("dx", dx, tdx), ("dw", dw, tdw), ("db", db, tdb)):
        check(f"{name} with splits={splits}", got, ref)


def test_split_plan():
    """Split-K only when the tiles do not fill the GPU, and never so thin that a split has < 8 slices."""
    assert cuda_conv.choose_splits(tiles=320, K=2880, sms=132) == 1  # SD 64x64 level: enough tiles
    assert cuda_conv.choose_splits(tiles=40, K=11520, sms=132) == 7  # 1280 channels at 8x8: ceil(264 / 40)
    assert cuda_conv.choose_splits(tiles=5, K=8192, sms=132) == 16  # conv_in's dw: capped at MAX_SPLITS
    assert cuda_conv.choose_splits(tiles=5, K=100, sms=132) == 1  # too little K to split
    assert cuda_conv._split_plan("op", 3, 1, 5 * 16, np) == (3, 2)  # 5 slices in 3 splits: 2 + 2 + 1
    assert cuda_conv._split_plan("op", 1000, 1, 5 * 16, np) == (5, 1)


def test_caches_interoperate_with_the_numpy_op(emu_forward, rng):
    """A CUDA forward feeds the NumPy backward and the other way round (same Conv2dCache type)."""
    x, w, b = f32(rng, 3, 5, 7, 11), f32(rng, 13, 5, 3, 3), f32(rng, 13)
    dy = f32(rng, 3, 13, 3, 5)  # Ho = (7 + 1 - 3) // 2 + 1, Wo = (11 + 1 - 3) // 2 + 1
    _, c_cu = ops.conv2d_forward(x, w, b, 2, ((0, 1), (0, 1)))
    _, c_np = spec(np_conv.conv2d_forward, x, w, b, 2, ((0, 1), (0, 1)))
    assert type(c_cu) is type(c_np) and c_cu.algo == "implicit_gemm"
    for got, want in zip(ops.conv2d_backward(dy, c_np), spec(np_conv.conv2d_backward, dy, c_cu)):
        check("crossed caches", got, want)


def test_inputs_are_not_modified_and_non_contiguous_inputs_work(emu_forward, rng):
    x = f32(rng, 7, 4, 3, 5).transpose(1, 0, 2, 3)  # (4, 7, 3, 5), not C-contiguous
    w = f32(rng, 6, 7, 3, 3)[:, :, ::-1]  # negative strides
    before = (x.copy(), w.copy())
    y, cache = ops.conv2d_forward(x, w, None, 1, 1)
    dy = f32(rng, *y.shape)[..., ::1]
    dx, dw, db = ops.conv2d_backward(dy, cache)
    ty, tdx, tdw, _ = torch_conv(x, w, None, 1, 1, dy)
    check("y", y, ty)
    check("dx", dx, tdx)
    check("dw", dw, tdw)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(w, before[1])
    assert db is None and y.dtype == dx.dtype == dw.dtype == np.float32


def test_empty_batch(emu_forward):
    x, w, b = np.zeros((0, 3, 5, 5), np.float32), np.ones((4, 3, 3, 3), np.float32), np.ones(4, np.float32)
    y, cache = ops.conv2d_forward(x, w, b, 1, 1)
    assert y.shape == (0, 4, 5, 5)
    dx, dw, db = ops.conv2d_backward(np.zeros((0, 4, 5, 5), np.float32), cache)
    assert dx.shape == x.shape and not dw.any() and not db.any()


def test_bad_input_is_refused_before_launch(emu_forward):
    x, w = np.zeros((2, 3, 5, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv2d \(cuda\): argument 'w' must have shape \(\*, 3, \*, \*\), got "
                                         r"\(4, 2, 3, 3\)"):
        ops.conv2d_forward(x, w[:, :2])
    with pytest.raises(ValueError, match=r"conv2d \(cuda\): argument 'x' must be float32 .* got float64"):
        ops.conv2d_forward(x.astype(np.float64), w.astype(np.float64))
    with pytest.raises(ValueError, match=r"kernel 3x3 is larger than the padded input 2x2"):
        ops.conv2d_forward(x[:, :, :2, :2], w)
    with pytest.raises(ValueError, match=r"argument 'stride' must be an int >= 1, got 0"):
        ops.conv2d_forward(x, w, stride=0)
    with pytest.raises(ValueError, match=r"argument 'padding' must be an int >= 0 or"):
        ops.conv2d_forward(x, w, padding=(1, 2))
    with pytest.raises(ValueError, match=r"argument 'b' must have shape \(4,\), got \(3,\)"):
        ops.conv2d_forward(x, w, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"version 4 does not exist; available: \(1, 2, 3\)"):
        ops.conv2d_forward(x, w, version=4)
    with pytest.raises(ValueError, match=r"version 3 does not exist; available: \(1, 2\)"):
        ops.conv2d_backward(np.zeros((2, 4, 5, 5), np.float32), ops.conv2d_forward(x, w, None, 1, 1)[1], version=3)
    with pytest.raises(ValueError, match=r"splits must be an int >= 1, got 0"):
        ops.conv2d_forward(x, w, splits=0)
    _, cache = ops.conv2d_forward(x, w, None, 1, 1)
    with pytest.raises(ValueError, match=r"conv2d_backward \(cuda\): argument 'dy' must have shape \(2, 4, 5, 5\)"):
        ops.conv2d_backward(np.zeros((2, 4, 5, 4), np.float32), cache)


def test_dispatch_from_the_numpy_op(emu_forward, rng):
    """minisd.ops.conv2d_forward/backward hand float32 arrays to the kernels while emulating; float64 stays NumPy."""
    x, w, b = f32(rng, 2, 3, 6, 5), f32(rng, 4, 3, 3, 3), f32(rng, 4)
    y, cache = np_conv.conv2d_forward(x, w, b, 1, 1)
    assert cache.algo == "implicit_gemm"  # the CUDA launcher's cache
    dx, dw, db = np_conv.conv2d_backward(f32(rng, *y.shape), cache)
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()
    _, cache64 = np_conv.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1, 1)
    assert cache64.algo == "im2col"


@pytest.mark.skipif(SANITIZE, reason="already running under the sanitizer")
def test_conv_under_sanitizer():
    """This file again with ASan + UBSan builds of the kernels (out-of-bounds and int-overflow checks)."""
    run_under_sanitizer(__file__)
