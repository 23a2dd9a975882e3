// attention.cu -- fused multi-head scaled-dot-product attention, forward and backward, float32.
//
// Computes, for every batch element n and head (b = n*h + head), with queries q_l, keys k_s, values v_s (rows of
// width d) and qs = q * scale (scale = d**-0.5 by default, applied to q once, as the NumPy op does):
//   s_ls = qs_l . k_s      p_ls = softmax_s(s_ls)      y_l = sum_s p_ls v_s      lse_l = log sum_s exp(s_ls)
// causal: query l sees keys s <= l only (CLIP's text encoder; needs L == S).
// Shapes: q, y (N, L, h*d), k, v (N, S, h*d): heads packed head-major in the last axis exactly as the NumPy op and
// PyTorch/diffusers lay them out (`b n (h d)`); lse (N*h, L) float32, saved for the backward. Every tensor is
// passed with three strides (batch n, head, token; the d values of a row are contiguous), so the same kernels read
// the packed layout and the head-split (N*h, T, d) layout of the NumPy op's cache. Head dims: any d <= 160 (SD:
// 40, 80, 160 for SD 1.x, 64 for SD 2.x and CLIP); the launcher refuses larger d with a clear error.
// Must match: minisd/ops/attention.py:attention_forward / attention_backward.
// References: Milakov & Gimelshein 2018, online softmax, https://arxiv.org/abs/1805.02867; Dao et al. 2022,
// FlashAttention, https://arxiv.org/abs/2205.14135; Dao 2023, FlashAttention-2 (its backward: recompute the scores
// from q, k and lse; D = rowsum(dy * y) = rowsum(p * dp)), https://arxiv.org/abs/2307.08691.
// Launched by minisd/cuda/attention.py; tested by tests/test_cuda_attention.py (every version, ragged shapes, three
// thread orders, ASan/UBSan): python -m pytest tests/test_cuda_attention.py
//
// Online softmax (forward): the keys arrive in tiles; each query row keeps a running max m, a running sum
// l = sum exp(s - m) and an unnormalised output o = sum exp(s - m) v. When a tile raises the max to m', the old
// sums are rescaled by exp(m - m') before the tile is added; at the end y = o / l and lse = m + log l. The
// (L, S) score matrix never exists in global memory: one tile of it lives in shared memory.
// Backward (per head; the NumPy op's formulas):
//   p = exp(s - lse)                 rebuilt from the saved lse: exact softmax, no max/sum pass
//   dv = p^T dy      dp = dy v^T     ds = p * (dp - D),  D_l = sum_s p_ls dp_ls  (= dy_l . y_l)
//   dq = ds k * scale                dk = ds^T qs
// Two kernels, so that every output element is summed by one thread in a fixed order (no atomics, deterministic):
// dq (one block per query tile, loops over the keys; first pass computes D and saves it, second pass dq) and
// dk/dv (one block per key tile, loops over the queries, reads D). The scores are recomputed in each.
//
// Version history (every version stays in this file and is tested; the production one keeps its number):
//   v1  naive port of the definition: one thread per query row (forward, dq) or key row (dk/dv) walks every
//       key (query) reading global memory: forward in three passes (max, then sum and the unnormalised output
//       accumulated in y, then the division); dq computes D first. Rows of y, dq, dk, dv are accumulated in place
//       in global memory. Uncoalesced and without reuse, but a line-by-line image of the math.
//   v2  (production) FlashAttention-2 tiling on the CUDA cores: 256 threads (16 x 16) per block; a block owns 64
//       rows (queries; keys in dk/dv) and streams 32-row tiles of the other side through shared memory. Thread
//       (ty, tx) owns rows ty*4 .. ty*4+3 and, in each product, the columns tx, tx+16, ...: score tile columns (2
//       per thread) and output columns of d (up to 10 per thread, d <= 160), so the register tiles hold a 4 x 2
//       score block and the 4 x d/16 output accumulators; row max and sums combine across the 16 threads of a
//       row with warp shuffles. Shared rows are padded to an odd length (d rounded up to 16, plus 1) so that
//       threads reading different rows at the same column hit different banks. fp32 FMAs, expf (not __expf).
//       Open (needs a GPU to measure): larger register tiles with vector loads, skipping D's extra pass when the
//       forward output is at hand, fp16/bf16 storage with tensor-core mma (not emulated: the emulator has no
//       tensor-core instructions).

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif
#ifndef INFINITY  // NVRTC compiles without <math.h>; nvcc and the emulator get it from the host headers
#define INFINITY __int_as_float(0x7f800000)
#endif

