"""Activations and small elementwise ops: erf, SiLU, GELU (exact and tanh), QuickGELU, GEGLU, softmax, dropout.

Every op is a pair `*_forward(x, ...) -> (y, cache)` / `*_backward(dy, cache) -> dx`. Shapes are free: x (...) ->
y (...), except geglu (..., 2F) -> (..., F) and softmax, which normalises along `axis`. Caches hold references to
the inputs (never copies) and everything derived is recomputed in backward: an activation costs a few ufunc passes,
while caching e.g. sigmoid(x) would double the activation memory of a U-Net.

Where SD uses them: SiLU after every GroupNorm of the ResBlocks and on the time embedding; exact GELU inside GEGLU
(every transformer FeedForward of the U-Net) and in the OpenCLIP-H text encoder of SD 2.x; QuickGELU
x*sigmoid(1.702x) in CLIP ViT-L/14, SD 1.x's text encoder; softmax in attention; dropout is 0 in SD inference
but used when training small models.

erf: NumPy has none, so minisd has its own (W. J. Cody's scheme; the coefficients are fitted here, see the end of
this file):  erf(x) = x + x*S(x^2) for |x| < t0,  erf(x) = 1 - exp(-x^2) * P(|x|)/Q(|x|) for |x| >= t0.
Measured against math.erf on a dense grid of |x| < 10 (tests/test_ops_activations.py): float32 <= 1.5 ulp,
float64 <= 1.2e-16 absolute (1 ulp).

Speed: NumPy ufuncs run on one core and a 10-step polynomial over a 20 MB array streams it through memory ten
times. The hot loops therefore run `_chunked`: 64K-element slices (256 KB in float32), so a chain of ~30 ufuncs
works on data in the core's L2/L3 cache, shared among threads by ops.common.parallel_for (ufuncs release the
GIL), with their temporaries taken from per-thread scratch buffers (`_tmp`).

References (formulas):
  GELU: Hendrycks & Gimpel 2016, https://arxiv.org/abs/1606.08415 ; tanh form as torch.nn.GELU(approximate="tanh")
    https://pytorch.org/docs/2.5/generated/torch.nn.GELU.html
  GEGLU: Shazeer 2020, https://arxiv.org/abs/2002.05202 ; SD's FeedForward (value first, gate second):
    https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/attention.py (class GEGLU)
  QuickGELU: https://github.com/openai/CLIP/blob/d05afc43/clip/model.py#L166-L168
  SiLU: Elfwing et al. 2017, https://arxiv.org/abs/1702.03118
  erf: W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23 (1969) 631-637,
    https://doi.org/10.1090/S0025-5718-1969-0247736-4 (the scheme; the coefficients below are our own fits)
  Dropout: Srivastava et al. 2014, https://jmlr.org/papers/v15/srivastava14a.html (inverted scaling as torch)
"""
import math
import threading
from typing import NamedTuple, Optional

import numpy as np

from ..backend import is_cuda, use_cuda_ops, xp_of
from .common import check_float, parallel_for

CHUNK = 1 << 16  # elements per work item of the chunked loops (256 KB of float32): amortises NumPy's ~1 us
#                  per-call overhead while a kernel's temporaries stay in cache (L2/L3)

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 x (1 + tanh(k (x + 0.044715 x^3)))
_GELU_TANH_C = 0.044715
_QUICK_GELU_A = 1.702  # QuickGELU: x * sigmoid(1.702 x)


# ------------------------------------------------------------------------------------------------------------
# chunked, threaded elementwise loops

