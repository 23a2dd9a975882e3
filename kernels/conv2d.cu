// conv2d.cu -- 2-D convolution of NCHW float32 tensors as an implicit GEMM: forward, backward data, backward weight,
// bias gradient.
//
// Computes (exactly torch.nn.functional.conv2d, zero padding, groups = 1):
//   y[n, co, oh, ow] = b[co] + sum_{c, i, j} w[co, c, i, j] * x[n, c, oh*s + i - top, ow*s + j - left]
// with x read as 0 outside the image (the padding is never materialised).
// Shapes: x (N, C, H, W), w (Cout, C, KH, KW) (PyTorch's layout), b (Cout,), y and dy (N, Cout, Ho, Wo),
// Ho = (H + top + bottom - KH) / s + 1 (floor), Wo likewise; any KH, KW; any stride s >= 1; padding
// ((top, bottom), (left, right)), asymmetric allowed (the SD VAE Downsample pads ((0, 1), (0, 1))). bottom and right
// only enter through Ho and Wo: reads past the image are zeros either way.
// Must match: minisd/ops/conv.py:conv2d_forward / conv2d_backward (the NumPy spec: im2col + GEMM, Winograd).
// References: Chellapilla et al. 2006 (convolution as a matrix product), https://inria.hal.science/inria-00112631;
// Chetlur et al. 2014, "cuDNN: Efficient Primitives for Deep Learning" (implicit GEMM: the im2col matrix is
// never built, its entries are gathered from x while the GEMM tiles are loaded), https://arxiv.org/abs/1410.0759;
// llm.c's SGEMM-style tiling (dev/cuda/matmul_forward.cu) for the register tiles.
// Launched by minisd/cuda/conv.py; tested by tests/test_cuda_conv.py (every version, ragged shapes, three thread
// orders, ASan/UBSan): python -m pytest tests/test_cuda_conv.py
//
// The three passes are three GEMMs C (M x Ncol) = A (M x K) @ B (K x Ncol) whose operands are index maps:
//   forward          M = Cout, Ncol = N*Ho*Wo (output pixels p), K = C*KH*KW (taps t = (c, i, j), PyTorch order)
//                    A[co, t] = w[co, t] (w viewed as (Cout, C*KH*KW), no copy), B[t, p] = x at tap t of pixel p
//   backward data    M = C, Ncol = N*H*W (input pixels q), K = Cout*KH*KW (t' = (co, i, j))
//                    A[c, t'] = w[co, c, i, j], B[t', q] = dy[n, co, oh, ow] where oh*s + i - top = h (and the
//                    same for columns): the output pixels whose window covered q through tap (i, j); 0 where
//                    (h + top - i) is not a multiple of s or lies outside [0, Ho) -- the transpose of the forward
//   backward weight  M = Cout, Ncol = C*KH*KW, K = N*Ho*Wo: A[co, p] = dy[n, co, oh, ow], B[p, t] = the forward's
//                    B transposed (dw = dy @ im2col(x)^T, summed over every output pixel of every image)
//   bias             db[co] = sum over n, oh, ow of dy
//
// Version history (every version stays in this file and is tested; the production one keeps its number):
//   v1  naive port of the definition: one thread per output element (y, dx or dw) loops over its whole sum,
//       reading global memory directly. dx inverts the window arithmetic per tap (divisibility by s); bias: one
//       thread per output channel. Simple to check; slow (no reuse: every weight is read N*Ho*Wo times).
//   v2  (production) tiled implicit GEMM: a block of 256 threads computes a 64 x 64 tile of C; the K loop moves
//       through 16-wide slices, each thread loads 4 elements of A and 4 of B into shared memory (the index maps
//       above, decomposed once per slice and stepped with carries, no division per element), then every thread
//       computes a 4 x 4 register tile (4 rows ty*4.. x 4 columns tx, tx+16, ...: neighbouring threads own
//       neighbouring columns, so loads from shared memory are conflict-free and the stores to y coalesce).
//       Loads are coalesced: consecutive threads take consecutive pixels (forward, dx) or consecutive K entries
//       (weights, dw). Split-K over gridDim.z for GEMMs with few tiles (SD's 8x8 and 16x16 levels: 40-160 tiles
//       for 132 SMs; the weight gradient of conv_in: 5 tiles but K = 8192): split z writes its own partial
//       result, the launcher sums the partials in a fixed order (deterministic, unlike atomicAdd), split 0 adds
//       the bias. Bias gradient: one block per output channel, block reduction.
//       fp32 FMAs on the CUDA cores.
//   v3  (forward only; a candidate, not yet production) SGEMM-class tiling: 128 x 128 tiles, 8 x 8 register tiles
//       read from shared memory as float4 (4x fewer shared-memory loads per FMA than v2), K slices of 8 double-
//       buffered (the next slice is fetched into registers during the FMAs; one barrier per slice). More registers
//       (127) and 4x larger tiles (fewer blocks: split-K matters more at 16x16 and 8x8). Whether it beats v2 is a
//       GPU measurement (benchmarks/gpu.py --all-versions); until then v2 stays production.
//   Open: the same tiling for the two backward GEMMs; a TF32/fp16 tensor-core version (mma.sync; the emulator has
//       no tensor-core instructions, so it could only be checked on a GPU).

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// ------------------------------------------------------------------------------------------------ v1 (naive)
// grid: ceil(N*Cout*Ho*Wo / blockDim.x) blocks; one thread per y element.
extern "C" __global__ void conv2d_forward_v1(const float* __restrict__ x, const float* __restrict__ w,
                                             const float* __restrict__ b, float* __restrict__ y, int N, int C,
                                             int H, int W, int Cout, int KH, int KW, int Ho, int Wo, int stride,
                                             int top, int left, int has_bias, int ktiles_per_split) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // = ((n * Cout + co) * Ho + oh) * Wo + ow
    if (idx >= (long long)N * Cout * Ho * Wo) return;
    const int ow = (int)(idx % Wo), oh = (int)(idx / Wo % Ho), co = (int)(idx / ((long long)Wo * Ho) % Cout);
    const int n = (int)(idx / ((long long)Wo * Ho * Cout));
    float acc = has_bias ? b[co] : 0.0f;
    for (int c = 0; c < C; ++c)
        for (int i = 0; i < KH; ++i) {
            const int ih = oh * stride + i - top;
            if (ih < 0 || ih >= H) continue;  // a padding row: x is zero there
            for (int j = 0; j < KW; ++j) {
                const int iw = ow * stride + j - left;
                if (iw < 0 || iw >= W) continue;
                acc += w[(((long long)co * C + c) * KH + i) * KW + j] * x[(((long long)n * C + c) * H + ih) * W + iw];
            }
        }
    y[idx] = acc;
}

