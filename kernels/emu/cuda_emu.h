// cuda_emu.h -- run minisd's CUDA C kernels (the unchanged kernels/*.cu files) on the CPU, for tests without a GPU.
//
//   g++ -std=c++20 -O2 -fPIC -shared -include kernels/emu/cuda_emu.h kernel.cu  (kernels/emu/emu.py does this)
//
// What it emulates: a subset of CUDA C large enough for minisd's kernels -- __global__/__device__ functions,
// threadIdx/blockIdx/blockDim/gridDim, static and dynamic __shared__ memory, __syncthreads (+ _count/_and/_or),
// the warp intrinsics (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) with the semantics of
// PTX shfl.sync / vote.sync / bar.warp.sync on Volta and later, atomics and the common math intrinsics.
//
// Execution model (one OS thread, fully deterministic):
//   * Every CUDA thread of a block is a *fiber*: a separate stack plus a saved register set. A fiber runs without
//     interruption until it reaches a synchronisation point (__syncthreads, a warp intrinsic) or returns; then it
//     switches back to the block scheduler. So threads only ever interleave at synchronisation points, and the
//     order in which they run between two points is chosen by the schedule mode: forward (thread 0 first),
//     reverse, or random (seeded). A warp whose shuffle partners have all arrived continues at once, so warps
//     race ahead of each other as far as the block barriers allow (see run_block). A kernel whose result
//     changes with the mode has a race (a missing barrier); a correct one gives identical results in every mode.
//   * Blocks run one after another. Before each block, all shared memory (static and dynamic) is filled with
//     0xFF bytes: a float read of unwritten shared memory gives NaN (and an int gives -1), so a test that asserts
//     "every output is finite" catches reads of uninitialised shared memory, and values cannot leak from one block
//     to the next. (Parallel workers were measured in the prototype and gave no speed-up on loaded 2-core CI
//     machines; serial blocks keep static shared memory poisonable and every run reproducible.)
//   * Atomics are plain read-modify-write: fibers never switch in the middle of one, so they are atomic for free.
//
// Errors found at run time make the launch fail with a message (emu.py raises EmuKernelError with it):
//   * divergent __syncthreads: some threads wait at a barrier while others have exited, or threads wait at
//     different __syncthreads call sites (file:line given);
//   * deadlock (nobody can make progress), listed by where the threads wait;
//   * warp intrinsics: own lane missing from `mask`, different intrinsics met in one warp group, a shuffle that
//     reads a lane that exited or is not in `mask` (undefined on the GPU);
//   * __trap().
// Sanitizer builds (-fsanitize=address,undefined, emu.py sanitize=True) add out-of-bounds checks on global
// memory (NumPy buffers come from the ASan allocator), dynamic shared memory (malloc'd) and static shared arrays
// (UBSan -fsanitize=bounds), and signed int overflow in index math. The fiber switches are announced to ASan
// (__sanitizer_start/finish_switch_fiber) so it tracks the fiber stacks correctly.
//
// Not emulated: fp16/bf16 types, cooperative groups, cp.async, tensor-core instructions (mma/wmma/wgmma), TMA,
// textures, __constant__ memory uploaded from the host, inter-block communication (blocks are serial, so a
// grid-wide spin-wait would hang), memory-model subtleties (__threadfence is a no-op here). Floating point is
// not bit-identical to the GPU: nvcc contracts a*b+c into FMA, __expf is an approximation there, and
// reductions may run in another order, so tests compare with tolerances.
//
// Design after the minisd prototype in ../shared/reference/cuda_emu/ (docs/cuda-verification.md there).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>

#if !defined(__x86_64__) || defined(EMU_USE_UCONTEXT)
// Portable but slower context switch (glibc swapcontext also saves the signal mask: a system call per switch).
#include <ucontext.h>
#define EMU_UCONTEXT 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

// ------------------------------------------------------------------------------------------- CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)  // checked by emu.py against the block size instead
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static

// Static shared memory: one copy per kernel (blocks run one at a time), placed in its own linker section so the
// launcher can poison all of it before every block. The linker defines __start_/__stop_ symbols for a section
// whose name is a C identifier; they are weak so a module without __shared__ variables links too.
#define __shared__ static __attribute__((section("emu_smem")))
extern "C" char __start_emu_smem[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_smem[] __attribute__((weak, visibility("hidden")));

// Dynamic shared memory (the `shared_mem=` bytes of a launch). Kernels declare it with this macro, which each
// .cu file defines as `extern __shared__ type name[]` for nvcc/NVRTC when the emulator has not defined it.
#define EMU_EXTERN_SHARED(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())

// ------------------------------------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return {x, y, z}; }
};
struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
static constexpr int warpSize = 32;