def _chunked(n, fn, chunk=CHUNK, bufsize=None):
    """Call fn(lo, hi) for consecutive slices [lo, hi) of range(n), `chunk` long, spread over the threads.

    The chunk boundaries do not depend on the thread count, so per-chunk partial sums (LayerNorm's dgamma)
    give the same result on any machine. bufsize: NumPy's ufunc buffer size (elements) to use in the workers
    (see norm._channel_bufsize).
    """
    nchunks = max(1, -(-n // chunk))

    def work(c0, c1):
        # overflow in exp(-x) for very negative x is expected (sigmoid -> 0); errstate and bufsize are per thread
        old = np.setbufsize(bufsize) if bufsize else None
        try:
            with np.errstate(over="ignore"):
                for c in range(c0, c1):
                    fn(c * chunk, min(n, (c + 1) * chunk))
        finally:
            if old:
                np.setbufsize(old)

    parallel_for(nchunks, work)


def _map(kernel, out, *arrays):
    """Run kernel(out_slice, *array_slices) over flat chunks of same-sized C-contiguous arrays. Returns out.

    CuPy arrays (the generic ops run unchanged on the GPU, DEVELOPERS.md §6: np.* ufuncs dispatch to CuPy) get
    one call on the whole arrays: chunks and threads are a CPU-cache device.
    """
    if is_cuda(out):
        kernel(out, *arrays)
        return out
    flats = [a.reshape(-1) for a in arrays]  # views: the callers pass C-contiguous arrays
    of = out.reshape(-1)
    _chunked(of.size, lambda lo, hi: kernel(of[lo:hi], *(f[lo:hi] for f in flats)))
    return out


_SCRATCH = threading.local()


def _tmp(like, slot):
    """A scratch array shaped like `like`, private to this thread and `slot`, reused from chunk to chunk.

    A fresh np.empty for every temporary of every chunk costs more than the arithmetic (measured: erf on 32K
    elements ~3.5x slower with its six temporaries freshly allocated each time; large allocations go back to
    the OS and come back as fresh pages). Kernels that call each other use different slots. Only buffers of up to
    4 * CHUNK elements are kept (1 MB in float32 per slot and thread: the activations' slots hold CHUNK, the
    norms' one block of norm.BLOCK = 4 * CHUNK); bigger requests (GroupNorm rows longer than a block) get a fresh
    array each time.
    """
    if is_cuda(like):
        return xp_of(like).empty_like(like)
    n = like.size
    key = (slot, like.dtype)
    buf = _SCRATCH.__dict__.get(key)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, CHUNK), like.dtype)
        if n <= 4 * CHUNK:
            _SCRATCH.__dict__[key] = buf
    return buf[:n].reshape(like.shape)


def _contig(x):
    return xp_of(x).ascontiguousarray(x)  # no copy when x is already C-contiguous (np.ascontiguousarray refuses CuPy)


def _compute_dtype(x):
    """float16 is evaluated in float32 (the polynomials' coefficients need more than 11 bits) and cast back."""
    return np.float32 if x.dtype == np.float16 else x.dtype


# ------------------------------------------------------------------------------------------------------------
# erf

class _ErfTable(NamedTuple):
    t0: float  # branch point: |x| < t0 uses the small-argument polynomial
    clip: float  # beyond this erf rounds to +-1 in the target dtype; clipping keeps P/Q finite
    small: tuple  # S, low -> high powers of s = x^2:  erf(x) = x + x*S(s)
    num: tuple  # P, low -> high powers of a = |x|:   erfc(a) = exp(-a^2) * P(a)/Q(a)
    den: tuple  # Q


# float32: 6 + 4 + 4 coefficients; measured max error 1.3 ulp in float32, np.exp's own rounding included
_ERF32 = _ErfTable(
    t0=0.9, clip=3.92,  # erfc(3.92) = 2.96e-8 < half an ulp below 1.0f
    small=(0.12837915472723108, -0.37612528804753687, 0.11282194093299178, -0.02678071912852338,
           0.005014484151150446, -0.0006102687036764049),
    num=(1.000261081183726, 0.6632617544858654, 0.19509177866007582, -0.0002067796166227695),
    den=(1.0, 1.7935559569214332, 1.2123838818342139, 0.3403632889365483))

# float64: 12 + 6 + 7 coefficients; fit errors 7e-18 / 1e-18, so float64 rounding (1 ulp) is what remains
_ERF64 = _ErfTable(
    t0=1.0, clip=6.0,  # erfc(6) = 2.2e-17 < half an ulp below 1.0
    small=(0.12837916709551256, -0.37612638903183543, 0.11283791670945006, -0.02686617064323777,
           0.0052239776071164225, -0.0008548325975389692, 0.00012055294904839707, -1.492473690741966e-05,
           1.6447424703317362e-06, -1.6208483801871705e-07, 1.3720064546777686e-08, -7.795898827002142e-10),
    num=(0.9999998890070964, 1.3901205118066104, 0.9489529335154433, 0.37326024115325845, 0.08424089800899665,
         0.008914090951478871),
    den=(1.0, 2.518498507995611, 2.790780072313601, 1.7560537260213227, 0.6695462702192527,
         0.14930917579382227, 0.015799938147578338))


