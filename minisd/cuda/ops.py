"""GPU implementations of the hot ops: GroupNorm (+ fused SiLU), LayerNorm, softmax, GEGLU, forward and backward.

Same signatures and return conventions as the NumPy ops they replace (the spec):
    group_norm_forward(x, gamma, beta, num_groups, eps, act=None) -> (y, cache)   minisd/ops/norm.py
    group_norm_backward(dy, cache) -> (dx, dgamma, dbeta)
    layer_norm_forward(x, gamma, beta, eps) -> (y, cache);  layer_norm_backward(dy, cache) -> (dx, dgamma, dbeta)
    softmax_forward(x, axis=-1) -> (y, cache);  softmax_backward(dy, cache) -> dx      minisd/ops/activations.py
    geglu_forward(h) -> (y, cache);  geglu_backward(dy, cache) -> dh
The caches are the NumPy ops' own NamedTuples (GroupNormCache(x, gamma, beta, mean, rstd, act),
LayerNormCache(x, gamma, mean, rstd), SoftmaxCache(y, axis), GegluCache(h)), so a forward on one path and a
backward on the other work.

Arrays are CuPy arrays on a GPU, or float32 NumPy arrays while emulating (`with minisd.cuda.emulate():`), where the
kernels run in the CPU emulator (kernels/emu/). The kernels are float32-only. Every function validates shapes and
dtypes before it launches anything (ValueError naming the op, the argument, expected and actual), copies
non-contiguous inputs once (the kernels index dense memory), and allocates outputs through launch.empty (NaN-filled
while testing, so "every element written" can be asserted).

Keyword-only extras for tests and benchmarks: `version=` picks an older kernel version (default: the production
one, VERSIONS below) and `threads=` the block size (must suit the kernel; the defaults are below each launch).
Kernel sources, with the derivations and version histories: kernels/groupnorm.cu, layernorm.cu, softmax.cu, geglu.cu.

Glossary: N batch, C channels, G groups, HW flattened spatial size, M rows (product of leading dims), D normalised
width, S softmax length, F GEGLU inner width.
"""
import numpy as np

from .. import backend
# The NumPy ops' cache types are reused, so a cache from either path feeds either backward. Modules, not names,
# are imported: their attributes are read at call time, so minisd.ops.* may import minisd.cuda at their top.
from ..ops import activations as _act
from ..ops import norm as _norm
from ..ops.common import check_ndim, check_shape
from .launch import blocks, empty, get_kernel

# op -> (available kernel versions, production version)
VERSIONS = {
    "group_norm_forward": ((1, 2), 2),
    "group_norm_backward": ((1, 2), 2),
    "layer_norm_forward": ((1, 2), 2),
    "layer_norm_backward": ((1, 2), 2),
    "softmax_forward": ((1, 2, 3), 3),
    "softmax_backward": ((1, 2), 2),
    "geglu_forward": ((1, 2), 2),
    "geglu_backward": ((1, 2), 2),
}
_INT32_MAX = 2 ** 31 - 1


# ---------------------------------------------------------------------------------------------------------------
# checks shared by every op

def _arrays(op, **arrays):
    """Check that the arrays are all CuPy or all NumPy and float32; return their array module (numpy or cupy)."""
    first_name, first = next((k, a) for k, a in arrays.items() if a is not None)
    for name, a in arrays.items():
        if a is None:
            continue
        if backend.is_cuda(a) != backend.is_cuda(first):
            raise ValueError(f"{op}: argument '{name}' is a {type(a).__module__.split('.')[0]} array but "
                             f"'{first_name}' is a {type(first).__module__.split('.')[0]} array; move both to the "
                             f"same device")
        if a.dtype != np.float32:
            raise ValueError(f"{op}: argument '{name}' must be float32 (the CUDA kernels are float32-only), "
                             f"got {a.dtype}")
    return backend.xp_of(first)


def _i32(op, what, value):
    """The kernels take int sizes: refuse sizes that do not fit (instead of silently wrapping around)."""
    if value > _INT32_MAX:
        raise ValueError(f"{op}: {what} = {value} does not fit the kernels' 32-bit int sizes; split the input")
    return np.int32(value)


def _version(op, version):
    avail, production = VERSIONS[op]
    v = production if version is None else version
    if v not in avail:
        raise ValueError(f"{op}: version {version!r} does not exist; available: {avail} (production {production})")
    return v


def _threads(op, threads, default, multiple_of=32):
    """Block size: the default, or a caller's choice that is a multiple of `multiple_of` and at most 1024."""
    if threads is None:
        return default
    if not 1 <= threads <= 1024 or threads % multiple_of:
        raise ValueError(f"{op}: threads={threads} must be a multiple of {multiple_of} in [{multiple_of}, 1024]")
    return int(threads)