// grid: ceil(N*C*H*W / blockDim.x) blocks; one thread per dx element.
extern "C" __global__ void conv2d_backward_data_v1(const float* __restrict__ dy, const float* __restrict__ w,
                                                   float* __restrict__ dx, int N, int C, int H, int W, int Cout,
                                                   int KH, int KW, int Ho, int Wo, int stride, int top, int left,
                                                   int ktiles_per_split) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // = ((n * C + c) * H + h) * W + w
    if (idx >= (long long)N * C * H * W) return;
    const int iw = (int)(idx % W), ih = (int)(idx / W % H), c = (int)(idx / ((long long)W * H) % C);
    const int n = (int)(idx / ((long long)W * H * C));
    float acc = 0.0f;
    for (int co = 0; co < Cout; ++co)
        for (int i = 0; i < KH; ++i) {
            // in the forward, tap i of output row oh read input row oh*s + i - top; invert that
            const int rh = ih + top - i;
            if (rh < 0 || rh % stride) continue;
            const int oh = rh / stride;
            if (oh >= Ho) continue;
            for (int j = 0; j < KW; ++j) {
                const int rw = iw + left - j;
                if (rw < 0 || rw % stride) continue;
                const int ow = rw / stride;
                if (ow >= Wo) continue;
                acc += w[(((long long)co * C + c) * KH + i) * KW + j] * dy[(((long long)n * Cout + co) * Ho + oh) * Wo + ow];
            }
        }
    dx[idx] = acc;
}

