"""Multi-head scaled-dot-product attention with a hard bound on the memory used by the score matrix.

    y = softmax(q k^T * scale) v        per head, scale = d**-0.5 by default

Shapes: q (N, L, D), k and v (N, S, D) -> y (N, L, D), with D = h*d. Heads are split head-major inside D,
`b n (h d) -> b h n d`, exactly as the to_q/to_k/to_v linears of LDM/diffusers/PyTorch lay them out, and y is
packed back the same way. Self attention has S == L; cross attention has S != L (UNet: 4096 queries x 77 text
tokens); `causal=True` (CLIP text encoder) lets query i see only keys j <= i and needs L == S.

Memory: the (N, h, L, S) score matrix is the one big tensor of attention (SD 1.5 at a 64x64 latent: 2 x 8 x
4096 x 4096 float32 = 1 GiB). It is never built. The work is cut into blocks of (heads x query rows); each
block's (rows x S) scores are computed, turned into probabilities and used at once, and the buffer is reused
for the next block. All score-sized buffers alive at any moment (forward: 1, backward: 2) fit in
`max_score_bytes`. Backward recomputes each block of scores from q and k (flash-attention style) instead of
caching probabilities; the cache holds q, k, v and one float per query row (the log-sum-exp).

Threads: matmuls run in the calling thread, where OpenBLAS already uses every core; only the elementwise part
of a block (max, exp, sums), which NumPy runs on one core, is split by query rows across `parallel_for` threads.
Why not give each thread whole blocks, matmuls included? OpenBLAS serialises threaded GEMMs that arrive from
several threads at once (a lock since OpenBLAS PR #1875), and its spinning workers then compete with our
threads: measured on the 2-core machine, that was 1.7x slower than this split (337 vs 197 ms, SD 1.5 self
attention, same run). It only wins when BLAS is pinned to one thread (OPENBLAS_NUM_THREADS=1), which minisd
does not do.

References:
  Vaswani et al. 2017, "Attention Is All You Need", eq. 1: https://arxiv.org/abs/1706.03762
  Dao et al. 2022, "FlashAttention" (recompute in backward, log-sum-exp stats): https://arxiv.org/abs/2205.14135
  Dao 2023, "FlashAttention-2" (backward with D = rowsum(dY * Y)): https://arxiv.org/abs/2307.08691
  LDM CrossAttention (the head split, the scale), ldm/modules/attention.py:
    https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/attention.py
  PyTorch reference semantics (the tests compare against it):
    https://pytorch.org/docs/2.5/generated/torch.nn.functional.scaled_dot_product_attention.html
  OpenBLAS serialising concurrent threaded level-3 calls: https://github.com/OpenMathLib/OpenBLAS/pull/1875
"""
from typing import NamedTuple

import numpy as np

from ..backend import use_cuda_ops
from .common import check_float, check_ndim, check_shape, parallel_for

# Default bound on the bytes of score/probability blocks alive at once (all buffers together).
DEFAULT_MAX_SCORE_BYTES = 64 * 2**20

# Blocks are also kept near this size when the bound would allow more: small enough to stay in the shared L3
# cache between the matmul that writes a block and the exp/matmul that read it back, large enough that the
# per-block cost (Python calls, thread hand-offs, waking the BLAS threads) is spread over many elements.
# Measured on the 2-core Zen 5 machine (4096 keys, float32): 1 MiB blocks were 15% (forward) and 30%
# (backward) slower than 8 MiB; 16 MiB was no faster.
TARGET_BLOCK_BYTES = 8 * 2**20

# Give each thread at least this many score elements per hand-off, otherwise threading costs more than it saves
# (cross attention with S = 77 has short rows).
MIN_ELEMENTS_PER_THREAD = 32 * 1024


class AttentionCache(NamedTuple):
    q: np.ndarray  # (N*h, L, d) queries, split into heads and already multiplied by scale
    k: np.ndarray  # (N*h, S, d) keys, split into heads
    v: np.ndarray  # (N*h, S, d) values, split into heads
    lse: np.ndarray  # (N*h, L) log-sum-exp of each score row: p = exp(s - lse) rebuilds the probabilities
    num_heads: int
    scale: float
    causal: bool
    max_score_bytes: int


