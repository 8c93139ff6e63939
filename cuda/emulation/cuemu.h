// cuemu: a header-only CPU emulation of the part of CUDA's execution model that cuda/*.cu uses, so the unmodified
// kernels build with g++ and run on the CPU (docs/cuda-emulation.md). build.py compiles each .cu with this header
// force-included and rewrites `k<<<grid, block, shmem, stream>>>(args)` into `::cuemu::launch(k, grid, block,
// shmem, stream)(args)`.
//
// A launch runs synchronously, blocks one after another; the threads of a block run concurrently, either as fibers
// on the calling thread (the default: fast, deterministic, thread 0 runs ahead of the others until it blocks) or as
// one std::thread each (CUEMU_THREADS, used by the sanitizer builds so that ThreadSanitizer sees races between
// barriers). __shared__ variables are function statics, shared by the block's threads; between blocks they are
// filled with 0xFF bytes (NaN floats, -1 integers) so that a read before the write of this block shows.
// (build.py registers them: each `__shared__ T a[n], b;` is followed by CUEMU_SHARED_REG(a) CUEMU_SHARED_REG(b).)
// Faults a GPU would report (or leave undefined) end the launch with an error that the next cudaGetLastError()
// returns: a __syncthreads that can never complete, a shuffle whose mask does not name its calling lane or names a
// lane that is absent or exited, lanes of one shuffle with different masks, a bad launch configuration.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- the CUDA keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// build.py follows each __shared__ declaration with CUEMU_SHARED_REG(name) for each of its names, so the runtime
// knows every shared variable (gcc ignores a section attribute on the statics of templates)
#define __shared__ static
#define CUEMU_SHARED_REG(name) \
  static const bool cuemu_shared_reg_##name = ::cuemu::register_shared(&name, sizeof(name)); \
  (void)cuemu_shared_reg_##name;

