"""conv2d, upsample_nearest2x, concat: float64 finite differences, PyTorch parity on odd shapes, chunking, bad input."""
import numpy as np
import pytest

import minisd.ops.conv as conv_mod
from minisd.ops.conv import (concat_backward, concat_forward, conv2d_backward, conv2d_forward,
                             upsample_nearest2x_backward, upsample_nearest2x_forward)
from minisd.testing import numerical_gradient, rel_error


def _algos(K, stride, padding):
    """Algorithms conv2d can use for this case: im2col always; 1x1 or Winograd where they apply."""
    if K == 1 and stride == 1 and padding == 0:
        return ["1x1"]
    return ["im2col", "winograd"] if (K == 3 and stride == 1) else ["im2col"]


def _force(monkeypatch, algo):
    """Make conv2d pick `algo` for the small test shapes (the thresholds are tuned for SD-sized tensors)."""
    if algo == "winograd":
        monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_TILES", 0)
        monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_CHANNELS", 0)
        monkeypatch.setattr(conv_mod, "WINOGRAD_NARROW_MIN_CHANNELS", 0)
    else:
        monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_TILES", 10**12)


def _with_algos(cases):
    """Expand (N, C, H, W, Cout, K, stride, padding, ...) cases with every algorithm that applies to them."""
    return [case + (algo,) for case in cases for algo in _algos(case[5], case[6], case[7])]