namespace emu {

// ------------------------------------------------------------------------------------------- state
enum State { RUNNABLE, AT_BARRIER, AT_WARP, EXITED };
enum BarrierOp { BAR_SYNC, BAR_COUNT, BAR_AND, BAR_OR };
enum WarpOp { WARP_SYNC, WARP_SHFL, WARP_BALLOT, WARP_ANY, WARP_ALL };
inline const char* barrier_name(int op) {
    static const char* n[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
    return n[op];
}
inline const char* warp_name(int op) {
    static const char* n[] = {"__syncwarp", "__shfl*_sync", "__ballot_sync", "__any_sync", "__all_sync"};
    return n[op];
}

struct Thread {             // one CUDA thread = one fiber
#ifdef EMU_UCONTEXT
    ucontext_t ctx;
#else
    void* sp = nullptr;     // saved stack pointer while switched out
#endif
    uint3 tid{};
    unsigned lin = 0, lane = 0;  // linear index in the block (x fastest, as on the GPU) and lane = lin % 32
    State state = RUNNABLE;
    // the synchronisation point the thread waits at
    int op = 0;             // BarrierOp or WarpOp
    unsigned mask = 0;      // warp ops: the member lanes
    uint64_t value = 0;     // shuffles: the value offered to other lanes
    int src = 0;            // shuffles: the lane to read (already resolved with the PTX lane rules)
    int pred = 0;           // votes and __syncthreads_count/_and/_or: this thread's predicate
    uint64_t result = 0;    // what the synchronisation point returns to this thread
    const char* file = "";  // call site, for messages and the divergent-barrier check
    int line = 0;
    unsigned barriers = 0;  // block barriers passed so far (diagnostics)
};

struct Launch {             // the launch in progress; blocks run one after another
    dim3 grid, block;
    uint3 block_idx{};
    void (*body)(void*) = nullptr;  // calls the kernel with its unpacked arguments
    void* body_arg = nullptr;
    std::vector<Thread> threads;
    std::vector<unsigned> order;    // run order within a scheduling round
    Thread* cur = nullptr;
    int sched = 0;                  // 0 forward, 1 reverse, 2 random
    unsigned seed = 0;
    std::mt19937 rng;
    unsigned char* dyn = nullptr;   // dynamic shared memory of this launch
    size_t dyn_bytes = 0;
#ifdef EMU_UCONTEXT
    ucontext_t sched_ctx;
#else
    void* sched_sp = nullptr;
#endif
#ifdef EMU_ASAN
    void* sched_fake_stack = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
};
inline Launch* g_launch = nullptr;

// ------------------------------------------------------------------------------------------- errors
inline bool g_failed = false;
inline std::string g_error;
inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
    if (g_failed) return;  // keep the first error: later ones are usually consequences
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_failed = true;
    g_error = buf;
}
inline std::string where(const Thread& t) {  // "block (1,0,0) thread (5,0,0)"
    char b[160];
    snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u)", g_launch->block_idx.x, g_launch->block_idx.y,
             g_launch->block_idx.z, t.tid.x, t.tid.y, t.tid.z);
    return b;
}

// ------------------------------------------------------------------------------------------- fiber stacks
// One mmap'd region holds every fiber's stack, each with an inaccessible guard page below it, so a stack
// overflow faults at once instead of silently corrupting the neighbouring fiber. Reused across launches.
struct Stacks {
    char* base = nullptr;
    size_t count = 0, size = 0, map_len = 0;
    static constexpr size_t kGuard = 4096;
    void ensure(size_t n) {
        if (n <= count) return;
        if (base) munmap(base, map_len);
#ifdef EMU_ASAN
        size_t kb = 256;  // instrumented frames are much larger
#else
        size_t kb = 64;
#endif
        if (const char* s = getenv("EMU_STACK_KB")) kb = (size_t)atol(s);
        size = kb * 1024;
        map_len = (size + kGuard) * n;
        base = (char*)mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
        if (base == (char*)MAP_FAILED) {
            perror("cuda_emu: mmap of fiber stacks");
            abort();
        }
        for (size_t i = 0; i < n; ++i) mprotect(base + i * (size + kGuard), kGuard, PROT_NONE);
        count = n;
    }
    char* lo(size_t i) const { return base + i * (size + kGuard) + kGuard; }  // lowest usable address
};
inline Stacks g_stacks;

