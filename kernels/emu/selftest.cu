// selftest.cu -- small kernels that pin down the emulator's own semantics (tests/test_cuda_emulator.py).
//
// Each kernel exercises one feature: warp shuffles in every mode and width, votes, partial warps, block-wide
// votes, shared-memory poisoning, dynamic shared memory, atomics, argument passing, and the error checks
// (reading an exited lane, a lane missing from its own mask, mixed intrinsics, barriers at different call
// sites, deadlock, __trap). The file is valid CUDA C as well (NVRTC compiles it, see tests/test_cuda_gate.py),
// so scripts/gpu_check.sh runs the same semantic tests on a real GPU, which is what confirms that the emulator's
// warp model (written from the PTX ISA text, like the Python model in the test) matches the hardware.
// Conventions as in every minisd .cu: no #include, extern "C", EMU_EXTERN_SHARED for dynamic shared memory.

#ifndef EMU_EXTERN_SHARED
#define EMU_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

// out[(mode * 32) + lane] for mode 0 idx, 1 up, 2 down, 3 xor; out[4 * 32 + lane] = ballot(in & 1).
// One warp; `b` is the source lane / delta / lane mask, `width` the segment width (2, 4, 8, 16 or 32).
extern "C" __global__ void shfl_modes(const int* in, int* out, int width, int b) {
    const int lane = threadIdx.x;
    const int v = in[lane];
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, b, width);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, (unsigned)b, width);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, (unsigned)b, width);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, b, width);
    out[4 * 32 + lane] = (int)__ballot_sync(0xffffffffu, v & 1);
}

// 64-bit values travel through shuffles whole (CUDA splits them into two 32-bit shfl instructions).
extern "C" __global__ void shfl_wide(const double* in, double* out, const long long* lin, long long* lout) {
    const int lane = threadIdx.x;
    out[lane] = __shfl_down_sync(0xffffffffu, in[lane], 3);
    lout[lane] = __shfl_xor_sync(0xffffffffu, lin[lane], 5);
}

// Votes among the lanes in `mask` only (the others skip the intrinsics): out[3 * t + 0..2] = ballot, any, all.
// Threads not in the mask write -7. Launched with several warps and with partial warps.
extern "C" __global__ void votes(const int* pred, unsigned mask, int* out) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32;
    if ((mask >> lane) & 1u) {
        const int p = pred[t];
        out[3 * t + 0] = (int)__ballot_sync(mask, p);
        out[3 * t + 1] = __any_sync(mask, p);
        out[3 * t + 2] = __all_sync(mask, p);
    } else {
        out[3 * t + 0] = out[3 * t + 1] = out[3 * t + 2] = -7;
    }
}

