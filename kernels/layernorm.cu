// layernorm.cu -- LayerNorm over the last axis, forward and backward, float32.
//
// Computes, for every row m of x viewed as (M, D):
//   mean, var = mean and biased variance of the row      rstd = 1 / sqrt(var + eps)
//   y = (x - mean) * rstd * gamma + beta
// Shapes: x, y, dy, dx (M, D) contiguous (M = product of the leading dims, e.g. N*L tokens); gamma, beta (D,);
// mean, rstd (M,) saved by the forward; dgamma_part, dbeta_part (P, D): partial parameter gradients of P row
// chunks, summed over P by the launcher (deterministic, no atomics).
// Must match: minisd/ops/norm.py:layer_norm_forward / layer_norm_backward.
// References: Ba, Kiros & Hinton, Layer Normalization, https://arxiv.org/abs/1607.06450; PyTorch F.layer_norm;
// llm.c layernorm_forward/backward (train_gpt2.cu, the warp-per-row design of its kernel3).
// Launched by minisd/cuda/ops.py (layer_norm_forward / layer_norm_backward); tested by tests/test_cuda_kernels.py:
//   python -m pytest tests/test_cuda_kernels.py -k layernorm
//
// Backward (per row; means run over the D columns):
//   xhat = (x - mean) * rstd (recomputed from the saved mean/rstd)      dxhat = dy * gamma
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
//   dgamma = sum over rows of dy * xhat        dbeta = sum over rows of dy
// dx needs row reductions, dgamma/dbeta column reductions, so they are two kernels with different layouts.
//
// Version history (every version stays in this file and is tested; the production one keeps its number):
//   v1  naive port of the NumPy code: one thread per row (forward, dx) and one thread per column (dgamma,
//       dbeta, P = 1 chunk). Neighbouring threads read addresses D floats apart: uncoalesced; slow.
//   v2  (production) one warp per row for the forward and dx: the 32 lanes stride over the row (coalesced),
//       shuffle reductions, no shared memory and no block barrier; blockDim.x/32 rows per block.
//       Two-pass variance (stable), fp32 accumulation. dgamma/dbeta: a block covers 32 columns x a chunk of
//       rows; its 32x8 threads read whole row segments (coalesced), reduce over the 8 row lanes in shared memory
//       and write one partial row; the launcher sums the P partials.

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// Sum over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ float ln_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ------------------------------------------------------------------------------------------------ v1 (naive)
// grid: ceil(M / blockDim.x) blocks, one thread per row.
extern "C" __global__ void layernorm_forward_v1(const float* __restrict__ x, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, float* __restrict__ y,
                                                float* __restrict__ mean, float* __restrict__ rstd, int M, int D,
                                                float eps) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const float* xr = x + (long long)m * D;
    float* yr = y + (long long)m * D;
    float s = 0.0f;
    for (int i = 0; i < D; ++i) s += xr[i];
    const float mu = s / D;
    float q = 0.0f;
    for (int i = 0; i < D; ++i) q += (xr[i] - mu) * (xr[i] - mu);
    const float r = 1.0f / sqrtf(q / D + eps);
    for (int i = 0; i < D; ++i) yr[i] = (xr[i] - mu) * r * gamma[i] + beta[i];
    mean[m] = mu;
    rstd[m] = r;
}

// grid: ceil(M / blockDim.x) blocks, one thread per row.
extern "C" __global__ void layernorm_backward_dx_v1(const float* __restrict__ dy, const float* __restrict__ x,
                                                    const float* __restrict__ gamma, const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, float* __restrict__ dx, int M,
                                                    int D) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const long long base = (long long)m * D;
    const float mu = mean[m], r = rstd[m];
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = 0; i < D; ++i) {
        const float dxhat = dy[base + i] * gamma[i];
        s1 += dxhat;
        s2 += dxhat * (x[base + i] - mu) * r;
    }
    const float m1 = s1 / D, m2 = s2 / D;
    for (int i = 0; i < D; ++i) dx[base + i] = r * (dy[base + i] * gamma[i] - m1 - (x[base + i] - mu) * r * m2);
}

