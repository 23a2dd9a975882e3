"""GPU conv2d (kernels/conv2d.cu): the launch code of minisd/ops/conv.py:conv2d_forward / conv2d_backward.

Same signatures, returns and cache as the NumPy op (the spec):
    conv2d_forward(x, w, b=None, stride=1, padding=0) -> (y, Conv2dCache)
    conv2d_backward(dy, cache) -> (dx, dw, db or None)
x (N, C, H, W), w (Cout, C, KH, KW), b (Cout,) or None -> y (N, Cout, Ho, Wo); padding an int or
((top, bottom), (left, right)); any kernel size, any stride. The cache is the NumPy op's own Conv2dCache (x, w,
has_bias, stride, padding, algo="implicit_gemm"), so a forward on one path feeds a backward on the other (the NumPy
backward treats "implicit_gemm" like "im2col", its general path).

Arrays are CuPy arrays on a GPU, or float32 NumPy arrays while emulating (`with minisd.cuda.emulate():`).
Keyword-only extras for tests and benchmarks: `version=` (1 naive, 2 tiled implicit GEMM: production, 3 forward
only: larger register tiles and double buffering, a candidate until measured on a GPU) and `splits=` (v2/v3: split
the GEMM's K dimension over that many blocks; default: chosen from the shape, see choose_splits). Kernel source, derivation and version history: kernels/conv2d.cu.

Glossary: N batch, C / Cout input / output channels, H, W / Ho, Wo input / output size, KH, KW kernel size,
K the GEMM reduction length (C*KH*KW, Cout*KH*KW or N*Ho*Wo depending on the pass).
"""
import numpy as np

from .. import backend
from ..ops import conv as _conv
from ..ops.common import check_ndim, check_shape
from .launch import blocks, empty, get_kernel
from .ops import _arrays, _i32, _round32, _threads, _version

VERSIONS = {"conv2d_forward": ((1, 2, 3), 2), "conv2d_backward": ((1, 2), 2)}

# v2 tile geometry: must match CV_BM / CV_BN / CV_BK / CV_THREADS in kernels/conv2d.cu; v3 (forward): CV3_*
TILE_M, TILE_N, TILE_K, TILE_THREADS = 64, 64, 16, 256
TILE3_M, TILE3_N, TILE3_K = 128, 128, 8
# Split-K: use more blocks than tiles when a GEMM has fewer than TARGET_WAVES blocks per SM (SD's 16x16 and 8x8
# levels, and the weight gradient of thin layers), but give each split at least MIN_SLICES_PER_SPLIT slices of K
# (fewer, and writing and summing the partial results costs more than the extra parallelism brings).
TARGET_WAVES = 2
MIN_SLICES_PER_SPLIT = 8
MAX_SPLITS = 16
EMULATED_SMS = 132  # the emulator plans launches as for an H100 SXM (132 SMs), so tests exercise split-K too

_sm_count = {}


def _sms(xp):
    """Number of SMs of the current GPU (cached per device), or EMULATED_SMS in the emulator."""
    if xp is np:
        return EMULATED_SMS
    dev = xp.cuda.Device()
    if dev.id not in _sm_count:
        _sm_count[dev.id] = int(dev.attributes["MultiProcessorCount"])
    return _sm_count[dev.id]


