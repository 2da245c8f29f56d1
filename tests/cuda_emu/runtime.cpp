// The scheduler of the CUDA emulation (cuda_emu.h) and the runtime calls the
// launchers make. One OS thread: the threads of a block are ucontext fibers.
//
// A launch runs its blocks one at a time, in forward, reversed or shuffled order. In
// a block the scheduler repeatedly picks a runnable thread -- the lowest id, the
// highest, or a random one -- and runs it until it blocks or exits:
// - at __syncthreads(): released when every thread that has not exited waits there;
// - at a warp collective: released when every lane its mask names has arrived at the
//   same collective (same kind, source line and mask); then each gets its result.
// A lane named in a mask that has exited, lanes meeting at different collectives or
// barriers, or a block where nothing can run is a misuse: the launch stops and
// emu_error() says what happened (the Python test raises it).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

// The bounds of the __shared__ variables (cuda_emu.h), from the linker.
extern "C" char __start_emu_shared[] __attribute__((weak)), __stop_emu_shared[] __attribute__((weak));

namespace emu {

Thread* g_thread = nullptr;
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

enum Order { kForward = 0, kReversed = 1, kShuffled = 2 };
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 << 10, kGuardBytes = 4096;

int g_sms = 2;
// Plan-only mode: launches are recorded (grid and block), not run, and memsets do
// nothing, so the real launchers can be driven at users' sizes with no memory.
bool g_plan_only = false;
std::vector<std::array<unsigned, 6>> g_planned;
int g_thread_order = kForward, g_block_order = kForward;
std::mt19937_64 g_rng;
cudaError_t g_last = cudaSuccess;
std::string g_error;  // the first misuse; sticky until emu_configure
long long g_launches = 0;

ucontext_t g_scheduler;
ucontext_t g_contexts[kMaxThreads];
Thread g_threads[kMaxThreads];
char* g_stacks = nullptr;  // kMaxThreads stacks, each above a guard page
const std::function<void()>* g_body = nullptr;
int g_count = 0, g_exited = 0, g_at_barrier = 0, g_barrier_line = 0;
uint64_t g_ready[kMaxThreads / 64];  // runnable threads, a bit each
int g_ready_count = 0;

const char* op_name(Op op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync",    "__all_sync",       "__syncwarp"};
  return names[op];
}

template <typename... A>
void fail(const char* fmt, A... args) {
  if (!g_error.empty()) return;
  char what[512], where[160];
  std::snprintf(what, sizeof what, fmt, args...);
  std::snprintf(where, sizeof where, "block (%u, %u, %u) of grid (%u, %u, %u), block dim (%u, %u, %u): ",
                g_block_idx.x, g_block_idx.y, g_block_idx.z, g_grid_dim.x, g_grid_dim.y, g_grid_dim.z,
                g_block_dim.x, g_block_dim.y, g_block_dim.z);
  g_error = std::string(where) + what;
}

void make_runnable(int i) {
  g_threads[i].wait = Wait::kRunnable;
  g_ready[i >> 6] |= uint64_t(1) << (i & 63);
  ++g_ready_count;
}

// The next thread to run, by the policy; removed from the runnable set.
int pick() {
  const int words = kMaxThreads / 64;
  int w = 0;
  uint64_t bits = 0;
  if (g_thread_order == kForward) {
    while (!g_ready[w]) ++w;
    bits = g_ready[w] & -g_ready[w];  // lowest
  } else if (g_thread_order == kReversed) {
    w = words - 1;
    while (!g_ready[w]) --w;
    bits = uint64_t(1) << (63 - __builtin_clzll(g_ready[w]));  // highest
  } else {
    int r = static_cast<int>(g_rng() % static_cast<uint64_t>(g_ready_count));
    for (;; ++w) {
      const int c = __builtin_popcountll(g_ready[w]);
      if (r < c) break;
      r -= c;
    }
    bits = g_ready[w];
    while (r--) bits &= bits - 1;  // drop the r lowest
    bits &= -bits;
  }
  g_ready[w] &= ~bits;
  --g_ready_count;
  return w * 64 + __builtin_ctzll(bits);
}

// Every lane of `t`'s mask waits at t's collective: hand each its result.
void complete(int base, const Thread& t) {
  const unsigned mask = t.mask;
  unsigned votes = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1) && g_threads[base + l].in != 0) votes |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Thread& u = g_threads[base + l];
    const int w = u.width, seg = l & ~(w - 1);
    int src = l;
    switch (t.op) {
      case kShfl: src = seg + (u.arg & (w - 1)); break;
      case kShflUp: src = l - u.arg >= seg ? l - u.arg : l; break;
      case kShflDown: src = l + u.arg < seg + w ? l + u.arg : l; break;
      case kShflXor: src = (l ^ u.arg) < seg + w ? l ^ u.arg : l; break;
      case kBallot: u.out = votes; break;
      case kAny: u.out = votes != 0; break;
      case kAll: u.out = votes == mask; break;
      case kSyncwarp: break;
    }
    if (t.op <= kShflXor) {
      if (w < 1 || w > 32 || (w & (w - 1)) != 0)
        return fail("%s (line %d): width %d is not a power of two <= 32", op_name(t.op), t.line, w);
      if (!(mask >> src & 1))
        return fail("thread %d reads lane %d with %s (line %d), which mask 0x%08x leaves out", u.id, src,
                    op_name(t.op), t.line, mask);
      u.out = g_threads[base + src].in;
    }
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) make_runnable(base + l);
}

