// oob_write.cu -- TEST FIXTURE, deliberately broken: an off-by-one bound writes one element past the output.
//
// scale_rows_oob multiplies x (n,) by s into y (n,), one thread per element, but its guard is `i <= n` instead
// of `i < n`, so thread n writes y[n] (and reads x[n]) when the grid has more than n threads. On a GPU this
// silently corrupts whatever follows y (compute-sanitizer --tool memcheck reports it); in the emulator's sanitize
// mode (ASan, python -m minisd.cuda.emu.asan) the write lands in the redzone after the NumPy buffer and ASan aborts
// with "heap-buffer-overflow" and this file's line. tests/test_cuda_emulator.py checks that report in a
// subprocess, and that the correct twin scale_rows_v1 runs clean under ASan.
// Not part of the compile gate (kernels/bugs/ is excluded); it must still compile with NVRTC.

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// Correct twin.
extern "C" __global__ void scale_rows_v1(const float* x, float* y, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = s * x[i];
}

// The fixture: `<=` lets thread n through.
extern "C" __global__ void scale_rows_oob(const float* x, float* y, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = s * x[i < n ? i : 0];  // BUG: i == n writes y[n] (the read is clamped to show the write)
}
