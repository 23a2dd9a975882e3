"""2-D convolution, nearest-neighbour 2x upsampling and channel concatenation.

These three ops carry the spatial work of the SD U-Net and VAE: every ResBlock, Downsample, Upsample, conv_in and
conv_out is a conv2d, 1x1 convs are the shortcuts and (SD 1.x) the transformer proj_in/proj_out, and the U-Net
decoder concatenates `[h, skip]` along channels before each output block.

Shapes (glossary N=batch, C=input channels, H,W=height,width, K=kernel size; Cout=output channels):
    conv2d      x (N, C, H, W), w (Cout, C, KH, KW) (PyTorch layout), b (Cout,) or None -> y (N, Cout, Ho, Wo)
                Ho = floor((H + top + bottom - KH) / stride) + 1, Wo likewise (exactly torch.nn.functional.conv2d).
                padding: int p (all four sides) or ((top, bottom), (left, right)) like np.pad; the SD VAE
                Downsample needs ((0, 1), (0, 1)) (right/bottom only) with stride 2.
    upsample    x (N, C, H, W) -> y (N, C, 2H, 2W), y[..., i, j] = x[..., i // 2, j // 2]
    concat      xs: list of arrays equal except along `axis` -> y; the U-Net uses axis=1 with [h, skip].

conv2d is computed by one of three algorithms, all exact (same sums, different rounding only):

1. im2col + one GEMM, the general path and the definition (CS231n `conv_forward_fast`, Caffe's im2col):
       cols[(c, i, j), (n, oh, ow)] = x_padded[n, c, oh * stride + i, ow * stride + j]      (C*KH*KW, rows)
       y[n, :, oh, ow]              = w.reshape(Cout, C*KH*KW) @ cols[:, (n, oh, ow)] + b
   The inner dimension C*KH*KW (2880 for 320 channels, 3x3) is large enough for BLAS to run near peak. Backward:
       dw    = dy (Cout, rows) @ cols^T (rows, C*KH*KW)        (the forward product, differentiated w.r.t. w)
       dcols = w^T (C*KH*KW, Cout) @ dy (Cout, rows)           (... and w.r.t. cols)
       dx    = col2im(dcols): every cols entry was a copy of one x entry, so its gradient is added back there
               (KH*KW shifted, strided adds; overlapping windows accumulate).
       db    = dy summed over N, H, W.
2. 1x1, stride 1, no padding: x itself is the cols matrix, y[n] = w (Cout, C) @ x[n] (C, H*W); no copy at all.
3. Winograd F(2x2, 3x3) for 3x3 stride-1 convs with many output pixels (most of the U-Net and VAE work). Why: on
   the 2-core AVX-512 dev machine NumPy's OpenBLAS sgemm (256-bit Haswell kernels there) measured ~250 GFLOP/s
   against ~480 for PyTorch's oneDNN conv, so with GEMM alone minisd was ~2x slower at 320-640 channels; doing
   2.25x fewer multiplications is what closes the gap. Each 2x2 block of outputs is computed from its 4x4 input
   tile d (tiles overlap by 2) and each 3x3 filter g as (Lavin & Gray 2016, eq. 8)
       Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise on 4x4 arrays)
   and the sum over input channels of the elementwise products is, for each of the 16 positions of the 4x4 array, a
   GEMM: 16 GEMMs of (Cout, C) @ (C, tiles) replace one of (Cout, 9C) @ (9C, 4*tiles). The transforms only add and
   halve (entries 0, +-1, +-1/2), so float32 results stay within ~2x the rounding of the direct sum. Backward is
   the exact transpose of each linear step (dw = G^T [ (A dY A^T) * (B^T d B) ] G summed over tiles and images;
   dd = B [ (A dY A^T) * (G g G^T) ] B^T, added back where each overlapping tile came from).
Backward of a stride-1 conv with few channels (the small training U-Nets): dx is itself a conv of dy with the
flipped, channel-swapped kernel (_input_grad_by_conv), so it runs on the fast forward paths, and dw is computed on
its own; with many channels (SD) the transposed forward above is faster (BACKWARD_BY_CONV_MAX_CHANNELS).

Memory: a full cols buffer is KH*KW/stride^2 times the input (1.2 GB for the VAE's 128-channel 3x3 conv at 512x512),
so the work is cut into chunks of output rows (Winograd: rows of tiles; for small images, groups of whole images)
whose scratch buffers each stay under MAX_COLS_BYTES. The backward cache holds x, not cols: recomputing cols costs
one memory pass, storing it for every conv of a U-Net would cost gigabytes.

References:
    PyTorch conv2d semantics: https://pytorch.org/docs/2.5/generated/torch.nn.functional.conv2d.html
    PyTorch interpolate (nearest): https://pytorch.org/docs/2.5/generated/torch.nn.functional.interpolate.html
    CS231n convolution notes (im2col): https://cs231n.github.io/convolutional-networks/#conv
    Chellapilla et al. 2006, "High Performance Convolutional Neural Networks for Document Processing" (unfolding
    convolutions into a matrix product): https://inria.hal.science/inria-00112631
    Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks" (Winograd F(2x2, 3x3), section 4.1):
    https://arxiv.org/abs/1509.09308
    SD VAE asymmetric Downsample padding: https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/model.py#L61
"""
from typing import List, NamedTuple, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..backend import use_cuda_ops
from .common import check_float, check_ndim, check_shape, parallel_for

# Upper bound for each im2col-sized scratch buffer (forward: cols; backward: cols and dcols; Winograd: its two tile
# arrays). It caps the VAE's 512x512 convs (a whole cols buffer would be 1.2 GB) and, kept at 32 MiB, lets glibc's
# malloc recycle the buffers from call to call: larger blocks are always fresh mmap pages that the kernel must fault
# in and zero, which measured ~0.8 ms per 16 MiB (12% of the 320-channel 64x64 Winograd forward).
MAX_COLS_BYTES = 32 * 2**20

# Winograd is used for 3x3 stride-1 convs with at least this many 2x2 output tiles per call (N*Ho*Wo/4) and this
# many input and output channels. Below that its fixed costs (transforming the weights, 16 skinny GEMMs instead of
# one wide one) outweigh the saved multiplications: measured at 1280 channels, it wins at 16x16 (64 tiles) and
# loses at 8x8 with batch 2 (32 tiles); with a handful of channels the GEMMs are too thin to matter either way.
WINOGRAD_MIN_TILES = 64
WINOGRAD_MIN_CHANNELS = 32
# ... and, for outputs narrower than WINOGRAD_NARROW_WIDTH, at least WINOGRAD_NARROW_MIN_CHANNELS channels. The tile
# transforms are ufuncs over stride-2 views whose innermost loop is one row of tiles (Wo/2 elements), so on narrow
# images they run short loops, and only a large GEMM share (many channels) still pays for them. Measured (2 threads,
# forward, Winograd vs im2col ms): 64 ch at 32x32 batch 64 78 vs 55, 128 ch at 32x32 batch 16 70 vs 36, 160 ch at
# 16x16 7.6 vs 7.0, 192 ch at 32x32 14.4 vs 21.2, 640 ch at 32x32 62 vs 85; but 128 ch at 128x128 34 vs 41.
WINOGRAD_NARROW_WIDTH = 64
WINOGRAD_NARROW_MIN_CHANNELS = 160

