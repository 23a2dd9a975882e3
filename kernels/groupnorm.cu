// groupnorm.cu -- GroupNorm forward and backward for NCHW float32 tensors, with an optional fused SiLU.
//
// Computes, for every sample n and group g of Cg = C/G consecutive channels (the group's Cg*HW values are
// contiguous in NCHW memory):
//   mean, var = mean and biased variance of the group's values      rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) * rstd      v = xhat * gamma[c] + beta[c]      y = v  or  y = silu(v) = v * sigmoid(v)
// Shapes: x, y, dy, dx (N, C, HW) contiguous, HW = H*W (any spatial dims flattened); gamma, beta (C,);
// mean, rstd (N, G) float32 (saved by the forward for the backward); dgamma_part, dbeta_part (N, C): per-sample
// partial parameter gradients, summed over N by the launcher (a deterministic sum, unlike atomicAdd).
// Must match: minisd/ops/norm.py:group_norm_forward / group_norm_backward (act="silu" fuses the SiLU that
// follows every GroupNorm in SD's ResBlocks: `in_layers.0/1`, `out_layers.0/1`).
// References: Wu & He, Group Normalization, https://arxiv.org/abs/1803.08494; PyTorch F.group_norm semantics.
// Launched by minisd/cuda/ops.py (group_norm_forward / group_norm_backward); tested by tests/test_cuda_kernels.py
// (every version, several block sizes, three thread orders, ASan/UBSan): python -m pytest tests/test_cuda_kernels.py -k groupnorm
//
// Backward (per group; sums S run over the group's GS = Cg*HW elements):
//   dv = dy * silu'(v) (or dy without the activation), silu'(v) = s * (1 + v * (1 - s)), s = sigmoid(v)
//   dbeta[c] = sum_{n,hw} dv        dgamma[c] = sum_{n,hw} dv * xhat        dxhat = dv * gamma[c]
//   dx = rstd * (dxhat - S(dxhat)/GS - xhat * S(dxhat * xhat)/GS)
// The two group sums need no extra pass: S(dxhat) = sum_c gamma[c] * dbeta_part[n,c] and
// S(dxhat * xhat) = sum_c gamma[c] * dgamma_part[n,c], so the per-channel sums give them for free.
// v and xhat are recomputed from x, mean, rstd (cheap) instead of being stored by the forward (memory).
//
// Version history (every version stays in this file and is tested; the production one keeps its number):
//   v1  naive port of the NumPy code: one thread per (n, g) walks its whole group serially (two passes for mean
//       and variance, one for y). Few threads (N*G = 64 for SD), uncoalesced loads: slow, but easy to check.
//   v2  one block per (n, g) (production): the block's threads stride over the group, so consecutive threads
//       read consecutive addresses (coalesced); sums are reduced with warp shuffles, then across warps in
//       shared memory. Two-pass variance (sum of (x - mean)^2), not E[x^2] - mean^2, which cancels
//       catastrophically when |mean| >> std. Backward: per-channel block reductions, then one elementwise pass.
//       fp32 accumulation everywhere. Open: N*G blocks underfill a 132-SM H100 at batch 1-2; a v3 would split
//       each group over several blocks (partial sums + a second kernel).

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// Sum over the 32 lanes of a warp, returned to every lane (butterfly: after 5 xor steps all lanes agree).
__device__ __forceinline__ float gn_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sums of a and b, returned to every thread. blockDim.x must be a multiple of 32 (full warps).
// red: 64 floats of shared memory. The first barrier makes back-to-back calls safe: nobody overwrites red
// while a slower warp still reads the previous call's partials. Every warp then reduces the (at most 32)
// per-warp partials itself, which saves the broadcast barrier a "warp 0 reduces, writes red[0]" scheme needs.
__device__ __forceinline__ void gn_block_sum2(float& a, float& b, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    a = gn_warp_sum(a);
    b = gn_warp_sum(b);
    __syncthreads();
    if (lane == 0) {
        red[warp] = a;
        red[32 + warp] = b;
    }
    __syncthreads();
    a = gn_warp_sum(lane < nwarps ? red[lane] : 0.0f);
    b = gn_warp_sum(lane < nwarps ? red[32 + lane] : 0.0f);
}