# ----------------------------------------------------------------------------------------------------------------
# head split / merge and the block plan

def _split_heads(x, num_heads):
    """(N, T, h*d) -> contiguous (N*h, T, d): each head becomes one matrix for batched matmul.

    Always a fresh copy (never a view of x, even for h = 1), so callers may scale it in place and the cache
    does not change if the caller later edits its own q/k/v.
    """
    N, T, D = x.shape
    x = x.reshape(N, T, num_heads, D // num_heads)  # (N, T, h, d)
    x = x.transpose(0, 2, 1, 3)  # (N, h, T, d)
    return x.copy().reshape(N * num_heads, T, D // num_heads)  # (N*h, T, d), copy() is C-contiguous


def _merge_heads(x, num_heads):
    """(N*h, T, d) -> (N, T, h*d), the inverse of _split_heads."""
    B, T, d = x.shape
    x = x.reshape(B // num_heads, num_heads, T, d)  # (N, h, T, d)
    x = x.transpose(0, 2, 1, 3)  # (N, T, h, d)
    return x.reshape(B // num_heads, T, num_heads * d)  # (N, T, D) (reshape copies the transposed view)


def _plan(B, L, S, bytes_per_score, max_score_bytes):
    """Block shape (heads per block, rows per block) so that the block's score buffers fit in max_score_bytes.

    bytes_per_score: bytes held per score element (itemsize x number of buffers, +1 for a causal mask).
    A block holds hb heads x rb query rows x S keys. Rows are cut first (a block never spans two heads unless
    it holds every row of them), so cross attention with a short S packs many heads into one block.
    A bound smaller than one score row is rounded up to one row: the least this row-wise algorithm can use.
    """
    elements = min(max_score_bytes, TARGET_BLOCK_BYTES) // bytes_per_score
    rows = max(1, min(L, elements // S))
    heads = max(1, min(B, elements // (L * S))) if rows == L else 1
    return heads, rows


def _blocks(B, L, heads, rows):
    """All (b0, b1, r0, r1) blocks covering heads [0, B) and query rows [0, L), head-major order."""
    return [(b0, min(b0 + heads, B), r0, min(r0 + rows, L))
            for b0 in range(0, B, heads) for r0 in range(0, L, rows)]


def _scores(out, q, k, b0, b1, r0, r1, causal):
    """Score block s = q k^T (q is pre-scaled) for heads [b0, b1), rows [r0, r1) -> (hb, rb, cols) in `out`.

    Causal blocks only compute keys [0, r1): every later key is masked for every row of the block anyway.
    """
    cols = r1 if causal else k.shape[1]
    s = out[:(b1 - b0) * (r1 - r0) * cols].reshape(b1 - b0, r1 - r0, cols)  # (hb, rb, cols), contiguous
    np.matmul(q[b0:b1, r0:r1], k[b0:b1, :cols].transpose(0, 2, 1), out=s)  # (hb, rb, d) @ (hb, d, cols)
    if causal:
        # query r0+i may not see key j > r0+i; -inf becomes exactly 0 after exp. Every row keeps its
        # diagonal, so no row is all -inf and the row max below stays finite.
        s[:, np.triu(np.ones((r1 - r0, cols), dtype=bool), k=r0 + 1)] = -np.inf
    return s


def _rowwise(n_rows, n_cols, fn):
    """Run fn(i0, i1) over row slices of a block, split across threads when the block is big enough."""
    parallel_for(n_rows, fn, min_chunk=max(1, MIN_ELEMENTS_PER_THREAD // n_cols))


# ----------------------------------------------------------------------------------------------------------------
# forward

def attention_forward(q, k, v, num_heads, causal=False, scale=None, max_score_bytes=None):
    """Multi-head attention. q (N, L, D), k (N, S, D), v (N, S, D), D = num_heads*d -> (y (N, L, D), cache).

    causal: query i attends to keys j <= i only (requires L == S). scale: defaults to d**-0.5.
    max_score_bytes: bound on the score/probability memory alive at once (default DEFAULT_MAX_SCORE_BYTES).
    """
    if use_cuda_ops(q):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.attention_forward(q, k, v, num_heads, causal, scale, max_score_bytes)
    _check_inputs(q, k, v, num_heads, causal)
    N, L, D = q.shape
    S = k.shape[1]
    d = D // num_heads
    scale = d ** -0.5 if scale is None else float(scale)
    max_score_bytes = DEFAULT_MAX_SCORE_BYTES if max_score_bytes is None else int(max_score_bytes)
    if max_score_bytes < 1:
        raise ValueError(f"attention: argument 'max_score_bytes' must be a positive number of bytes (or None for "
                         f"the default {DEFAULT_MAX_SCORE_BYTES}), got {max_score_bytes}")

    qh = _split_heads(q, num_heads)  # (B, L, d) with B = N*h
    qh *= scale  # scale the L*d queries once instead of every L*S score
    kh = _split_heads(k, num_heads)  # (B, S, d)
    vh = _split_heads(v, num_heads)  # (B, S, d)
    B = qh.shape[0]
    yh = np.empty_like(qh)  # (B, L, d) output, heads split
    lse = np.empty((B, L), dtype=q.dtype)

    heads, rows = _plan(B, L, S, q.dtype.itemsize + causal, max_score_bytes)
    buf = np.empty(heads * rows * S, dtype=q.dtype)  # the one score buffer, reused by every block
    m = np.empty(heads * rows, dtype=q.dtype)  # row max of the current block
    rowsum = np.empty_like(m)  # row sum of exp(s - max) of the current block

    for b0, b1, r0, r1 in _blocks(B, L, heads, rows):
        s = _scores(buf, qh, kh, b0, b1, r0, r1, causal)  # (hb, rb, cols)
        s2 = s.reshape(-1, s.shape[-1])  # (hb*rb, cols): softmax is row by row, so rows are independent work

        def softmax_rows(i0, i1):
            # Subtracting the row max keeps exp from overflowing; the largest term becomes exactly 1, so the
            # row sum is >= 1 and its log is safe. Everything is in place in the block buffer.
            x = s2[i0:i1]
            np.max(x, axis=-1, out=m[i0:i1])
            np.subtract(x, m[i0:i1, None], out=x)
            np.exp(x, out=x)  # unnormalised probabilities e = exp(s - max)
            np.sum(x, axis=-1, out=rowsum[i0:i1])

        _rowwise(s2.shape[0], s2.shape[1], softmax_rows)
        n = s2.shape[0]
        o = yh[b0:b1, r0:r1]  # (hb, rb, d) view into the output
        np.matmul(s, vh[b0:b1, :s.shape[-1]], out=o)  # (hb, rb, cols) @ (hb, cols, d)
        # Normalise after the matmul: dividing the (rb, d) result is S/d times cheaper than the (rb, S) block.
        o /= rowsum[:n].reshape(b1 - b0, r1 - r0, 1)
        lse[b0:b1, r0:r1] = (m[:n] + np.log(rowsum[:n])).reshape(b1 - b0, r1 - r0)  # softmax denominator

    cache = AttentionCache(qh, kh, vh, lse, num_heads, scale, causal, max_score_bytes)
    return _merge_heads(yh, num_heads), cache


def _check_inputs(q, k, v, num_heads, causal):
    op = "attention"
    check_ndim(op, "q", q, 3)
    check_ndim(op, "k", k, 3)
    N, L, D = q.shape
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1 or D % num_heads:
        raise ValueError(f"{op}: argument 'num_heads' must be a positive integer dividing D = {D} "
                         f"(the last dim of q), got {num_heads!r}")
    check_shape(op, "k", k, (N, None, D))
    check_shape(op, "v", v, k.shape)
    if causal and k.shape[1] != L:
        raise ValueError(f"{op}: causal=True needs as many keys as queries (self attention), "
                         f"got L = {L} queries and S = {k.shape[1]} keys")
    check_float(op, q=q, k=k, v=v)


# ----------------------------------------------------------------------------------------------------------------
# backward

def attention_backward(dy, cache):
    """dy (N, L, D) -> (dq (N, L, D), dk (N, S, D), dv (N, S, D)).

    Per head, with s = q k^T * scale, p = softmax(s) (rows), y = p v, and blocks of p rebuilt from the cached
    log-sum-exp (p = exp(s - lse): exact, no second max/sum pass):
        dv = p^T dy                                       inverts y = p v
        dp = dy v^T                                       (rows x S)
        ds = p * (dp - rowsum(p * dp))                    softmax Jacobian, row by row
        dq = ds k * scale,   dk = ds^T q * scale          inverts s = q k^T * scale
    rowsum(p * dp) equals FlashAttention-2's D = rowsum(dy * y) (because y = p v); it is computed from the
    block itself, so y need not be cached. A block spans all S keys, so these row sums are complete.
    dq rows belong to one block each; dk and dv are summed over the row blocks of a head, in a fixed order.
    """
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.attention_backward(dy, cache)
    qh, kh, vh, lse, num_heads, scale, causal, max_score_bytes = cache
    B, L, d = qh.shape
    S = kh.shape[1]
    check_shape("attention_backward", "dy", dy, (B // num_heads, L, num_heads * d))
    check_float("attention_backward", dy=dy, q=qh)

    dyh = _split_heads(dy, num_heads)  # (B, L, d)
    dqh = np.empty_like(qh)  # (B, L, d)
    dkh = np.zeros_like(kh)  # (B, S, d)
    dvh = np.zeros_like(vh)  # (B, S, d)

    heads, rows = _plan(B, L, S, 2 * qh.dtype.itemsize + causal, max_score_bytes)  # 2 buffers: p and dp
    pbuf = np.empty(heads * rows * S, dtype=qh.dtype)
    dpbuf = np.empty_like(pbuf)
    rowdot = np.empty(heads * rows, dtype=qh.dtype)  # rowsum(p * dp) of the current block
    tmp = np.empty((heads, S, d), dtype=qh.dtype)  # one block's share of dk or dv, before it is added

    for b0, b1, r0, r1 in _blocks(B, L, heads, rows):
        p = _scores(pbuf, qh, kh, b0, b1, r0, r1, causal)  # (hb, rb, cols) scores, overwritten by p below
        cols = p.shape[-1]
        dyb = dyh[b0:b1, r0:r1]  # (hb, rb, d)
        dp = dpbuf[:p.size].reshape(p.shape)  # (hb, rb, cols)
        np.matmul(dyb, vh[b0:b1, :cols].transpose(0, 2, 1), out=dp)  # dp = dy v^T
        p2 = p.reshape(-1, cols)  # (hb*rb, cols)
        dp2 = dp.reshape(-1, cols)  # (hb*rb, cols)
        lse_b = lse[b0:b1, r0:r1].reshape(-1)  # (hb*rb,)

        def softmax_grad_rows(i0, i1):
            x, g = p2[i0:i1], dp2[i0:i1]
            np.subtract(x, lse_b[i0:i1, None], out=x)
            np.exp(x, out=x)  # p = softmax(s) rebuilt in place (masked keys: exp(-inf) = 0)
            np.vecdot(x, g, out=rowdot[i0:i1])  # rowsum(p * dp) without a (rows, cols) temporary
            np.subtract(g, rowdot[i0:i1, None], out=g)
            np.multiply(g, x, out=g)  # g now holds ds = p * (dp - rowsum(p * dp))

        _rowwise(p2.shape[0], cols, softmax_grad_rows)
        ds = dp
        t = tmp[:b1 - b0, :cols]  # (hb, cols, d)
        np.matmul(p.transpose(0, 2, 1), dyb, out=t)  # this block's p^T dy
        dvh[b0:b1, :cols] += t
        np.matmul(ds, kh[b0:b1, :cols], out=dqh[b0:b1, r0:r1])  # dq = ds k (times scale below)
        np.matmul(ds.transpose(0, 2, 1), qh[b0:b1, r0:r1], out=t)  # this block's ds^T q (q already scaled)
        dkh[b0:b1, :cols] += t

    dqh *= scale
    return _merge_heads(dqh, num_heads), _merge_heads(dkh, num_heads), _merge_heads(dvh, num_heads)