// Block of 48 threads: warp 1 has only 16 lanes. An xor-reduction over 16-lane segments never leaves them.
extern "C" __global__ void partial_warp_sum(int* out) {
    int v = threadIdx.x;
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// Warp-synchronous tree sum of 32 values in shared memory. With sync != 0, __syncwarp() separates every read
// step from the following write step (correct since Volta, where lanes of a warp need not run in lock-step);
// with sync == 0 this is the pre-Volta idiom that silently relied on lock-step: a race.
extern "C" __global__ void warp_tree_sum(const float* x, float* out, int sync) {
    __shared__ float s[32];
    const int lane = threadIdx.x;
    s[lane] = x[lane];
    __syncwarp();
    for (int o = 16; o > 0; o >>= 1) {
        const float v = lane < o ? s[lane] + s[lane + o] : 0.0f;
        if (sync) __syncwarp();  // every read of this step before any write
        if (lane < o) s[lane] = v;
        if (sync) __syncwarp();  // every write before the next step's reads
    }
    if (lane == 0) out[0] = s[0];
}

// __syncthreads_count / _and / _or: out[3 * t + 0..2] for every thread of the block.
extern "C" __global__ void block_votes(const int* pred, int* out) {
    const int t = threadIdx.x;
    const int p = pred[blockIdx.x * blockDim.x + t];
    const int c = __syncthreads_count(p);
    const int a = __syncthreads_and(p);
    const int o = __syncthreads_or(p);
    const int g = blockIdx.x * blockDim.x + t;
    out[3 * g + 0] = c;
    out[3 * g + 1] = a;
    out[3 * g + 2] = o;
}

// Shared memory starts poisoned in every block: block 0 writes its array, the others only read it.
// Expected: block 0 reads back its values, every other block reads NaN (static) / NaN (dynamic).
extern "C" __global__ void smem_poison(float* out_static, float* out_dynamic) {
    __shared__ float s[64];
    EMU_EXTERN_SHARED(float, d);  // blockDim.x floats
    const int t = threadIdx.x;
    if (blockIdx.x == 0) {
        s[t] = (float)t;
        d[t] = (float)(2 * t);
    }
    __syncthreads();
    out_static[blockIdx.x * blockDim.x + t] = s[t];
    out_dynamic[blockIdx.x * blockDim.x + t] = d[t];
}

// Tree reduction in dynamic shared memory (blockDim.x a power of two): out[block] = sum of its inputs.
extern "C" __global__ void dyn_smem_sum(const float* in, float* out) {
    EMU_EXTERN_SHARED(float, buf);
    const int t = threadIdx.x;
    buf[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = buf[0];
}

// atomicAdd from every thread of every block: total[0] = n_threads, hist[i % 4] counts.
extern "C" __global__ void atomics(float* total, int* hist) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(total, 1.0f);
    atomicAdd(&hist[i % 4], 1);
}

// Every scalar type the launch code uses, to test argument checking and passing: out = the values, as double.
extern "C" __global__ void scalar_args(const float* x, double* out, int n, long long big, float f, double d,
                                       unsigned u, bool flag) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        out[0] = x[0];
        out[1] = n;
        out[2] = (double)big;
        out[3] = f;
        out[4] = d;
        out[5] = u;
        out[6] = flag ? 1.0 : 0.0;
    }
}

// A kernel that may only be launched with up to 64 threads per block.
extern "C" __global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }

// ---- kernels that must be reported as errors
// Lanes 0-15 shuffle with a full mask but lanes 16-31 have already returned: lane j reads exited lane j+16.
extern "C" __global__ void shfl_reads_exited_lane(int* out) {
    const int lane = threadIdx.x % 32;
    int v = lane;
    if (lane >= 16) return;
    v = __shfl_xor_sync(0xffffffffu, v, 16);
    out[threadIdx.x] = v;
}

// Every lane passes mask 0x1: the calling lanes 1..31 are not in their own mask.
extern "C" __global__ void own_lane_not_in_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (int)threadIdx.x, 0);
}

// Even lanes vote with __ballot_sync, odd lanes with __any_sync, all with a full mask.
extern "C" __global__ void mixed_warp_ops(int* out) {
    const int lane = threadIdx.x % 32;
    if (lane % 2 == 0) out[threadIdx.x] = (int)__ballot_sync(0xffffffffu, 1);
    else out[threadIdx.x] = __any_sync(0xffffffffu, 1);
}

// Two different __syncthreads() call sites: the two halves of the block never wait at the same barrier.
extern "C" __global__ void barrier_two_sites(int* out) {
    if (threadIdx.x < 16) {
        out[threadIdx.x] = 1;
        __syncthreads();
    } else {
        out[threadIdx.x] = 2;
        __syncthreads();
    }
}

// Thread 0 waits for a shuffle partner while the other lanes wait at the block barrier: nobody can continue.
extern "C" __global__ void warp_vs_block_deadlock(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x == 0) v = __shfl_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// __trap() in one thread.
extern "C" __global__ void traps(int* out) {
    if (threadIdx.x == 5) __trap();
    out[threadIdx.x] = 1;
}