// ---- runtime types and error codes (the values are CUDA's) ----
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMultiProcessorCount = 16 };

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuemu {

// ---- launch state ----
struct State {
  std::mutex mu;
  int last_error = 0;       // what cudaGetLastError returns (and clears)
  std::string message;      // the detail of the latest fault (kept until the next fault)
  long launches = 0;        // kernel launches run (a test can see that a launcher refused before launching)
  long max_blocks = 1L << 20;  // a grid larger than this is refused (emulation time), cudaErrorLaunchOutOfResources
  int sms = 132;            // what cudaDevAttrMultiProcessorCount reports (an H100 SXM)
};
inline State& state() {
  static State s;
  return s;
}
inline void set_error(int code, const std::string& msg) {
  std::lock_guard<std::mutex> g(state().mu);
  if (state().last_error == 0) state().last_error = code;
  state().message = msg;
}

struct Abort {};  // unwinds a CUDA thread out of its kernel once the block has failed

struct Block;
struct Thread {
  uint3 tid, bid;
  dim3 bdim, gdim;
  int linear;  // threadIdx in row-major order: the warp is linear / 32
  Block* blk;
};
// initial-exec: the library is loaded by dlopen, and the default model would call __tls_get_addr on every
// threadIdx read
inline thread_local Thread* tl_thread __attribute__((tls_model("initial-exec"))) = nullptr;
inline Thread& self() { return *tl_thread; }

struct Warp {
  uint64_t gen = 0;
  int arrived = 0;
  unsigned mask = 0;       // the mask of the shuffle in progress
  unsigned present = 0;    // lanes that exist and have not exited
  uint64_t val[2][32];     // double-buffered by gen parity: a fast lane's next write cannot clobber a slow read
};

struct Fiber;

// One block's barriers. Every field is read and written under mu (thread mode) or by one OS thread (fibers).
struct Block {
  int nthreads = 0, live = 0, blocked = 0;
  uint64_t gen = 0;  // the __syncthreads phase
  int arrived = 0, acc_and = 1, acc_or = 0, acc_count = 0;
  int res_and[2] = {1, 1}, res_or[2] = {0, 0}, res_count[2] = {0, 0};
  std::vector<Warp> warps;
  bool failed = false;
  bool fibers = false;
  std::vector<Fiber>* fiber_list = nullptr;
  std::mutex mu;
  std::condition_variable cv;
};

void park(Block& b, std::unique_lock<std::mutex>& lk, const uint64_t* gen, uint64_t val);

inline std::string where() {
  const Thread& t = self();
  return "block (" + std::to_string(t.bid.x) + "," + std::to_string(t.bid.y) + "," + std::to_string(t.bid.z) +
         ") thread (" + std::to_string(t.tid.x) + "," + std::to_string(t.tid.y) + "," + std::to_string(t.tid.z) + ")";
}

// Under the block's lock: the block cannot go on; wake everyone so that they unwind.
inline void fail_locked(Block& b, const std::string& msg) {
  if (!b.failed) set_error(cudaErrorLaunchFailure, "cuemu: " + msg);
  b.failed = true;
  if (!b.fibers) b.cv.notify_all();
}

// Under the lock, after an arrival or an exit: release the __syncthreads phase when every live thread is in it
// (every arrival counts itself as blocked first).
inline void maybe_release_block(Block& b) {
  if (b.arrived > 0 && b.arrived == b.live) {
    const int p = static_cast<int>(b.gen & 1);
    b.res_and[p ^ 1] = b.acc_and;  // the result lives in the parity of the next gen
    b.res_or[p ^ 1] = b.acc_or;
    b.res_count[p ^ 1] = b.acc_count;
    b.blocked -= b.arrived;
    b.arrived = 0;
    b.acc_and = 1;
    b.acc_or = 0;
    b.acc_count = 0;
    ++b.gen;
    if (!b.fibers) b.cv.notify_all();
  }
}

// Under the lock: every live thread waits and none can release the others.
inline void check_deadlock(Block& b) {
  if (!b.failed && b.live > 0 && b.blocked == b.live)
    fail_locked(b, "deadlock at " + where() + ": every live thread of the block waits at a barrier that cannot "
                   "complete (a __syncthreads in divergent code, or a shuffle waiting for a lane that never comes)");
}

inline std::unique_lock<std::mutex> lock_block(Block& b) {
  return b.fibers ? std::unique_lock<std::mutex>() : std::unique_lock<std::mutex>(b.mu);
}

// __syncthreads / _and / _or / _count: returns the reduction of pred over the live threads of the block.
inline void block_barrier(int pred, int* r_and, int* r_or, int* r_count) {
  Block& b = *self().blk;
  auto lk = lock_block(b);
  if (b.failed) throw Abort{};
  b.acc_and &= pred != 0;
  b.acc_or |= pred != 0;
  b.acc_count += pred != 0;
  ++b.arrived;
  ++b.blocked;
  const uint64_t g = b.gen;
  maybe_release_block(b);
  if (b.gen == g) {
    check_deadlock(b);
    park(b, lk, &b.gen, g);
  }
  const int p = static_cast<int>((g + 1) & 1);
  if (r_and) *r_and = b.res_and[p];
  if (r_or) *r_or = b.res_or[p];
  if (r_count) *r_count = b.res_count[p];
}

// A warp-synchronous exchange among the lanes of mask: each lane publishes v and gets the value of lane src.
inline uint64_t warp_exchange(unsigned mask, uint64_t v, int src, const char* op) {
  Thread& t = self();
  Block& b = *t.blk;
  const int lane = t.linear & 31;
  Warp& w = b.warps[t.linear >> 5];
  auto lk = lock_block(b);
  if (b.failed) throw Abort{};
  auto bad = [&](const std::string& why) {
    fail_locked(b, std::string(op) + " at " + where() + " (lane " + std::to_string(lane) + "): " + why);
    throw Abort{};
  };
  auto hexs = [](unsigned m) {
    char h[16];
    snprintf(h, sizeof h, "0x%08x", m);
    return std::string(h);
  };
  const std::string hex = (((mask >> lane) & 1u) && !(mask & ~w.present) && ((mask >> src) & 1u) &&
                           (w.arrived == 0 || w.mask == mask))
                              ? std::string()
                              : hexs(mask);  // formatted only for a fault
  if (!((mask >> lane) & 1u)) bad(std::string("the mask ") + hex + " does not name the calling lane");
  if ((mask & ~w.present) != 0u)
    bad(std::string("the mask ") + hex + " names lanes that do not exist or have exited");
  if (!((mask >> src) & 1u)) bad("the source lane " + std::to_string(src) + " is not in the mask " + hex);
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    bad(std::string("lanes of one warp shuffle with different masks, ") + hex + " and " + hexs(w.mask));
  }
  const uint64_t g = w.gen;
  const int p = static_cast<int>(g & 1);
  w.val[p][lane] = v;
  ++w.arrived;
  ++b.blocked;
  if (w.arrived == std::popcount(mask)) {
    b.blocked -= w.arrived;
    w.arrived = 0;
    ++w.gen;
    if (!b.fibers) b.cv.notify_all();
  } else {
    check_deadlock(b);
    park(b, lk, &w.gen, g);
  }
  return w.val[p][src];
}

