// missing_sync.cu -- TEST FIXTURE, deliberately broken: a block reduction with one __syncthreads removed.
//
// row_stats_v1 computes the mean and the (biased) variance of each row of x (M, S): one block per row, two
// block-wide sums in a row (the same scheme as groupnorm.cu's gn_block_sum). row_stats_nosync is identical except
// that the barrier at the start of the block sum is gone. That barrier protects the shared partials: without it
// a fast warp starts the second sum and overwrites red[] while a slower warp still reads the first sum's
// partials. On a GPU this is a race that may or may not show; in the emulator it shows deterministically, because
// a thread runs until its next synchronisation point (forward order: warp 0 writes its variance partial before
// warp 1 has read the mean partials). tests/test_cuda_emulator.py checks: row_stats_v1 is right under the
// forward, reverse and random thread orders; row_stats_nosync is wrong under at least one of them.
// Not part of the compile gate (kernels/bugs/ is excluded); it must still compile with NVRTC.
// Launch: grid (M,), block (B,) with B a multiple of 32 and B >= 64 (the race needs two warps).

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

__device__ __forceinline__ float fx_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float fx_block_sum(float v, float* red, bool leading_barrier) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = fx_warp_sum(v);
    if (leading_barrier) __syncthreads();  // BUG when false: red[] may still be read by another warp
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return fx_warp_sum(lane < nwarps ? red[lane] : 0.0f);
}

__device__ __forceinline__ void fx_row_stats(const float* x, float* mean, float* var, int S, bool sync) {
    __shared__ float red[32];
    const float* xr = x + (long long)blockIdx.x * S;
    float s = 0.0f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) s += xr[i];
    const float mu = fx_block_sum(s, red, sync) / S;
    float q = 0.0f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) q += (xr[i] - mu) * (xr[i] - mu);
    const float v = fx_block_sum(q, red, sync) / S;
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = mu;
        var[blockIdx.x] = v;
    }
}

// Correct twin: both barriers in place.
extern "C" __global__ void row_stats_v1(const float* x, float* mean, float* var, int S) {
    fx_row_stats(x, mean, var, S, true);
}

// The fixture: the leading barrier of the block sum is missing.
extern "C" __global__ void row_stats_nosync(const float* x, float* mean, float* var, int S) {
    fx_row_stats(x, mean, var, S, false);
}