# Stride-1 convs with fewer channels than this take their input gradient as a conv of dy (_input_grad_by_conv) and
# the weight gradient on its own; with more, the transposed forward (one pass that shares the dy tiles or columns
# between dx and dw) is faster because its GEMMs dominate. Measured fwd+bwd ms, 2 threads (benchmarks/README.md):
# 64 ch at 32x32 batch 64 and the training U-Nets gain, 640-1280 ch at 8x8-32x32 lose 35-65%.
BACKWARD_BY_CONV_MAX_CHANNELS = 160

# Below this many elements an elementwise job is not worth handing to threads (thread start-up ~ tens of us).
_MIN_PARALLEL = 1 << 16

# Winograd F(2x2, 3x3) 1-D matrices (Lavin & Gray 2016, section 4.1). The 2-D transforms are their Kronecker
# products (vec(B^T d B) = kron(B^T, B^T) @ vec(d), vec = row-major flatten). The filter transform and the transposed
# output transforms of the backward use these as small GEMMs; the input and output transforms of every tile
# are written out as adds (_BT_TERMS below, tested against _WINO_BT and _WINO_AT).
_WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)  # (4, 4) input tile
_WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)  # (4, 3) filter
_WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)  # (2, 4) output
_WINO_KB = np.kron(_WINO_BT, _WINO_BT)  # (16, 16) vec(B^T d B) = KB @ vec(d) (its transpose: the input gradient)
_WINO_KG = np.kron(_WINO_G, _WINO_G)  # (16, 9)  vec(G g G^T) = KG @ vec(g)
_WINO_KA = np.kron(_WINO_AT, _WINO_AT)  # (4, 16)  vec(A^T m A) = KA @ vec(m)


# ================================================================================================================
# conv2d: shared pieces

class Conv2dCache(NamedTuple):
    x: np.ndarray  # (N, C, H, W) the unpadded input; cols / tiles are recomputed from it in backward
    w: np.ndarray  # (Cout, C, KH, KW)
    has_bias: bool
    stride: int
    padding: Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right))
    algo: str  # "1x1", "im2col" or "winograd": the algorithm the forward used (backward uses its transpose)


def _parse_padding(op, padding):
    """int p or ((top, bottom), (left, right)) -> ((top, bottom), (left, right)) of non-negative ints."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
    if is_int(padding):
        p = int(padding)
        return (p, p), (p, p)
    try:
        (top, bottom), (left, right) = padding
    except (TypeError, ValueError):
        top = None
    if top is None or not all(is_int(v) for v in (top, bottom, left, right)):
        raise ValueError(f"{op}: argument 'padding' must be an int >= 0 or ((top, bottom), (left, right)) of "
                         f"ints >= 0, got {padding!r}")
    return (int(top), int(bottom)), (int(left), int(right))


def _check_stride(op, stride):
    if not (isinstance(stride, (int, np.integer)) and not isinstance(stride, bool) and stride >= 1):
        raise ValueError(f"{op}: argument 'stride' must be an int >= 1, got {stride!r}")
    return int(stride)


def _out_size(size, before, after, k, stride):
    return (size + before + after - k) // stride + 1


def _choose_algo(C, Cout, kh, kw, stride, pads, N, Ho, Wo):
    """'1x1', 'winograd' or 'im2col' (the general path) for this conv; see the module docstring and thresholds."""
    if kh == kw == 1 and stride == 1 and pads == ((0, 0), (0, 0)):
        return "1x1"
    tiles = N * ((Ho + 1) // 2) * ((Wo + 1) // 2)
    min_channels = WINOGRAD_MIN_CHANNELS if Wo >= WINOGRAD_NARROW_WIDTH else WINOGRAD_NARROW_MIN_CHANNELS
    if kh == kw == 3 and stride == 1 and tiles >= WINOGRAD_MIN_TILES and min(C, Cout) >= min_channels:
        return "winograd"
    return "im2col"


def _chunks(N, rows, row_bytes):
    """Split N images of `rows` output rows into (n0, n1, r0, r1) pieces whose scratch (row_bytes per row per image)
    fits MAX_COLS_BYTES.

    Whole images are grouped when they fit (one bigger GEMM runs closer to peak than several small ones, which matters
    at 8x8 and 16x16); otherwise each image is cut into bands of rows (at least one row, whatever the cap).
    """
    per_chunk = max(1, MAX_COLS_BYTES // max(1, row_bytes))  # rows that fit
    if per_chunk >= rows:
        nb = max(1, per_chunk // rows)  # images per chunk
        return [(n0, min(N, n0 + nb), 0, rows) for n0 in range(0, N, nb)]
    return [(n, n + 1, r0, min(rows, r0 + per_chunk)) for n in range(N) for r0 in range(0, rows, per_chunk)]


def _padded_band(x, n0, n1, r0, r1, kh, stride, pads, buf):
    """Zero-padded input rows that output rows [r0, r1) of images [n0, n1) read: (nb, C, (r1-r0-1)*stride+KH, Wp).

    Writes into `buf` (a flat scratch array reused across chunks, so no allocation per chunk) unless no padding is
    needed, in which case a view of x is returned directly (no copy at all).
    """
    (top, bottom), (left, right) = pads
    H, W = x.shape[2], x.shape[3]
    lo = r0 * stride - top  # first input row read (may be negative: inside the top padding)
    hi = (r1 - 1) * stride + kh - top  # one past the last input row read (may exceed H: bottom padding)
    if lo >= 0 and hi <= H and left == 0 and right == 0:
        return x[n0:n1, :, lo:hi, :]  # (nb, C, rows_in, W) view
    rows_in = hi - lo
    band = buf[: (n1 - n0) * x.shape[1] * rows_in * (W + left + right)]
    band = band.reshape(n1 - n0, x.shape[1], rows_in, W + left + right)  # (nb, C, rows_in, Wp)
    # band rows [a, e) hold real input rows a+lo .. e+lo; the rest is padding (clipped: with padding wider than the
    # kernel a band may lie entirely inside the padding)
    a = min(max(-lo, 0), rows_in)
    e = min(max(H - lo, a), rows_in)

    def fill(c0, c1):
        dst = band[:, c0:c1]  # (nb, C', rows_in, Wp)
        dst[:, :, :a] = 0  # top padding rows
        dst[:, :, e:] = 0  # bottom padding rows
        dst[:, :, :, :left] = 0
        dst[:, :, :, left + W:] = 0
        dst[:, :, a:e, left: left + W] = x[n0:n1, c0:c1, a + lo: e + lo]

    # copies release the GIL, so splitting over channels uses every core for this memory-bound step
    parallel_for(x.shape[1], fill, min_chunk=max(1, _MIN_PARALLEL // max(1, band[0, 0].size * (n1 - n0))))
    return band


def _band_rows(chunks, kh, stride):
    """Largest number of (image, padded input row) pairs any chunk's band holds: sizes the band scratch buffer."""
    return max(((n1 - n0) * ((r1 - r0 - 1) * stride + kh) for n0, n1, r0, r1 in chunks), default=0)