// ------------------------------------------------------------------------------------------- context switch
#ifndef EMU_UCONTEXT
// emu_switch(save, load): push the callee-saved registers of the x86-64 SysV ABI (rbx, rbp, r12-r15) and the
// SSE/x87 control words onto the current stack, store the stack pointer in *save, load `load` as the new stack
// pointer and pop the same set from there. Caller-saved registers need no saving: emu_switch is a normal call.
// About 20 instructions; glibc swapcontext is ~10x slower because it also saves the signal mask (a syscall).
extern "C" void emu_switch(void** save, void* load);
__asm__(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif

inline void switch_to_scheduler() {
    Launch* L = g_launch;
    Thread* t = L->cur;
#ifdef EMU_ASAN
    void* fake = nullptr;  // an exited fiber passes nullptr: ASan may free its fake stack
    __sanitizer_start_switch_fiber(t->state == EXITED ? nullptr : &fake, L->sched_stack_bottom, L->sched_stack_size);
#endif
#ifdef EMU_UCONTEXT
    swapcontext(&t->ctx, &L->sched_ctx);
#else
    emu_switch(&t->sp, L->sched_sp);
#endif
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// First code every fiber runs: call the kernel, then report "exited" for good.
[[noreturn]] inline void fiber_main() {
    Launch* L = g_launch;
#ifdef EMU_ASAN
    // learn the scheduler's stack bounds, needed to announce every switch back to it
    __sanitizer_finish_switch_fiber(nullptr, &L->sched_stack_bottom, &L->sched_stack_size);
#endif
    L->body(L->body_arg);
    L->cur->state = EXITED;
    switch_to_scheduler();
    __builtin_trap();  // an exited fiber is never resumed
}

inline void start_fiber(Thread& t, size_t i) {
    char* lo = g_stacks.lo(i);
#ifdef EMU_UCONTEXT
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = lo;
    t.ctx.uc_stack.ss_size = g_stacks.size;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, (void (*)())fiber_main, 0);
#else
    // Build the frame emu_switch expects to pop: control words, six registers, then the "return address"
    // fiber_main. After its `ret`, rsp must be 8 mod 16 as on entry to any function (the ABI's alignment rule),
    // hence the fake return address slot above it.
    uintptr_t top = ((uintptr_t)(lo + g_stacks.size)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                                    // fake return address of fiber_main (never used)
    *--sp = (uint64_t)(uintptr_t)&fiber_main;     // popped by `ret`
    for (int r = 0; r < 6; ++r) *--sp = 0;        // rbp rbx r12 r13 r14 r15
    *--sp = 0x1F80ull | (0x037Full << 32);        // default MXCSR | default x87 control word
    t.sp = sp;
#endif
}

inline void resume(Thread& t, size_t i) {
    Launch* L = g_launch;
    L->cur = &t;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&L->sched_fake_stack, g_stacks.lo(i), g_stacks.size);
#else
    (void)i;
#endif
#ifdef EMU_UCONTEXT
    swapcontext(&L->sched_ctx, &t.ctx);
#else
    emu_switch(&L->sched_sp, t.sp);
#endif
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(L->sched_fake_stack, nullptr, nullptr);
#endif
    L->cur = nullptr;
}

// ------------------------------------------------------------------------------------------- sync points (device side)
inline int barrier_op(int op, int pred, const char* file, int line) {
    Thread* t = g_launch->cur;
    t->state = AT_BARRIER;
    t->op = op;
    t->pred = pred;
    t->file = file;
    t->line = line;
    switch_to_scheduler();
    return (int)t->result;
}
inline uint64_t warp_op(int op, unsigned mask, uint64_t value, int src, int pred, const char* file, int line) {
    Thread* t = g_launch->cur;
    t->state = AT_WARP;
    t->op = op;
    t->mask = mask;
    t->value = value;
    t->src = src;
    t->pred = pred;
    t->file = file;
    t->line = line;
    switch_to_scheduler();
    return t->result;
}

// ------------------------------------------------------------------------------------------- scheduler
// Complete every warp group of the warp starting at thread `base` whose member lanes have all arrived. A group is
// "the lanes named in mask": each of them must either have exited (allowed, as on the GPU) or wait at a warp
// intrinsic with the same mask. Lanes beyond the end of a partial warp (block size not a multiple of 32) count as
// exited. Returns the number of released threads (and lowers *min_pos to the smallest run-order position among
// them), or -1 after an error.
inline int resolve_warp(unsigned base, const std::vector<unsigned>& pos, unsigned* min_pos) {
    Launch* L = g_launch;
    auto& T = L->threads;
    const unsigned nl = std::min(32u, (unsigned)T.size() - base);  // lanes that exist in this warp
    // The distinct masks of the waiting lanes (usually one): each is a candidate group. This keeps the cost per
    // arrival at O(32) instead of checking the whole group again for every waiting lane.
    unsigned masks[32], first_lane[32], nmasks = 0;
    for (unsigned l = 0; l < nl; ++l) {
        const Thread& t = T[base + l];
        if (t.state != AT_WARP) continue;
        if (!((t.mask >> l) & 1u)) {
            fail("%s at %s:%d: the calling lane %u is not in mask 0x%08x (%s)", warp_name(t.op), t.file, t.line, l,
                 t.mask, where(t).c_str());
            return -1;
        }
        unsigned k = 0;
        while (k < nmasks && masks[k] != t.mask) ++k;
        if (k == nmasks) {
            masks[nmasks] = t.mask;
            first_lane[nmasks++] = l;
        }
    }
    int released = 0;
    for (unsigned k = 0; k < nmasks; ++k) {
        const unsigned m = masks[k];
        const Thread& t = T[base + first_lane[k]];
        bool complete = true;
        for (unsigned j = 0; j < nl && complete; ++j) {
            if (!((m >> j) & 1u)) continue;
            const Thread& u = T[base + j];
            if (u.state == EXITED) continue;
            if (u.state != AT_WARP || u.mask != m) complete = false;
            else if (u.op != t.op) {
                fail("different warp intrinsics met in one warp group (mask 0x%08x): lane %u at %s (%s:%d), "
                     "lane %u at %s (%s:%d), %s", m, first_lane[k], warp_name(t.op), t.file, t.line, j,
                     warp_name(u.op), u.file, u.line, where(t).c_str());
                return -1;
            }
        }
        if (!complete) continue;
        // every member has arrived: compute all results before releasing anyone
        uint32_t ballot = 0;
        unsigned members = 0;
        for (unsigned j = 0; j < nl; ++j) {
            const Thread& u = T[base + j];
            if (((m >> j) & 1u) && u.state == AT_WARP) {
                ++members;
                if (u.pred) ballot |= 1u << j;
            }
        }
        for (unsigned j = 0; j < nl; ++j) {
            Thread& u = T[base + j];
            if (!((m >> j) & 1u) || u.state != AT_WARP) continue;
            switch (u.op) {
                case WARP_SHFL: {
                    const unsigned s = (unsigned)u.src;
                    const Thread* v = s < nl ? &T[base + s] : nullptr;
                    if (!v || !((m >> s) & 1u) || v->state != AT_WARP) {
                        fail("__shfl*_sync at %s:%d: lane %u reads lane %u, which %s (undefined value on the GPU), "
                             "%s", u.file, u.line, j, s,
                             !v ? "does not exist (partial warp)" : !((m >> s) & 1u) ? "is not in the mask"
                                                                                     : "has exited",
                             where(u).c_str());
                        return -1;
                    }
                    u.result = v->value;
                    break;
                }
                case WARP_BALLOT: u.result = ballot; break;
                case WARP_ANY: u.result = ballot != 0; break;
                case WARP_ALL: u.result = (unsigned)__builtin_popcount(ballot) == members; break;
                default: u.result = 0;
            }
        }
        for (unsigned j = 0; j < nl; ++j) {
            Thread& u = T[base + j];
            if (((m >> j) & 1u) && u.state == AT_WARP) {
                u.state = RUNNABLE;
                *min_pos = std::min(*min_pos, pos[base + j]);
                ++released;
            }
        }
    }
    return released;
}

// Short description of where the unfinished threads are, grouped by wait site: for deadlock messages.
inline std::string describe_waits() {
    struct Site { State s; int op; const char* file; int line; unsigned mask, count, first; };
    std::vector<Site> sites;
    for (const Thread& t : g_launch->threads) {
        bool found = false;
        for (Site& s : sites)
            if (s.s == t.state && s.op == t.op && s.line == t.line && s.mask == t.mask && !strcmp(s.file, t.file)) {
                ++s.count;
                found = true;
                break;
            }
        if (!found) sites.push_back({t.state, t.op, t.file, t.line, t.mask, 1, t.lin});
    }
    std::string out;
    for (const Site& s : sites) {
        char b[256];
        if (s.s == EXITED) snprintf(b, sizeof b, "; %u exited (first: thread %u)", s.count, s.first);
        else if (s.s == AT_BARRIER)
            snprintf(b, sizeof b, "; %u at %s (%s:%d) (first: thread %u)", s.count, barrier_name(s.op), s.file,
                     s.line, s.first);
        else
            snprintf(b, sizeof b, "; %u at %s mask 0x%08x (%s:%d) (first: thread %u)", s.count, warp_name(s.op),
                     s.mask, s.file, s.line, s.first);
        if (out.size() < 1500) out += b;
    }
    return out;
}

// Run one block to completion. Returns false after an error (g_error says what).
//
// Scheduling: the threads are visited in run order (forward: 0, 1, 2, ...; reverse; random: a fresh permutation
// per barrier phase). The first runnable thread runs until it blocks or exits; if that completes a warp group,
// the group is released at once and the visit restarts from the earliest released lane. So a warp races ahead
// through its shuffles as far as it can before the next warp starts, as independent warps may on a GPU: only
// __syncthreads orders warps against each other, and a missing one shows up as a wrong result.
inline bool run_block() {
    Launch* L = g_launch;
    const unsigned n = L->block.x * L->block.y * L->block.z;
    g_stacks.ensure(n);
    L->threads.assign(n, Thread{});
    L->order.resize(n);
    std::vector<unsigned> pos(n);  // pos[thread] = its place in the run order
    // per warp: lanes waiting at a warp intrinsic, lanes exited (cheap tests for "may a group be complete")
    std::vector<unsigned> waiting((n + 31) / 32, 0), exited((n + 31) / 32, 0);
    for (unsigned i = 0; i < n; ++i) {
        Thread& t = L->threads[i];
        t.lin = i;
        t.lane = i % 32;
        t.tid = {i % L->block.x, (i / L->block.x) % L->block.y, i / (L->block.x * L->block.y)};
        start_fiber(t, i);
        L->order[i] = L->sched == 1 ? n - 1 - i : i;
    }
    // poison: shared memory is uninitialised on the GPU; 0xFF bytes read as NaN floats / -1 ints
    if (L->dyn_bytes) memset(L->dyn, 0xFF, L->dyn_bytes);
    if (__start_emu_smem && __stop_emu_smem > __start_emu_smem)
        memset(__start_emu_smem, 0xFF, (size_t)(__stop_emu_smem - __start_emu_smem));
    const unsigned long long blin = L->block_idx.x + (unsigned long long)L->grid.x *
                                    (L->block_idx.y + (unsigned long long)L->grid.y * L->block_idx.z);
    L->rng.seed(L->seed * 1000003u + (unsigned)blin);  // reproducible per block
    for (;;) {  // one barrier phase per iteration
        if (L->sched == 2) std::shuffle(L->order.begin(), L->order.end(), L->rng);
        for (unsigned k = 0; k < n; ++k) pos[L->order[k]] = k;
        unsigned k = 0;
        while (k < n) {
            const unsigned i = L->order[k];
            Thread& t = L->threads[i];
            if (t.state != RUNNABLE) {
                ++k;
                continue;
            }
            resume(t, i);
            if (g_failed) return false;  // __trap() or an error inside an intrinsic
            // t now waits at a warp intrinsic, at a barrier, or has exited. The first two may complete a warp
            // group; the counters skip the O(32) group check while too few lanes of the warp have arrived.
            const unsigned w = i / 32;
            bool check = false;
            if (t.state == AT_WARP) {
                if (!((t.mask >> t.lane) & 1u)) {
                    fail("%s at %s:%d: the calling lane %u is not in mask 0x%08x (%s)", warp_name(t.op), t.file,
                         t.line, t.lane, t.mask, where(t).c_str());
                    return false;
                }
                ++waiting[w];
                const unsigned lanes = std::min(32u, n - w * 32);
                const unsigned exist = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
                check = waiting[w] + exited[w] >= (unsigned)__builtin_popcount(t.mask & exist);
            } else if (t.state == EXITED) {
                ++exited[w];
                check = waiting[w] > 0;
            }
            if (check) {
                unsigned min_pos = n;
                const int r = resolve_warp(w * 32, pos, &min_pos);
                if (r < 0) return false;
                waiting[w] -= (unsigned)r;
                if (min_pos < k) k = min_pos;  // continue with the earliest released lane (t itself if it was one)
            }
        }
        // nobody can run: all threads have exited, wait at a barrier, or wait for warp partners
        unsigned at_bar = 0, at_warp = 0, n_exited = 0;
        const Thread* first_bar = nullptr;
        const Thread* first_exit = nullptr;
        for (const Thread& t : L->threads) {
            if (t.state == AT_BARRIER) { ++at_bar; if (!first_bar) first_bar = &t; }
            else if (t.state == AT_WARP) ++at_warp;
            else if (t.state == EXITED) { ++n_exited; if (!first_exit) first_exit = &t; }
        }
        if (n_exited == n) return true;
        if (at_warp == 0 && at_bar > 0) {
            if (n_exited > 0) {
                fail("divergent __syncthreads in block (%u,%u,%u): %u threads wait at %s (%s:%d) but %u threads "
                     "of the block have exited (e.g. thread %u waits, thread %u exited); every thread of a block "
                     "must reach the same barrier",
                     L->block_idx.x, L->block_idx.y, L->block_idx.z, at_bar, barrier_name(first_bar->op),
                     first_bar->file, first_bar->line, n_exited, first_bar->lin, first_exit->lin);
                return false;
            }
            for (const Thread& t : L->threads)
                if (t.line != first_bar->line || t.op != first_bar->op ||
                    (t.file != first_bar->file && strcmp(t.file, first_bar->file))) {
                    fail("divergent __syncthreads in block (%u,%u,%u): thread %u waits at %s (%s:%d) but thread %u "
                         "waits at %s (%s:%d); every thread of a block must reach the same barrier",
                         L->block_idx.x, L->block_idx.y, L->block_idx.z, first_bar->lin,
                         barrier_name(first_bar->op), first_bar->file, first_bar->line, t.lin, barrier_name(t.op),
                         t.file, t.line);
                    return false;
                }
            int count = 0;
            for (const Thread& t : L->threads) count += t.pred != 0;
            const int op = first_bar->op;
            const int res = op == BAR_COUNT ? count : op == BAR_AND ? count == (int)n : op == BAR_OR ? count > 0 : 0;
            for (Thread& t : L->threads) {
                t.result = (uint64_t)res;
                t.state = RUNNABLE;
                ++t.barriers;
            }
            continue;
        }
        fail("deadlock in block (%u,%u,%u): no thread can continue%s", L->block_idx.x, L->block_idx.y,
             L->block_idx.z, describe_waits().c_str());
        return false;
    }
}

inline void* dynamic_smem() { return g_launch->dyn; }

// ------------------------------------------------------------------------------------------- launch
inline std::mutex g_launch_mutex;  // one launch at a time per module: static shared memory is a single copy

// Run every block of a launch. grid/block are 3 unsigned each; smem = dynamic shared memory bytes.
inline int launch(const unsigned* grid, const unsigned* block, size_t smem, int sched, unsigned seed,
                  void (*body)(void*), void* body_arg) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_failed = false;
    g_error.clear();
    Launch L;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    const unsigned long long nthreads = (unsigned long long)block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        fail("invalid launch configuration grid=(%u,%u,%u) block=(%u,%u,%u)", grid[0], grid[1], grid[2], block[0],
             block[1], block[2]);
        return 1;
    }
    L.body = body;
    L.body_arg = body_arg;
    L.sched = sched;
    L.seed = seed;
    L.dyn_bytes = smem;
    L.dyn = (unsigned char*)malloc(smem ? smem : 1);  // malloc'd so ASan sees overruns of dynamic smem
    g_launch = &L;
    for (unsigned z = 0; z < grid[2] && !g_failed; ++z)
        for (unsigned y = 0; y < grid[1] && !g_failed; ++y)
            for (unsigned x = 0; x < grid[0] && !g_failed; ++x) {
                L.block_idx = {x, y, z};
                if (!run_block()) break;
            }
    free(L.dyn);
    g_launch = nullptr;
    return g_failed ? 1 : 0;
}