def _horner(coefs, z, out):
    """out = sum_k coefs[k] z^k (Horner, in place; coefficients are rounded to z's dtype once)."""
    c = np.asarray(coefs, dtype=z.dtype)
    np.multiply(z, c[-1], out=out)
    out += c[-2]
    for ck in c[-3::-1]:
        out *= z
        out += ck


def _erf_into(x, out):
    """out = erf(x) for one chunk (float32 or float64, any shape).

    Both branches are computed for every element and blended with a 0/1 mask: a few extra multiplies are
    cheaper than np.where/np.copyto(where=) (3-10x slower per element here) or gathering each branch's elements.
    """
    t = _ERF64 if x.dtype == np.float64 else _ERF32
    xc = np.clip(x, -t.clip, t.clip, out=_tmp(x, "erf_xc"))  # beyond clip erf rounds to +-1; NaN stays NaN
    s = np.multiply(xc, xc, out=_tmp(x, "erf_s"))
    # small |x|, signed (S is even, so this is odd): x + x*S(s) rather than x*(1 + S(s)), so that the rounding
    # errors of S are scaled by |S| < 0.13
    _horner(t.small, s, out)
    out *= xc
    out += xc
    # large |x|: 1 - exp(-s) P(a)/Q(a), evaluated on a = |x| clipped into [t0, clip] so that it is finite (and
    # x / a is exactly +-1) wherever the mask selects it; P and Q have positive coefficients (bar a negligible
    # top term of the float32 P), so Horner has no cancellation
    a = np.abs(xc, out=_tmp(x, "erf_a"))
    m = np.greater_equal(a, t.t0, out=_tmp(x, "erf_m"), casting="unsafe")  # 1.0 where the large branch applies
    np.clip(a, t.t0, t.clip, out=a)
    p, q = _tmp(x, "erf_p"), _tmp(x, "erf_q")
    _horner(t.num, a, p)
    _horner(t.den, a, q)
    p /= q
    np.negative(s, out=s)
    np.exp(s, out=s)
    s *= p  # erfc(|x|)
    np.subtract(1, s, out=s)
    np.divide(xc, a, out=p)  # sign(x) where m == 1
    s *= p
    # blend: out * (1 - m) + large * m, exact for m in {0, 1}
    s *= m
    np.subtract(1, m, out=m)
    out *= m
    out += s


def erf(x):
    """The error function, elementwise. x (...) float -> (...) same dtype. No cache: it is a helper, not an op
    (gelu's backward differentiates it)."""
    check_float("erf", x=x)
    xc = _contig(x).astype(_compute_dtype(x), copy=False)
    return _map(lambda out, xs: _erf_into(xs, out), np.empty_like(xc), xc).astype(x.dtype, copy=False)


# ------------------------------------------------------------------------------------------------------------
# chunk kernels (out first, then inputs; every one works on any shape, so GroupNorm reuses them on blocks)

def _sigmoid_into(x, out):
    """out = 1 / (1 + exp(-x)); exp overflows to inf for x < -88 (float32) and the result is then exactly 0."""
    np.negative(x, out=out)
    np.exp(out, out=out)
    out += 1
    np.divide(1, out, out=out)  # np.reciprocal is not vectorised; divide is
    return out


def _silu_fwd(y, x):
    np.negative(x, out=y)
    np.exp(y, out=y)
    y += 1
    np.divide(x, y, out=y)  # x / (1 + exp(-x)) = x * sigmoid(x), one division instead of two ops


def _silu_bwd(dx, dy, x):
    # d/dx x s(x) = s + x s (1 - s) = s (1 + x (1 - s))
    s = _sigmoid_into(x, _tmp(x, "silu_s"))
    np.subtract(1, s, out=dx)
    dx *= x
    dx += 1
    dx *= s
    dx *= dy


def _gelu_fwd(y, x):
    # gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the same expression as PyTorch's
    u = np.multiply(x, _SQRT1_2, out=_tmp(x, "gelu_u"))
    _erf_into(u, y)
    y += 1
    y *= x
    y *= 0.5