// grid: ceil(Cout*C*KH*KW / blockDim.x) blocks; one thread per dw element (a single partial: splits = 1).
extern "C" __global__ void conv2d_backward_weight_v1(const float* __restrict__ dy, const float* __restrict__ x,
                                                     float* __restrict__ dw, int N, int C, int H, int W, int Cout,
                                                     int KH, int KW, int Ho, int Wo, int stride, int top, int left,
                                                     int ktiles_per_split) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // = ((co * C + c) * KH + i) * KW + j
    if (idx >= (long long)Cout * C * KH * KW) return;
    const int j = (int)(idx % KW), i = (int)(idx / KW % KH), c = (int)(idx / ((long long)KW * KH) % C);
    const int co = (int)(idx / ((long long)KW * KH * C));
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int oh = 0; oh < Ho; ++oh) {
            const int ih = oh * stride + i - top;
            if (ih < 0 || ih >= H) continue;
            for (int ow = 0; ow < Wo; ++ow) {
                const int iw = ow * stride + j - left;
                if (iw < 0 || iw >= W) continue;
                acc += dy[(((long long)n * Cout + co) * Ho + oh) * Wo + ow] * x[(((long long)n * C + c) * H + ih) * W + iw];
            }
        }
    dw[idx] = acc;
}

// grid: ceil(Cout / blockDim.x) blocks; one thread per output channel sums its whole (N, Ho*Wo) slice.
extern "C" __global__ void conv2d_backward_bias_v1(const float* __restrict__ dy, float* __restrict__ db, int N,
                                                   int Cout, int HoWo) {
    const int co = blockIdx.x * blockDim.x + threadIdx.x;
    if (co >= Cout) return;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int p = 0; p < HoWo; ++p) acc += dy[((long long)n * Cout + co) * HoWo + p];
    db[co] = acc;
}

// ------------------------------------------------------------------------------------------------ v2 (production)
// Tile sizes. The launcher (minisd/cuda/conv.py) uses the same numbers: keep them in sync.
#define CV_BM 64        // rows of C per block
#define CV_BN 64        // columns of C per block
#define CV_BK 16        // K slice loaded per step
#define CV_THREADS 256  // 16 x 16 threads, each a 4 x 4 register tile
// Row padding of the shared tiles: keeps float4-aligned rows and spreads the transposed stores over more banks.
#define CV_PAD 4

// acc[i][c] += sum_k As[k][ty*4 + i] * Bs[k][tx + 16*c] over one K slice. Threads of a warp share ty (2 values):
// the As reads are broadcasts, the Bs reads hit 16 consecutive words (no bank conflicts).
__device__ __forceinline__ void cv_mma_slice(const float (*As)[CV_BM + CV_PAD], const float (*Bs)[CV_BN + CV_PAD],
                                             float (&acc)[4][4]) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int k = 0; k < CV_BK; ++k) {
        float a[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[k][ty * 4 + i];
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = Bs[k][tx + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][c] += a[i] * bv[c];
    }
}

// The K slices [kt0, kt1) a block of split blockIdx.z works on (ktiles_per_split slices per split).
__device__ __forceinline__ void cv_split_range(int K, int ktiles_per_split, int& kt0, int& kt1) {
    const int ktiles = (K + CV_BK - 1) / CV_BK;
    kt0 = blockIdx.z * ktiles_per_split;
    kt1 = min(kt0 + ktiles_per_split, ktiles);
}