// Kernel arguments arrive like cuLaunchKernel's `void** kernelParams`: params[i] points at the value of the
// i-th parameter. They are copied into a tuple of the kernel's exact parameter types, then applied.
template <typename... A>
struct Call {
    void (*kernel)(A...);
    std::tuple<std::remove_cv_t<A>...> args;
    static void run(void* self) {
        Call* c = static_cast<Call*>(self);
        std::apply(c->kernel, c->args);
    }
};
template <typename... A, size_t... I>
inline int launch_unpacked(void (*k)(A...), const unsigned* g, const unsigned* b, size_t smem, int sched,
                           unsigned seed, void** params, std::index_sequence<I...>) {
    Call<A...> call{k, {*static_cast<std::remove_cv_t<A>*>(params[I])...}};
    return launch(g, b, smem, sched, seed, &Call<A...>::run, &call);
}
template <typename... A>
inline int launch_kernel(void (*k)(A...), const unsigned* g, const unsigned* b, size_t smem, int sched,
                         unsigned seed, void** params) {
    return launch_unpacked(k, g, b, smem, sched, seed, params, std::index_sequence_for<A...>{});
}

// The C signature as a string that emu.py checks arguments against, one code per parameter, comma-separated:
// f4 f8 (float, double), i1..i8 / u1..u8 (signed / unsigned integers by size), b1 (bool); pointers are "*"
// plus "c" when the pointee is const plus the pointee's code ("*cf4" = const float*, "*v" = void*).
// Vector types report their element type (float4* -> "*f4"); other structs "s<bytes>".
template <typename T> inline std::string scalar_code() {
    if constexpr (std::is_void_v<T>) return "v";
    else if constexpr (std::is_same_v<T, bool>) return "b1";
    else if constexpr (std::is_floating_point_v<T>) return "f" + std::to_string(sizeof(T));
    else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return "i" + std::to_string(sizeof(T));
    else if constexpr (std::is_integral_v<T>) return "u" + std::to_string(sizeof(T));
    else if constexpr (std::is_same_v<T, float2> || std::is_same_v<T, float3> || std::is_same_v<T, float4>)
        return "f4";
    else if constexpr (std::is_same_v<T, int2> || std::is_same_v<T, int4>) return "i4";
    else return "s" + std::to_string(sizeof(T));
}
template <typename T> inline std::string param_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using P = std::remove_pointer_t<U>;
        return std::string("*") + (std::is_const_v<P> ? "c" : "") + scalar_code<std::remove_cv_t<P>>();
    } else if constexpr (std::is_same_v<U, float2> || std::is_same_v<U, float4> || std::is_same_v<U, int2> ||
                         std::is_same_v<U, int4> || std::is_same_v<U, float3>) {
        return "s" + std::to_string(sizeof(U));  // vectors by value: not passable from Python, refused there
    } else {
        return scalar_code<U>();
    }
}
template <typename... A> inline int signature(void (*)(A...), char* out, int cap) {
    std::string s;
    ((s += (s.empty() ? "" : ","), s += param_code<A>()), ...);
    snprintf(out, (size_t)cap, "%s", s.c_str());
    return (int)s.size();
}

