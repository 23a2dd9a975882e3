"""Normalisation layers: GroupNorm (optionally fused with the SiLU that follows it) and LayerNorm.

GroupNorm: x (N, C, *spatial) -> y same shape. The C channels are split into G groups of Cg = C/G consecutive
channels; every (sample, group) is normalised over its Cg * prod(spatial) = L values, then each channel gets its
own scale gamma[c] and shift beta[c]:  y = (x - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c],
rstd = 1 / sqrt(var + eps), var the biased (divide by L) variance, as torch.nn.functional.group_norm.
SD: GroupNorm(32, C) everywhere; eps 1e-5 in U-Net ResBlocks, 1e-6 in SpatialTransformer and the whole VAE
(see shared/docs/sd-reference.md §1.2), so eps is a required argument here. `act="silu"` fuses the SiLU that
follows every ResBlock GroupNorm: one pass over memory instead of two, and no separate SiLU cache.

LayerNorm: x (..., D) -> y same shape, normalised over the last dimension D, then gamma, beta (D,).

Backward (same formula for both, written for one normalised row of L values with xhat = (x - mean) * rstd,
dxhat = dz * gamma): dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); dgamma = sum dz * xhat;
dbeta = sum dz (dz = dy, or dy * silu'(z) when fused). The caches keep only mean and rstd (N, G) / (...,) and a
reference to x: xhat is recomputed in backward, trading one subtraction per element for not storing a second
copy of every normalised activation.

Speed (NumPy body only): rows are processed in blocks of ~BLOCK elements so that the whole chain (statistics,
normalisation, SiLU) runs on data held in cache, and blocks are spread over the threads
(ops.common.parallel_for via activations._chunked). Sums are np.vecdot (a SIMD dot product) or BLAS
matrix-vector products, 2-3x faster than ndarray.sum here; GroupNorm's per-channel partial sums are combined in
float64. Temporaries come from per-thread scratch buffers (activations._tmp).

References:
  Wu & He 2018, Group Normalization, https://arxiv.org/abs/1803.08494
  Ba, Kiros & Hinton 2016, Layer Normalization, https://arxiv.org/abs/1607.06450
  llm.c layernorm_forward/backward and its derivation:
    https://github.com/karpathy/llm.c/blob/f1e2ace6/doc/layernorm/layernorm.md
  PyTorch semantics: https://pytorch.org/docs/2.5/generated/torch.nn.GroupNorm.html
"""
from typing import NamedTuple, Optional

import numpy as np

from ..backend import use_cuda_ops
from .activations import _chunked, _silu_bwd, _silu_fwd, _tmp
from .common import check_float, check_ndim, check_shape, num_threads

_ACTS = (None, "silu")
BLOCK = 1 << 18  # elements per work item (whole rows, at least one). Why this size: every NumPy call of a block
#                  needs the GIL for its Python-level bookkeeping (~15 calls per block), and with two threads each
#                  waiting for the other's turn that overhead, not the arithmetic, is what small blocks pay for.
#                  Measured (benchmarks/ops.py, 2 threads, best of 20): LayerNorm 2x4096x320 forward 4.2-5.3x
#                  torch with 128K blocks, 2.8-3.0x with 256K; GroupNorm 2x320x64x64 4.2-4.5x -> 2.8-3.2x; 512K
#                  was no faster and uses more memory.
MIN_SPLIT = 1 << 15  # a tensor of at least this many elements per thread is split so that every thread gets a block


# ------------------------------------------------------------------------------------------------------------
# GroupNorm

class GroupNormCache(NamedTuple):
    x: np.ndarray  # (N, C, *spatial) the input (a reference, not a copy): xhat is recomputed from it
    gamma: np.ndarray  # (C,)
    beta: np.ndarray  # (C,) only needed to recompute the pre-activation when act == "silu"
    mean: np.ndarray  # (N, G)
    rstd: np.ndarray  # (N, G) 1 / sqrt(var + eps)
    act: Optional[str]


def _check_group_norm(x, gamma, beta, num_groups, act):
    check_ndim("group_norm", "x", x, tuple(range(2, 8)))
    C = x.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must be a positive divisor of the C={C} channels "
                         f"of x (N, C, ...) = {tuple(x.shape)}")
    check_shape("group_norm", "gamma", gamma, (C,))
    check_shape("group_norm", "beta", beta, (C,))
    if act not in _ACTS:
        raise ValueError(f"group_norm: act must be one of {_ACTS}, got {act!r}")
    _check_not_half("group_norm", check_float("group_norm", x=x, gamma=gamma, beta=beta))


