"""GPU attention (kernels/attention.cu): the launch code of minisd/ops/attention.py:attention_forward / _backward.

Same signatures, returns and cache as the NumPy op (the spec):
    attention_forward(q, k, v, num_heads, causal=False, scale=None, max_score_bytes=None) -> (y, AttentionCache)
    attention_backward(dy, cache) -> (dq, dk, dv)
q, y (N, L, h*d), k, v (N, S, h*d), heads packed head-major in the last axis. Head dims up to MAX_HEAD_DIM = 160
run the fused kernels; wider heads (the SD VAE's one 512-wide head) run the NumPy op's memory-bounded blockwise
algorithm in CuPy array operations instead (_forward_wide / _backward_wide: cuBLAS GEMMs, no custom kernel).
The cache is the NumPy op's own AttentionCache (q split into heads and multiplied by scale, k and v split into
heads, lse (N*h, L), ...), so a forward on one path feeds a backward on the other. The kernels read the packed
inputs directly (strides), so the head-split copies exist only for the cache: three copies of size N*L*D, small
next to the attention itself. max_score_bytes is checked and stored (the cache carries it), but the kernels need no
score buffer: one tile of scores per block lives in shared memory.

Arrays are CuPy arrays on a GPU, or float32 NumPy arrays while emulating (`with minisd.cuda.emulate():`).
Keyword-only extra for tests and benchmarks: `version=` (1 naive, 2 FlashAttention-2 tiling: production).
Kernel source, derivation and version history: kernels/attention.cu.

Glossary: N batch, L query tokens, S key tokens, h heads, d head dim, D = h*d, B = N*h.
"""
import numpy as np

from ..ops import attention as _att
from .launch import blocks, empty, get_kernel
from .ops import _arrays, _i32, _version

VERSIONS = {"attention_forward": ((1, 2), 2), "attention_backward": ((1, 2), 2)}

MAX_HEAD_DIM = 160  # AT_MAXC * 16 in kernels/attention.cu: SD 1.x's largest head (1280 channels / 8 heads)
# v2 tile geometry: must match AT_THREADS / AT_ROWS / AT_COLS / AT_PS in kernels/attention.cu
THREADS, ROWS, COLS, PS = 256, 64, 32, 36
V1_THREADS = 64
SMEM_DEFAULT_LIMIT = 48 * 1024  # above this a kernel must opt in (max_dynamic_shared_size_bytes), as on the GPU


def _smem_bytes(kind, d):
    """Dynamic shared memory of a v2 kernel for head dim d (the layouts in kernels/attention.cu)."""
    ld = (d + 15) // 16 * 16 + 1
    floats = {"forward": (ROWS + 2 * COLS) * ld + ROWS * PS,
              "dq": (2 * ROWS + 2 * COLS) * ld + ROWS * PS,
              "dkdv": (2 * ROWS + 2 * COLS) * ld + 2 * ROWS * PS + 2 * COLS}[kind]
    return 4 * floats


def _launch(k, grid, block, args, smem=0):
    if smem > SMEM_DEFAULT_LIMIT:
        k.max_dynamic_shared_size_bytes = smem  # the opt-in a GPU needs for more than 48 KiB per block
    k(grid, block, args, shared_mem=smem)