// built-in variables (read-only references into the current launch)
inline const uint3& tidx() { return g_launch->cur->tid; }
inline const uint3& bidx() { return g_launch->block_idx; }
inline const dim3& bdim() { return g_launch->block; }
inline const dim3& gdim() { return g_launch->grid; }

// PTX shfl.sync lane selection (PTX ISA, "Parallel Synchronization and Communication Instructions: shfl.sync").
// b = source lane or delta (only its low 5 bits are used), c = ((32 - width) << 8) | clamp, where clamp is 0 for
// .up and 31 otherwise. Returns the lane to read; a lane outside its width-segment reads its own value.
inline unsigned shfl_lane(int mode, unsigned lane, unsigned b, int width) {
    const unsigned bval = b & 31u;
    const unsigned segmask = (32u - (unsigned)width) & 31u;
    const unsigned cval = mode == 1 ? 0u : 31u;
    const int max_lane = (int)((lane & segmask) | (cval & ~segmask));
    const int min_lane = (int)(lane & segmask);
    int j;
    bool ok;
    switch (mode) {
        case 0: j = min_lane | (int)(bval & ~segmask); ok = j <= max_lane; break;  // .idx
        case 1: j = (int)lane - (int)bval; ok = j >= max_lane; break;               // .up
        case 2: j = (int)lane + (int)bval; ok = j <= max_lane; break;               // .down
        default: j = (int)(lane ^ bval); ok = j <= max_lane; break;                 // .bfly (xor)
    }
    return ok ? (unsigned)j : lane;
}
template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <typename T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}
template <typename T> inline T shfl(int mode, unsigned mask, T v, unsigned b, int width, const char* f, int l) {
    const unsigned src = shfl_lane(mode, g_launch->cur->lane, b, width);
    return from_bits<T>(warp_op(WARP_SHFL, mask, to_bits(v), (int)src, 0, f, l));
}
}  // namespace emu