// grid: (ceil(N*Ho*Wo / 64), ceil(Cout / 64), splits); block 256. y: (splits, N, Cout, Ho, Wo) partials (splits = 1:
// y itself); split 0 adds the bias.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_forward_v2(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                  float* __restrict__ y, int N, int C, int H, int W, int Cout, int KH, int KW, int Ho, int Wo,
                  int stride, int top, int left, int has_bias, int ktiles_per_split) {
    __shared__ __align__(16) float As[CV_BK][CV_BM + CV_PAD];
    __shared__ __align__(16) float Bs[CV_BK][CV_BN + CV_PAD];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int KK = KH * KW, K = C * KK, HoWo = Ho * Wo, P = N * HoWo;  // P = GEMM columns (launcher: fits int)
    const int m0 = blockIdx.y * CV_BM, p0 = blockIdx.x * CV_BN;
    int kt0, kt1;
    cv_split_range(K, ktiles_per_split, kt0, kt1);

    // A loader: thread t reads w[m0 + am + 16r, k0 + ak], r < 4 (16 consecutive threads: one contiguous row piece)
    const int ak = t & 15, am = t >> 4;
    // B loader: thread t owns pixel column p0 + bn and the 4 consecutive taps k0 + bk .. k0 + bk + 3 of each slice;
    // consecutive threads take consecutive pixels, i.e. neighbouring x addresses (coalesced for stride 1)
    const int bn = t & 63, bk = (t >> 6) * 4;
    const int p = p0 + bn;
    const bool p_ok = p < P;
    int ih0 = 0, iw0 = 0, n = 0;
    if (p_ok) {
        n = p / HoWo;
        const int r = p - n * HoWo, oh = r / Wo, ow = r - oh * Wo;
        ih0 = oh * stride - top;  // top-left corner of the pixel's window in (unpadded) input coordinates
        iw0 = ow * stride - left;
    }
    const float* xn = x + (long long)n * C * H * W;

    float acc[4][4] = {};
    for (int kt = kt0; kt < kt1; ++kt) {
        const int k0 = kt * CV_BK;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int m = m0 + am + 16 * r, k = k0 + ak;
            As[ak][am + 16 * r] = (m < Cout && k < K) ? w[(long long)m * K + k] : 0.0f;
        }
        // tap k = (c, i, j) in PyTorch's (C, KH, KW) order: divide once per slice, then step with carries
        int k = k0 + bk, c = k / KK, i = (k - c * KK) / KW, j = k - c * KK - i * KW;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float v = 0.0f;
            const int ih = ih0 + i, iw = iw0 + j;
            // unsigned compares: a negative coordinate (inside the top/left padding) wraps to a huge value
            if (p_ok && k < K && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
                v = xn[((long long)c * H + ih) * W + iw];
            Bs[bk + r][bn] = v;
            ++k;
            if (++j == KW) {
                j = 0;
                if (++i == KH) {
                    i = 0;
                    ++c;
                }
            }
        }
        __syncthreads();  // the slice is in shared memory
        cv_mma_slice(As, Bs, acc);
        __syncthreads();  // everyone is done reading it before the next slice overwrites it
    }

    float* out = y + (long long)blockIdx.z * N * Cout * HoWo;
    const bool add_bias = has_bias && blockIdx.z == 0;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
        const int pc = p0 + tx + 16 * cc;
        if (pc >= P) continue;
        const int nc = pc / HoWo, pix = pc - nc * HoWo;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty * 4 + i;
            if (m < Cout) out[((long long)nc * Cout + m) * HoWo + pix] = acc[i][cc] + (add_bias ? b[m] : 0.0f);
        }
    }
}