// ------------------------------------------------------------------------------------------------ v1 (naive)
// grid: (ceil(L / blockDim.x), N*h); one thread per query row l of head b = blockIdx.y.
extern "C" __global__ void attention_forward_v1(const float* __restrict__ q, const float* __restrict__ k,
                                                const float* __restrict__ v, float* __restrict__ y,
                                                float* __restrict__ lse, int h, int L, int S, int d, int q_sn,
                                                int q_sh, int q_st, int kv_sn, int kv_sh, int kv_st, int y_sn,
                                                int y_sh, int y_st, float scale, int causal) {
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    const float* ql = q + (long long)n * q_sn + (long long)hd * q_sh + (long long)l * q_st;
    const float* kb = k + (long long)n * kv_sn + (long long)hd * kv_sh;
    const float* vb = v + (long long)n * kv_sn + (long long)hd * kv_sh;
    float* yl = y + (long long)n * y_sn + (long long)hd * y_sh + (long long)l * y_st;
    const int s_end = causal ? l + 1 : S;
    float mx = -INFINITY;  // pass 1: the row max (subtracting it keeps exp from overflowing)
    for (int s = 0; s < s_end; ++s) {
        float dot = 0.0f;
        for (int j = 0; j < d; ++j) dot += (ql[j] * scale) * kb[(long long)s * kv_st + j];
        mx = fmaxf(mx, dot);
    }
    for (int j = 0; j < d; ++j) yl[j] = 0.0f;
    float sum = 0.0f;  // pass 2: sum of exp and the unnormalised output
    for (int s = 0; s < s_end; ++s) {
        float dot = 0.0f;
        for (int j = 0; j < d; ++j) dot += (ql[j] * scale) * kb[(long long)s * kv_st + j];
        const float p = expf(dot - mx);
        sum += p;
        for (int j = 0; j < d; ++j) yl[j] += p * vb[(long long)s * kv_st + j];
    }
    for (int j = 0; j < d; ++j) yl[j] /= sum;
    lse[(long long)b * L + l] = mx + logf(sum);
}