def _pads(padding):
    """int or ((top, bottom), (left, right)) -> (top, bottom, left, right)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    (top, bottom), (left, right) = padding
    return top, bottom, left, right


def _torch_conv(torch, x, w, b, stride, padding, dy):
    """Reference: F.pad (zeros, any asymmetry) then F.conv2d with no padding; gradients from autograd."""
    F = torch.nn.functional
    top, bottom, left, right = _pads(padding)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    ty = F.conv2d(F.pad(tx, (left, right, top, bottom)), tw, tb, stride=stride)  # F.pad order: (W sides, H sides)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), None if b is None else tb.grad.numpy()


# (N, C, H, W, Cout, K, stride, padding, bias): small odd shapes covering every branch of the implementation
GRADCHECK_CASES = [
    (1, 3, 5, 7, 2, 3, 1, 1, True),  # 3x3 "same" conv, non-square image
    (3, 5, 6, 5, 4, 3, 2, 1, True),  # stride 2, batch 3
    (2, 3, 7, 6, 2, 3, 2, ((0, 1), (0, 1)), False),  # the VAE Downsample padding, no bias
    (3, 5, 4, 5, 3, 1, 1, 0, True),  # 1x1 stride 1 (direct matmul path)
    (2, 3, 7, 5, 2, 1, 2, 0, False),  # 1x1 stride 2 (im2col path)
    (1, 3, 6, 7, 2, 3, 1, ((2, 0), (1, 3)), True),  # lopsided padding on all sides
    (2, 2, 5, 6, 3, 3, 3, 0, True),  # stride 3, no padding, a leftover input row/column never read
    (2, 2, 2, 3, 2, 3, 1, 4, True),  # padding wider than the kernel: whole output rows see only zeros
    (2, 3, 6, 6, 4, 3, 1, 0, True),  # 3x3 without padding, even sizes (Winograd tiles fit exactly)
    # stride 1 other than 3x3: the input gradient as a conv of dy with the flipped kernel, and the row-run im2col
    (2, 3, 7, 6, 2, 5, 1, ((2, 1), (0, 3)), True),  # 5x5, lopsided padding (each side < K)
    (1, 2, 5, 4, 3, 2, 1, 0, False),  # 2x2, even kernel, no padding (the band is x itself)
    (2, 3, 4, 5, 2, 1, 1, 1, True),  # 1x1 with padding: as wide as the kernel, so the im2col backward
]


@pytest.mark.parametrize("N,C,H,W,Cout,K,stride,padding,bias,algo", _with_algos(GRADCHECK_CASES))
def test_conv2d_gradcheck_float64(rng, monkeypatch, N, C, H, W, Cout, K, stride, padding, bias, algo):
    _force(monkeypatch, algo)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((Cout, C, K, K))
    b = rng.standard_normal(Cout) if bias else None
    y, cache = conv2d_forward(x, w, b, stride, padding)
    assert cache.algo == algo
    top, bottom, left, right = _pads(padding)
    assert y.shape == (N, Cout, (H + top + bottom - K) // stride + 1, (W + left + right - K) // stride + 1)
    assert y.dtype == np.float64
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)

    def f():
        return conv2d_forward(x, w, b, stride, padding)[0]
    assert rel_error(dx, numerical_gradient(f, x, dy)) < 1e-6
    assert rel_error(dw, numerical_gradient(f, w, dy)) < 1e-6
    if bias:
        assert rel_error(db, numerical_gradient(f, b, dy)) < 1e-6
    else:
        assert db is None


def test_conv2d_forward_matches_direct_sum(rng):
    """An independent, loop-level definition of the forward (no im2col, no torch): y = sum over c, i, j."""
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    stride, (top, bottom, left, right) = 2, (1, 0, 0, 2)
    y, _ = conv2d_forward(x, w, b, stride, ((top, bottom), (left, right)))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ref = np.zeros_like(y)
    for oh in range(y.shape[2]):
        for ow in range(y.shape[3]):
            patch = xp[:, :, oh * stride: oh * stride + 3, ow * stride: ow * stride + 3]  # (N, C, 3, 3)
            ref[:, :, oh, ow] = np.einsum("ncij,ocij->no", patch, w) + b
    assert rel_error(y, ref) < 1e-12


# float32 against PyTorch. rel_error < 1e-5: both sides sum up to C*K*K = 117 float32 products per output, whose
# rounding error (~sqrt(117) * 6e-8 relative) stays far below it, while any indexing or sign error gives O(1).
TORCH_CASES = [
    (1, 5, 7, 11, 7, 3, 1, 1),
    (3, 13, 7, 11, 7, 3, 1, 1),
    (3, 13, 7, 11, 5, 3, 2, 1),
    (1, 13, 7, 11, 7, 3, 2, ((0, 1), (0, 1))),
    (3, 5, 8, 8, 13, 3, 2, ((0, 1), (0, 1))),
    (3, 13, 7, 11, 5, 1, 1, 0),
    (1, 5, 7, 11, 13, 1, 2, 0),
    (3, 7, 9, 6, 5, 3, 1, 0),
    (1, 13, 7, 11, 7, 3, 1, ((0, 1), (0, 1))),
    (3, 7, 9, 10, 5, 5, 1, ((2, 1), (0, 3))),  # 5x5 stride 1, lopsided padding
    (1, 5, 6, 7, 3, 2, 1, 0),  # even kernel, no padding
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,C,H,W,Cout,K,stride,padding,algo", _with_algos(TORCH_CASES))
def test_conv2d_matches_torch(rng, monkeypatch, N, C, H, W, Cout, K, stride, padding, algo, bias):
    torch = pytest.importorskip("torch")
    _force(monkeypatch, algo)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((Cout, C, K, K)).astype(np.float32)
    b = rng.standard_normal(Cout).astype(np.float32) if bias else None
    y, cache = conv2d_forward(x, w, b, stride, padding)
    assert cache.algo == algo
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv2d_backward(dy, cache)
    ty, tdx, tdw, tdb = _torch_conv(torch, x, w, b, stride, padding, dy)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    assert y.shape == ty.shape
    assert rel_error(y, ty) < 1e-5
    assert rel_error(dx, tdx) < 1e-5
    assert rel_error(dw, tdw) < 1e-5
    if bias:
        assert db.dtype == np.float32
        assert rel_error(db, tdb) < 1e-5
    else:
        assert db is None


def test_conv2d_winograd_by_default_matches_torch(rng):
    """A mid-sized 3x3 conv takes the Winograd path with the real thresholds (output at least 64 wide: odd height,
    channels not multiples of 8); 324-term sums, same tolerance. Its input gradient (a conv of dy) is Winograd too."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((1, 36, 65, 66)).astype(np.float32)
    w = rng.standard_normal((34, 36, 3, 3)).astype(np.float32)
    b = rng.standard_normal(34).astype(np.float32)
    y, cache = conv2d_forward(x, w, b, 1, 1)
    assert cache.algo == "winograd"
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = conv2d_backward(dy, cache)
    ref = _torch_conv(torch, x, w, b, 1, 1, dy)
    for got, want in zip((y,) + grads, ref):
        assert got.dtype == np.float32
        assert rel_error(got, want) < 1e-5