// After a lane of the warp at `base` arrived at a collective or exited: completes
// the collectives whose lanes have all arrived; reports a misuse.
void check_warp(int base) {
  const int end = std::min(base + 32, g_count);
  for (int i = base; i < end; ++i) {
    const Thread& t = g_threads[i];
    if (t.wait != Wait::kWarp) continue;
    if (!(t.mask >> (i - base) & 1))
      return fail("thread %d calls %s (line %d) with mask 0x%08x, which leaves out its own lane %d", i,
                  op_name(t.op), t.line, t.mask, i - base);
    bool all = true;
    for (int l = 0; l < 32; ++l) {
      if (!(t.mask >> l & 1)) continue;
      if (base + l >= g_count)
        return fail("thread %d calls %s (line %d) with mask 0x%08x, naming lane %d of a block of %d threads", i,
                    op_name(t.op), t.line, t.mask, l, g_count);
      const Thread& u = g_threads[base + l];
      if (u.wait == Wait::kExited)
        return fail("thread %d waits at %s (line %d) for lane %d (thread %d), which has exited", i,
                    op_name(t.op), t.line, l, base + l);
      if (u.wait == Wait::kWarp && (u.op != t.op || u.line != t.line || u.mask != t.mask))
        return fail("lanes of warp %d meet at different collectives: thread %d at %s (line %d, mask 0x%08x), "
                    "thread %d at %s (line %d, mask 0x%08x)",
                    base / 32, i, op_name(t.op), t.line, t.mask, base + l, op_name(u.op), u.line, u.mask);
      all = all && u.wait == Wait::kWarp;
    }
    if (all) complete(base, t);
  }
}

void check_barrier() {
  if (g_at_barrier == 0 || g_at_barrier + g_exited < g_count) return;
  for (int i = 0; i < g_count; ++i)
    if (g_threads[i].wait == Wait::kBarrier) make_runnable(i);
  g_at_barrier = 0;
}

std::string describe_waits() {
  std::string s;
  for (int i = 0, shown = 0; i < g_count && shown < 6; ++i) {
    const Thread& t = g_threads[i];
    if (t.wait == Wait::kExited) continue;
    char line[120];
    std::snprintf(line, sizeof line, "%sthread %d waits at %s (line %d)", shown++ ? "; " : "", i,
                  t.wait == Wait::kBarrier ? "__syncthreads" : op_name(t.op), t.line);
    s += line;
  }
  return s;
}

void entry() {
  (*g_body)();
  g_thread->wait = Wait::kExited;
}  // returns to g_scheduler (uc_link)