// Exported once per module: the message of the last failed launch.
extern "C" __attribute__((visibility("default"))) int emu_last_error(char* out, int cap) {
    snprintf(out, (size_t)cap, "%s", emu::g_error.c_str());
    return (int)emu::g_error.size();
}
// emu.py appends one EMU_EXPORT(kernel) per extern "C" __global__ kernel: a launcher and a signature query.
#define EMU_EXPORT(name)                                                                                       \
    extern "C" __attribute__((visibility("default"))) int emu_launch_##name(                                  \
        const unsigned* g, const unsigned* b, size_t smem, int sched, unsigned seed, void** params) {         \
        return ::emu::launch_kernel(name, g, b, smem, sched, seed, params);                                    \
    }                                                                                                          \
    extern "C" __attribute__((visibility("default"))) int emu_signature_##name(char* out, int cap) {          \
        return ::emu::signature(name, out, cap);                                                               \
    }
// ------------------------------------------------------------------------------------------- built-ins
#define threadIdx (::emu::tidx())
#define blockIdx (::emu::bidx())
#define blockDim (::emu::bdim())
#define gridDim (::emu::gdim())

// Synchronisation. __builtin_FILE/__builtin_LINE as default arguments evaluate at the call site, so every wait
// knows its source line (emu.py compiles the kernel with `#line 1 "kernels/x.cu"`, so it is the .cu's own line).
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    emu::barrier_op(emu::BAR_SYNC, 0, f, l);
}
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::barrier_op(emu::BAR_COUNT, p, f, l);
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::barrier_op(emu::BAR_AND, p, f, l);
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::barrier_op(emu::BAR_OR, p, f, l);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    emu::warp_op(emu::WARP_SYNC, mask, 0, 0, 0, f, l);
}
inline void __threadfence() {}        // fibers of one OS thread see every write at once
inline void __threadfence_block() {}
inline void __trap(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    emu::fail("__trap() at %s:%d, %s", f, l, emu::where(*emu::g_launch->cur).c_str());
    emu::g_launch->cur->state = emu::EXITED;
    emu::switch_to_scheduler();
    __builtin_unreachable();
}