def _gelu_parts(g, phi, gpdf):
    """phi = Phi(g) (normal CDF), gpdf = g * pdf(g): gelu(g) = g phi and gelu'(g) = phi + gpdf."""
    np.multiply(g, _SQRT1_2, out=gpdf)
    _erf_into(gpdf, phi)
    phi += 1
    phi *= 0.5
    np.square(gpdf, out=gpdf)  # (g / sqrt 2)^2 = g^2 / 2
    np.negative(gpdf, out=gpdf)
    np.exp(gpdf, out=gpdf)
    gpdf *= _INV_SQRT_2PI
    gpdf *= g


def _gelu_bwd(dx, dy, x):
    phi = _tmp(x, "gelu_phi")
    _gelu_parts(x, phi, dx)
    dx += phi
    dx *= dy


def _gelu_tanh_fwd(y, x):
    # 0.5 x (1 + tanh(k (x + c x^3))); x*x*x, not x**3 (power is ~90x slower in float32)
    np.multiply(x, x, out=y)
    y *= x
    y *= _GELU_TANH_C
    y += x
    y *= _GELU_TANH_K
    np.tanh(y, out=y)
    y += 1
    y *= x
    y *= 0.5


def _gelu_tanh_bwd(dx, dy, x):
    # with u = k (x + c x^3), t = tanh u:  d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
    x2 = np.multiply(x, x, out=_tmp(x, "gt_x2"))
    t = np.multiply(x2, x, out=_tmp(x, "gt_t"))
    t *= _GELU_TANH_C
    t += x
    t *= _GELU_TANH_K
    np.tanh(t, out=t)
    x2 *= 3 * _GELU_TANH_C
    x2 += 1
    x2 *= _GELU_TANH_K
    x2 *= x  # x k (1 + 3 c x^2)
    np.multiply(t, t, out=dx)
    np.subtract(1, dx, out=dx)
    dx *= x2
    dx += t
    dx += 1
    dx *= 0.5
    dx *= dy


def _quick_gelu_fwd(y, x):
    np.multiply(x, -_QUICK_GELU_A, out=y)
    np.exp(y, out=y)
    y += 1
    np.divide(x, y, out=y)  # x / (1 + exp(-1.702 x))


def _quick_gelu_bwd(dx, dy, x):
    # d/dx x s(ax) = s + a x s (1 - s) = s (1 + a x (1 - s))
    s = np.multiply(x, _QUICK_GELU_A, out=_tmp(x, "qg_s"))
    _sigmoid_into(s, s)
    np.subtract(1, s, out=dx)
    dx *= x
    dx *= _QUICK_GELU_A
    dx += 1
    dx *= s
    dx *= dy


# ------------------------------------------------------------------------------------------------------------
# elementwise activations: forward / backward pairs

class ActCache(NamedTuple):
    x: np.ndarray  # (...) the input; everything else is recomputed in backward (memory over a few passes)


def _unary_forward(name, kernel, x):
    check_float(name, x=x)
    xc = _contig(x).astype(_compute_dtype(x), copy=False)
    y = _map(kernel, np.empty_like(xc), xc).astype(x.dtype, copy=False)
    return y, ActCache(x)