def _packed(a, h):
    """Strides of a C-contiguous (N, T, h*d) array: batch T*D, head d, token D."""
    N, T, D = a.shape
    return (np.int32(T * D), np.int32(D // h), np.int32(D))


def _split(a, h):
    """Strides of a C-contiguous (N*h, T, d) array: batch h*T*d, head T*d, token d."""
    _, T, d = a.shape
    return (np.int32(h * T * d), np.int32(T * d), np.int32(d))


def _split_heads(xp, a, h, scale=None):
    """(N, T, h*d) -> C-contiguous (N*h, T, d) copy (times scale, in the array's dtype), as the NumPy op's cache."""
    N, T, D = a.shape
    # always a fresh copy (ascontiguousarray would return a view for h = 1, and *= below would scale the caller's q)
    out = a.reshape(N, T, h, D // h).transpose(0, 2, 1, 3).copy().reshape(N * h, T, D // h)  # (N*h, T, d)
    if scale is not None:
        out *= np.float32(scale)  # NumPy: qh *= scale on float32, i.e. a float32 multiply
    return out


def _merge_heads(xp, a, h):
    """(N*h, T, d) -> (N, T, h*d), the inverse of _split_heads (a fresh contiguous array)."""
    B, T, d = a.shape
    return xp.ascontiguousarray(a.reshape(B // h, h, T, d).transpose(0, 2, 1, 3)).reshape(B // h, T, h * d)


# ---------------------------------------------------------------------------------------------------------------
# heads wider than the kernels' MAX_HEAD_DIM: the SD VAE's mid-block attention has one 512-wide head (4096 tokens at
# a 64x64 latent). Its register tiles would need 32 output columns per thread, so it is not fused: the NumPy op's
# memory-bounded algorithm in array operations instead (blocks of query rows; each block's scores are computed,
# used and dropped; GEMMs on cuBLAS through CuPy). Same cache, same formulas as minisd/ops/attention.py.

def _row_blocks(B, L, S, max_score_bytes, buffers):
    """Query rows per block so that `buffers` float32 score-sized temporaries of B heads fit max_score_bytes."""
    rows = max(1, min(L, max_score_bytes // max(1, 4 * buffers * B * S)))
    return [(r0, min(L, r0 + rows)) for r0 in range(0, L, rows)]


def _masked_scores(xp, qh, kh, r0, r1, causal):
    s = qh[:, r0:r1] @ kh.transpose(0, 2, 1)  # (B, rb, S): q is pre-scaled
    if causal:  # query r0 + i may not see key j > r0 + i (exp(-inf) = 0)
        s = xp.where(xp.arange(kh.shape[1])[None, :] > xp.arange(r0, r1)[:, None], np.float32(-np.inf), s)
    return s


def _forward_wide(xp, qh, kh, vh, causal, max_score_bytes):
    """qh (B, L, d) pre-scaled, kh, vh (B, S, d) -> yh (B, L, d), lse (B, L)."""
    B, L, _ = qh.shape
    yh, lse = empty(xp, qh.shape), empty(xp, (B, L))
    for r0, r1 in _row_blocks(B, L, kh.shape[1], max_score_bytes, 2):
        s = _masked_scores(xp, qh, kh, r0, r1, causal)
        m = s.max(axis=-1, keepdims=True)  # subtracting the row max keeps exp from overflowing
        e = xp.exp(s - m)
        rowsum = e.sum(axis=-1, keepdims=True)
        yh[:, r0:r1] = (e @ vh) / rowsum
        lse[:, r0:r1] = (m + xp.log(rowsum))[..., 0]
    return yh, lse


def _backward_wide(xp, dyh, qh, kh, vh, lse, scale, causal, max_score_bytes):
    """dyh (B, L, d) -> dqh, dkh, dvh: the NumPy op's backward, block by block (p rebuilt from lse)."""
    B, L, _ = qh.shape
    dqh, dkh, dvh = empty(xp, qh.shape), xp.zeros(kh.shape, np.float32), xp.zeros(vh.shape, np.float32)
    for r0, r1 in _row_blocks(B, L, kh.shape[1], max_score_bytes, 3):
        p = xp.exp(_masked_scores(xp, qh, kh, r0, r1, causal) - lse[:, r0:r1, None])  # (B, rb, S)
        dyb = dyh[:, r0:r1]
        dp = dyb @ vh.transpose(0, 2, 1)  # dp = dy v^T
        dvh += p.transpose(0, 2, 1) @ dyb  # inverts y = p v
        ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))  # softmax Jacobian, row by row
        dqh[:, r0:r1] = (ds @ kh) * np.float32(scale)
        dkh += ds.transpose(0, 2, 1) @ qh[:, r0:r1]  # q is already scaled
    return dqh, dkh, dvh


def attention_forward(q, k, v, num_heads, causal=False, scale=None, max_score_bytes=None, *, version=None):
    """Multi-head attention. q (N, L, D), k (N, S, D), v (N, S, D), D = num_heads*d -> (y (N, L, D), cache)."""
    op = "attention (cuda)"
    _att._check_inputs(q, k, v, num_heads, causal)
    xp = _arrays(op, q=q, k=k, v=v)
    v_ = _version("attention_forward", version)
    N, L, D = q.shape
    S, h = k.shape[1], int(num_heads)
    d = D // h
    scale = d ** -0.5 if scale is None else float(scale)
    max_score_bytes = _att.DEFAULT_MAX_SCORE_BYTES if max_score_bytes is None else int(max_score_bytes)
    if max_score_bytes < 1:
        raise ValueError(f"{op}: argument 'max_score_bytes' must be a positive number of bytes (or None for the "
                         f"default {_att.DEFAULT_MAX_SCORE_BYTES}), got {max_score_bytes}")
    for what, n in (("N*L*D", N * L * D), ("N*S*D", N * S * D), ("N*h", N * h)):
        _i32(op, what, n)
    if N * h > 65535:  # one grid row per (batch, head): gridDim.y is limited to 65535
        raise ValueError(f"{op}: N*h = {N * h} batch x heads exceeds the 65535 grid rows of a launch; split the batch")
    q, k, v = xp.ascontiguousarray(q), xp.ascontiguousarray(k), xp.ascontiguousarray(v)
    qh, kh, vh = _split_heads(xp, q, h, scale), _split_heads(xp, k, h), _split_heads(xp, v, h)  # the cache's
    if d > MAX_HEAD_DIM:  # not fused (see _forward_wide)
        yh, lse = _forward_wide(xp, qh, kh, vh, causal, max_score_bytes)
        return _merge_heads(xp, yh, h), _att.AttentionCache(qh, kh, vh, lse, h, scale, bool(causal), max_score_bytes)
    y = empty(xp, (N, L, D))
    lse = empty(xp, (N * h, L))
    if N * L and S and d:
        kern = get_kernel("attention", f"attention_forward_v{v_}", q)
        args = ((q, k, v, y, lse, np.int32(h), np.int32(L), np.int32(S), np.int32(d)) + _packed(q, h)
                + _packed(k, h) + _packed(y, h) + (np.float32(scale), np.int32(bool(causal))))
        if v_ == 1:
            _launch(kern, (blocks(L, V1_THREADS), N * h), (V1_THREADS,), args)
        else:
            _launch(kern, (blocks(L, ROWS), N * h), (THREADS,), args, _smem_bytes("forward", d))
    return y, _att.AttentionCache(qh, kh, vh, lse, h, scale, bool(causal), max_score_bytes)


def attention_backward(dy, cache, *, version=None):
    """dy (N, L, D) -> (dq (N, L, D), dk (N, S, D), dv (N, S, D)); see minisd/ops/attention.py for the math."""
    op = "attention_backward (cuda)"
    qh, kh, vh, lse, h, scale, causal, _ = cache
    B, L, d = qh.shape
    S = kh.shape[1]
    N, D = B // h, h * d
    if tuple(dy.shape) != (N, L, D):
        raise ValueError(f"{op}: argument 'dy' must have shape {(N, L, D)}, got {tuple(dy.shape)}")
    xp = _arrays(op, dy=dy, q=qh, k=kh, v=vh, lse=lse)
    v_ = _version("attention_backward", version)
    # no-ops for this module's caches; the NumPy forward's cache is contiguous too, but a caller's may not be
    dy, qh, kh, vh, lse = (xp.ascontiguousarray(a) for a in (dy, qh, kh, vh, lse))
    if not (B and L and S and d):  # nothing to sum (a grid of 0 blocks is an error on the GPU)
        return xp.zeros((N, L, D), np.float32), xp.zeros((N, S, D), np.float32), xp.zeros((N, S, D), np.float32)
    if d > MAX_HEAD_DIM:  # not fused (see _forward_wide)
        grads = _backward_wide(xp, _split_heads(xp, dy, h), qh, kh, vh, lse, scale, causal, cache.max_score_bytes)
        return tuple(_merge_heads(xp, g, h) for g in grads)
    dq, dk, dv = empty(xp, (N, L, D)), empty(xp, (N, S, D)), empty(xp, (N, S, D))
    delta = empty(xp, (B, L))  # D = rowsum(p * dp) per query row, written by the dq kernel, read by dk/dv
    sizes = (np.int32(h), np.int32(L), np.int32(S), np.int32(d))
    kq = get_kernel("attention", f"attention_backward_dq_v{v_}", qh)
    kkv = get_kernel("attention", f"attention_backward_dkdv_v{v_}", qh)
    args_dq = ((qh, kh, vh, dy, lse, dq, delta) + sizes + _split(qh, h) + _split(kh, h) + _packed(dy, h)
               + (np.float32(scale), np.int32(bool(causal))))
    args_kv = ((qh, kh, vh, dy, lse, delta, dk, dv) + sizes + _split(qh, h) + _split(kh, h) + _packed(dy, h)
               + _packed(dk, h) + (np.int32(bool(causal)),))
    if v_ == 1:
        _launch(kq, (blocks(L, V1_THREADS), B), (V1_THREADS,), args_dq)
        _launch(kkv, (blocks(S, V1_THREADS), B), (V1_THREADS,), args_kv)
    else:
        _launch(kq, (blocks(L, ROWS), B), (THREADS,), args_dq, _smem_bytes("dq", d))
        _launch(kkv, (blocks(S, ROWS), B), (THREADS,), args_kv, _smem_bytes("dkdv", d))
    return dq, dk, dv