def _round32(n, cap=256):
    """A block size for a reduction over n items: n rounded up to whole warps, at least 32, at most cap."""
    return int(min(cap, max(32, -(-n // 32) * 32)))


# ---------------------------------------------------------------------------------------------------------------
# GroupNorm

_ACTS = {None: 0, "silu": 1}


def group_norm_forward(x, gamma, beta, num_groups, eps, act=None, *, version=None, threads=None):
    """GroupNorm (+ optional fused SiLU). x (N, C, *spatial), gamma/beta (C,) -> y like x, GroupNormCache with
    mean, rstd (N, G)."""
    op = "group_norm (cuda)"
    check_ndim(op, "x", x, tuple(range(2, 9)))
    N, C = x.shape[:2]
    check_shape(op, "gamma", gamma, (C,))
    check_shape(op, "beta", beta, (C,))
    G = int(num_groups)
    if G < 1 or C % G:
        raise ValueError(f"{op}: num_groups={num_groups} must divide the {C} channels of x {tuple(x.shape)}")
    if act not in _ACTS:
        raise ValueError(f"{op}: act must be None or 'silu', got {act!r}")
    xp = _arrays(op, x=x, gamma=gamma, beta=beta)
    v = _version("group_norm_forward", version)
    HW = int(np.prod(x.shape[2:], dtype=np.int64))
    x, gamma, beta = xp.ascontiguousarray(x), xp.ascontiguousarray(gamma), xp.ascontiguousarray(beta)
    y = empty(xp, x.shape)
    mean, rstd = empty(xp, (N, G)), empty(xp, (N, G))
    args = (x, gamma, beta, y, mean, rstd, _i32(op, "N", N), _i32(op, "C", C), _i32(op, "H*W", HW), np.int32(G),
            np.float32(eps), np.int32(_ACTS[act]))
    _i32(op, "group size C/G*H*W", C // G * HW)
    _i32(op, "N*C", N * C)
    k = get_kernel("groupnorm", f"groupnorm_forward_v{v}", x)
    if x.size == 0:
        pass  # nothing to launch (a grid of 0 blocks is an error on the GPU)
    elif v == 1:  # one thread per (n, g)
        t = _threads(op, threads, 64)
        k((blocks(N * G, t),), (t,), args)
    else:  # one block per (n, g)
        t = _threads(op, threads, _round32(C // G * HW))
        k((N * G,), (t,), args)
    return y, _norm.GroupNormCache(x, gamma, beta, mean, rstd, act)


def group_norm_backward(dy, cache, *, version=None, threads=None):
    """dy like x -> (dx like x, dgamma (C,), dbeta (C,))."""
    op = "group_norm_backward (cuda)"
    x, gamma, beta, mean, rstd, act = cache
    check_shape(op, "dy", dy, tuple(x.shape))
    xp = _arrays(op, dy=dy, x=x, gamma=gamma, beta=beta, mean=mean, rstd=rstd)
    v = _version("group_norm_backward", version)
    N, C = x.shape[:2]
    G = mean.shape[1]  # mean, rstd (N, G)
    HW = int(np.prod(x.shape[2:], dtype=np.int64))
    # no-ops for this module's own caches; a cache from the NumPy forward may hold a non-contiguous x
    dy, x, gamma, beta, mean, rstd = (xp.ascontiguousarray(a) for a in (dy, x, gamma, beta, mean, rstd))
    dx = empty(xp, x.shape)
    dgamma_part, dbeta_part = empty(xp, (N, C)), empty(xp, (N, C))  # per-sample partial sums
    args = (dy, x, gamma, beta, mean, rstd, dx, dgamma_part, dbeta_part, np.int32(N), np.int32(C), np.int32(HW),
            np.int32(G), np.int32(_ACTS[act]))
    k = get_kernel("groupnorm", f"groupnorm_backward_v{v}", x)
    if x.size == 0:
        return dx, xp.zeros(C, np.float32), xp.zeros(C, np.float32)
    if v == 1:
        t = _threads(op, threads, 64)
        k((blocks(N * G, t),), (t,), args)
    else:  # the per-channel loops run over H*W, so size the block for that
        t = _threads(op, threads, _round32(HW))
        k((N * G,), (t,), args)
    # the sum over the batch happens here, in a fixed order (deterministic, unlike atomicAdd in the kernel)
    return dx, dgamma_part.sum(axis=0), dbeta_part.sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm

def layer_norm_forward(x, gamma, beta, eps, *, version=None, threads=None):
    """LayerNorm over the last axis. x (..., D), gamma/beta (D,) -> y (..., D), LayerNormCache."""
    op = "layer_norm (cuda)"
    check_ndim(op, "x", x, tuple(range(1, 9)))
    D = x.shape[-1]
    check_shape(op, "gamma", gamma, (D,))
    check_shape(op, "beta", beta, (D,))
    xp = _arrays(op, x=x, gamma=gamma, beta=beta)
    v = _version("layer_norm_forward", version)
    M = int(np.prod(x.shape[:-1], dtype=np.int64))
    x, gamma, beta = xp.ascontiguousarray(x), xp.ascontiguousarray(gamma), xp.ascontiguousarray(beta)
    y = empty(xp, x.shape)
    mean, rstd = empty(xp, x.shape[:-1]), empty(xp, x.shape[:-1])
    args = (x, gamma, beta, y, mean, rstd, _i32(op, "rows", M), _i32(op, "D", D), np.float32(eps))
    k = get_kernel("layernorm", f"layernorm_forward_v{v}", x)
    if M:
        _launch_rows(op, k, v, M, threads, args)
    return y, _norm.LayerNormCache(x, gamma, mean, rstd)


def _launch_rows(op, k, v, M, threads, args):
    """v1: one thread per row; v2 (and softmax v3 / backward v2): one warp per row, threads/32 rows per block."""
    if v == 1:
        t = _threads(op, threads, 64)
        k((blocks(M, t),), (t,), args)
    else:
        t = _threads(op, threads, 128)
        k((blocks(M, t // 32),), (t,), args)


def layer_norm_backward(dy, cache, *, version=None, threads=None):
    """dy (..., D) -> (dx (..., D), dgamma (D,), dbeta (D,))."""
    op = "layer_norm_backward (cuda)"
    x, gamma, mean, rstd = cache
    check_shape(op, "dy", dy, tuple(x.shape))
    xp = _arrays(op, dy=dy, x=x, gamma=gamma, mean=mean, rstd=rstd)
    v = _version("layer_norm_backward", version)
    D = x.shape[-1]
    M = int(np.prod(x.shape[:-1], dtype=np.int64))
    dy, x, gamma, mean, rstd = (xp.ascontiguousarray(a) for a in (dy, x, gamma, mean, rstd))
    dx = empty(xp, x.shape)
    if M == 0:
        return dx, xp.zeros(D, np.float32), xp.zeros(D, np.float32)
    k = get_kernel("layernorm", f"layernorm_backward_dx_v{v}", x)
    _launch_rows(op, k, v, M, threads, (dy, x, gamma, mean, rstd, dx, np.int32(M), np.int32(D)))
    kp = get_kernel("layernorm", f"layernorm_backward_dparams_v{v}", x)
    if v == 1:  # one thread per column, all rows: a single partial row
        P, rows_per_chunk = 1, M
        t = _threads(op, threads, 64)
        grid, block = (blocks(D, t),), (t,)
    else:
        # blocks of 32 columns x a chunk of rows, ~256 chunks: enough blocks to fill a GPU even when D/32 is
        # small (D = 320: 10 column tiles), while the partial buffer stays small (256 x D floats)
        rows_per_chunk = max(8, -(-M // 256))
        P = blocks(M, rows_per_chunk)
        grid, block = (blocks(D, 32), P), (32, 8)
    dgamma_part, dbeta_part = empty(xp, (P, D)), empty(xp, (P, D))
    kp(grid, block, (dy, x, mean, rstd, dgamma_part, dbeta_part, np.int32(M), np.int32(D), np.int32(rows_per_chunk)))
    return dx, dgamma_part.sum(axis=0), dbeta_part.sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# softmax

def _rows_last(xp, x, axis):
    """x with `axis` moved last, as a C-contiguous (M, S) array, and the moved shape."""
    xt = xp.moveaxis(x, axis, -1)  # (..., S)
    return xp.ascontiguousarray(xt).reshape(-1, xt.shape[-1]), xt.shape  # (M, S)


def _rows_back(xp, y2, shape, axis):
    y = y2.reshape(shape)  # (..., S)
    return y if axis == len(shape) - 1 else xp.ascontiguousarray(xp.moveaxis(y, -1, axis))


def softmax_forward(x, axis=-1, *, version=None, threads=None):
    """Softmax along `axis`. x (...) -> y (...), SoftmaxCache(y, axis)."""
    op = "softmax (cuda)"
    xp = _arrays(op, x=x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{op}: axis {axis} out of range for an input of shape {tuple(x.shape)}")
    axis %= x.ndim
    v = _version("softmax_forward", version)
    x2, shape = _rows_last(xp, x, axis)  # (M, S)
    M, S = x2.shape
    y2 = empty(xp, x2.shape)
    k = get_kernel("softmax", f"softmax_forward_v{v}", x2)
    args = (x2, y2, _i32(op, "rows", M), _i32(op, "softmax length", S))
    if M and S:
        if v == 2:  # one block per row
            t = _threads(op, threads, _round32(S))
            k((M,), (t,), args)
        else:
            _launch_rows(op, k, 1 if v == 1 else 2, M, threads, args)
    y = _rows_back(xp, y2, shape, axis)
    return y, _act.SoftmaxCache(y, axis)


def softmax_backward(dy, cache, *, version=None, threads=None):
    """dy (...) -> dx (...) = y * (dy - sum(dy * y, axis))."""
    op = "softmax_backward (cuda)"
    y, axis = cache
    check_shape(op, "dy", dy, tuple(y.shape))
    xp = _arrays(op, dy=dy, y=y)
    v = _version("softmax_backward", version)
    y2, shape = _rows_last(xp, y, axis)  # (M, S)
    dy2, _ = _rows_last(xp, dy, axis)
    M, S = y2.shape
    dx2 = empty(xp, y2.shape)
    k = get_kernel("softmax", f"softmax_backward_v{v}", y2)
    if M and S:
        _launch_rows(op, k, v, M, threads, (y2, dy2, dx2, np.int32(M), np.int32(S)))
    return _rows_back(xp, dx2, shape, axis)


# ---------------------------------------------------------------------------------------------------------------
# GEGLU

def geglu_forward(h, *, version=None, threads=None):
    """GEGLU, value first and gate second: h (..., 2F) -> y (..., F) = h[..., :F] * gelu(h[..., F:]), GegluCache(h)."""
    op = "geglu (cuda)"
    xp = _arrays(op, h=h)
    if h.ndim < 1 or h.shape[-1] % 2:
        raise ValueError(f"{op}: argument 'h' must have an even last dimension (..., 2F), got {tuple(h.shape)}")
    v = _version("geglu_forward", version)
    F = h.shape[-1] // 2
    M = int(np.prod(h.shape[:-1], dtype=np.int64))
    h = xp.ascontiguousarray(h)
    y = empty(xp, h.shape[:-1] + (F,))
    args = (h, y, _i32(op, "rows", M), _i32(op, "F", F))
    if M and F:
        _launch_elementwise(op, get_kernel("geglu", f"geglu_forward_v{v}", h), v, M, F, threads, args)
    return y, _act.GegluCache(h)


def _launch_elementwise(op, k, v, M, F, threads, args):
    if v == 1:  # flat: one thread per output element
        t = _threads(op, threads, 256)
        k((_i32(op, "blocks", blocks(M * F, t)),), (t,), args)
    else:  # 2-D: x over columns, y over rows (grid-stride beyond 65535 rows)
        t = _threads(op, threads, _round32(F))
        k((blocks(F, t), min(M, 65535)), (t,), args)


def geglu_backward(dy, cache, *, version=None, threads=None):
    """dy (..., F) -> dh (..., 2F): d value = dy gelu(gate), d gate = dy value gelu'(gate)."""
    op = "geglu_backward (cuda)"
    h = cache.h  # (..., 2F)
    F = h.shape[-1] // 2
    check_shape(op, "dy", dy, tuple(h.shape[:-1]) + (F,))
    xp = _arrays(op, dy=dy, h=h)
    v = _version("geglu_backward", version)
    M = int(np.prod(h.shape[:-1], dtype=np.int64))
    h, dy = xp.ascontiguousarray(h), xp.ascontiguousarray(dy)
    dh = empty(xp, h.shape)
    if M and F:
        _launch_elementwise(op, get_kernel("geglu", f"geglu_backward_v{v}", h), v, M, F, threads,
                            (h, dy, dh, np.int32(M), np.int32(F)))
    return dh


# ---------------------------------------------------------------------------------------------------------------
# conv2d and attention: their launch code lives in conv.py and attention.py (kernels/conv2d.cu, attention.cu) and is
# re-exported here, so minisd.cuda.ops stays the one module the NumPy ops dispatch to. Imported last: those modules
# use the helpers above.
from . import attention as _attention_mod, conv as _conv_mod  # noqa: E402
from .attention import attention_backward, attention_forward  # noqa: E402,F401
from .conv import (conv2d_backward, conv2d_forward, upsample_nearest2x_backward,  # noqa: E402,F401
                   upsample_nearest2x_forward)

VERSIONS.update(_conv_mod.VERSIONS)
VERSIONS.update(_attention_mod.VERSIONS)