def _unary_backward(name, kernel, dy, cache):
    x = cache.x
    if dy.shape != x.shape:
        raise ValueError(f"{name}_backward: argument 'dy' must have shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    check_float(name, x=x, dy=dy)
    dt = _compute_dtype(x)
    xc = _contig(x).astype(dt, copy=False)
    dyc = _contig(dy).astype(dt, copy=False)
    return _map(kernel, np.empty_like(xc), dyc, xc).astype(x.dtype, copy=False)


def silu_forward(x):
    """SiLU / swish: y = x * sigmoid(x). x (...) -> y (...)."""
    return _unary_forward("silu", _silu_fwd, x)


def silu_backward(dy, cache):
    """dy (...) -> dx (...)."""
    return _unary_backward("silu", _silu_bwd, dy, cache)


def gelu_forward(x):
    """Exact GELU: y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (torch's default approximate='none')."""
    return _unary_forward("gelu", _gelu_fwd, x)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x * pdf(x)), pdf the standard normal density."""
    return _unary_backward("gelu", _gelu_bwd, dy, cache)


def gelu_tanh_forward(x):
    """tanh-approximated GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (torch approximate='tanh')."""
    return _unary_forward("gelu_tanh", _gelu_tanh_fwd, x)


def gelu_tanh_backward(dy, cache):
    return _unary_backward("gelu_tanh", _gelu_tanh_bwd, dy, cache)


def quick_gelu_forward(x):
    """QuickGELU of OpenAI CLIP (SD 1.x text encoder): y = x * sigmoid(1.702 x)."""
    return _unary_forward("quick_gelu", _quick_gelu_fwd, x)


def quick_gelu_backward(dy, cache):
    return _unary_backward("quick_gelu", _quick_gelu_bwd, dy, cache)


# ------------------------------------------------------------------------------------------------------------
# GEGLU

class GegluCache(NamedTuple):
    h: np.ndarray  # (..., 2F) the input: value = h[..., :F], gate = h[..., F:]; Phi(gate) is recomputed


def _geglu_rows(h2, fn):
    """Call fn(r0, r1) over row blocks of h2 (M, 2F) holding ~CHUNK elements of each half."""
    rows = max(1, CHUNK // (h2.shape[1] // 2))
    m = h2.shape[0]
    nblocks = -(-m // rows)
    _chunked(nblocks, lambda b0, b1: fn(b0 * rows, min(m, b1 * rows)), chunk=1)


def geglu_forward(h):
    """GEGLU as SD's FeedForward: value, gate = h.chunk(2, -1); y = value * gelu(gate) (exact GELU).

    h (..., 2F) -> y (..., F). The first half is the value, the second the gate (LDM GEGLU / diffusers GEGLU).
    """
    if use_cuda_ops(h):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.geglu_forward(h)
    check_float("geglu", h=h)
    if h.ndim < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu: argument 'h' must have an even last dimension (..., 2F), got {tuple(h.shape)}")
    dt = _compute_dtype(h)
    F = h.shape[-1] // 2
    h2 = _contig(h).astype(dt, copy=False).reshape(-1, 2 * F)  # (M, 2F)
    y2 = np.empty((h2.shape[0], F), dtype=dt)  # (M, F)

    def rows(r0, r1):
        # value and gate are strided (r, F) views of the same rows: no copies of the halves
        _gelu_fwd(y2[r0:r1], h2[r0:r1, F:])
        y2[r0:r1] *= h2[r0:r1, :F]

    _geglu_rows(h2, rows)
    return y2.reshape(h.shape[:-1] + (F,)).astype(h.dtype, copy=False), GegluCache(h)


def geglu_backward(dy, cache):
    """dy (..., F) -> dh (..., 2F): d value = dy gelu(gate), d gate = dy value gelu'(gate)."""
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.geglu_backward(dy, cache)
    h = cache.h
    F = h.shape[-1] // 2
    if dy.shape != h.shape[:-1] + (F,):
        raise ValueError(f"geglu_backward: argument 'dy' must have shape {h.shape[:-1] + (F,)}, "
                         f"got {tuple(dy.shape)}")
    check_float("geglu", h=h, dy=dy)
    dt = _compute_dtype(h)
    h2 = _contig(h).astype(dt, copy=False).reshape(-1, 2 * F)  # (M, 2F)
    dy2 = _contig(dy).astype(dt, copy=False).reshape(-1, F)  # (M, F)
    dh2 = np.empty_like(h2)  # (M, 2F)

    def rows(r0, r1):
        g, v, d = h2[r0:r1, F:], h2[r0:r1, :F], dy2[r0:r1]
        dv, dg = dh2[r0:r1, :F], dh2[r0:r1, F:]
        phi = _tmp(d, "geglu_phi")
        _gelu_parts(g, phi, dg)  # dg = g pdf(g) for now
        dg += phi  # gelu'(g)
        dg *= v
        dg *= d
        np.multiply(g, phi, out=dv)  # gelu(g)
        dv *= d

    _geglu_rows(h2, rows)
    return dh2.reshape(h.shape).astype(h.dtype, copy=False)


# ------------------------------------------------------------------------------------------------------------
# softmax

class SoftmaxCache(NamedTuple):
    y: np.ndarray  # (...) the output: the backward needs only y (dx = y (dy - sum(dy y)))
    axis: int


def _rows_last(x, axis):
    """x with `axis` moved last, as a C-contiguous (M, K) array, plus the shape to move back from."""
    xt = np.moveaxis(x, axis, -1)  # (..., K)
    return np.ascontiguousarray(xt).reshape(-1, xt.shape[-1]), xt.shape  # (M, K)


def _rows_back(y2, shape, axis):
    return np.ascontiguousarray(np.moveaxis(y2.reshape(shape), -1, axis))