// grid: (ceil(L / blockDim.x), N*h); one thread per query row. q is the scaled q (qs); writes dq and D (delta).
extern "C" __global__ void attention_backward_dq_v1(const float* __restrict__ q, const float* __restrict__ k,
                                                    const float* __restrict__ v, const float* __restrict__ dy,
                                                    const float* __restrict__ lse, float* __restrict__ dq,
                                                    float* __restrict__ delta, int h, int L, int S, int d, int q_sn,
                                                    int q_sh, int q_st, int kv_sn, int kv_sh, int kv_st, int g_sn,
                                                    int g_sh, int g_st, float scale, int causal) {
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    const float* ql = q + (long long)n * q_sn + (long long)hd * q_sh + (long long)l * q_st;
    const float* kb = k + (long long)n * kv_sn + (long long)hd * kv_sh;
    const float* vb = v + (long long)n * kv_sn + (long long)hd * kv_sh;
    const long long g = (long long)n * g_sn + (long long)hd * g_sh + (long long)l * g_st;  // dy and dq: same layout
    const float lse_l = lse[(long long)b * L + l];
    const int s_end = causal ? l + 1 : S;
    float D = 0.0f;  // D = sum_s p_ls dp_ls
    for (int s = 0; s < s_end; ++s) {
        float sc = 0.0f, dp = 0.0f;
        for (int j = 0; j < d; ++j) {
            sc += ql[j] * kb[(long long)s * kv_st + j];
            dp += dy[g + j] * vb[(long long)s * kv_st + j];
        }
        D += expf(sc - lse_l) * dp;
    }
    delta[(long long)b * L + l] = D;
    for (int j = 0; j < d; ++j) dq[g + j] = 0.0f;
    for (int s = 0; s < s_end; ++s) {
        float sc = 0.0f, dp = 0.0f;
        for (int j = 0; j < d; ++j) {
            sc += ql[j] * kb[(long long)s * kv_st + j];
            dp += dy[g + j] * vb[(long long)s * kv_st + j];
        }
        const float ds = expf(sc - lse_l) * (dp - D);
        for (int j = 0; j < d; ++j) dq[g + j] += ds * kb[(long long)s * kv_st + j];
    }
    for (int j = 0; j < d; ++j) dq[g + j] *= scale;
}

// grid: (ceil(S / blockDim.x), N*h); one thread per key row s. Reads D (delta) written by the dq kernel.
extern "C" __global__ void attention_backward_dkdv_v1(const float* __restrict__ q, const float* __restrict__ k,
                                                      const float* __restrict__ v, const float* __restrict__ dy,
                                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                                      float* __restrict__ dk, float* __restrict__ dv, int h, int L,
                                                      int S, int d, int q_sn, int q_sh, int q_st, int kv_sn,
                                                      int kv_sh, int kv_st, int g_sn, int g_sh, int g_st, int o_sn,
                                                      int o_sh, int o_st, int causal) {
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    const float* qb = q + (long long)n * q_sn + (long long)hd * q_sh;
    const float* ks = k + (long long)n * kv_sn + (long long)hd * kv_sh + (long long)s * kv_st;
    const float* vs = v + (long long)n * kv_sn + (long long)hd * kv_sh + (long long)s * kv_st;
    const float* dyb = dy + (long long)n * g_sn + (long long)hd * g_sh;
    const long long o = (long long)n * o_sn + (long long)hd * o_sh + (long long)s * o_st;  // dk and dv
    for (int j = 0; j < d; ++j) dk[o + j] = dv[o + j] = 0.0f;
    for (int l = causal ? s : 0; l < L; ++l) {  // causal: queries before s cannot see key s
        float sc = 0.0f, dp = 0.0f;
        for (int j = 0; j < d; ++j) {
            sc += qb[(long long)l * q_st + j] * ks[j];
            dp += dyb[(long long)l * g_st + j] * vs[j];
        }
        const float p = expf(sc - lse[(long long)b * L + l]);
        const float ds = p * (dp - delta[(long long)b * L + l]);
        for (int j = 0; j < d; ++j) {
            dv[o + j] += p * dyb[(long long)l * g_st + j];
            dk[o + j] += ds * qb[(long long)l * q_st + j];
        }
    }
}

// ------------------------------------------------------------------------------------------------ v2 (production)
// Tile geometry; minisd/cuda/attention.py sizes the dynamic shared memory from the same numbers.
#define AT_THREADS 256  // 16 x 16: thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16)
#define AT_ROWS 64      // rows a block owns: 16 ty x 4 rows per thread
#define AT_COLS 32      // rows of the streamed tiles: 16 tx x 2 score columns per thread
#define AT_PS 36        // row length of the (AT_ROWS x AT_COLS) probability tiles: 4*36 = 16 mod 32, so the two
                        // ty of a warp write to different bank halves
#define AT_MAXC 10      // output columns per thread: d <= 160 = 16 x 10