template <typename T>
inline T __shfl_sync(unsigned m, T v, int src, int w = warpSize, const char* f = __builtin_FILE(),
                     int l = __builtin_LINE()) {
    return emu::shfl(0, m, v, (unsigned)src, w, f, l);
}
template <typename T>
inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = warpSize, const char* f = __builtin_FILE(),
                        int l = __builtin_LINE()) {
    return emu::shfl(1, m, v, d, w, f, l);
}
template <typename T>
inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = warpSize, const char* f = __builtin_FILE(),
                          int l = __builtin_LINE()) {
    return emu::shfl(2, m, v, d, w, f, l);
}
template <typename T>
inline T __shfl_xor_sync(unsigned m, T v, int lane_mask, int w = warpSize, const char* f = __builtin_FILE(),
                         int l = __builtin_LINE()) {
    return emu::shfl(3, m, v, (unsigned)lane_mask, w, f, l);
}
inline unsigned __ballot_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (unsigned)emu::warp_op(emu::WARP_BALLOT, m, 0, 0, p != 0, f, l);
}
inline int __any_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (int)emu::warp_op(emu::WARP_ANY, m, 0, 0, p != 0, f, l);
}
inline int __all_sync(unsigned m, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (int)emu::warp_op(emu::WARP_ALL, m, 0, 0, p != 0, f, l);
}
// Not a synchronisation point on the GPU either; here: the lanes of the warp that exist and have not exited
// (the GPU may report fewer, e.g. inside a divergent branch, so kernels must not rely on more than that).
inline unsigned __activemask() {
    const auto& T = emu::g_launch->threads;
    const unsigned base = emu::g_launch->cur->lin & ~31u, n = (unsigned)T.size();
    unsigned m = 0;
    for (unsigned j = 0; j < 32 && base + j < n; ++j)
        if (T[base + j].state != emu::EXITED) m |= 1u << j;
    return m;
}