def softmax_forward(x, axis=-1):
    """Softmax along `axis`: y = exp(x - max) / sum exp(x - max). x (...) -> y (...).

    Subtracting the row maximum keeps exp from overflowing and changes nothing mathematically.
    """
    if use_cuda_ops(x):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.softmax_forward(x, axis)
    check_float("softmax", x=x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax: axis {axis} out of range for an input of shape {tuple(x.shape)}")
    axis %= x.ndim
    if x.size == 0:  # nothing to normalise (and max() of an empty row is undefined)
        return x.copy(), SoftmaxCache(x.copy(), axis)
    x2, shape = _rows_last(x, axis)  # (M, K)
    x2 = x2.astype(_compute_dtype(x), copy=False)
    y2 = np.empty_like(x2)
    rows = max(1, CHUNK // max(1, x2.shape[1]))
    ones = np.ones(x2.shape[1], dtype=x2.dtype)

    def block(b0, b1):
        r0, r1 = b0 * rows, min(x2.shape[0], b1 * rows)
        xs, ys = x2[r0:r1], y2[r0:r1]  # (r, K)
        np.subtract(xs, xs.max(axis=1, keepdims=True), out=ys)
        np.exp(ys, out=ys)
        inv = 1 / (ys @ ones)  # (r,) row sums as a BLAS matrix-vector product (faster than ys.sum(1))
        ys *= inv[:, None]

    _chunked(-(-x2.shape[0] // rows), block, chunk=1)
    y = _rows_back(y2, shape, axis).astype(x.dtype, copy=False)
    return y, SoftmaxCache(y, axis)


def softmax_backward(dy, cache):
    """dy (...) -> dx (...) = y * (dy - sum(dy * y, axis))."""
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.softmax_backward(dy, cache)
    y, axis = cache
    if dy.shape != y.shape:
        raise ValueError(f"softmax_backward: argument 'dy' must have shape {tuple(y.shape)}, got {tuple(dy.shape)}")
    check_float("softmax", y=y, dy=dy)
    dt = _compute_dtype(y)
    y2, shape = _rows_last(y, axis)  # (M, K)
    y2 = y2.astype(dt, copy=False)
    dy2 = _rows_last(dy, axis)[0].astype(dt, copy=False)
    dx2 = np.empty_like(y2)
    rows = max(1, CHUNK // max(1, y2.shape[1]))

    def block(b0, b1):
        r0, r1 = b0 * rows, min(y2.shape[0], b1 * rows)
        ys, ds, dxs = y2[r0:r1], dy2[r0:r1], dx2[r0:r1]  # (r, K)
        dot = np.vecdot(ds, ys)  # (r,) sum_k dy_k y_k
        np.subtract(ds, dot[:, None], out=dxs)
        dxs *= ys

    _chunked(-(-y2.shape[0] // rows), block, chunk=1)
    return _rows_back(dx2, shape, axis).astype(y.dtype, copy=False)


# ------------------------------------------------------------------------------------------------------------
# dropout

class DropoutCache(NamedTuple):
    keep: Optional[np.ndarray]  # (...) bool mask of kept elements; None when dropout was the identity
    scale: float  # 1 / (1 - p)


def dropout_forward(x, p, rng, training=True):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p), so that E[y] = x and
    inference needs no rescaling. Identity when not training or p == 0: then y IS x (no copy, SD inference calls
    this at every ResBlock), so do not modify y in place.

    x (...), p in [0, 1], rng: np.random.Generator (explicit randomness, DEVELOPERS.md §5) -> y (...).
    """
    check_float("dropout", x=x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return x, DropoutCache(None, 1.0)
    if p == 1.0:  # everything dropped (1/(1-p) would be inf, and 0 * inf is nan)
        return np.zeros_like(x), DropoutCache(np.zeros(x.shape, dtype=bool), 0.0)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"dropout: rng must be a np.random.Generator (e.g. np.random.default_rng(0)), "
                         f"got {type(rng).__name__}")
    keep = rng.random(x.shape, dtype=np.float32) >= p  # (...) bool, 1 byte per element in the cache
    keep = xp_of(x).asarray(keep)  # drawn on the host from the explicit rng; moved to the GPU for CuPy x
    scale = 1.0 / (1.0 - p)
    y = x * keep
    y *= x.dtype.type(scale)
    return y, DropoutCache(keep, scale)


def dropout_backward(dy, cache):
    """dy (...) -> dx (...): the same mask and scale as the forward."""
    keep, scale = cache
    if keep is None:
        return dy.copy()  # backwards return fresh arrays (the caller may accumulate into them)
    if dy.shape != keep.shape:
        raise ValueError(f"dropout_backward: argument 'dy' must have shape {tuple(keep.shape)}, "
                         f"got {tuple(dy.shape)}")
    dx = dy * keep
    dx *= dy.dtype.type(scale)
    return dx


# ------------------------------------------------------------------------------------------------------------
# how the erf tables were made (development only: needs mpmath; `python -m minisd.ops.activations` prints them)

def _fit_erf_table(t0, clip, small_degree, num_degree, den_degree, nodes=200, iterations=48):
    """Fit an _ErfTable at 40 significant digits.

    S: Chebyshev interpolant of erf(sqrt s)/sqrt s - 1 on s in [0, t0^2] (mpmath.chebyfit; near-minimax).
    P/Q: weighted linear least squares on `nodes` Chebyshev points of [t0, clip], in z = (a - mid)/half so the
    system is well conditioned. The error of P/Q - erfcx(a) is weighted by exp(-a^2)/erf(a) (its effect on erf,
    relative). 8 Sanathanan-Koerner iterations (divide each row by the previous Q) make the linearised problem
    match the true one, then Lawson iterations (weights grow where the error is large) push towards minimax.
    Finally z is expanded back into powers of a and everything is scaled so that Q(0) = 1.
    """
    import mpmath as mp  # dev dependency, imported here only

    mp.mp.dps = 40
    small = mp.chebyfit(lambda s: mp.erf(mp.sqrt(s)) / mp.sqrt(s) - 1, [0, t0 * t0], small_degree + 1)[::-1]
    mid, half = (mp.mpf(t0) + clip) / 2, (clip - mp.mpf(t0)) / 2
    a = [mid + half * mp.cos(mp.pi * (i + mp.mpf(1) / 2) / nodes) for i in range(nodes)]
    z = [(ai - mid) / half for ai in a]
    target = [mp.erfc(ai) * mp.exp(ai * ai) for ai in a]  # erfcx(a)
    weight = [mp.exp(-ai * ai) / mp.erf(ai) for ai in a]
    p, q = num_degree, den_degree
    prev_q, lawson, best = [mp.mpf(1)] * nodes, [mp.mpf(1)] * nodes, None
    for it in range(iterations):
        rows, rhs = [], []
        for i in range(nodes):
            w = weight[i] * mp.sqrt(lawson[i]) / prev_q[i]
            rows.append([w * z[i] ** k for k in range(p + 1)] + [-w * target[i] * z[i] ** k for k in range(1, q + 1)])
            rhs.append(w * target[i])
        sol = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))[0]
        P, Q = [sol[k] for k in range(p + 1)], [mp.mpf(1)] + [sol[p + k] for k in range(1, q + 1)]
        prev_q = [mp.polyval(Q[::-1], zi) for zi in z]
        err = [(mp.polyval(P[::-1], zi) / qi - ti) * wi for zi, qi, ti, wi in zip(z, prev_q, target, weight)]
        worst = max(abs(e) for e in err)
        if min(prev_q) > 0 and (best is None or worst < best[0]):
            best = (worst, P, Q)
        if it >= 8:
            lawson = [lw * abs(e) for lw, e in zip(lawson, err)]
            total = mp.fsum(lawson) / nodes
            lawson = [lw / total for lw in lawson]
    _, P, Q = best

    def in_powers_of_a(c):  # sum_k c_k ((a - mid)/half)^k -> coefficients of a^j
        return [mp.fsum(c[k] * mp.binomial(k, j) * (-mid) ** (k - j) / half ** k for k in range(j, len(c)))
                for j in range(len(c))]

    P, Q = in_powers_of_a(P), in_powers_of_a(Q)
    return _ErfTable(t0, clip, tuple(float(c) for c in small), tuple(float(c / Q[0]) for c in P),
                     tuple(float(c / Q[0]) for c in Q))


if __name__ == "__main__":
    print("_ERF32 =", _fit_erf_table(0.9, 3.92, 5, 3, 3))
    print("_ERF64 =", _fit_erf_table(1.0, 6.0, 11, 5, 6))