void run_block() {
  const dim3 d = g_block_dim;
  g_count = static_cast<int>(d.x * d.y * d.z);
  g_exited = g_at_barrier = 0;
  if (__start_emu_shared != nullptr) std::memset(__start_emu_shared, 0xFF, __stop_emu_shared - __start_emu_shared);
  std::fill(std::begin(g_ready), std::end(g_ready), 0);
  g_ready_count = 0;
  for (int i = 0; i < g_count; ++i) {
    g_threads[i] = Thread{};
    g_threads[i].idx = uint3{i % d.x, (i / d.x) % d.y, i / (d.x * d.y)};
    g_threads[i].id = i;
    ucontext_t& c = g_contexts[i];
    getcontext(&c);
    c.uc_stack.ss_sp = g_stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes;
    c.uc_stack.ss_size = kStackBytes;
    c.uc_link = &g_scheduler;
    makecontext(&c, entry, 0);
    make_runnable(i);
  }
  while (g_error.empty()) {
    if (g_ready_count == 0) {
      if (g_exited < g_count)
        fail("deadlock: no thread can run, %d of %d exited; %s", g_exited, g_count, describe_waits().c_str());
      return;
    }
    const int i = pick();
    g_thread = &g_threads[i];
    swapcontext(&g_scheduler, &g_contexts[i]);
    Thread& t = g_threads[i];
    if (t.wait == Wait::kExited) {
      ++g_exited;
      check_warp(i & ~31);
      check_barrier();
    } else if (t.wait == Wait::kBarrier) {
      if (g_at_barrier++ == 0) g_barrier_line = t.line;
      if (t.line != g_barrier_line)
        fail("threads wait at different __syncthreads: line %d and line %d", g_barrier_line, t.line);
      check_barrier();
    } else {
      check_warp(i & ~31);
    }
  }
}

}  // namespace

void suspend() {
  swapcontext(&g_contexts[g_thread->id], &g_scheduler);
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (!g_error.empty()) return;  // an earlier launch failed
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    g_last = cudaErrorInvalidConfiguration;
    return;
  }
  if (g_plan_only) {
    g_planned.push_back({grid.x, grid.y, grid.z, block.x, block.y, block.z});
    return;
  }
  if (g_stacks == nullptr) {
    const size_t slot = kStackBytes + kGuardBytes;
    void* p = mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return fail("cannot map the fiber stacks");
    g_stacks = static_cast<char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * slot, kGuardBytes, PROT_NONE);
  }
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (g_block_order == kReversed) std::reverse(blocks.begin(), blocks.end());
  if (g_block_order == kShuffled) std::shuffle(blocks.begin(), blocks.end(), g_rng);
  g_body = &body;
  g_grid_dim = grid;
  g_block_dim = block;
  for (const uint3& b : blocks) {
    g_block_idx = b;
    run_block();
    if (!g_error.empty()) {
      g_last = cudaErrorLaunchFailure;
      return;
    }
  }
  ++g_launches;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_error.empty() ? emu::g_last : cudaErrorLaunchFailure;
  emu::g_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::g_error.empty() ? emu::g_last : cudaErrorLaunchFailure; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (!emu::g_plan_only) std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::g_sms;
  return cudaSuccess;
}

// ---- control from Python (ctypes)

// order: 0 forward, 1 reversed, 2 shuffled (by `seed`); also clears any error.
extern "C" void emu_configure(int thread_order, int block_order, unsigned long long seed, int sms) {
  emu::g_thread_order = thread_order;
  emu::g_block_order = block_order;
  emu::g_rng.seed(seed);
  emu::g_sms = sms;
  emu::g_error.clear();
  emu::g_last = cudaSuccess;
}

extern "C" const char* emu_error() { return emu::g_error.c_str(); }

// Plan-only mode on or off (see g_plan_only); either way the recorded launches are cleared.
extern "C" void emu_plan_only(int on) {
  emu::g_plan_only = on != 0;
  emu::g_planned.clear();
}

extern "C" long long emu_planned_count() { return static_cast<long long>(emu::g_planned.size()); }

// out: grid x, y, z and block x, y, z of recorded launch i.
extern "C" void emu_planned(long long i, unsigned* out) {
  for (int j = 0; j < 6; ++j) out[j] = emu::g_planned[i][j];
}

extern "C" long long emu_launches() { return emu::g_launches; }
