// divergent_barrier.cu -- TEST FIXTURE, deliberately broken: __syncthreads() after an early return.
//
// shift_left_divergent copies y[i] = x[i + 1 within the block] through shared memory, but the threads past the
// end of the data return *before* the barrier. When n is not a multiple of the block size, the last block's
// remaining threads wait at a barrier that the exited threads never reach: undefined behaviour in CUDA (a hang
// or wrong results, depending on the GPU; compute-sanitizer --tool synccheck reports it). The emulator reports
// "divergent __syncthreads ... threads have exited". The correct twin shift_left_v1 keeps every thread alive
// until after the barrier and only guards the memory accesses.
// Not part of the compile gate (kernels/bugs/ is excluded); it must still compile with NVRTC.
// Launch: grid (ceil(n / 256),), block (256,).

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// Correct twin.
extern "C" __global__ void shift_left_v1(const float* x, float* y, int n) {
    __shared__ float s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    const int j = threadIdx.x + 1 < blockDim.x ? threadIdx.x + 1 : threadIdx.x;
    if (i < n) y[i] = s[j];
}

// The fixture.
extern "C" __global__ void shift_left_divergent(const float* x, float* y, int n) {
    __shared__ float s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;  // BUG: these threads never reach the barrier below
    s[threadIdx.x] = x[i];
    __syncthreads();
    const int j = threadIdx.x + 1 < blockDim.x ? threadIdx.x + 1 : threadIdx.x;
    y[i] = s[j];
}