def _check_not_half(op, dtype):
    # float16 sums of a whole group overflow (65504) and lose the statistics; float16 is a storage dtype in
    # minisd (nn.Params converts to the compute dtype on access)
    if dtype == np.float16:
        raise ValueError(f"{op}: float16 input is not supported (its sums overflow); compute in float32, "
                         f"e.g. x.astype(np.float32)")


def _group_view(x, G):
    """x (N, C, *spatial) as a C-contiguous (N*G, Cg, S) array: one row per (sample, group)."""
    N, C = x.shape[:2]
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    return np.ascontiguousarray(x).reshape(N * G, C // G, S)  # (N*G, Cg, S)


def _blocks(nrows, row_size, fn, bufsize=None):
    """fn(r0, r1) over blocks of whole rows holding ~BLOCK elements, spread over the threads."""
    rows = max(1, BLOCK // max(1, row_size))
    # a tensor smaller than a few blocks (the small training U-Nets) would otherwise run on one core; these blocks
    # compute per-row results only, so how the rows are cut does not change them
    per_thread = -(-nrows // num_threads())
    if per_thread * row_size >= MIN_SPLIT:
        rows = min(rows, per_thread)
    _chunked(-(-nrows // rows), lambda b0, b1: fn(b0 * rows, min(nrows, b1 * rows)), chunk=1, bufsize=bufsize)


def _channel_bufsize(S):
    """NumPy's ufunc buffer size for blocks whose rows of S values meet an operand broadcast along them
    (GroupNorm's per-channel gamma[c], LayerNorm's per-row rstd). With the default 8192-element buffer, rows of
    S in [512, 8192) are copied through the buffer: 1.4-2.5x slower than with a 1024-element one (measured;
    shorter rows gain nothing)."""
    return 1024 if S >= 512 else None


def group_norm_forward(x, gamma, beta, num_groups, eps, act=None):
    """GroupNorm, optionally followed by SiLU.

    x (N, C, *spatial), gamma (C,), beta (C,), num_groups G dividing C, eps (1e-5 or 1e-6 in SD),
    act None or "silu" -> y (N, C, *spatial), cache.
    """
    if use_cuda_ops(x):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.group_norm_forward(x, gamma, beta, num_groups, eps, act)
    _check_group_norm(x, gamma, beta, num_groups, act)
    N, C = x.shape[:2]
    G = num_groups
    xr = _group_view(x, G)  # (N*G, Cg, S)
    R, Cg, S = xr.shape
    L = Cg * S  # values per group
    y = np.empty_like(xr)  # (N*G, Cg, S)
    mean = np.empty(R, dtype=x.dtype)  # (N*G,)
    rstd = np.empty(R, dtype=x.dtype)
    gam = np.tile(gamma.reshape(G, Cg), (N, 1))  # (N*G, Cg): the gamma of every row's channels
    bet = np.tile(beta.reshape(G, Cg), (N, 1))[:, :, None]  # (N*G, Cg, 1)
    ones = np.ones(S, dtype=x.dtype)

    def block(r0, r1):
        xs, ys = xr[r0:r1], y[r0:r1]  # (r, Cg, S)
        # mean, then the variance as the mean of squared deviations: two passes over a block that sits in
        # cache. The one-pass E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
        # Sums: np.vecdot (a SIMD dot product) per channel, the Cg channel sums added in float64, so float32
        # accumulation error grows with S, not with the whole group (1M values in the SD VAE).
        m = (np.vecdot(xs, ones).sum(axis=1, dtype=np.float64) / L).astype(x.dtype)  # (r,)
        d = np.subtract(xs, m[:, None, None], out=_tmp(xs, "gn_d"))  # (r, Cg, S) x - mean
        var = np.vecdot(d, d).sum(axis=1, dtype=np.float64) / L  # (r,)
        rs = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
        mean[r0:r1], rstd[r0:r1] = m, rs
        scale = (rs[:, None] * gam[r0:r1])[:, :, None]  # (r, Cg, 1) rstd * gamma[c]: one multiply
        if act is None:
            np.multiply(d, scale, out=ys)
            ys += bet[r0:r1]
        else:  # the fused SiLU reads the normalised block while it is still in cache
            d *= scale
            d += bet[r0:r1]
            _silu_fwd(ys, d)

    _blocks(R, L, block, bufsize=_channel_bufsize(S))
    cache = GroupNormCache(x, gamma, beta, mean.reshape(N, G), rstd.reshape(N, G), act)
    return y.reshape(x.shape), cache


def group_norm_backward(dy, cache):
    """dy (N, C, *spatial) -> (dx (N, C, *spatial), dgamma (C,), dbeta (C,))."""
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.group_norm_backward(dy, cache)
    x, gamma, beta, mean, rstd, act = cache
    if dy.shape != x.shape:
        raise ValueError(f"group_norm_backward: argument 'dy' must have shape {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    check_float("group_norm", x=x, dy=dy)
    N, C = x.shape[:2]
    G = mean.shape[1]
    xr = _group_view(x, G)  # (N*G, Cg, S)
    dyr = _group_view(dy, G)
    R, Cg, S = xr.shape
    L = Cg * S
    mean, rstd = mean.reshape(R), rstd.reshape(R)  # (N*G,)
    gam = np.tile(gamma.reshape(G, Cg), (N, 1))  # (N*G, Cg)
    bet = np.tile(beta.reshape(G, Cg), (N, 1))[:, :, None]  # (N*G, Cg, 1)
    dx = np.empty_like(xr)
    s1 = np.empty((R, Cg), dtype=x.dtype)  # sum over spatial of dz, per (row, channel) -> dbeta
    s2 = np.empty((R, Cg), dtype=x.dtype)  # sum over spatial of dz * xhat -> dgamma
    ones = np.ones(S, dtype=x.dtype)

    def block(r0, r1):
        xs, dys, dxs = xr[r0:r1], dyr[r0:r1], dx[r0:r1]  # (r, Cg, S)
        rs = rstd[r0:r1]  # (r,)
        m = mean[r0:r1, None, None]
        gscale = (rs[:, None] * gam[r0:r1])[:, :, None]  # (r, Cg, 1) rstd * gamma[c]
        d = _tmp(xs, "gn_d")
        if act is None:
            dz = dys
        else:  # forward was y = silu(z), z = (x - mean) * rstd * gamma + beta: dz = dy * silu'(z)
            z = np.subtract(xs, m, out=d)  # d's buffer holds z for now: fewer live blocks, all in L2
            z *= gscale
            z += bet[r0:r1]
            dz = dxs  # dx's block holds dz until it is turned into dx below
            _silu_bwd(dz, dys, z)
        np.subtract(xs, m, out=d)  # d = x - mean; xhat = d * rstd (recomputed, not cached)
        b1 = np.vecdot(dz, ones)  # (r, Cg) sum dz
        b2 = np.vecdot(dz, d) * rs[:, None]  # (r, Cg) sum dz * xhat
        s1[r0:r1], s2[r0:r1] = b1, b2
        # group means of dxhat = dz * gamma and of dxhat * xhat (the Cg channel sums added in float64)
        k1 = (b1 * gam[r0:r1]).sum(axis=1, dtype=np.float64) / L  # (r,)
        k2 = (b2 * gam[r0:r1]).sum(axis=1, dtype=np.float64) / L
        # dx = rstd * (dxhat - k1 - xhat * k2) = dz * (rstd gamma) + d * (-rstd^2 k2) + (-rstd k1)
        np.multiply(dz, gscale, out=dxs)  # in place when dz is dxs
        d *= (-rs * rs * k2).astype(x.dtype)[:, None, None]
        dxs += d
        dxs += (-rs * k1).astype(x.dtype)[:, None, None]

    _blocks(R, L, block, bufsize=_channel_bufsize(S))
    # parameters: sum the per-(sample, channel) partials over the batch (fixed order: deterministic)
    dgamma = s2.reshape(N, C).sum(axis=0)
    dbeta = s1.reshape(N, C).sum(axis=0)
    return dx.reshape(x.shape), dgamma, dbeta


# ------------------------------------------------------------------------------------------------------------
# LayerNorm

class LayerNormCache(NamedTuple):
    x: np.ndarray  # (..., D) the input (a reference): xhat is recomputed from it
    gamma: np.ndarray  # (D,)
    mean: np.ndarray  # (...,)
    rstd: np.ndarray  # (...,) 1 / sqrt(var + eps)


def layer_norm_forward(x, gamma, beta, eps):
    """LayerNorm over the last dimension. x (..., D), gamma (D,), beta (D,), eps (1e-5 in SD/CLIP) -> y (..., D)."""
    if use_cuda_ops(x):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.layer_norm_forward(x, gamma, beta, eps)
    check_ndim("layer_norm", "x", x, tuple(range(1, 9)))
    D = x.shape[-1]
    check_shape("layer_norm", "gamma", gamma, (D,))
    check_shape("layer_norm", "beta", beta, (D,))
    _check_not_half("layer_norm", check_float("layer_norm", x=x, gamma=gamma, beta=beta))
    x2 = np.ascontiguousarray(x).reshape(-1, D)  # (M, D)
    M = x2.shape[0]
    y2 = np.empty_like(x2)
    mean = np.empty(M, dtype=x.dtype)
    rstd = np.empty(M, dtype=x.dtype)
    ones = np.ones(D, dtype=x.dtype)
    inv_d, eps = x.dtype.type(1.0 / D), x.dtype.type(eps)

    def block(r0, r1):
        xs, ys = x2[r0:r1], y2[r0:r1]  # (r, D)
        m = xs @ ones  # (r,) row sums as a BLAS matrix-vector product: 2x faster than xs.sum(1), and accurate
        m *= inv_d
        np.subtract(xs, m[:, None], out=ys)  # two-pass variance, as in GroupNorm (no E[x^2] - E[x]^2)
        rs = np.vecdot(ys, ys)
        rs *= inv_d
        rs += eps
        np.sqrt(rs, out=rs)
        np.divide(1, rs, out=rs)
        mean[r0:r1], rstd[r0:r1] = m, rs
        ys *= rs[:, None]
        ys *= gamma
        ys += beta

    _blocks(M, D, block, bufsize=_channel_bufsize(D))
    lead = x.shape[:-1]
    return y2.reshape(x.shape), LayerNormCache(x, gamma, mean.reshape(lead), rstd.reshape(lead))


def layer_norm_backward(dy, cache):
    """dy (..., D) -> (dx (..., D), dgamma (D,), dbeta (D,))."""
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.layer_norm_backward(dy, cache)
    x, gamma, mean, rstd = cache
    if dy.shape != x.shape:
        raise ValueError(f"layer_norm_backward: argument 'dy' must have shape {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    check_float("layer_norm", x=x, dy=dy)
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)  # (M, D)
    dy2 = np.ascontiguousarray(dy).reshape(-1, D)
    mean2, rstd2 = mean.reshape(-1), rstd.reshape(-1)  # (M,)
    M = x2.shape[0]
    rows = max(1, BLOCK // D)
    nblocks = -(-M // rows)
    dx2 = np.empty_like(x2)
    # dgamma/dbeta: one partial row per block (fixed blocks, so the same sum on any thread count)
    dg_part = np.empty((nblocks, D), dtype=x.dtype)
    db_part = np.empty((nblocks, D), dtype=x.dtype)
    inv_d = x.dtype.type(1.0 / D)
    rs_d = rstd2 * inv_d  # (M,) per-row factors of the dx formula below, computed once for all blocks
    rs3_d = rstd2 * rstd2 * rs_d
    ones = np.ones(rows, dtype=x.dtype)

    def block(b, _):
        r0, r1 = b * rows, min(M, (b + 1) * rows)
        xs, dys, dxs = x2[r0:r1], dy2[r0:r1], dx2[r0:r1]  # (r, D)
        rs = rstd2[r0:r1]  # (r,)
        d = np.subtract(xs, mean2[r0:r1, None], out=_tmp(xs, "ln_d"))  # x - mean; xhat = d * rstd, recomputed
        p = np.multiply(dys, d, out=dxs)  # dy * (x - mean), in dx's block until dx is computed
        # every reduction below is a BLAS matrix-vector product (2x faster than ndarray.sum, and accurate)
        dg_part[b] = rs @ p  # (D,) sum over rows of dy * xhat
        db_part[b] = ones[:r1 - r0] @ dys  # (D,) sum over rows of dy
        k1 = dys @ gamma  # (r,) sum_j dxhat_j, with dxhat = dy * gamma
        k2 = p @ gamma  # (r,) sum_j dxhat_j (x_j - mean)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        #    = dy * (rstd gamma) - d * (rstd^3 k2 / D) - rstd k1 / D
        np.multiply(rs[:, None], gamma, out=dxs)  # (r, D) outer product rstd * gamma
        dxs *= dys
        k2 *= rs3_d[r0:r1]
        d *= k2[:, None]
        dxs -= d
        k1 *= rs_d[r0:r1]
        dxs -= k1[:, None]

    # mostly per-row broadcasts: for 256 <= D < 512 a buffer of exactly one row is faster still (measured 7-12%
    # at D = 320; not so for the forward, which has two per-column ones, gamma and beta)
    bufsize = _channel_bufsize(D) or (D if D % 16 == 0 and D >= 256 else None)
    if nblocks:
        _chunked(nblocks, block, chunk=1, bufsize=bufsize)
    return dx2.reshape(x.shape), dg_part.sum(axis=0), db_part.sum(axis=0)