// Under no lock: the thread leaves the kernel (returned, or unwound after a failure).
inline void thread_exit() {
  Thread& t = self();
  Block& b = *t.blk;
  auto lk = lock_block(b);
  --b.live;
  Warp& w = b.warps[t.linear >> 5];
  const int lane = t.linear & 31;
  w.present &= ~(1u << lane);
  if (b.failed) return;
  if (w.arrived > 0 && ((w.mask >> lane) & 1u)) {
    fail_locked(b, "lane " + std::to_string(lane) + " exited at " + where() +
                       " while the lanes of its warp wait for it in a shuffle");
    return;
  }
  maybe_release_block(b);  // an exited thread no longer holds a __syncthreads back (as on sm_70 and later)
  check_deadlock(b);
}

// ---- fibers (the default) ----
// A switch saves the callee-saved registers on the old stack and loads them from the new one: no system call
// (swapcontext also saves the signal mask, with a system call per switch). Other architectures use ucontext.
constexpr size_t kFiberStack = 256 * 1024;

#if defined(__x86_64__)
#define CUEMU_ASM_SWITCH 1
extern "C" void cuemu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .weak cuemu_switch
    .hidden cuemu_switch
    .type cuemu_switch, @function
cuemu_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size cuemu_switch, .-cuemu_switch
)");
#endif

struct Fiber {
#if defined(CUEMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;
  Thread th;
  bool done = false, waiting = false;
  const uint64_t* wait_gen = nullptr;
  uint64_t wait_val = 0;
};

struct FiberRun {
#if defined(CUEMU_ASM_SWITCH)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
};
inline FiberRun& fiber_run() {
  static FiberRun r;
  return r;
}

inline void to_scheduler(Fiber& f) {
#if defined(CUEMU_ASM_SWITCH)
  cuemu_switch(&f.sp, fiber_run().sched_sp);
#else
  swapcontext(&f.uc, &fiber_run().sched);
#endif
}

inline void to_fiber(Fiber& f) {
#if defined(CUEMU_ASM_SWITCH)
  cuemu_switch(&fiber_run().sched_sp, f.sp);
#else
  swapcontext(&fiber_run().sched, &f.uc);
#endif
}

[[noreturn]] inline void fiber_entry() {
  FiberRun& r = fiber_run();
  Fiber& f = *r.current;
  try {
    (*r.body)();
  } catch (const Abort&) {
  }
  thread_exit();
  f.done = true;
  to_scheduler(f);  // never resumed
  abort();
}