// Max / sum over the 16 threads (tx = 0..15) that share a row: lanes 0-15 and 16-31 of a warp are two rows.
__device__ __forceinline__ float at_max16(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float at_sum16(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// dst[r][j] (row length ld) = src row r (row stride st) times mul, for r < rows; zero for rows r >= valid and for
// columns d <= j < DP (so dot products over DP columns need no bounds checks). Warps take rows, lanes take columns:
// each warp reads contiguous row pieces (coalesced).
__device__ __forceinline__ void at_load_tile(float* dst, int ld, const float* src, int st, int rows, int valid,
                                             int d, int DP, float mul) {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r < rows; r += nwarps)
        for (int j = lane; j < DP; j += 32) dst[r * ld + j] = (r < valid && j < d) ? src[(long long)r * st + j] * mul : 0.0f;
}

// Two score products over the DP columns of row-major shared tiles (row length ld):
//   x[i][c] = A1[row_i] . B1[col_c]      z[i][c] = A2[row_i] . B2[col_c]      (z only when A2 != nullptr)
// with row_i = ty*4 + i of the A tiles and col_c = tx + 16c of the B tiles. A reads are broadcasts (the 16 tx of a
// row read the same word); B reads: 16 rows of odd length ld at one column -> 16 different banks.
__device__ __forceinline__ void at_scores(float (&x)[4][2], float (&z)[4][2], const float* A1, const float* B1,
                                          const float* A2, const float* B2, int ld, int DP) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c) x[i][c] = z[i][c] = 0.0f;
    const float* a1 = A1 + ty * 4 * ld;
    const float* b1 = B1 + tx * ld;
    for (int j = 0; j < DP; ++j) {
        float a[4], bv[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = a1[i * ld + j];
#pragma unroll
        for (int c = 0; c < 2; ++c) bv[c] = b1[c * 16 * ld + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) x[i][c] += a[i] * bv[c];
    }
    if (A2 == nullptr) return;
    const float* a2 = A2 + ty * 4 * ld;
    const float* b2 = B2 + tx * ld;
    for (int j = 0; j < DP; ++j) {
        float a[4], bv[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = a2[i * ld + j];
#pragma unroll
        for (int c = 0; c < 2; ++c) bv[c] = b2[c * 16 * ld + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) z[i][c] += a[i] * bv[c];
    }
}

// acc[i][c] += sum_{kk < AT_COLS} P[row_i][kk] * V[kk][tx + 16c] for c < nc (= DP/16): a probability tile (row
// length AT_PS) times a streamed tile (row length ld). P reads are broadcasts, V reads 16 consecutive words.
__device__ __forceinline__ void at_accumulate(float (&acc)[4][AT_MAXC], const float* P, const float* V, int ld,
                                              int nc) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const float* p = P + ty * 4 * AT_PS;
    for (int kk = 0; kk < AT_COLS; ++kk) {
        float a[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = p[i * AT_PS + kk];
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) {
            if (c < nc) {  // uniform over the block: short head dims skip the unused columns
                const float bv = V[kk * ld + tx + 16 * c];
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][c] += a[i] * bv;
            }
        }
    }
}