// Block-wide sum of one value (same scheme as gn_block_sum2). red: 32 floats of shared memory.
__device__ __forceinline__ float gn_block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = gn_warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return gn_warp_sum(lane < nwarps ? red[lane] : 0.0f);
}

__device__ __forceinline__ float gn_silu(float v) { return v / (1.0f + expf(-v)); }

// d silu(v) / dv = s + v * s * (1 - s) with s = sigmoid(v)
__device__ __forceinline__ float gn_silu_grad(float v) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
}

// ------------------------------------------------------------------------------------------------ v1 (naive)
// grid: ceil(N*G / blockDim.x) blocks, one thread per (n, g).
extern "C" __global__ void groupnorm_forward_v1(const float* __restrict__ x, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, float* __restrict__ y,
                                                float* __restrict__ mean, float* __restrict__ rstd, int N, int C,
                                                int HW, int G, float eps, int act) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;  // = n * G + g
    if (ng >= N * G) return;
    const int g = ng % G, Cg = C / G, GS = Cg * HW;
    const float* xg = x + (long long)ng * GS;  // the group is contiguous: channels g*Cg .. g*Cg+Cg-1 of sample n
    float* yg = y + (long long)ng * GS;
    float s = 0.0f;
    for (int i = 0; i < GS; ++i) s += xg[i];
    const float mu = s / GS;
    float q = 0.0f;
    for (int i = 0; i < GS; ++i) q += (xg[i] - mu) * (xg[i] - mu);
    const float r = 1.0f / sqrtf(q / GS + eps);
    for (int i = 0; i < GS; ++i) {
        const int c = g * Cg + i / HW;
        const float v = (xg[i] - mu) * r * gamma[c] + beta[c];
        yg[i] = act ? gn_silu(v) : v;
    }
    mean[ng] = mu;
    rstd[ng] = r;
}

// grid: ceil(N*G / blockDim.x) blocks, one thread per (n, g).
extern "C" __global__ void groupnorm_backward_v1(const float* __restrict__ dy, const float* __restrict__ x,
                                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                                 float* __restrict__ dx, float* __restrict__ dgamma_part,
                                                 float* __restrict__ dbeta_part, int N, int C, int HW, int G,
                                                 int act) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= N * G) return;
    const int n = ng / G, g = ng % G, Cg = C / G, GS = Cg * HW;
    const long long base = (long long)ng * GS;
    const float mu = mean[ng], r = rstd[ng];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int cl = 0; cl < Cg; ++cl) {  // per channel: the parameter-gradient partials
        const int c = g * Cg + cl;
        float db = 0.0f, dg = 0.0f;
        for (int hw = 0; hw < HW; ++hw) {
            const long long i = base + (long long)cl * HW + hw;
            const float xhat = (x[i] - mu) * r;
            const float dv = act ? dy[i] * gn_silu_grad(xhat * gamma[c] + beta[c]) : dy[i];
            db += dv;
            dg += dv * xhat;
        }
        dbeta_part[n * C + c] = db;
        dgamma_part[n * C + c] = dg;
        sum_dxhat += gamma[c] * db;
        sum_dxhat_xhat += gamma[c] * dg;
    }
    const float m1 = sum_dxhat / GS, m2 = sum_dxhat_xhat / GS;
    for (int j = 0; j < GS; ++j) {
        const int c = g * Cg + j / HW;
        const long long i = base + j;
        const float xhat = (x[i] - mu) * r;
        const float dv = act ? dy[i] * gn_silu_grad(xhat * gamma[c] + beta[c]) : dy[i];
        dx[i] = r * (dv * gamma[c] - m1 - xhat * m2);
    }
}