inline void start_fiber(Fiber& f) {
#if defined(CUEMU_ASM_SWITCH)
  // the stack as cuemu_switch leaves it: six saved registers, then the address it returns to (fiber_entry), then
  // a null return address for fiber_entry; at its entry rsp is 8 mod 16, as after a call
  // stacks are kFiberStack apart: without a different offset per fiber every stack top maps to the same cache set
  const size_t colour = (static_cast<size_t>(f.th.linear) * 4160) % (64 * 1024);
  auto* top = reinterpret_cast<void**>(f.stack + kFiberStack - colour);
  top[-1] = nullptr;
  top[-2] = reinterpret_cast<void*>(&fiber_entry);
  for (int k = 3; k <= 8; ++k) top[-k] = nullptr;
  f.sp = top - 8;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kFiberStack;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

inline void park(Block& b, std::unique_lock<std::mutex>& lk, const uint64_t* gen, uint64_t val) {
  if (b.fibers) {
    FiberRun& r = fiber_run();
    Fiber& f = *r.current;
    f.waiting = true;
    f.wait_gen = gen;
    f.wait_val = val;
    to_scheduler(f);
    f.waiting = false;
    if (b.failed) throw Abort{};
    return;
  }
  b.cv.wait(lk, [&] { return *gen != val || b.failed; });
  if (*gen == val && b.failed) throw Abort{};
}

inline void run_block_fibers(Block& b, const Thread& proto, const std::function<void()>& body) {
  FiberRun& r = fiber_run();
  const int n = b.nthreads;
  if (static_cast<int>(r.fibers.size()) < n) r.fibers.resize(n);
  r.body = &body;
  b.fibers = true;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    if (!f.stack) {
      void* p = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      f.stack = static_cast<char*>(p);
    }
    f.th = proto;
    f.th.linear = i;
    f.th.tid = {i % proto.bdim.x, (i / proto.bdim.x) % proto.bdim.y, i / (proto.bdim.x * proto.bdim.y)};
    f.done = f.waiting = false;
    start_fiber(f);
  }
  int done = 0;
  // even blocks run their threads in order, odd blocks in reverse order: thread 0 runs ahead of the others in one
  // block and the last thread in the next, so a read of a slot that a lower thread, or a higher one, writes
  // without a barrier in between sees stale data in one of them
  const bool forward = ((proto.bid.x + proto.bid.y + proto.bid.z) & 1u) == 0;
  while (done < n && !b.failed) {
    bool ran = false;
    done = 0;
    for (int k = 0; k < n && !b.failed; ++k) {
      Fiber& f = r.fibers[forward ? k : n - 1 - k];
      if (f.done) {
        ++done;
        continue;
      }
      if (f.waiting && *f.wait_gen == f.wait_val) continue;
      r.current = &f;
      tl_thread = &f.th;
      to_fiber(f);
      ran = true;
      if (f.done) ++done;
    }
    if (!ran && done < n && !b.failed) {  // check_deadlock should have caught this first
      set_error(cudaErrorLaunchFailure, "cuemu: no runnable thread in a block that has not finished");
      b.failed = true;
    }
  }
  // after a failure the unfinished fibers are abandoned (their frames hold no resources: kernels are plain code)
  tl_thread = nullptr;
}

// ---- one std::thread per CUDA thread (CUEMU_THREADS=1: the sanitizer builds) ----
inline void run_block_threads(Block& b, const Thread& proto, const std::function<void()>& body) {
  const int n = b.nthreads;
  std::vector<Thread> ths(n, proto);
  std::vector<std::thread> os;
  os.reserve(n);
  for (int i = 0; i < n; ++i) {
    ths[i].linear = i;
    ths[i].tid = {i % proto.bdim.x, (i / proto.bdim.x) % proto.bdim.y, i / (proto.bdim.x * proto.bdim.y)};
    os.emplace_back([&, i] {
      tl_thread = &ths[i];
      try {
        body();
      } catch (const Abort&) {
      }
      thread_exit();
      tl_thread = nullptr;
    });
  }
  for (auto& t : os) t.join();
}

inline bool use_threads() {
#if defined(CUEMU_THREADS)
  return true;
#else
  return false;
#endif
}