// grid: (ceil(N*H*W / 64), ceil(C / 64), splits); block 256. dx: (splits, N, C, H, W) partials.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_backward_data_v2(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx, int N,
                        int C, int H, int W, int Cout, int KH, int KW, int Ho, int Wo, int stride, int top, int left,
                        int ktiles_per_split) {
    __shared__ __align__(16) float As[CV_BK][CV_BM + CV_PAD];
    __shared__ __align__(16) float Bs[CV_BK][CV_BN + CV_PAD];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int KK = KH * KW, K = Cout * KK, HW = H * W, HoWo = Ho * Wo, Q = N * HW;
    const int m0 = blockIdx.y * CV_BM, q0 = blockIdx.x * CV_BN;
    int kt0, kt1;
    cv_split_range(K, ktiles_per_split, kt0, kt1);

    // A loader: thread t owns input channel m0 + am and the 4 consecutive k' = (co, ij) of each slice
    const int am = t & 63, ak = (t >> 6) * 4;
    const int ca = m0 + am;
    // B loader: thread t owns input pixel q0 + bn = (n, h, w) and 4 consecutive k' = (co, i, j)
    const int bn = t & 63, bk = (t >> 6) * 4;
    const int q = q0 + bn;
    const bool q_ok = q < Q;
    int n = 0, hp = 0, wp = 0;
    if (q_ok) {
        n = q / HW;
        const int r = q - n * HW, h = r / W;
        hp = h + top;  // the pixel's row in padded coordinates: output row oh read it through tap i if oh*s + i == hp
        wp = r - h * W + left;
    }
    const float* dyn = dy + (long long)n * Cout * HoWo;

    float acc[4][4] = {};
    for (int kt = kt0; kt < kt1; ++kt) {
        const int k0 = kt * CV_BK;
        {
            int k = k0 + ak, co = k / KK, ij = k - co * KK;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                As[ak + r][am] = (ca < C && k < K) ? w[((long long)co * C + ca) * KK + ij] : 0.0f;
                ++k;
                if (++ij == KK) {
                    ij = 0;
                    ++co;
                }
            }
        }
        int k = k0 + bk, co = k / KK, i = (k - co * KK) / KW, j = k - co * KK - i * KW;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float v = 0.0f;
            const int rh = hp - i, rw = wp - j;  // = oh*s and ow*s if this tap of some output pixel read q
            if (q_ok && k < K && rh >= 0 && rw >= 0) {
                int oh = rh, ow = rw;
                bool hit = true;
                if (stride != 1) {
                    hit = rh % stride == 0 && rw % stride == 0;
                    oh = rh / stride;
                    ow = rw / stride;
                }
                if (hit && oh < Ho && ow < Wo) v = dyn[(long long)co * HoWo + oh * Wo + ow];
            }
            Bs[bk + r][bn] = v;
            ++k;
            if (++j == KW) {
                j = 0;
                if (++i == KH) {
                    i = 0;
                    ++co;
                }
            }
        }
        __syncthreads();
        cv_mma_slice(As, Bs, acc);
        __syncthreads();
    }

    float* out = dx + (long long)blockIdx.z * N * C * HW;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
        const int qc = q0 + tx + 16 * cc;
        if (qc >= Q) continue;
        const int nc = qc / HW, pix = qc - nc * HW;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + ty * 4 + i;
            if (m < C) out[((long long)nc * C + m) * HW + pix] = acc[i][cc];
        }
    }
}