// Dynamic shared memory (floats, ld = DP + 1): Qs [64][ld] | Ks [32][ld] | Vs [32][ld] | Ps [64][AT_PS].
// grid: (ceil(L / 64), N*h); block 256.
extern "C" __global__ void __launch_bounds__(AT_THREADS)
attention_forward_v2(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                     float* __restrict__ y, float* __restrict__ lse, int h, int L, int S, int d, int q_sn, int q_sh,
                     int q_st, int kv_sn, int kv_sh, int kv_st, int y_sn, int y_sh, int y_st, float scale,
                     int causal) {
    EMU_EXTERN_SHARED(float, smem);
    const int DP = (d + 15) & ~15, ld = DP + 1, nc = DP >> 4;
    float* Qs = smem;
    float* Ks = Qs + AT_ROWS * ld;
    float* Vs = Ks + AT_COLS * ld;
    float* Ps = Vs + AT_COLS * ld;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int q0 = blockIdx.x * AT_ROWS;
    const long long kv_base = (long long)n * kv_sn + (long long)hd * kv_sh;
    // the q tile, scaled once as it is loaded (the NumPy op scales q before the product: same rounding)
    at_load_tile(Qs, ld, q + (long long)n * q_sn + (long long)hd * q_sh + (long long)q0 * q_st, q_st, AT_ROWS,
                 L - q0, d, DP, scale);

    float m[4], l[4], o[4][AT_MAXC];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) o[i][c] = 0.0f;
    }
    // causal: the block's last query is q0 + 63, so later keys are masked for all of its rows
    const int s_end = causal ? min(S, q0 + AT_ROWS) : S;
    for (int s0 = 0; s0 < s_end; s0 += AT_COLS) {
        __syncthreads();  // every thread is done with the previous K, V and P tiles
        at_load_tile(Ks, ld, k + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        at_load_tile(Vs, ld, v + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        __syncthreads();  // the tiles (and, the first time, Qs) are in shared memory
        float sc[4][2], unused[4][2];
        at_scores(sc, unused, Qs, Ks, nullptr, nullptr, ld, DP);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = q0 + ty * 4 + i;
            float mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int key = s0 + tx + 16 * c;
                if (key >= S || (causal && key > row)) sc[i][c] = -INFINITY;  // exp(-inf) = 0 below
                mx = fmaxf(mx, sc[i][c]);
            }
            const float m_new = fmaxf(m[i], at_max16(mx));
            // a row whose keys so far are all masked keeps m = -inf; offset by 0 then (exp(-inf - -inf) is NaN)
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = expf(m[i] - m_use);  // rescales the old sums to the new max (0 on the first tile)
            float ps = 0.0f;
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float p = expf(sc[i][c] - m_use);
                Ps[(ty * 4 + i) * AT_PS + tx + 16 * c] = p;
                ps += p;
            }
            l[i] = l[i] * alpha + at_sum16(ps);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < AT_MAXC; ++c) o[i][c] *= alpha;
        }
        // A warp reads back only the probability rows it wrote itself (rows ty*4.. of its two ty), so a warp
        // barrier orders those shared-memory writes and reads; no block barrier is needed here.
        __syncwarp();
        at_accumulate(o, Ps, Vs, ld, nc);
    }

    float* yb = y + (long long)n * y_sn + (long long)hd * y_sh;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = q0 + ty * 4 + i;
        if (row >= L) continue;
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) {
            const int j = tx + 16 * c;
            if (c < nc && j < d) yb[(long long)row * y_st + j] = o[i][c] / l[i];  // normalise once, at the end
        }
        if (tx == 0) lse[(long long)b * L + row] = m[i] + logf(l[i]);
    }
}