struct SharedVars {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> vars;
};
inline SharedVars& shared_vars() {
  static SharedVars v;
  return v;
}

// Fills every __shared__ variable with 0xFF (a GPU's shared memory holds whatever the previous block left).
inline void poison_shared() {
  std::lock_guard<std::mutex> g(shared_vars().mu);
  for (auto& [p, n] : shared_vars().vars) memset(p, 0xFF, n);
}

// Called once per __shared__ variable (a static's initialiser), the first time its kernel runs.
inline bool register_shared(void* p, size_t n) {
  std::lock_guard<std::mutex> g(shared_vars().mu);
  shared_vars().vars.emplace_back(p, n);
  memset(p, 0xFF, n);
  return true;
}

inline int check_config(dim3 g, dim3 bl, size_t shmem) {
  const unsigned long long nt = 1ull * bl.x * bl.y * bl.z;
  if (nt == 0 || nt > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64) return cudaErrorInvalidConfiguration;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (shmem > 48 * 1024) return cudaErrorInvalidValue;
  return 0;
}

inline void run_grid(dim3 g, dim3 bl, size_t shmem, const std::function<void()>& body) {
  if (const int err = check_config(g, bl, shmem)) {
    set_error(err, "cuemu: invalid launch configuration: grid (" + std::to_string(g.x) + "," + std::to_string(g.y) +
                       "," + std::to_string(g.z) + ") block (" + std::to_string(bl.x) + "," + std::to_string(bl.y) +
                       "," + std::to_string(bl.z) + ") dynamic shared " + std::to_string(shmem));
    return;
  }
  const unsigned long long blocks = 1ull * g.x * g.y * g.z;
  if (blocks > static_cast<unsigned long long>(state().max_blocks)) {
    set_error(cudaErrorLaunchOutOfResources,
              "cuemu: a grid of " + std::to_string(blocks) + " blocks is more than the emulation runs (" +
                  std::to_string(state().max_blocks) + ")");
    return;
  }
  {
    std::lock_guard<std::mutex> lg(state().mu);
    ++state().launches;
  }
  const int n = static_cast<int>(bl.x * bl.y * bl.z);
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        poison_shared();
        Block b;
        b.nthreads = b.live = n;
        b.warps.resize((n + 31) / 32);
        for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) {
          const int lanes = std::min(32, n - 32 * w);
          b.warps[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        }
        Thread proto{{0, 0, 0}, {x, y, z}, bl, g, 0, &b};
        if (use_threads())
          run_block_threads(b, proto, body);
        else
          run_block_fibers(b, proto, body);
        if (b.failed) return;  // the error is recorded; the rest of the grid does not run
      }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shmem;
  template <typename... A>
  void operator()(A&&... a) const {
    const std::tuple<std::decay_t<P>...> args(static_cast<P>(std::forward<A>(a))...);
    auto k = kernel;
    run_grid(grid, block, shmem, [&args, k] { std::apply(k, args); });  // each thread gets its own copy
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, shmem};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuemu: shuffles move at most 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

inline int lane_id() { return self().linear & 31; }

}  // namespace cuemu

// ---- the built-in variables ----
#define threadIdx (::cuemu::self().tid)
#define blockIdx (::cuemu::self().bid)
#define blockDim (::cuemu::self().bdim)
#define gridDim (::cuemu::self().gdim)
constexpr int warpSize = 32;

