// local_memory.cu -- TEST FIXTURE for the compile gate: a kernel that uses local memory.
//
// A per-thread array indexed with a value known only at run time cannot live in registers (registers are not
// addressable), so ptxas puts it in local memory: off-chip, cached, ~100x slower than a register. ptxas -v
// reports "256 bytes stack frame" for gather_local_v1, and the gate must refuse it
// (tests/test_cuda_gate.py). It computes y[t] = x[(t + idx[t]) % n] the slow way; nothing else is wrong with it.
// Version history: v1 only (a fixture). Not part of the gate run over kernels/*.cu.

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

extern "C" __global__ void gather_local_v1(const float* x, const int* idx, float* y, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float tmp[64];
    for (int k = 0; k < 64; ++k) tmp[k] = x[(t + k) % n];
    y[t] = tmp[idx[t] & 63];  // dynamic index: tmp must be addressable memory
}