def test_conv2d_torch_symmetric_padding_argument(rng):
    """An int padding means the same as F.conv2d(padding=p) (not only as F.pad + conv)."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)
    w = rng.standard_normal((3, 5, 3, 3)).astype(np.float32)
    y, _ = conv2d_forward(x, w, None, 2, 2)
    ty = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=2, padding=2).numpy()
    assert y.shape == ty.shape
    assert rel_error(y, ty) < 1e-5


@pytest.mark.parametrize("split", ["rows", "bands", "images"])
@pytest.mark.parametrize("stride,padding,algo", [(1, 1, "im2col"), (2, ((0, 1), (0, 1)), "im2col"), (2, 0, "im2col"),
                                                 (1, ((4, 5), (0, 2)), "im2col"), (1, 1, "winograd"),
                                                 (1, ((0, 1), (0, 1)), "winograd"), (1, ((4, 5), (0, 2)), "winograd")])
def test_conv2d_chunked_equals_unchunked(rng, monkeypatch, split, stride, padding, algo):
    """A small MAX_COLS_BYTES forces one-row chunks, two-row bands, or groups of two whole images."""
    _force(monkeypatch, algo)
    calls = []  # spy on the chunk planner: (its arguments, its plan)

    def spy(N, rows, row_bytes):
        calls.append(((N, rows, row_bytes), _real_chunks(N, rows, row_bytes)))
        return calls[-1][1]
    monkeypatch.setattr(conv_mod, "_chunks", spy)
    x = rng.standard_normal((3, 4, 9, 7))
    w = rng.standard_normal((5, 4, 3, 3))
    b = rng.standard_normal(5)
    y_ref, cache = conv2d_forward(x, w, b, stride, padding)
    assert cache.algo == algo and len(calls[-1][1]) == 1  # the default cap: one chunk for all three images
    dy = rng.standard_normal(y_ref.shape)
    grads_ref = conv2d_backward(dy, cache)
    N, rows, row_bytes = calls[0][0]  # the forward's plan (backward plans after it)
    cap = {"rows": 1, "bands": 2 * row_bytes, "images": 2 * rows * row_bytes}[split]
    monkeypatch.setattr(conv_mod, "MAX_COLS_BYTES", cap)
    calls.clear()
    y, cache = conv2d_forward(x, w, b, stride, padding)
    grads = conv2d_backward(dy, cache)
    sizes = {"rows": (1, 1), "bands": (1, 2), "images": (2, rows)}[split]  # (images, rows) of the first chunk
    # the backward of a stride-1 conv plans twice: its input gradient is itself a conv (of dy, 5 -> 4 channels,
    # so its chunks differ), then its weight gradient; stride 2 and padding >= 3 take the one-plan im2col backward
    plans = 3 if stride == 1 and padding in (1, ((0, 1), (0, 1))) else 2
    assert len(calls) == plans and all(len(plan) > 1 for _, plan in calls)  # every pass really was cut up
    # the forward and the weight gradient (when it uses the forward's algorithm) cut x exactly as asked
    for i in ((0, plans - 1) if plans == 3 or algo == "im2col" else (0,)):
        plan = calls[i][1]
        assert plan[0][1] - plan[0][0] == sizes[0] and plan[0][3] - plan[0][2] == sizes[1]
    assert rel_error(y, y_ref) < 1e-13
    for g, g_ref in zip(grads, grads_ref):
        assert rel_error(g, g_ref) < 1e-13


_real_chunks = conv_mod._chunks


def test_conv2d_chunks_respect_cap(monkeypatch):
    monkeypatch.setattr(conv_mod, "MAX_COLS_BYTES", 4 * 2**20)
    N, Ho, row_bytes = 2, 512, 128 * 9 * 512 * 4  # a VAE conv at 512x512: a whole cols buffer would be 1.2 GB
    chunks = conv_mod._chunks(N, Ho, row_bytes)
    assert max((n1 - n0) * (r1 - r0) * row_bytes for n0, n1, r0, r1 in chunks) <= 4 * 2**20
    covered = sorted((n, r) for n0, n1, r0, r1 in chunks for n in range(n0, n1) for r in range(r0, r1))
    assert covered == [(n, r) for n in range(N) for r in range(Ho)]  # every output row exactly once


@pytest.mark.parametrize("shape,K,stride,padding,algo", [
    ((1, 320, 64, 64), 3, 1, 1, "winograd"),  # U-Net level 1 ResBlock conv
    ((2, 640, 32, 32), 3, 1, 1, "winograd"),
    ((1, 1280, 16, 16), 3, 1, 1, "winograd"),
    ((2, 1280, 8, 8), 3, 1, 1, "im2col"),  # too few tiles for the Winograd fixed costs
    ((1, 4, 64, 64), 3, 1, 1, "im2col"),  # conv_in: too few channels
    ((1, 320, 64, 64), 3, 2, 1, "im2col"),  # Downsample
    ((1, 128, 64, 64), 3, 2, ((0, 1), (0, 1)), "im2col"),  # VAE Downsample
    ((1, 640, 32, 32), 1, 1, 0, "1x1"),  # shortcut / proj_in
])
def test_conv2d_algorithm_choice(shape, K, stride, padding, algo):
    x = np.zeros(shape, np.float32)
    w = np.zeros((shape[1], shape[1], K, K), np.float32)
    _, cache = conv2d_forward(x, w, None, stride, padding)
    assert cache.algo == algo


@pytest.mark.parametrize("K,stride,algo", [(1, 1, "1x1"), (3, 2, "im2col"), (3, 1, "im2col"), (3, 1, "winograd")])
def test_conv2d_non_contiguous_inputs(rng, monkeypatch, K, stride, algo):
    """Transposed / reversed views give the same results as their contiguous copies and are not modified."""
    _force(monkeypatch, algo)
    x = rng.standard_normal((5, 2, 6, 7)).transpose(1, 0, 2, 3)  # (2, 5, 6, 7), not C-contiguous
    w = rng.standard_normal((4, 5, K, K))[:, :, ::-1]  # negative strides
    pad = 0 if K == 1 else 1
    before = (x.copy(), w.copy())
    y, cache = conv2d_forward(x, w, None, stride, pad)
    assert cache.algo == algo
    dy = rng.standard_normal(y.shape[::-1]).T  # a transposed view as well
    grads = conv2d_backward(dy, cache)
    y_ref, cache_ref = conv2d_forward(np.ascontiguousarray(x), np.ascontiguousarray(w), None, stride, pad)
    grads_ref = conv2d_backward(np.ascontiguousarray(dy), cache_ref)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(w, before[1])
    assert rel_error(y, y_ref) < 1e-14
    for g, g_ref in zip(grads[:2], grads_ref[:2]):
        assert rel_error(g, g_ref) < 1e-14


@pytest.mark.parametrize("K,algo", [(1, "1x1"), (3, "im2col"), (3, "winograd")])
def test_conv2d_backward_returns_fresh_arrays(rng, monkeypatch, K, algo):
    _force(monkeypatch, algo)
    x = rng.standard_normal((2, 3, 5, 5))
    w = rng.standard_normal((4, 3, K, K))
    y, cache = conv2d_forward(x, w, rng.standard_normal(4), 1, 0)
    assert cache.algo == algo
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    for g in (dx, dw, db):
        assert not np.shares_memory(g, dy) and not np.shares_memory(g, x) and not np.shares_memory(g, w)


def test_conv2d_bad_input():
    x = np.zeros((2, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv2d: argument 'x' must be 4-D, got shape \(3, 8, 8\)"):
        conv2d_forward(x[0], w)
    with pytest.raises(ValueError, match=r"conv2d: argument 'w' must be 4-D"):
        conv2d_forward(x, w[0])
    with pytest.raises(ValueError,
                       match=r"conv2d: argument 'w' must have shape \(\*, 3, \*, \*\), got \(4, 5, 3, 3\)"):
        conv2d_forward(x, np.zeros((4, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"conv2d: argument 'b' must have shape \(4,\), got \(3,\)"):
        conv2d_forward(x, w, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"conv2d: argument 'w' has dtype float64 but 'x' has float32"):
        conv2d_forward(x, w.astype(np.float64))
    with pytest.raises(ValueError, match=r"conv2d: argument 'x' must be a float array"):
        conv2d_forward(x.astype(np.int32), w)
    for bad in (-1, 1.5, (1, 1), ((0, 1),), ((0, 1), (0, -1)), "same"):
        with pytest.raises(ValueError, match=r"conv2d: argument 'padding' must be an int >= 0 or"):
            conv2d_forward(x, w, padding=bad)
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match=r"conv2d: argument 'stride' must be an int >= 1"):
            conv2d_forward(x, w, stride=bad)
    with pytest.raises(ValueError, match=r"conv2d: kernel 3x3 is larger than the padded input 2x2"):
        conv2d_forward(np.zeros((1, 3, 2, 2), np.float32), w)
    _, cache = conv2d_forward(x, w, padding=1)
    with pytest.raises(ValueError, match=r"conv2d_backward: argument 'dy' must have shape \(2, 4, 8, 8\)"):
        conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), cache)


# ---------------------------------------------------------------------------------------------------------------
# upsample_nearest2x

def test_upsample_gradcheck_float64(rng):
    x = rng.standard_normal((2, 3, 3, 5))
    y, cache = upsample_nearest2x_forward(x)
    assert y.shape == (2, 3, 6, 10) and y.dtype == np.float64
    dy = rng.standard_normal(y.shape)
    dx = upsample_nearest2x_backward(dy, cache)
    assert rel_error(dx, numerical_gradient(lambda: upsample_nearest2x_forward(x)[0], x, dy)) < 1e-6


@pytest.mark.parametrize("shape", [(1, 5, 7, 11), (3, 13, 4, 3)])
def test_upsample_matches_torch(rng, shape):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape).astype(np.float32)
    y, cache = upsample_nearest2x_forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = upsample_nearest2x_backward(dy, cache)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.interpolate(tx, scale_factor=2, mode="nearest")
    ty.backward(torch.tensor(dy))
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(y, ty.detach().numpy())  # a pure copy: must be bit-exact
    assert rel_error(dx, tx.grad.numpy()) < 1e-6  # sums of 4 float32 values; only the summation order may differ


def test_upsample_bad_input():
    with pytest.raises(ValueError, match=r"upsample_nearest2x: argument 'x' must be 4-D, got shape \(3, 4, 4\)"):
        upsample_nearest2x_forward(np.zeros((3, 4, 4), np.float32))
    _, cache = upsample_nearest2x_forward(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError,
                       match=r"upsample_nearest2x_backward: argument 'dy' must have shape \(1, 2, 6, 8\)"):
        upsample_nearest2x_backward(np.zeros((1, 2, 6, 7), np.float32), cache)


# ---------------------------------------------------------------------------------------------------------------
# concat

@pytest.mark.parametrize("axis", [1, 0, -1])
def test_concat_gradcheck_float64(rng, axis):
    shapes = {1: [(2, 3, 4, 5), (2, 7, 4, 5)], 0: [(1, 3, 4, 5), (3, 3, 4, 5)], -1: [(2, 3, 4, 2), (2, 3, 4, 5)]}[axis]
    h, skip = (rng.standard_normal(s) for s in shapes)
    y, cache = concat_forward([h, skip], axis=axis)
    dy = rng.standard_normal(y.shape)
    dh, dskip = concat_backward(dy, cache)
    assert rel_error(dh, numerical_gradient(lambda: concat_forward([h, skip], axis=axis)[0], h, dy)) < 1e-6
    assert rel_error(dskip, numerical_gradient(lambda: concat_forward([h, skip], axis=axis)[0], skip, dy)) < 1e-6
    for g in (dh, dskip):
        assert not np.shares_memory(g, dy)  # fresh arrays, safe to accumulate into


def test_concat_matches_torch(rng):
    torch = pytest.importorskip("torch")
    xs = [rng.standard_normal((3, c, 7, 11)).astype(np.float32) for c in (13, 5, 7)]
    y, cache = concat_forward(xs, axis=1)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dxs = concat_backward(dy, cache)
    txs = [torch.tensor(a, requires_grad=True) for a in xs]
    ty = torch.cat(txs, dim=1)  # h first, then the skip, as the U-Net does
    ty.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    assert len(dxs) == 3
    for d, t in zip(dxs, txs):
        np.testing.assert_array_equal(d, t.grad.numpy())


def test_concat_bad_input():
    a = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError,
                       match=r"concat: argument 'xs\[1\]' must have shape \(2, \*, 4, 4\), got \(2, 3, 4, 5\)"):
        concat_forward([a, np.zeros((2, 3, 4, 5), np.float32)])
    with pytest.raises(ValueError, match=r"concat: argument 'xs\[1\]' must have shape \(2, \*, 4, 4\), got \(2, 3, 4\)"):
        concat_forward([a, np.zeros((2, 3, 4), np.float32)])
    with pytest.raises(ValueError, match=r"concat: argument 'xs\[1\]' has dtype float64 but 'xs\[0\]' has float32"):
        concat_forward([a, a.astype(np.float64)])
    with pytest.raises(ValueError, match=r"concat: argument 'xs' must hold at least one array"):
        concat_forward([])
    with pytest.raises(ValueError, match=r"concat: argument 'axis' must lie in \[-4, 4\)"):
        concat_forward([a, a], axis=4)


def test_winograd_written_out_transform_is_the_papers_matrix():
    """The adds of _BT_TERMS are exactly B^T of Lavin & Gray (the Winograd tests above check whole convs; this
    pins the table itself, so a wrong sign cannot hide behind a compensating one elsewhere)."""
    d = np.arange(16.0).reshape(4, 4) ** 1.5  # any tile with distinct rows
    rows = np.stack([op(d[i], d[k]) for i, k, op in conv_mod._BT_TERMS])  # (B^T d) row by row
    np.testing.assert_array_equal(rows, conv_mod._WINO_BT @ d)


@pytest.mark.parametrize("N,C,H,W,Cout,K,stride,padding,bias,algo",
                         [c for c in _with_algos(GRADCHECK_CASES) if c[6] == 1 and c[5] > 1])
def test_conv2d_both_stride1_backwards_agree(rng, monkeypatch, N, C, H, W, Cout, K, stride, padding, bias, algo):
    """Stride-1 convs have two backward paths, picked by channel count: the input gradient as a conv of dy (the
    gradcheck above runs it at these small sizes) and, for many channels, the transposed forward (Winograd or
    im2col). Both must give the same gradients (float64, so any formula slip shows far above rounding)."""
    _force(monkeypatch, algo)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((Cout, C, K, K))
    y, cache = conv2d_forward(x, w, rng.standard_normal(Cout) if bias else None, stride, padding)
    dy = rng.standard_normal(y.shape)
    by_conv = conv2d_backward(dy, cache)
    monkeypatch.setattr(conv_mod, "BACKWARD_BY_CONV_MAX_CHANNELS", 0)  # every conv takes the transposed forward
    transposed = conv2d_backward(dy, cache)
    for a, b in zip(by_conv, transposed):
        if a is None:
            assert b is None
        else:
            assert rel_error(a, b) < 1e-12