// ---- barriers ----
inline void __syncthreads() { ::cuemu::block_barrier(1, nullptr, nullptr, nullptr); }
inline int __syncthreads_and(int p) {
  int r;
  ::cuemu::block_barrier(p, &r, nullptr, nullptr);
  return r;
}
inline int __syncthreads_or(int p) {
  int r;
  ::cuemu::block_barrier(p, nullptr, &r, nullptr);
  return r;
}
inline int __syncthreads_count(int p) {
  int r;
  ::cuemu::block_barrier(p, nullptr, nullptr, &r);
  return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuemu::warp_exchange(mask, 0, ::cuemu::lane_id(), "__syncwarp");
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- warp shuffles (width a power of two up to 32, as CUDA requires) ----
namespace cuemu {
inline int shfl_width(int width, const char* op) {
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    Block& b = *self().blk;
    auto lk = lock_block(b);
    fail_locked(b, std::string(op) + ": width " + std::to_string(width) + " is not a power of two up to 32");
    throw Abort{};
  }
  return width;
}
}  // namespace cuemu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int w = ::cuemu::shfl_width(width, "__shfl_sync");
  const int lane = ::cuemu::lane_id();
  const int s = (lane & ~(w - 1)) + (src & (w - 1));
  return ::cuemu::from_bits<T>(::cuemu::warp_exchange(mask, ::cuemu::to_bits(v), s, "__shfl_sync"));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int w = ::cuemu::shfl_width(width, "__shfl_xor_sync");
  const int lane = ::cuemu::lane_id();
  int s = lane ^ lane_mask;
  if ((s & ~(w - 1)) > (lane & ~(w - 1))) s = lane;  // a later group of width lanes: the caller's own value
  return ::cuemu::from_bits<T>(::cuemu::warp_exchange(mask, ::cuemu::to_bits(v), s & 31, "__shfl_xor_sync"));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int w = ::cuemu::shfl_width(width, "__shfl_down_sync");
  const int lane = ::cuemu::lane_id();
  const int s = (lane & (w - 1)) + static_cast<int>(delta) < w ? lane + static_cast<int>(delta) : lane;
  return ::cuemu::from_bits<T>(::cuemu::warp_exchange(mask, ::cuemu::to_bits(v), s, "__shfl_down_sync"));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int w = ::cuemu::shfl_width(width, "__shfl_up_sync");
  const int lane = ::cuemu::lane_id();
  const int s = (lane & (w - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::cuemu::from_bits<T>(::cuemu::warp_exchange(mask, ::cuemu::to_bits(v), s, "__shfl_up_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  // every lane of the mask publishes its predicate; the ballot is read back lane by lane
  const int lane = ::cuemu::lane_id();
  (void)::cuemu::warp_exchange(mask, pred != 0, lane, "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) r |= (::cuemu::warp_exchange(mask, pred != 0, l, "__ballot_sync") ? 1u : 0u) << l;
  return r;
}

// ---- atomics (device scope; std::atomic_ref so that the thread mode is race-free and TSan-visible) ----
template <typename T>
T atomicAdd(T* p, T v) {
  std::atomic_ref<T> a(*p);
  if constexpr (std::is_floating_point_v<T>) {
    T old = a.load();
    while (!a.compare_exchange_weak(old, old + v)) {
    }
    return old;
  } else {
    return a.fetch_add(v);
  }
}
template <typename T>
T atomicSub(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

// ---- device math: CUDA's overloads of min/max (the float ones are C's fminf etc., in <math.h>) ----
#define CUEMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
CUEMU_MINMAX(int)
CUEMU_MINMAX(unsigned)
CUEMU_MINMAX(long)
CUEMU_MINMAX(unsigned long)
CUEMU_MINMAX(long long)
CUEMU_MINMAX(unsigned long long)
#undef CUEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }

// ---- float16 and bfloat16: 2-byte storage types with CUDA's conversions ----
struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(std::bit_cast<uint16_t>(static_cast<_Float16>(f))) {}
  operator float() const { return static_cast<float>(std::bit_cast<_Float16>(bits)); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2);
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---- the host runtime calls the launchers make ----
inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> g(::cuemu::state().mu);
  const int e = ::cuemu::state().last_error;
  ::cuemu::state().last_error = 0;
  return static_cast<cudaError_t>(e);
}
inline cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> g(::cuemu::state().mu);
  return static_cast<cudaError_t>(::cuemu::state().last_error);
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = ::cuemu::state().sms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int = 0, cudaStream_t = nullptr) {
  memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
