// softmax.cu -- softmax over the last axis (rows), forward and backward, float32.
//
// Computes, for every row m of x viewed as (M, S):
//   y = exp(x - max(x)) / sum(exp(x - max(x)))          (subtracting the row max keeps exp from overflowing)
//   backward: dx = y * (dy - sum(dy * y))               (the Jacobian diag(y) - y y^T applied to dy)
// Shapes: x, y, dy, dx (M, S) contiguous; M = product of the leading dims (e.g. N*h*L attention rows), S = the
// softmax axis (e.g. S key tokens). The launcher moves another axis last first.
// Must match: minisd/ops/activations.py:softmax_forward / softmax_backward.
// References: Milakov & Gimelshein, Online normalizer calculation for softmax, https://arxiv.org/abs/1805.02867
// (v3's single-pass max and sum); llm.c softmax_forward kernels (dev/cuda/softmax_forward.cu).
// Launched by minisd/cuda/ops.py (softmax_forward / softmax_backward); tested by tests/test_cuda_kernels.py:
//   python -m pytest tests/test_cuda_kernels.py -k softmax
//
// Version history (every version stays in this file and is tested; the production one keeps its number):
//   forward
//   v1  naive port of the NumPy code: one thread per row, three serial passes (max, sum of exp, write).
//       Uncoalesced (neighbouring threads are S floats apart); slow.
//   v2  one block per row: threads stride over the row (coalesced), warp-shuffle reductions combined across
//       warps in shared memory. Good for very long rows, wasteful for short ones (S = 77 keys in SD's
//       cross-attention leaves most of a 128-thread block idle), and M blocks can mean many tiny blocks.
//   v3  (production) one warp per row, blockDim.x/32 rows per block, no shared memory or block barrier.
//       Online softmax: each lane keeps a running (max, sum) pair and rescales its sum when the max grows, so
//       the statistics need one read of the row instead of two; pairs merge across lanes with shuffles.
//   backward
//   v1  naive: one thread per row, two passes (dot product, write).
//   v2  (production) one warp per row: coalesced dot product with shuffles, then the write pass.

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif
#ifndef INFINITY  // NVRTC compiles without <math.h>; nvcc and the emulator get it from the host headers
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float sm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float sm_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ------------------------------------------------------------------------------------------------ v1 (naive)
// grid: ceil(M / blockDim.x) blocks, one thread per row.
extern "C" __global__ void softmax_forward_v1(const float* __restrict__ x, float* __restrict__ y, int M, int S) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const float* xr = x + (long long)m * S;
    float* yr = y + (long long)m * S;
    float mx = -INFINITY;
    for (int i = 0; i < S; ++i) mx = fmaxf(mx, xr[i]);
    float s = 0.0f;
    for (int i = 0; i < S; ++i) s += expf(xr[i] - mx);
    for (int i = 0; i < S; ++i) yr[i] = expf(xr[i] - mx) / s;
}

// grid: ceil(M / blockDim.x) blocks, one thread per row.
extern "C" __global__ void softmax_backward_v1(const float* __restrict__ y, const float* __restrict__ dy,
                                               float* __restrict__ dx, int M, int S) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const long long base = (long long)m * S;
    float dot = 0.0f;
    for (int i = 0; i < S; ++i) dot += dy[base + i] * y[base + i];
    for (int i = 0; i < S; ++i) dx[base + i] = y[base + i] * (dy[base + i] - dot);
}

// ------------------------------------------------------------------------------------------------ v2 (block per row)
// grid: M blocks; block (B, 1, 1) with B a multiple of 32, <= 1024.
extern "C" __global__ void softmax_forward_v2(const float* __restrict__ x, float* __restrict__ y, int M, int S) {
    __shared__ float red[32];  // one partial per warp
    const int m = blockIdx.x;
    if (m >= M) return;  // uniform over the block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float* xr = x + (long long)m * S;
    float* yr = y + (long long)m * S;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < S; i += blockDim.x) mx = fmaxf(mx, xr[i]);
    mx = sm_warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = sm_warp_max(lane < nwarps ? red[lane] : -INFINITY);  // every warp reduces the partials itself
    __syncthreads();  // all reads of red are done before it is reused for the sums
    float s = 0.0f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) s += expf(xr[i] - mx);
    s = sm_warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    s = sm_warp_sum(lane < nwarps ? red[lane] : 0.0f);
    const float inv = 1.0f / s;
    for (int i = threadIdx.x; i < S; i += blockDim.x) yr[i] = expf(xr[i] - mx) * inv;
}

// ------------------------------------------------------------------------------------------------ v3 / v2 bwd (production)
// grid: ceil(M / (blockDim.x / 32)) blocks; warp w of block b owns row b * blockDim.x/32 + w.
extern "C" __global__ void softmax_forward_v3(const float* __restrict__ x, float* __restrict__ y, int M, int S) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= M) return;  // uniform over the warp; no block barrier in this kernel
    const float* xr = x + (long long)m * S;
    float* yr = y + (long long)m * S;
    // Running max mx and sum s = sum exp(x_i - mx) over this lane's elements: when a larger value arrives, the
    // sum so far is rescaled by exp(old max - new max). exp(-inf) = 0 handles the first element.
    float mx = -INFINITY, s = 0.0f;
    for (int i = lane; i < S; i += 32) {
        const float v = xr[i];
        if (v > mx) {
            s = s * expf(mx - v) + 1.0f;
            mx = v;
        } else {
            s += expf(v - mx);
        }
    }
    // Merge the 32 (max, sum) pairs. A lane that saw no element (S < 32) has (-inf, 0): its weight must be 0, and
    // exp(-inf - (-inf)) would be NaN, hence the explicit test.
    for (int o = 16; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, mx, o);
        const float so = __shfl_xor_sync(0xffffffffu, s, o);
        const float mn = fmaxf(mx, mo);
        s = (mx == -INFINITY ? 0.0f : s * expf(mx - mn)) + (mo == -INFINITY ? 0.0f : so * expf(mo - mn));
        mx = mn;
    }
    const float inv = 1.0f / s;
    for (int i = lane; i < S; i += 32) yr[i] = expf(xr[i] - mx) * inv;
}

// grid and block as softmax_forward_v3: one warp per row.
extern "C" __global__ void softmax_backward_v2(const float* __restrict__ y, const float* __restrict__ dy,
                                               float* __restrict__ dx, int M, int S) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= M) return;  // uniform over the warp
    const long long base = (long long)m * S;
    float dot = 0.0f;
    for (int i = lane; i < S; i += 32) dot += dy[base + i] * y[base + i];
    dot = sm_warp_sum(dot);
    for (int i = lane; i < S; i += 32) dx[base + i] = y[base + i] * (dy[base + i] - dot);
}