def choose_splits(tiles, K, sms, slice_k=TILE_K):
    """How many ways to split K for a GEMM of `tiles` output tiles: 1 when the tiles alone fill the GPU."""
    if tiles >= TARGET_WAVES * sms:
        return 1
    slices = -(-K // slice_k)
    return max(1, min(MAX_SPLITS, -(-TARGET_WAVES * sms // tiles), slices // MIN_SLICES_PER_SPLIT))


def _split_plan(op, splits, tiles, K, xp, slice_k=TILE_K):
    """(splits, slices per split) for a v2/v3 launch; a caller's `splits` is honoured (capped at the slice count)."""
    slices = -(-K // slice_k)
    if splits is None:
        splits = choose_splits(tiles, K, _sms(xp), slice_k)
    elif not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"{op}: splits must be an int >= 1, got {splits!r}")
    per = -(-slices // int(splits))
    return -(-slices // per), per  # no empty split: e.g. 5 slices in 3 splits -> per = 2, 3 splits


def _gemm(xp, k, grid_xy, splits, per, out_shape, args):
    """Launch a v2 implicit-GEMM kernel; with splits > 1 into a (splits, *out_shape) buffer, summed here in a fixed
    order (deterministic). args: the kernel arguments before the output and the trailing ints, see callers."""
    inputs, sizes = args
    if splits == 1:
        out = empty(xp, out_shape)
        k(grid_xy + (1,), (TILE_THREADS,), inputs + (out,) + sizes + (np.int32(per),))
        return out
    part = empty(xp, (splits,) + tuple(out_shape))
    k(grid_xy + (splits,), (TILE_THREADS,), inputs + (part,) + sizes + (np.int32(per),))
    return part.sum(axis=0)


def _geometry(op, x, w, stride, padding):
    """Validate like the NumPy op; return (stride, pads, Ho, Wo)."""
    check_ndim(op, "x", x, 4)
    check_ndim(op, "w", w, 4)
    N, C, H, W = x.shape
    check_shape(op, "w", w, (None, C, None, None))
    stride = _conv._check_stride(op, stride)
    pads = _conv._parse_padding(op, padding)
    (top, bottom), (left, right) = pads
    kh, kw = w.shape[2:]
    if H + top + bottom < kh or W + left + right < kw:
        raise ValueError(f"{op}: kernel {kh}x{kw} is larger than the padded input {H + top + bottom}x"
                         f"{W + left + right} (x {tuple(x.shape)}, padding {pads})")
    return stride, pads, _conv._out_size(H, top, bottom, kh, stride), _conv._out_size(W, left, right, kw, stride)


def _sizes(op, x, w, Ho, Wo, stride, pads):
    """The int arguments every kernel takes (N, C, H, W, Cout, KH, KW, Ho, Wo, stride, top, left), after checking
    that the products the kernels form in 32-bit ints fit (GEMM column counts, per-image sizes)."""
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    for what, v in (("N*Ho*Wo", N * Ho * Wo), ("N*H*W", N * H * W), ("(C+1)*H*W", (C + 1) * H * W),
                    ("Cout*Ho*Wo", Cout * Ho * Wo), ("C*KH*KW", C * kh * kw), ("Cout*KH*KW", Cout * kh * kw)):
        _i32(op, what, v)
    (top, _), (left, _) = pads
    return tuple(np.int32(v) for v in (N, C, H, W, Cout, kh, kw, Ho, Wo, stride, top, left))


def conv2d_forward(x, w, b=None, stride=1, padding=0, *, version=None, splits=None, threads=None):
    """y = conv2d(x, w, b): x (N, C, H, W), w (Cout, C, KH, KW), b (Cout,) or None -> y (N, Cout, Ho, Wo), cache."""
    op = "conv2d (cuda)"
    stride, pads, Ho, Wo = _geometry(op, x, w, stride, padding)
    Cout = w.shape[0]
    if b is not None:
        check_shape(op, "b", b, (Cout,))
    xp = _arrays(op, x=x, w=w, b=b)
    v = _version("conv2d_forward", version)
    x, w = xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    bias = xp.ascontiguousarray(b) if b is not None else xp.zeros(1, np.float32)  # a valid pointer either way
    N, C = x.shape[:2]
    sizes = _sizes(op, x, w, Ho, Wo, stride, pads)
    cache = _conv.Conv2dCache(x, w, b is not None, stride, pads, "implicit_gemm")
    if N * Cout * Ho * Wo == 0:
        return empty(xp, (N, Cout, Ho, Wo)), cache
    k = get_kernel("conv2d", f"conv2d_forward_v{v}", x)
    flags = (np.int32(b is not None),)
    if v == 1:  # one thread per output element
        y = empty(xp, (N, Cout, Ho, Wo))
        t = _threads(op, threads, 128)
        k((_i32(op, "blocks", blocks(N * Cout * Ho * Wo, t)),), (t,), (x, w, bias, y) + sizes + flags + (np.int32(0),))
        return y, cache
    K = C * w.shape[2] * w.shape[3]
    tm, tn, tk = (TILE3_M, TILE3_N, TILE3_K) if v == 3 else (TILE_M, TILE_N, TILE_K)
    grid = (blocks(N * Ho * Wo, tn), blocks(Cout, tm))
    s, per = _split_plan(op, splits, grid[0] * grid[1], K, xp, tk)
    y = _gemm(xp, k, grid, s, per, (N, Cout, Ho, Wo), ((x, w, bias), sizes + flags))
    return y, cache


def conv2d_backward(dy, cache, *, version=None, splits=None, threads=None):
    """dy (N, Cout, Ho, Wo) -> (dx (N, C, H, W), dw (Cout, C, KH, KW), db (Cout,) or None).

    splits: for v2, one count for both GEMMs (dx: K = Cout*KH*KW; dw: K = N*Ho*Wo); default chosen per GEMM.
    """
    op = "conv2d_backward (cuda)"
    x, w, has_bias, stride, pads, _ = cache
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    (top, bottom), (left, right) = pads
    Ho, Wo = _conv._out_size(H, top, bottom, kh, stride), _conv._out_size(W, left, right, kw, stride)
    check_shape(op, "dy", dy, (N, Cout, Ho, Wo))
    xp = _arrays(op, dy=dy, x=x, w=w)
    v = _version("conv2d_backward", version)
    # no-ops for this module's caches; a cache from the NumPy forward may hold non-contiguous arrays
    dy, x, w = xp.ascontiguousarray(dy), xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    sizes = _sizes(op, x, w, Ho, Wo, stride, pads)
    if N * Ho * Wo == 0 or C * Cout == 0:  # nothing to sum: zero gradients (a grid of 0 blocks is an error)
        db = xp.zeros(Cout, np.float32) if has_bias else None
        return xp.zeros(x.shape, np.float32), xp.zeros(w.shape, np.float32), db
    kd = get_kernel("conv2d", f"conv2d_backward_data_v{v}", x)
    kw_ = get_kernel("conv2d", f"conv2d_backward_weight_v{v}", x)
    kb = get_kernel("conv2d", f"conv2d_backward_bias_v{v}", x)
    tail = (np.int32(0),)
    if v == 1:
        t = _threads(op, threads, 128)
        dx = empty(xp, x.shape)
        kd((_i32(op, "blocks", blocks(x.size, t)),), (t,), (dy, w, dx) + sizes + tail)
        dw = empty(xp, w.shape)
        kw_((_i32(op, "blocks", blocks(w.size, t)),), (t,), (dy, x, dw) + sizes + tail)
    else:
        KK = kh * kw
        grid = (blocks(N * H * W, TILE_N), blocks(C, TILE_M))
        s, per = _split_plan(op, splits, grid[0] * grid[1], Cout * KK, xp)
        dx = _gemm(xp, kd, grid, s, per, x.shape, ((dy, w), sizes))
        grid = (blocks(C * KK, TILE_N), blocks(Cout, TILE_M))
        s, per = _split_plan(op, splits, grid[0] * grid[1], N * Ho * Wo, xp)
        dw = _gemm(xp, kw_, grid, s, per, (Cout, C * KK), ((dy, x), sizes)).reshape(w.shape)
    db = None
    if has_bias:  # y = ... + b[co] at every (n, oh, ow): db sums dy over them
        db = empty(xp, (Cout,))
        if v == 1:
            t = _threads(op, threads, 64)
            kb((blocks(Cout, t),), (t,), (dy, db, np.int32(N), np.int32(Cout), np.int32(Ho * Wo)))
        else:
            t = _threads(op, threads, _round32(Ho * Wo))
            kb((Cout,), (t,), (dy, db, np.int32(N), np.int32(Cout), np.int32(Ho * Wo)))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------
# nearest-neighbour 2x upsampling: no kernel of its own (a strided copy and a 4-term sum, which CuPy's elementwise
# and reduction kernels do at memory speed), but the NumPy op allocates its output with np.empty and fills it from
# threads, which cannot hold CuPy arrays. These are its device twins (same signatures, returns and cache).

def upsample_nearest2x_forward(x):
    """x (N, C, H, W) -> y (N, C, 2H, 2W), each pixel a 2x2 block; the NumPy op's UpsampleCache."""
    check_ndim("upsample_nearest2x (cuda)", "x", x, 4)
    xp = backend.xp_of(x)
    N, C, H, W = x.shape
    y = xp.empty((N, C, 2 * H, 2 * W), dtype=x.dtype)
    y.reshape(N * C, H, 2, W, 2)[...] = x.reshape(N * C, H, 1, W, 1)  # (N*C, H, 2, W, 2) <- broadcast over 2x2
    return y, _conv.UpsampleCache(tuple(x.shape))


def upsample_nearest2x_backward(dy, cache):
    """dy (N, C, 2H, 2W) -> dx (N, C, H, W): the sum of each 2x2 block (every input pixel fed four outputs)."""
    N, C, H, W = cache.x_shape
    check_shape("upsample_nearest2x_backward (cuda)", "dy", dy, (N, C, 2 * H, 2 * W))
    return dy.reshape(N * C, H, 2, W, 2).sum(axis=(2, 4)).reshape(N, C, H, W)  # (N*C, H, 2, W, 2) -> (N, C, H, W)