// ------------------------------------------------------------------------------------------------ v2 (production)
// grid: N*G blocks, block (B, 1, 1) with B a multiple of 32, <= 1024.
extern "C" __global__ void groupnorm_forward_v2(const float* __restrict__ x, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, float* __restrict__ y,
                                                float* __restrict__ mean, float* __restrict__ rstd, int N, int C,
                                                int HW, int G, float eps, int act) {
    __shared__ float red[32];
    const int ng = blockIdx.x;  // = n * G + g
    if (ng >= N * G) return;    // uniform over the block: no thread of it reaches a barrier
    const int g = ng % G, Cg = C / G, GS = Cg * HW;
    const float* xg = x + (long long)ng * GS;
    float* yg = y + (long long)ng * GS;
    float s = 0.0f;
    for (int i = threadIdx.x; i < GS; i += blockDim.x) s += xg[i];
    const float mu = gn_block_sum(s, red) / GS;
    float q = 0.0f;  // second pass over x (served mostly from L2): the numerically stable variance
    for (int i = threadIdx.x; i < GS; i += blockDim.x) {
        const float d = xg[i] - mu;
        q += d * d;
    }
    const float r = 1.0f / sqrtf(gn_block_sum(q, red) / GS + eps);
    for (int i = threadIdx.x; i < GS; i += blockDim.x) {
        const int c = g * Cg + i / HW;
        const float v = (xg[i] - mu) * r * gamma[c] + beta[c];
        yg[i] = act ? gn_silu(v) : v;
    }
    if (threadIdx.x == 0) {
        mean[ng] = mu;
        rstd[ng] = r;
    }
}

// grid: N*G blocks, block (B, 1, 1) with B a multiple of 32, <= 1024.
extern "C" __global__ void groupnorm_backward_v2(const float* __restrict__ dy, const float* __restrict__ x,
                                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                                 float* __restrict__ dx, float* __restrict__ dgamma_part,
                                                 float* __restrict__ dbeta_part, int N, int C, int HW, int G,
                                                 int act) {
    __shared__ float red[64];
    const int ng = blockIdx.x;
    if (ng >= N * G) return;  // uniform over the block
    const int n = ng / G, g = ng % G, Cg = C / G, GS = Cg * HW;
    const long long base = (long long)ng * GS;
    const float mu = mean[ng], r = rstd[ng];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;  // identical in every thread (built from block totals)
    for (int cl = 0; cl < Cg; ++cl) {
        const int c = g * Cg + cl;
        const float gam = gamma[c], bet = beta[c];
        const float* xc = x + base + (long long)cl * HW;
        const float* dyc = dy + base + (long long)cl * HW;
        float db = 0.0f, dg = 0.0f;
        for (int hw = threadIdx.x; hw < HW; hw += blockDim.x) {
            const float xhat = (xc[hw] - mu) * r;
            const float dv = act ? dyc[hw] * gn_silu_grad(xhat * gam + bet) : dyc[hw];
            db += dv;
            dg += dv * xhat;
        }
        gn_block_sum2(db, dg, red);
        if (threadIdx.x == 0) {
            dbeta_part[n * C + c] = db;
            dgamma_part[n * C + c] = dg;
        }
        sum_dxhat += gam * db;
        sum_dxhat_xhat += gam * dg;
    }
    const float m1 = sum_dxhat / GS, m2 = sum_dxhat_xhat / GS;
    for (int j = threadIdx.x; j < GS; j += blockDim.x) {
        const int c = g * Cg + j / HW;
        const float xhat = (x[base + j] - mu) * r;
        const float dv = act ? dy[base + j] * gn_silu_grad(xhat * gamma[c] + beta[c]) : dy[base + j];
        dx[base + j] = r * (dv * gamma[c] - m1 - xhat * m2);
    }
}