def _im2col(band, kh, kw, stride, R, Wo, cols):
    """cols (C, KH, KW, nb, R, Wo) <- band (nb, C, rows_in, Wp): cols[c, i, j, n, r, q] = band[n, c, r*s + i, q*s + j]."""
    win = sliding_window_view(band, (kh, kw), axis=(2, 3))  # (nb, C, rows_in-KH+1, Wp-KW+1, KH, KW) view, no copy
    win = win[:, :, ::stride, ::stride][:, :, :R, :Wo]  # (nb, C, R, Wo, KH, KW) the stride subsamples windows
    _parallel_copy(cols, win.transpose(1, 4, 5, 0, 2, 3))  # (C, KH, KW, nb, R, Wo) = w.reshape's column order


def _col2im_add(dcols, band_grad, kh, kw, stride):
    """Inverse of _im2col: band_grad (nb, C, rows_in, Wp) += every dcols (C, KH, KW, nb, R, Wo) entry at its source."""
    R, Wo = dcols.shape[4], dcols.shape[5]
    # channels per inner block: all KH*KW adds hit the same destination block, so keep it small enough (~256 KiB)
    # to stay in L2 cache between taps instead of streaming it from memory KH*KW times
    block = max(1, (256 << 10) // max(1, band_grad[:, 0].nbytes))

    def add(c0, c1):
        for b0 in range(c0, c1, block):
            b1 = min(c1, b0 + block)
            for i in range(kh):
                for j in range(kw):
                    # tap (i, j) read rows i, i+s, ..., columns j, j+s, ...; overlapping taps accumulate
                    dst = band_grad[:, b0:b1, i: i + (R - 1) * stride + 1: stride, j: j + (Wo - 1) * stride + 1: stride]
                    dst += dcols[b0:b1, i, j].transpose(1, 0, 2, 3)  # (nb, C', R, Wo)

    parallel_for(dcols.shape[0], add, min_chunk=max(1, _MIN_PARALLEL // max(1, dcols[0].size)))


def _parallel_copy(dst, src):
    """dst[...] = src, split over axis 0 across threads (copies release the GIL, so the cores share the work)."""
    def copy(i0, i1):
        np.copyto(dst[i0:i1], src[i0:i1])

    parallel_for(dst.shape[0], copy, min_chunk=max(1, _MIN_PARALLEL // max(1, dst[0].size)))


def _add_bias(y, b):
    """y (N, Cout, Ho, Wo) += b (Cout,) in place, split over threads (a ufunc pass; the GEMM had no room for it)."""
    y3 = y.reshape(y.shape[0] * y.shape[1], -1)  # (N*Cout, Ho*Wo)
    bb = np.broadcast_to(b, (y.shape[0], y.shape[1])).reshape(-1, 1)  # (N*Cout, 1) bias of each row

    def add(r0, r1):
        y3[r0:r1] += bb[r0:r1]

    parallel_for(y3.shape[0], add, min_chunk=max(1, _MIN_PARALLEL // max(1, y3.shape[1])))


def _crop_padding(dx, n0, n1, dxp, pads):
    """dx[n0:n1] = dxp (nb, C, Hp, Wp) without its padding (the padding's gradient is simply dropped)."""
    (top, _), (left, _) = pads
    H, W = dx.shape[2], dx.shape[3]
    # (C, nb, H, W) views so that the threads split channels
    _parallel_copy(dx[n0:n1].transpose(1, 0, 2, 3), dxp[:, :, top: top + H, left: left + W].transpose(1, 0, 2, 3))


# ================================================================================================================
# conv2d: public ops

def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """y = conv2d(x, w, b): x (N, C, H, W), w (Cout, C, KH, KW), b (Cout,) or None -> y (N, Cout, Ho, Wo).

    stride: int >= 1. padding: int (all sides) or ((top, bottom), (left, right)); zeros, as PyTorch.
    """
    if use_cuda_ops(x):  # GPU: dispatch point (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops  # inside the function: minisd.cuda.ops imports this module
        return cuda_ops.conv2d_forward(x, w, b, stride, padding)
    op = "conv2d"
    check_ndim(op, "x", x, 4)
    check_ndim(op, "w", w, 4)
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    check_shape(op, "w", w, (None, C, None, None))
    if b is not None:
        check_shape(op, "b", b, (Cout,))
    dtype = check_float(op, x=x, w=w, b=b)
    stride = _check_stride(op, stride)
    pads = _parse_padding(op, padding)
    (top, bottom), (left, right) = pads
    if H + top + bottom < kh or W + left + right < kw:
        raise ValueError(f"{op}: kernel {kh}x{kw} is larger than the padded input {H + top + bottom}x"
                         f"{W + left + right} (x {tuple(x.shape)}, padding {pads})")
    Ho, Wo = _out_size(H, top, bottom, kh, stride), _out_size(W, left, right, kw, stride)
    algo = _choose_algo(C, Cout, kh, kw, stride, pads, N, Ho, Wo)
    y = np.empty((N, Cout, Ho, Wo), dtype=dtype)
    if algo == "1x1":
        # y[n] = w (Cout, C) @ x[n] (C, H*W): x is already the cols matrix; the GEMM writes straight into y
        np.matmul(w.reshape(Cout, C), x.reshape(N, C, H * W), out=y.reshape(N, Cout, H * W))  # (N, Cout, H*W)
    elif algo == "winograd":
        _winograd_forward(x, w, pads, y)
    else:
        _im2col_forward(x, w, stride, pads, y)
    if b is not None:
        _add_bias(y, b)
    return y, Conv2dCache(x, w, b is not None, stride, pads, algo)


def conv2d_backward(dy, cache):
    """dy (N, Cout, Ho, Wo) -> (dx (N, C, H, W), dw (Cout, C, KH, KW), db (Cout,) or None)."""
    if use_cuda_ops(dy):  # GPU: dispatch point (DEVELOPERS.md §6); both paths read each other's caches
        from ..cuda import ops as cuda_ops
        return cuda_ops.conv2d_backward(dy, cache)
    x, w, has_bias, stride, pads, algo = cache
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    (top, bottom), (left, right) = pads
    Ho, Wo = _out_size(H, top, bottom, kh, stride), _out_size(W, left, right, kw, stride)
    check_shape("conv2d_backward", "dy", dy, (N, Cout, Ho, Wo))
    check_float("conv2d_backward", dy=dy, x=x)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # y = ... + b[co] at every (n, oh, ow)
    if algo == "1x1":
        # forward was y[n] = w2 @ x[n] (Cout, H*W), so dx[n] = w2^T @ dy[n] and dw = sum_n dy[n] @ x[n]^T
        w2 = w.reshape(Cout, C)  # (Cout, C)
        dy3 = dy.reshape(N, Cout, H * W)  # (N, Cout, H*W)
        x3 = x.reshape(N, C, H * W)  # (N, C, H*W)
        dx = np.empty_like(x)
        np.matmul(w2.T, dy3, out=dx.reshape(N, C, H * W))
        dw = np.zeros_like(w2)
        for n in range(N):  # one GEMM per image: a fused (Cout, N*H*W) operand would need a transposed copy of dy
            dw += dy3[n] @ x3[n].T
    elif (stride == 1 and max(top, bottom) < kh and max(left, right) < kw
          and min(C, Cout) < BACKWARD_BY_CONV_MAX_CHANNELS):
        dx = _input_grad_by_conv(dy, w, pads)
        if algo == "winograd":
            dw = _winograd_weight_grad(dy, x, w, pads)
        else:
            dw = _im2col_weight_grad_rows(dy, x, w, pads)
    elif algo == "winograd":
        dx, dw = _winograd_backward(dy, x, w, pads)
    else:  # stride 2 (downsampling), padding as wide as the kernel, or many channels
        dx, dw = _im2col_backward(dy, x, w, stride, pads)
    return dx, dw.reshape(w.shape), db


def _input_grad_by_conv(dy, w, pads):
    """dx (N, C, H, W) of a stride-1 conv: itself a conv of dy, so the fast forward paths (Winograd) compute it.

    y[n, o, h, v] = sum_{c,i,j} w[o, c, i, j] xp[n, c, h+i, v+j] (xp: x padded by top, left) gives
        dx[n, c, p, q] = sum_{o,i,j} w[o, c, i, j] dy[n, o, p+top-i, q+left-j]
    which is a conv of dy, padded by (KH-1-top, KH-1-bottom) rows and (KW-1-left, KW-1-right) columns, with the
    kernel flipped in both directions and its two channel axes swapped (the "full convolution" of dy). Cheaper than
    the transposed im2col (dcols = w^T dy, then KH*KW scatter-adds of a 9x larger array) when channels are few:
    measured at batch 64, 32x32, 2 threads, whole backward: 32 -> 3 channels (the CIFAR conv_out) 39.8 -> 10.3 ms.
    """
    kh, kw = w.shape[2:]
    (top, bottom), (left, right) = pads
    w_flip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, Cout, KH, KW)
    return conv2d_forward(dy, w_flip, None, 1, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))[0]


# ================================================================================================================
# conv2d: im2col + GEMM

def _im2col_forward(x, w, stride, pads, y):
    """y (N, Cout, Ho, Wo) <- conv of x (N, C, H, W) with w (Cout, C, KH, KW), no bias."""
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    Ho, Wo = y.shape[2], y.shape[3]
    if stride == 1:
        _im2col_forward_rows(x, w, pads, y)
        return
    ckk = C * kh * kw
    w2 = w.reshape(Cout, ckk)  # (Cout, C*KH*KW) a view: PyTorch's layout is already GEMM-ready
    chunks = _chunks(N, Ho, ckk * Wo * x.itemsize)
    cols_buf = np.empty(max(((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks), default=0) * ckk * Wo, x.dtype)
    band_buf = np.empty(_band_rows(chunks, kh, stride) * C * (W + sum(pads[1])), x.dtype)
    for n0, n1, r0, r1 in chunks:
        nb, R = n1 - n0, r1 - r0
        band = _padded_band(x, n0, n1, r0, r1, kh, stride, pads, band_buf)
        cols = cols_buf[: ckk * nb * R * Wo].reshape(C, kh, kw, nb, R, Wo)
        _im2col(band, kh, kw, stride, R, Wo, cols)
        cols2 = cols.reshape(ckk, nb * R * Wo)  # (C*KH*KW, nb*R*Wo)
        if nb == 1:
            # the GEMM writes straight into y (no temporary): y[n, :, r0:r1] is a (Cout, R*Wo) view with row
            # stride Ho*Wo, which BLAS accepts as is
            np.matmul(w2, cols2, out=y[n0, :, r0:r1].reshape(Cout, R * Wo))
        else:
            # small images: one GEMM for the group reads w (59 MB at 1280 channels) once instead of nb times
            # and gives BLAS a wider matrix; the price is one copy of the (small) output into NCHW order
            yg = np.matmul(w2, cols2).reshape(Cout, nb, Ho, Wo)  # (Cout, nb, Ho, Wo)
            _parallel_copy(y[n0:n1].transpose(1, 0, 2, 3), yg)  # (Cout, nb, Ho, Wo) view of y


def _flat_band(x, n0, n1, r0, r1, kh, kw, pads, band_buf):
    """The zero-padded band of input rows for output rows [r0, r1) (stride 1) as one flat run per image and channel.

    Returns (band (nb, C, rows_in, Wp) in band_buf, its flat view (nb*C*rows_in*Wp + KW - 1,)): the KW - 1 zeros at
    the end let the last channel's shifted run below stay inside the buffer.
    """
    band = _padded_band(x, n0, n1, r0, r1, kh, 1, pads, band_buf)
    if not np.may_share_memory(band, band_buf):  # no padding at all: a view of x, copied to be one flat run
        band = _parallel_copy_into(band_buf, band)
    n = band.size
    band_buf[n: n + kw - 1] = 0
    return band, band_buf[: n + kw - 1]


def _parallel_copy_into(buf, src):
    """A contiguous copy of src in the front of the flat buffer `buf`."""
    dst = buf[: src.size].reshape(src.shape)
    _parallel_copy(dst, src)
    return dst


def _im2col_rows(flat, band_shape, kh, kw, R, cols):
    """cols (C, KH, KW, nb, R*Wp) <- cols[c, i, j, n, r*Wp + q] = band[n, c, r + i, q + j] (stride 1).

    Like _im2col, but each output row is computed at all Wp positions of the padded row, so that a row of cols is one
    contiguous run of the band: (c, i, j, n) reads R*Wp values starting at row i, column j of image n, channel c.
    The last KW-1 of every Wp positions wrap into the next row (or the zero slack): they are garbage outputs that
    the callers drop (forward) or multiply by zero (weight gradient). Why: the copy then moves runs of R*Wp values
    instead of R runs of Wo (a 32-wide image is a 32-value inner loop), measured 2-3x faster on the small U-Nets.
    """
    nb, C, rows_in, Wp = band_shape
    it = flat.itemsize
    src = np.lib.stride_tricks.as_strided(flat, shape=(C, kh, kw, nb, R * Wp),
                                          strides=(rows_in * Wp * it, Wp * it, it, C * rows_in * Wp * it, it),
                                          writeable=False)
    _parallel_copy(cols, src)


def _im2col_forward_rows(x, w, pads, y):
    """y <- stride-1 conv by im2col over whole padded rows (_im2col_rows), no bias."""
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    Ho, Wo = y.shape[2], y.shape[3]
    Wp = W + sum(pads[1])
    ckk = C * kh * kw
    w2 = w.reshape(Cout, ckk)  # (Cout, C*KH*KW)
    chunks = _chunks(N, Ho, max(ckk, Cout) * Wp * x.itemsize)
    most = max(((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks), default=0) * Wp
    cols_buf, yg_buf = np.empty(most * ckk, x.dtype), np.empty(most * Cout, x.dtype)
    band_buf = np.empty(_band_rows(chunks, kh, 1) * C * Wp + kw - 1, x.dtype)
    for n0, n1, r0, r1 in chunks:
        nb, R = n1 - n0, r1 - r0
        band, flat = _flat_band(x, n0, n1, r0, r1, kh, kw, pads, band_buf)
        cols = cols_buf[: ckk * nb * R * Wp].reshape(C, kh, kw, nb, R * Wp)
        _im2col_rows(flat, band.shape, kh, kw, R, cols)
        yg = np.matmul(w2, cols.reshape(ckk, nb * R * Wp), out=yg_buf[: Cout * nb * R * Wp].reshape(Cout, -1))
        yg = yg.reshape(Cout, nb, R, Wp)[..., :Wo]  # (Cout, nb, R, Wo) the real outputs
        _parallel_copy(y[n0:n1, :, r0:r1].transpose(1, 0, 2, 3), yg)


def _im2col_weight_grad_rows(dy, x, w, pads):
    """dw (Cout, C*KH*KW) of a stride-1 conv: dy @ cols^T with the cols of _im2col_rows (input gradient: by conv)."""
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    Wp = W + sum(pads[1])
    ckk = C * kh * kw
    chunks = _chunks(N, Ho, max(ckk, Cout) * Wp * x.itemsize)
    most = max(((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks), default=0) * Wp
    cols_buf, dyp_buf = np.empty(most * ckk, x.dtype), np.empty(most * Cout, x.dtype)
    band_buf = np.empty(_band_rows(chunks, kh, 1) * C * Wp + kw - 1, x.dtype)
    dw = np.zeros((Cout, ckk), x.dtype)
    for n0, n1, r0, r1 in chunks:
        nb, R = n1 - n0, r1 - r0
        band, flat = _flat_band(x, n0, n1, r0, r1, kh, kw, pads, band_buf)
        cols = cols_buf[: ckk * nb * R * Wp].reshape(C, kh, kw, nb, R * Wp)
        _im2col_rows(flat, band.shape, kh, kw, R, cols)
        # dy at the Wp positions of each row, zero at the garbage ones, so they add nothing to dw
        dyp = dyp_buf[: Cout * nb * R * Wp].reshape(Cout, nb, R, Wp)
        dyp[..., Wo:] = 0
        _parallel_copy(dyp[..., :Wo], dy[n0:n1, :, r0:r1].transpose(1, 0, 2, 3))
        dw += dyp.reshape(Cout, -1) @ cols.reshape(ckk, -1).T  # (Cout, C*KH*KW)
    return dw


def _im2col_backward(dy, x, w, stride, pads):
    """dy (N, Cout, Ho, Wo) -> dx (N, C, H, W), dw (Cout, C*KH*KW) for the im2col forward."""
    N, C, H, W = x.shape
    Cout, _, kh, kw = w.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    (top, bottom), (left, right) = pads
    ckk = C * kh * kw
    w2 = w.reshape(Cout, ckk)  # (Cout, C*KH*KW)
    chunks = _chunks(N, Ho, ckk * Wo * x.itemsize)
    cols_buf = np.empty(max(((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks), default=0) * ckk * Wo, x.dtype)
    dcols_buf = np.empty_like(cols_buf)
    band_buf = np.empty(_band_rows(chunks, kh, stride) * C * (W + left + right), x.dtype)
    dx = np.empty_like(x)
    dw = np.zeros((Cout, ckk), x.dtype) if N == 0 else None
    dxp = None
    for n0, n1, r0, r1 in chunks:
        nb, R = n1 - n0, r1 - r0
        if r0 == 0:
            # gradient of the padded input of this image group; the bands of consecutive row chunks overlap (a
            # window straddles the cut), so accumulate the whole padded image and crop the padding off at the end
            dxp = np.zeros((nb, C, H + top + bottom, W + left + right), dtype=x.dtype)  # (nb, C, Hp, Wp)
        band = _padded_band(x, n0, n1, r0, r1, kh, stride, pads, band_buf)
        cols = cols_buf[: ckk * nb * R * Wo].reshape(C, kh, kw, nb, R, Wo)
        _im2col(band, kh, kw, stride, R, Wo, cols)  # recomputed, not cached (see the module docstring)
        cols2 = cols.reshape(ckk, nb * R * Wo)  # (C*KH*KW, nb*R*Wo)
        if nb == 1:
            dy2 = dy[n0, :, r0:r1].reshape(Cout, R * Wo)  # (Cout, R*Wo) a view
        else:
            dy2 = dy[n0:n1].transpose(1, 0, 2, 3).reshape(Cout, nb * Ho * Wo)  # (Cout, nb*Ho*Wo) small copy
        # forward was y2 = w2 @ cols2, so dw = dy2 @ cols2^T and dcols = w2^T @ dy2 (BLAS reads the transposes)
        if dw is None:
            dw = dy2 @ cols2.T  # (Cout, C*KH*KW)
        else:
            dw += dy2 @ cols2.T
        dcols = np.matmul(w2.T, dy2, out=dcols_buf[: cols2.size].reshape(ckk, nb * R * Wo))
        band_grad = dxp[:, :, r0 * stride: (r1 - 1) * stride + kh]  # (nb, C, rows_in, Wp) rows this chunk read
        _col2im_add(dcols.reshape(C, kh, kw, nb, R, Wo), band_grad, kh, kw, stride)
        if r1 == Ho:
            _crop_padding(dx, n0, n1, dxp, pads)
    return dx, dw


# ================================================================================================================
# conv2d: Winograd F(2x2, 3x3) for 3x3, stride 1

# B^T and A^T (Lavin & Gray 2016, section 4.1) have only 0 and +-1 entries, so each transform is a few adds per row,
# written out below instead of as matrix products (a (16, 16) GEMM over every tile is 8x the arithmetic of the adds
# and measured 10 GFLOP/s: OpenBLAS is slow at K = 16). Row a of B^T d takes rows i and k of d combined by op:
_BT_TERMS = ((0, 2, np.subtract), (1, 2, np.add), (2, 1, np.subtract), (1, 3, np.subtract))  # B^T rows 0..3
# A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: output row 0 = m0 + m1 + m2, row 1 = m1 - m2 - m3


def _winograd_setup(x, w, pads):
    """Tile geometry, the transformed filters and the chunk plan shared by the Winograd forward and weight gradient."""
    N, C, H, W = x.shape
    Cout = w.shape[0]
    (top, bottom), (left, right) = pads
    Ho, Wo = H + top + bottom - 2, W + left + right - 2
    th, tw = (Ho + 1) // 2, (Wo + 1) // 2  # tiles per column / row; each gives a 2x2 block of outputs
    # tile (r, t) reads padded rows 2r..2r+3, columns 2t..2t+3: an odd output size needs one more zero row/column
    # at the bottom/right, and the extra output it produces is dropped
    wpads = ((top, bottom + 2 * th - Ho), (left, right + 2 * tw - Wo))
    # U[k, co, c] = (G w[co, c] G^T) at position k of the 4x4 array: one (16, 9) @ (9, Cout*C) GEMM (tiny: weights
    # only), already in the (16, Cout, C) layout the 16 GEMMs need
    U = (_WINO_KG.astype(x.dtype) @ w.reshape(Cout * C, 9).T).reshape(16, Cout, C)  # (16, Cout, C)
    chunks = _chunks(N, th, 16 * max(C, Cout) * tw * x.itemsize)  # each tile array holds 16 values per tile
    most_tiles = max(((n1 - n0) * (r1 - r0) for n0, n1, r0, r1 in chunks), default=0) * tw
    band_buf = np.empty(_band_rows(chunks, 4, 2) * C * (2 * tw + 2), x.dtype)
    return th, tw, wpads, U, chunks, most_tiles, band_buf


def _winograd_input_transform(x, n0, n1, t0, t1, tw, wpads, band_buf, tmp_buf, V_buf):
    """V (16, C, T) = B^T d B of every 4x4 input tile d of tile rows [t0, t1) of images [n0, n1), T = nb*R*tw.

    Tile (r, t) is rows 2r..2r+3, columns 2t..2t+3 of the padded band, so row i of every tile at once is the
    stride-2 view band[..., i + 2r, :]: the row transform is 4 ufuncs on such views, the column transform 4 more on
    each result, written straight into V in the (position, channel, tile) layout of the 16 GEMMs.
    """
    nb, R, C = n1 - n0, t1 - t0, x.shape[1]
    band = _padded_band(x, n0, n1, t0, t1, 4, 2, wpads, band_buf)  # (nb, C, 2R+2, 2tw+2)
    V6 = V_buf[: 16 * C * nb * R * tw].reshape(4, 4, C, nb, R, tw)  # V6[a, b, c, n, r, t]: position (a, b)
    tmp = tmp_buf[: nb * C * R * band.shape[3]].reshape(nb, C, R, band.shape[3])  # one row of B^T d per tile

    def transform(c0, c1):
        d = [band[:, c0:c1, i: i + 2 * R: 2] for i in range(4)]  # d[i]: row i of every tile, (nb, C', R, Wp)
        r = tmp[:, c0:c1]  # this thread's channels of the scratch row
        for a, (i, k, op) in enumerate(_BT_TERMS):
            op(d[i], d[k], out=r)  # row a of B^T d, every tile
            q = [r[..., j: j + 2 * tw: 2] for j in range(4)]  # q[j]: column j of it, (nb, C', R, tw)
            for b, (j, l, op2) in enumerate(_BT_TERMS):
                op2(q[j], q[l], out=V6[a, b, c0:c1].transpose(1, 0, 2, 3))  # (B^T d B)[a, b]

    parallel_for(C, transform, min_chunk=max(1, _MIN_PARALLEL // max(1, 16 * nb * R * tw)))
    return V6.reshape(16, C, nb * R * tw)  # (16, C, T)


def _winograd_output_transform(M, y, n0, n1, t0, t1, tmp_buf):
    """y[n0:n1, :, 2*t0: 2*t1] <- A^T m A of every 4x4 product tile m in M (16, Cout, T); odd edges dropped."""
    Cout, Ho, Wo = y.shape[1:]
    nb, R = n1 - n0, t1 - t0
    tw = M.shape[2] // (nb * R)
    M6 = M.reshape(4, 4, Cout, nb, R, tw)  # M6[i, j, co, n, r, t]
    tmp = tmp_buf[: 4 * Cout * nb * R * tw].reshape(4, Cout, nb, R, tw)  # one row of A^T m per tile

    def transform(c0, c1):
        s = tmp[:, c0:c1]  # (4, C', nb, R, tw) s[j]: column j of one row of A^T m
        m = M6[:, :, c0:c1]
        for a in range(2):
            rows = (min(2 * t1, Ho) - 2 * t0 - a + 1) // 2  # tile rows whose output row 2r+a exists (odd Ho)
            if a == 0:
                np.add(m[0], m[1], out=s)
                s += m[2]  # row 0 of A^T m = m0 + m1 + m2
            else:
                np.subtract(m[1], m[2], out=s)
                s -= m[3]  # row 1 = m1 - m2 - m3
            for b in range(2):
                cols = (Wo - b + 1) // 2
                dst = y[n0:n1, c0:c1, 2 * t0 + a: 2 * t0 + a + 2 * rows: 2, b: b + 2 * cols: 2]  # (nb, C', rows, cols)
                sj = [s[j, :, :, :rows, :cols].transpose(1, 0, 2, 3) for j in range(4)]  # (nb, C', rows, cols)
                if b == 0:
                    np.add(sj[0], sj[1], out=dst)
                    dst += sj[2]
                else:
                    np.subtract(sj[1], sj[2], out=dst)
                    dst -= sj[3]

    parallel_for(Cout, transform, min_chunk=max(1, _MIN_PARALLEL // max(1, 16 * nb * R * tw)))


def _winograd_forward(x, w, pads, y):
    """y (N, Cout, Ho, Wo) <- 3x3 stride-1 conv of x with w via Winograd F(2x2, 3x3), no bias."""
    N, C = x.shape[:2]
    Cout = y.shape[1]
    th, tw, wpads, U, chunks, most, band_buf = _winograd_setup(x, w, pads)
    V_buf, M_buf = np.empty(16 * C * most, x.dtype), np.empty(16 * Cout * most, x.dtype)
    # scratch rows of either transform: (nb, C, R, 2tw+2) for the input, (4, Cout, T) for the output
    tmp_buf = np.empty(max(C * 2 * (most + most // tw), 4 * Cout * most), x.dtype)
    for n0, n1, t0, t1 in chunks:
        T = (n1 - n0) * (t1 - t0) * tw
        V = _winograd_input_transform(x, n0, n1, t0, t1, tw, wpads, band_buf, tmp_buf, V_buf)  # (16, C, T)
        # the elementwise product summed over input channels: 16 GEMMs (Cout, C) @ (C, T), one per 4x4 position
        M = np.matmul(U, V, out=M_buf[: 16 * Cout * T].reshape(16, Cout, T))
        _winograd_output_transform(M, y, n0, n1, t0, t1, tmp_buf)


def _winograd_weight_grad(dy, x, w, pads):
    """dy (N, Cout, Ho, Wo) -> dw (Cout, C*9) for the Winograd forward (its input gradient is _input_grad_by_conv).

    The forward was M[k] = U[k] @ V[k] per position k, then y = A^T M A; so dM = A dY A^T per tile,
    dU[k] = sum over chunks of dM[k] @ V[k]^T, and U = G w G^T gives dw = G^T dU G.
    """
    N, C = x.shape[:2]
    Cout, Ho, Wo = dy.shape[1:]
    th, tw, wpads, U, chunks, most, band_buf = _winograd_setup(x, w, pads)
    KA = _WINO_KA.astype(x.dtype)
    V_buf, Z_buf = np.empty(16 * C * most, x.dtype), np.empty(16 * Cout * most, x.dtype)
    tmp_buf = np.empty(C * 2 * (most + most // tw), x.dtype)  # (nb, C, R, 2tw+2) rows of the input transform
    dyt_buf = np.empty(4 * Cout * most, x.dtype)
    dU = np.zeros((16, Cout, C), x.dtype)
    for n0, n1, t0, t1 in chunks:
        nb, R = n1 - n0, t1 - t0
        T = nb * R * tw
        V = _winograd_input_transform(x, n0, n1, t0, t1, tw, wpads, band_buf, tmp_buf, V_buf)  # recomputed
        # dY tiles: dyt[a, b, co, n, r, t] = dy[n, co, 2(t0+r)+a, 2t+b]; outputs past an odd edge stay zero
        dyt = dyt_buf[: 4 * Cout * T].reshape(2, 2, Cout, nb, R, tw)
        for a in range(2):
            rows = (min(2 * t1, Ho) - 2 * t0 - a + 1) // 2
            for b in range(2):
                cols = (Wo - b + 1) // 2
                if rows < R or cols < tw:
                    dyt[a, b] = 0  # (rare: odd sizes) clear what a previous chunk left in the buffer
                src = dy[n0:n1, :, 2 * t0 + a: 2 * t0 + a + 2 * rows: 2, b: b + 2 * cols: 2]  # (nb, Cout, rows, cols)
                _parallel_copy(dyt[a, b, :, :, :rows, :cols], src.transpose(1, 0, 2, 3))  # (Cout, nb, rows, cols)
        # y_tile = KA @ vec(m), so dM = KA^T @ dY: a (16, 4) product, 4 inputs per output (cheap next to the rest)
        Z = np.matmul(KA.T, dyt.reshape(4, Cout * T), out=Z_buf[: 16 * Cout * T].reshape(16, Cout * T))
        dU += np.matmul(Z.reshape(16, Cout, T), V.transpose(0, 2, 1))  # (16, Cout, C)
    # U = KG @ w (per (co, c) pair), so dw = KG^T @ dU; computed as dU^T @ KG to land in w's (Cout, C, 9) layout
    dw = dU.reshape(16, Cout * C).T @ _WINO_KG.astype(x.dtype)  # (Cout*C, 9)
    return dw.reshape(Cout, C * 9)



def _winograd_backward(dy, x, w, pads):
    """dy (N, Cout, Ho, Wo) -> dx (N, C, H, W), dw (Cout, C*9) for the Winograd forward: each step transposed.

    The path for many channels: dx reuses the dM tiles that dw needs, and the GEMMs dominate the transforms.
    """
    N, C, H, W = x.shape
    Cout, Ho, Wo = dy.shape[1:]
    th, tw, wpads, U, chunks, most, band_buf = _winograd_setup(x, w, pads)
    KB, KA = _WINO_KB.astype(x.dtype), _WINO_KA.astype(x.dtype)
    # two big scratch buffers shared by the arrays below in turn (see the forward), plus the small dY tiles
    buf1, buf2 = np.empty(16 * max(C, Cout) * most, x.dtype), np.empty(16 * max(C, Cout) * most, x.dtype)
    dyt_buf = np.empty(4 * Cout * most, x.dtype)
    tmp_buf = np.empty(C * 2 * (most + most // tw), x.dtype)  # (nb, C, R, 2tw+2) rows of the input transform
    dx = np.empty_like(x)
    dU = np.zeros((16, Cout, C), x.dtype) if N == 0 else None
    dxp = None
    for n0, n1, t0, t1 in chunks:
        nb, R = n1 - n0, t1 - t0
        T = nb * R * tw
        if t0 == 0:
            # gradient of the padded input of this image group (tiles overlap, and so do consecutive chunks)
            dxp = np.zeros((nb, C, 2 * th + 2, 2 * tw + 2), x.dtype)  # (nb, C, Hp', Wp')
        V = _winograd_input_transform(x, n0, n1, t0, t1, tw, wpads, band_buf, tmp_buf, buf2)  # recomputed
        # dY tiles: dyt[a, b, co, n, r, t] = dy[n, co, 2(t0+r)+a, 2t+b]; outputs past an odd edge stay zero
        dyt = dyt_buf[: 4 * Cout * T].reshape(2, 2, Cout, nb, R, tw)
        for a in range(2):
            rows = (min(2 * t1, Ho) - 2 * t0 - a + 1) // 2
            for b_ in range(2):
                cols = (Wo - b_ + 1) // 2
                if rows < R or cols < tw:
                    dyt[a, b_] = 0  # (rare: odd sizes) clear what a previous chunk left in the buffer
                src = dy[n0:n1, :, 2 * t0 + a: 2 * t0 + a + 2 * rows: 2, b_: b_ + 2 * cols: 2]  # (nb, Cout, rows, cols)
                _parallel_copy(dyt[a, b_, :, :, :rows, :cols], src.transpose(1, 0, 2, 3))  # (Cout, nb, rows, cols)
        # forward was y_tile = KA @ M, so dM = KA^T @ dY (= A dY A^T per tile)
        Z = np.matmul(KA.T, dyt.reshape(4, Cout * T), out=buf1[: 16 * Cout * T].reshape(16, Cout * T))  # D is done
        Z = Z.reshape(16, Cout, T)  # (16, Cout, T)
        # M[k] = U[k] @ V[k], so dU[k] = dM[k] @ V[k]^T (summed over chunks) and dV[k] = U[k]^T @ dM[k]
        if dU is None:
            dU = np.matmul(Z, V.transpose(0, 2, 1))  # (16, Cout, C)
        else:
            dU += np.matmul(Z, V.transpose(0, 2, 1))
        dV = np.matmul(U.transpose(0, 2, 1), Z, out=buf2[: 16 * C * T].reshape(16, C, T))  # V is done
        # V = KB @ D, so dD = KB^T @ dV: the gradient of every 4x4 input tile
        dD = np.matmul(KB.T, dV.reshape(16, C * T), out=buf1[: 16 * C * T].reshape(16, C * T))  # Z is done
        dD = dD.reshape(4, 4, C, nb, R, tw).transpose(2, 0, 1, 3, 4, 5)  # (C, 4, 4, nb, R, tw) like im2col's cols
        _col2im_add(dD, dxp[:, :, 2 * t0: 2 * t1 + 2], 4, 4, 2)  # tiles are 4x4 windows with stride 2
        if t1 == th:
            _crop_padding(dx, n0, n1, dxp, wpads)
    # U = KG @ w (per (co, c) pair), so dw = KG^T @ dU; computed as dU^T @ KG to land in w's (Cout, C, 9) layout
    dw = dU.reshape(16, Cout * C).T @ _WINO_KG.astype(x.dtype)  # (Cout*C, 9)
    return dx, dw.reshape(Cout, C * 9)

# ================================================================================================================
# nearest-neighbour upsampling by 2

class UpsampleCache(NamedTuple):
    x_shape: Tuple[int, int, int, int]  # (N, C, H, W) nothing else is needed: the op is a fixed copy pattern


def upsample_nearest2x_forward(x):
    """x (N, C, H, W) -> y (N, C, 2H, 2W): each pixel becomes a 2x2 block (F.interpolate(scale_factor=2, "nearest"))."""
    if use_cuda_ops(x):  # GPU: a device twin (np.empty + threads cannot hold CuPy arrays), DEVELOPERS.md §6
        from ..cuda import ops as cuda_ops
        return cuda_ops.upsample_nearest2x_forward(x)
    check_ndim("upsample_nearest2x", "x", x, 4)
    check_float("upsample_nearest2x", x=x)
    N, C, H, W = x.shape
    y = np.empty((N, C, 2 * H, 2 * W), dtype=x.dtype)
    y6 = y.reshape(N * C, H, 2, W, 2)  # (N*C, H, 2, W, 2) y6[:, i, a, j, b] = y[..., 2i + a, 2j + b]
    x5 = x.reshape(N * C, H, 1, W, 1)  # (N*C, H, 1, W, 1) broadcast over a and b

    def copy(r0, r1):
        y6[r0:r1] = x5[r0:r1]

    parallel_for(N * C, copy, min_chunk=max(1, _MIN_PARALLEL // max(1, 4 * H * W)))
    return y, UpsampleCache(tuple(x.shape))


def upsample_nearest2x_backward(dy, cache):
    """dy (N, C, 2H, 2W) -> dx (N, C, H, W): each input pixel was copied to 4 outputs, so sum their gradients."""
    if use_cuda_ops(dy):  # GPU: the device twin (DEVELOPERS.md §6)
        from ..cuda import ops as cuda_ops
        return cuda_ops.upsample_nearest2x_backward(dy, cache)
    N, C, H, W = cache.x_shape
    check_shape("upsample_nearest2x_backward", "dy", dy, (N, C, 2 * H, 2 * W))
    dy6 = dy.reshape(N * C, H, 2, W, 2)  # (N*C, H, 2, W, 2)
    dx = np.empty((N, C, H, W), dtype=dy.dtype)
    dx3 = dx.reshape(N * C, H, W)  # (N*C, H, W)

    # .sum(axis=(2, 4)) is ~10x slower (NumPy reduces such short axes one element at a time); instead add the two
    # rows of each pair (contiguous reads), then the two columns, a few channels at a time so the temporary stays
    # in L2 cache
    block = max(1, (256 << 10) // max(1, 2 * H * W * dy.itemsize))

    def add(r0, r1):
        for b0 in range(r0, r1, block):
            b1 = min(r1, b0 + block)
            rows = dy6[b0:b1, :, 0] + dy6[b0:b1, :, 1]  # (n, H, W, 2) row pairs summed
            np.add(rows[..., 0], rows[..., 1], out=dx3[b0:b1])  # (n, H, W) then column pairs

    parallel_for(N * C, add, min_chunk=max(1, _MIN_PARALLEL // max(1, 4 * H * W)))
    return dx


# ================================================================================================================
# concatenation (U-Net skip connections)

class ConcatCache(NamedTuple):
    axis: int  # non-negative axis the inputs were joined along
    sizes: Tuple[int, ...]  # size of each input along `axis`, in order


def concat_forward(xs, axis=1):
    """xs: list of arrays with equal shapes except along `axis` (and one dtype) -> their concatenation.

    The U-Net output blocks call concat_forward([h, skip], axis=1): h first, as in the LDM/diffusers code.
    """
    op = "concat"
    if len(xs) == 0:
        raise ValueError(f"{op}: argument 'xs' must hold at least one array, got an empty list")
    ndim = xs[0].ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: argument 'axis' must lie in [{-ndim}, {ndim}) for {ndim}-D inputs, got {axis}")
    axis = axis % ndim
    expected = tuple(None if d == axis else s for d, s in enumerate(xs[0].shape))
    for i, a in enumerate(xs):
        check_shape(op, f"xs[{i}]", a, expected)
    check_float(op, **{f"xs[{i}]": a for i, a in enumerate(xs)})
    y = np.concatenate(xs, axis=axis)
    return y, ConcatCache(axis, tuple(a.shape[axis] for a in xs))


def concat_backward(dy, cache) -> List[np.ndarray]:
    """dy (concatenated shape) -> [dx_0, dx_1, ...]: the slice of dy that each input filled, as fresh arrays."""
    axis, sizes = cache
    if dy.shape[axis] != sum(sizes):
        raise ValueError(f"concat_backward: argument 'dy' must have size {sum(sizes)} along axis {axis}, "
                         f"got shape {tuple(dy.shape)}")
    bounds = np.cumsum((0,) + sizes)
    index = [slice(None)] * dy.ndim
    dxs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        index[axis] = slice(int(lo), int(hi))
        dxs.append(dy[tuple(index)].copy())  # copy: callers may accumulate into the gradients in place
    return dxs