// grid: (ceil(C*KH*KW / 64), ceil(Cout / 64), splits); block 256. dw: (splits, Cout, C*KH*KW) partials.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_backward_weight_v2(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dw, int N,
                          int C, int H, int W, int Cout, int KH, int KW, int Ho, int Wo, int stride, int top,
                          int left, int ktiles_per_split) {
    __shared__ __align__(16) float As[CV_BK][CV_BM + CV_PAD];
    __shared__ __align__(16) float Bs[CV_BK][CV_BN + CV_PAD];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int KK = KH * KW, CKK = C * KK, HoWo = Ho * Wo, K = N * HoWo;  // K: every output pixel of every image
    const int m0 = blockIdx.y * CV_BM, t0 = blockIdx.x * CV_BN;
    int kt0, kt1;
    cv_split_range(K, ktiles_per_split, kt0, kt1);

    // Both loaders: thread t reads output pixel k0 + lk of the slice (consecutive threads: consecutive pixels);
    // A for output channels m0 + lo + 16r, B for taps t0 + lo + 16r (r < 4)
    const int lk = t & 15, lo = t >> 4;
    int xoff[4];  // per owned tap (c, i, j): offset of channel c in an image (C*H*W fits int: launcher), window offset
    int di[4], dj[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int tap = t0 + lo + 16 * r;
        const int c = tap / KK, i = (tap - c * KK) / KW, j = tap - c * KK - i * KW;
        xoff[r] = tap < CKK ? c * H * W : 0;
        di[r] = tap < CKK ? i - top : -(1 << 30);  // an invalid tap gets a row that is always out of range
        dj[r] = j - left;
    }

    float acc[4][4] = {};
    for (int kt = kt0; kt < kt1; ++kt) {
        const int p = kt * CV_BK + lk;
        const bool p_ok = p < K;
        int n = 0, oh = 0, ow = 0;
        if (p_ok) {
            n = p / HoWo;
            const int r = p - n * HoWo;
            oh = r / Wo;
            ow = r - oh * Wo;
        }
        const float* dyp = dy + (long long)n * Cout * HoWo + oh * Wo + ow;
        const float* xn = x + (long long)n * C * H * W;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int co = m0 + lo + 16 * r;
            As[lk][lo + 16 * r] = (p_ok && co < Cout) ? dyp[(long long)co * HoWo] : 0.0f;
            const int ih = oh * stride + di[r], iw = ow * stride + dj[r];
            Bs[lk][lo + 16 * r] =
                (p_ok && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W) ? xn[xoff[r] + (long long)ih * W + iw]
                                                                                   : 0.0f;
        }
        __syncthreads();
        cv_mma_slice(As, Bs, acc);
        __syncthreads();
    }

    float* out = dw + (long long)blockIdx.z * Cout * CKK;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
        const int tap = t0 + tx + 16 * cc;
        if (tap >= CKK) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int co = m0 + ty * 4 + i;
            if (co < Cout) out[(long long)co * CKK + tap] = acc[i][cc];
        }
    }
}

// Sum over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ float cv_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// grid: Cout blocks; block (B, 1, 1), B a multiple of 32. One block sums dy[:, co] over N and Ho*Wo.
extern "C" __global__ void conv2d_backward_bias_v2(const float* __restrict__ dy, float* __restrict__ db, int N,
                                                   int Cout, int HoWo) {
    __shared__ float red[32];
    const int co = blockIdx.x;
    float s = 0.0f;
    for (int n = 0; n < N; ++n) {  // two loops instead of one over N*HoWo: no division per element
        const float* d = dy + ((long long)n * Cout + co) * HoWo;
        for (int p = threadIdx.x; p < HoWo; p += blockDim.x) s += d[p];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    s = cv_warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = cv_warp_sum(lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f);
        if (lane == 0) db[co] = s;
    }
}

// ------------------------------------------------------------------------------------------------ v3 (candidate)
// The forward GEMM with SGEMM-class tiling: a block of 256 threads computes a 128 x 128 tile of y; the K loop moves
// in slices of 8 through two shared-memory buffers (the next slice is fetched from global memory into registers
// while the current one is multiplied, then stored into the other buffer: one barrier per slice instead of two);
// each thread owns an 8 x 8 register tile made of four 4 x 4 quadrants (rows ty*4.. and 64+ty*4.., columns tx*4..
// and 64+tx*4..), read from shared memory as float4: 64 FMAs per 4 vector loads (v2: 16 FMAs per 8 scalar
// loads), so the loop is bound by the FMA units rather than by shared-memory bandwidth.
// Split-K as v2. Launched with version=3 by minisd/cuda/conv.py; production stays v2 until a GPU run of
// benchmarks/gpu.py --all-versions shows v3 faster at SD's shapes (not measurable in the emulator).
#define CV3_BM 128
#define CV3_BN 128
#define CV3_BK 8
#define CV3_APAD 4  // A is stored transposed (k-major): the pad spreads the 8 k-rows of a store over all banks

extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_forward_v3(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                  float* __restrict__ y, int N, int C, int H, int W, int Cout, int KH, int KW, int Ho, int Wo,
                  int stride, int top, int left, int has_bias, int ktiles_per_split) {
    __shared__ __align__(16) float As[2][CV3_BK][CV3_BM + CV3_APAD];
    __shared__ __align__(16) float Bs[2][CV3_BK][CV3_BN];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int KK = KH * KW, K = C * KK, HoWo = Ho * Wo, P = N * HoWo;
    const int m0 = blockIdx.y * CV3_BM, p0 = blockIdx.x * CV3_BN;
    const int kslices = (K + CV3_BK - 1) / CV3_BK;
    const int kt0 = blockIdx.z * ktiles_per_split, kt1 = min(kt0 + ktiles_per_split, kslices);

    // A loader: thread t reads w[m0 + am + 32r, k0 + ak], r < 4
    const int ak = t & 7, am = t >> 3;
    // B loader: thread t owns pixel p0 + bn and the 4 consecutive taps k0 + bk .. k0 + bk + 3 of each slice
    const int bn = t & 127, bk = (t >> 7) * 4;
    const int p = p0 + bn;
    const bool p_ok = p < P;
    int ih0 = 0, iw0 = 0, n = 0;
    if (p_ok) {
        n = p / HoWo;
        const int r = p - n * HoWo, oh = r / Wo, ow = r - oh * Wo;
        ih0 = oh * stride - top;
        iw0 = ow * stride - left;
    }
    const float* xn = x + (long long)n * C * H * W;

    float ra[4], rb[4];  // the next slice, on its way from global memory to shared memory
    auto fetch = [&](int kt) {
        const int k0 = kt * CV3_BK;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int m = m0 + am + 32 * r, k = k0 + ak;
            ra[r] = (m < Cout && k < K) ? w[(long long)m * K + k] : 0.0f;
        }
        int k = k0 + bk, c = k / KK, i = (k - c * KK) / KW, j = k - c * KK - i * KW;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int ih = ih0 + i, iw = iw0 + j;
            rb[r] = (p_ok && k < K && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
                        ? xn[((long long)c * H + ih) * W + iw] : 0.0f;
            ++k;
            if (++j == KW) {
                j = 0;
                if (++i == KH) {
                    i = 0;
                    ++c;
                }
            }
        }
    };
    auto stash = [&](int buf) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            As[buf][ak][am + 32 * r] = ra[r];
            Bs[buf][bk + r][bn] = rb[r];
        }
    };

    float acc[8][8] = {};
    if (kt0 < kt1) {
        fetch(kt0);
        stash(0);
    }
    __syncthreads();
    for (int kt = kt0; kt < kt1; ++kt) {
        const int cur = (kt - kt0) & 1;
        if (kt + 1 < kt1) fetch(kt + 1);  // global loads in flight during the FMAs below
#pragma unroll
        for (int k = 0; k < CV3_BK; ++k) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][k][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][k][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][k][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][k][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int c = 0; c < 8; ++c) acc[i][c] += a[i] * bv[c];
        }
        // the other buffer was last read in the previous iteration, before its closing barrier: free to overwrite
        if (kt + 1 < kt1) stash(cur ^ 1);
        __syncthreads();
    }

    float* out = y + (long long)blockIdx.z * N * Cout * HoWo;
    const bool add_bias = has_bias && blockIdx.z == 0;
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
        const int pc = p0 + (cc < 4 ? tx * 4 + cc : 64 + tx * 4 + cc - 4);
        if (pc >= P) continue;
        const int nc = pc / HoWo, pix = pc - nc * HoWo;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
            if (m < Cout) out[((long long)nc * Cout + m) * HoWo + pix] = acc[i][cc] + (add_bias ? b[m] : 0.0f);
        }
    }
}