// grid: ceil(D / blockDim.x) blocks, one thread per column; writes a single partial row (P = 1).
// rows_per_chunk is unused (same signature as v2, so the launcher treats both alike).
extern "C" __global__ void layernorm_backward_dparams_v1(const float* __restrict__ dy, const float* __restrict__ x,
                                                         const float* __restrict__ mean,
                                                         const float* __restrict__ rstd,
                                                         float* __restrict__ dgamma_part,
                                                         float* __restrict__ dbeta_part, int M, int D,
                                                         int rows_per_chunk) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D) return;
    float dg = 0.0f, db = 0.0f;
    for (int m = 0; m < M; ++m) {
        const long long k = (long long)m * D + i;
        dg += dy[k] * (x[k] - mean[m]) * rstd[m];
        db += dy[k];
    }
    dgamma_part[i] = dg;
    dbeta_part[i] = db;
}

// ------------------------------------------------------------------------------------------------ v2 (production)
// grid: ceil(M / (blockDim.x / 32)) blocks; block (B, 1, 1) with B a multiple of 32: warp w of block b owns row
// b * B/32 + w.
extern "C" __global__ void layernorm_forward_v2(const float* __restrict__ x, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, float* __restrict__ y,
                                                float* __restrict__ mean, float* __restrict__ rstd, int M, int D,
                                                float eps) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= M) return;  // uniform over the warp, and there is no block barrier in this kernel
    const float* xr = x + (long long)m * D;
    float* yr = y + (long long)m * D;
    float s = 0.0f;
    for (int i = lane; i < D; i += 32) s += xr[i];
    const float mu = ln_warp_sum(s) / D;
    float q = 0.0f;  // second pass (from L1/L2): stable variance
    for (int i = lane; i < D; i += 32) {
        const float d = xr[i] - mu;
        q += d * d;
    }
    const float r = 1.0f / sqrtf(ln_warp_sum(q) / D + eps);
    for (int i = lane; i < D; i += 32) yr[i] = (xr[i] - mu) * r * gamma[i] + beta[i];
    if (lane == 0) {
        mean[m] = mu;
        rstd[m] = r;
    }
}

// grid and block as layernorm_forward_v2: one warp per row.
extern "C" __global__ void layernorm_backward_dx_v2(const float* __restrict__ dy, const float* __restrict__ x,
                                                    const float* __restrict__ gamma, const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, float* __restrict__ dx, int M,
                                                    int D) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= M) return;  // uniform over the warp
    const long long base = (long long)m * D;
    const float mu = mean[m], r = rstd[m];
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = lane; i < D; i += 32) {
        const float dxhat = dy[base + i] * gamma[i];
        s1 += dxhat;
        s2 += dxhat * (x[base + i] - mu) * r;
    }
    const float m1 = ln_warp_sum(s1) / D, m2 = ln_warp_sum(s2) / D;
    for (int i = lane; i < D; i += 32) dx[base + i] = r * (dy[base + i] * gamma[i] - m1 - (x[base + i] - mu) * r * m2);
}

// grid (ceil(D / 32), P) with P = ceil(M / rows_per_chunk); block (32, 8). Block (bx, p) sums rows
// [p * rows_per_chunk, (p + 1) * rows_per_chunk) of columns bx*32 .. bx*32+31 into dgamma_part[p, :], dbeta_part[p, :].
extern "C" __global__ void layernorm_backward_dparams_v2(const float* __restrict__ dy, const float* __restrict__ x,
                                                         const float* __restrict__ mean,
                                                         const float* __restrict__ rstd,
                                                         float* __restrict__ dgamma_part,
                                                         float* __restrict__ dbeta_part, int M, int D,
                                                         int rows_per_chunk) {
    __shared__ float sg[8][32];  // [row lane][column]: partial sums of every thread
    __shared__ float sb[8][32];
    const int tx = threadIdx.x, ty = threadIdx.y;  // column within the tile, row lane
    const int i = blockIdx.x * 32 + tx;
    const int m0 = blockIdx.y * rows_per_chunk;
    const int m1 = min(M, m0 + rows_per_chunk);
    float dg = 0.0f, db = 0.0f;
    if (i < D) {
        for (int m = m0 + ty; m < m1; m += blockDim.y) {
            const long long k = (long long)m * D + i;
            dg += dy[k] * (x[k] - mean[m]) * rstd[m];
            db += dy[k];
        }
    }
    sg[ty][tx] = dg;
    sb[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && i < D) {  // 8 partials per column, summed in a fixed order: deterministic
        float g = 0.0f, b = 0.0f;
        for (int k = 0; k < (int)blockDim.y; ++k) {
            g += sg[k][tx];
            b += sb[k][tx];
        }
        dgamma_part[(long long)blockIdx.y * D + i] = g;
        dbeta_part[(long long)blockIdx.y * D + i] = b;
    }
}