// Dynamic shared memory (floats): Qs [64][ld] | dOs [64][ld] | Ks [32][ld] | Vs [32][ld] | dSs [64][AT_PS].
// grid: (ceil(L / 64), N*h); block 256. q is the scaled q; dy and dq share the g strides; writes delta (N*h, L).
extern "C" __global__ void __launch_bounds__(AT_THREADS)
attention_backward_dq_v2(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         const float* __restrict__ dy, const float* __restrict__ lse, float* __restrict__ dq,
                         float* __restrict__ delta, int h, int L, int S, int d, int q_sn, int q_sh, int q_st,
                         int kv_sn, int kv_sh, int kv_st, int g_sn, int g_sh, int g_st, float scale, int causal) {
    EMU_EXTERN_SHARED(float, smem);
    const int DP = (d + 15) & ~15, ld = DP + 1, nc = DP >> 4;
    float* Qs = smem;
    float* dOs = Qs + AT_ROWS * ld;
    float* Ks = dOs + AT_ROWS * ld;
    float* Vs = Ks + AT_COLS * ld;
    float* dSs = Vs + AT_COLS * ld;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int q0 = blockIdx.x * AT_ROWS;
    const long long kv_base = (long long)n * kv_sn + (long long)hd * kv_sh;
    const long long g_base = (long long)n * g_sn + (long long)hd * g_sh;
    at_load_tile(Qs, ld, q + (long long)n * q_sn + (long long)hd * q_sh + (long long)q0 * q_st, q_st, AT_ROWS,
                 L - q0, d, DP, 1.0f);
    at_load_tile(dOs, ld, dy + g_base + (long long)q0 * g_st, g_st, AT_ROWS, L - q0, d, DP, 1.0f);
    float lse_r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = q0 + ty * 4 + i;
        lse_r[i] = row < L ? lse[(long long)b * L + row] : 0.0f;
    }
    const int s_end = causal ? min(S, q0 + AT_ROWS) : S;

    // pass 1: D_l = sum_s p_ls dp_ls (needs every key before any ds can be formed)
    float D[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s0 = 0; s0 < s_end; s0 += AT_COLS) {
        __syncthreads();
        at_load_tile(Ks, ld, k + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        at_load_tile(Vs, ld, v + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        __syncthreads();
        float sc[4][2], dp[4][2];
        at_scores(sc, dp, Qs, Ks, dOs, Vs, ld, DP);  // s = qs k^T, dp = dy v^T
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int key = s0 + tx + 16 * c;
                if (key < S && !(causal && key > q0 + ty * 4 + i)) D[i] += expf(sc[i][c] - lse_r[i]) * dp[i][c];
            }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        D[i] = at_sum16(D[i]);
        const int row = q0 + ty * 4 + i;
        if (tx == 0 && row < L) delta[(long long)b * L + row] = D[i];
    }

    // pass 2: ds = p (dp - D), dq += ds k
    float acc[4][AT_MAXC];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) acc[i][c] = 0.0f;
    for (int s0 = 0; s0 < s_end; s0 += AT_COLS) {
        __syncthreads();  // previous K, V and dS tiles are consumed
        at_load_tile(Ks, ld, k + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        at_load_tile(Vs, ld, v + kv_base + (long long)s0 * kv_st, kv_st, AT_COLS, S - s0, d, DP, 1.0f);
        __syncthreads();
        float sc[4][2], dp[4][2];
        at_scores(sc, dp, Qs, Ks, dOs, Vs, ld, DP);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int key = s0 + tx + 16 * c;
                const bool ok = key < S && !(causal && key > q0 + ty * 4 + i);
                dSs[(ty * 4 + i) * AT_PS + tx + 16 * c] = ok ? expf(sc[i][c] - lse_r[i]) * (dp[i][c] - D[i]) : 0.0f;
            }
        __syncwarp();  // each warp reads back only its own rows of dS (see the forward)
        at_accumulate(acc, dSs, Ks, ld, nc);
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = q0 + ty * 4 + i;
        if (row >= L) continue;
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) {
            const int j = tx + 16 * c;
            if (c < nc && j < d) dq[g_base + (long long)row * g_st + j] = acc[i][c] * scale;  // s = (q*scale) k^T
        }
    }
}