// ------------------------------------------------------------------------------------------- atomics
// Fibers switch only at synchronisation points, so a plain read-modify-write is already atomic.
template <typename T> inline T atomicAdd(T* a, T v) { T old = *a; *a = old + v; return old; }
template <typename T> inline T atomicSub(T* a, T v) { T old = *a; *a = old - v; return old; }
template <typename T> inline T atomicExch(T* a, T v) { T old = *a; *a = v; return old; }
template <typename T> inline T atomicMin(T* a, T v) { T old = *a; *a = v < old ? v : old; return old; }
template <typename T> inline T atomicMax(T* a, T v) { T old = *a; *a = v > old ? v : old; return old; }
template <typename T> inline T atomicCAS(T* a, T cmp, T v) { T old = *a; if (old == cmp) *a = v; return old; }

// ------------------------------------------------------------------------------------------- math and bit intrinsics
// The C math functions (expf, erff, fmaxf, sqrtf, ...) come from <cmath>. The CUDA fast-math intrinsics map to
// the accurate functions: results differ from the GPU in the last bits, which test tolerances absorb.
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
    return a > b ? std::common_type_t<A, B>(a) : std::common_type_t<A, B>(b);
}
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
    return a < b ? std::common_type_t<A, B>(a) : std::common_type_t<A, B>(b);
}
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __int2float_rn(int i) { return (float)i; }
inline int __float2int_rn(float f) { return (int)nearbyintf(f); }
inline int __float2int_rz(float f) { return (int)f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int __mul24(int a, int b) { return a * b; }
inline int __umul24(unsigned a, unsigned b) { return (int)(a * b); }