// Dynamic shared memory (floats): Ks [64][ld] | Vs [64][ld] | Qs [32][ld] | dOs [32][ld] | Pt [64][AT_PS] |
// dSt [64][AT_PS] | lse_s [32] | D_s [32]. grid: (ceil(S / 64), N*h); block 256. dk and dv share the o strides.
extern "C" __global__ void __launch_bounds__(AT_THREADS)
attention_backward_dkdv_v2(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ dy, const float* __restrict__ lse,
                           const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv, int h,
                           int L, int S, int d, int q_sn, int q_sh, int q_st, int kv_sn, int kv_sh, int kv_st,
                           int g_sn, int g_sh, int g_st, int o_sn, int o_sh, int o_st, int causal) {
    EMU_EXTERN_SHARED(float, smem);
    const int DP = (d + 15) & ~15, ld = DP + 1, nc = DP >> 4;
    float* Ks = smem;
    float* Vs = Ks + AT_ROWS * ld;
    float* Qs = Vs + AT_ROWS * ld;
    float* dOs = Qs + AT_COLS * ld;
    float* Pt = dOs + AT_COLS * ld;
    float* dSt = Pt + AT_ROWS * AT_PS;
    float* lse_s = dSt + AT_ROWS * AT_PS;
    float* D_s = lse_s + AT_COLS;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int b = blockIdx.y, n = b / h, hd = b - n * h;
    const int s0 = blockIdx.x * AT_ROWS;
    const long long kv_base = (long long)n * kv_sn + (long long)hd * kv_sh;
    const long long q_base = (long long)n * q_sn + (long long)hd * q_sh;
    const long long g_base = (long long)n * g_sn + (long long)hd * g_sh;
    at_load_tile(Ks, ld, k + kv_base + (long long)s0 * kv_st, kv_st, AT_ROWS, S - s0, d, DP, 1.0f);
    at_load_tile(Vs, ld, v + kv_base + (long long)s0 * kv_st, kv_st, AT_ROWS, S - s0, d, DP, 1.0f);

    float dk_acc[4][AT_MAXC], dv_acc[4][AT_MAXC];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) dk_acc[i][c] = dv_acc[i][c] = 0.0f;
    // causal: queries before s0 see none of this block's keys; start at the query tile that holds s0
    for (int l0 = causal ? s0 / AT_COLS * AT_COLS : 0; l0 < L; l0 += AT_COLS) {
        __syncthreads();  // previous Q, dO, P and dS tiles are consumed
        at_load_tile(Qs, ld, q + q_base + (long long)l0 * q_st, q_st, AT_COLS, L - l0, d, DP, 1.0f);
        at_load_tile(dOs, ld, dy + g_base + (long long)l0 * g_st, g_st, AT_COLS, L - l0, d, DP, 1.0f);
        if (threadIdx.x < AT_COLS) {
            const int ql = l0 + threadIdx.x;
            lse_s[threadIdx.x] = ql < L ? lse[(long long)b * L + ql] : 0.0f;
            D_s[threadIdx.x] = ql < L ? delta[(long long)b * L + ql] : 0.0f;
        }
        __syncthreads();
        float st[4][2], dpt[4][2];
        at_scores(st, dpt, Ks, Qs, Vs, dOs, ld, DP);  // s^T = k qs^T, dp^T = v dy^T (rows: keys, columns: queries)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = tx + 16 * c, ql = l0 + col;
                const bool ok = ql < L && !(causal && s0 + ty * 4 + i > ql);
                const float p = ok ? expf(st[i][c] - lse_s[col]) : 0.0f;
                Pt[(ty * 4 + i) * AT_PS + col] = p;
                dSt[(ty * 4 + i) * AT_PS + col] = p * (dpt[i][c] - D_s[col]);
            }
        __syncwarp();  // each warp reads back only its own rows of p^T and ds^T (see the forward)
        at_accumulate(dv_acc, Pt, dOs, ld, nc);  // dv += p^T dy
        at_accumulate(dk_acc, dSt, Qs, ld, nc);  // dk += ds^T qs
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int key = s0 + ty * 4 + i;
        if (key >= S) continue;
        const long long o = (long long)n * o_sn + (long long)hd * o_sh + (long long)key * o_st;
#pragma unroll
        for (int c = 0; c < AT_MAXC; ++c) {
            const int j = tx + 16 * c;
            if (c < nc && j < d) {
                dk[o + j] = dk_acc[i][c];
                dv[o + j] = dv_acc[i][c];
            }
        }
    }
}
