// The CUDA emulator's runtime (see csrc/emu/README.md): mock devices, launch validation, the
// fiber scheduler that runs a thread block on the host, and the memory-access checker.
//
// This file is compiled WITHOUT instrumentation. The kernel files are compiled with
// -fsanitize=thread, which makes the compiler call __tsan_readN / __tsan_writeN before every
// memory access they make; the definitions below (instead of the ThreadSanitizer library, which
// is not linked) check each access while a kernel runs:
//   - global memory: inside a buffer the launch was given (described from the kernel's parameter
//     struct, rows and strides included), writable if written, naturally aligned;
//   - shared memory: inside what was allocated (static) or requested at launch (dynamic),
//     naturally aligned, and no other thread wrote it (or, for a write, read or wrote it) since
//     the last barrier of the block;
//   - the fiber's own stack: local memory, not checked.
// The first violation aborts the launch before the access happens; the launch then returns an
// error and fastkd_emu_last_error() says what, where and which thread.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#define FASTKD_CUDA_EMULATION 1
#include "cuda_runtime.h"

namespace emu {
namespace {

// ---- devices ----------------------------------------------------------------------------------
struct DeviceModel {
  const char* name;
  int cc_major, cc_minor, sms;
  int smem_per_sm, smem_optin, smem_default, smem_reserved;
  int regs_per_sm, regs_per_block, threads_per_sm, threads_per_block, blocks_per_sm;
};

// Published limits (CUDA C Programming Guide, "Compute capabilities"): A100 (8.0), H100 (9.0).
constexpr DeviceModel kA100{"A100", 8, 0, 108, 167936, 166912, 49152, 1024,
                            65536, 65536, 2048, 1024, 32};
constexpr DeviceModel kH100{"H100", 9, 0, 132, 233472, 232448, 49152, 1024,
                            65536, 65536, 2048, 1024, 32};

struct FuncAttr {
  int max_dynamic = 49152;
  int carveout = -1;
};

struct KernelResources {
  int regs = 0;
  int static_smem = 0;
};

struct State {
  std::mutex mu;
  std::vector<DeviceModel> devices{kA100, kH100};
  std::map<std::pair<int, const void*>, FuncAttr> attrs;
  std::map<std::string, KernelResources> resources;  // by short kernel name, per device arch
  bool execute = true;
  std::string launch_log;
  std::string last_error_msg;
};

State& state() {
  static State s;
  return s;
}

thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;

// "void emu::kernel_name() [with auto K = ns::kern<false, 512, 2>]" -> "kern<false, 512, 2>"
std::string short_name(const char* pretty) {
  std::string s(pretty);
  size_t a = s.find("K = ");
  if (a == std::string::npos) return s;
  s = s.substr(a + 4);
  if (!s.empty() && s.back() == ']') s.pop_back();
  if (!s.empty() && s[0] == '&') s = s.substr(1);
  // Drop the namespaces: the last "::" outside template brackets.
  int depth = 0;
  size_t cut = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    else if (s[i] == '>') --depth;
    else if (depth == 0 && s[i] == ':' && s[i + 1] == ':') cut = i + 2;
  }
  return s.substr(cut);
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// ---- the running grid ---------------------------------------------------------------------------
enum class FState { Ready, Barrier, Warp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable part [stack, stack + kStack)
  dim3 tid;
  int rank = 0;
  FState st = FState::Ready;
  int line = 0;  // of the barrier / shuffle it waits at
};

struct Warp {
  unsigned arrived = 0, mask = 0;
  int line = 0;
  int kind = 0, width = 32;
  uint32_t val[32];
  int arg[32];
  uint32_t res[32];
};

struct Region {
  const char* base;
  int64_t extent;
  int64_t n[3], s[3];  // dims (bytes strides), outermost first; n = 1 where unused
  int elem;
  bool writable;
  std::string what;
};

constexpr size_t kStack = 256 * 1024;
constexpr size_t kPage = 4096;
constexpr size_t kSharedArena = 256 * 1024;

struct Grid {
  LaunchSpec spec{};
  std::string name;
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Region> regions;
  ucontext_t sched;
  Fiber* cur = nullptr;
  dim3 bid;
  bool aborted = false;
  cudaError_t error = cudaSuccess;
  std::string message;
  int done = 0;
  int bar_arrived = 0, bar_line = 0;
  uint64_t epoch = 1;  // grows across blocks and launches: stale shadow entries never match
  // shared memory
  char* static_arena = nullptr;
  char* dyn_arena = nullptr;
  size_t static_used = 0;
  std::vector<std::pair<const void*, size_t>> static_keys;
  std::vector<uint64_t> shadow_w, shadow_r;  // per byte: (epoch << 16) | (rank + 1)
  int64_t max_static_seen = 0;
};

Grid* g_grid = nullptr;    // set while a launch runs (launches are serialised by g_run_mu)
std::mutex g_run_mu;
char* g_stacks = nullptr;  // 1024 stacks, each below a guard page
char* g_arena = nullptr;   // static + dynamic shared arenas
std::vector<uint64_t> g_shadow_w, g_shadow_r;
uint64_t g_epoch = 1;

void ensure_memory() {
  if (g_stacks != nullptr) return;
  const size_t per = kStack + kPage;
  g_stacks = static_cast<char*>(mmap(nullptr, per * 1024, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (g_stacks == MAP_FAILED) {
    perror("fastkd emu: mmap of the fiber stacks");
    abort();
  }
  for (int i = 0; i < 1024; ++i) mprotect(g_stacks + i * per, kPage, PROT_NONE);
  g_arena = static_cast<char*>(aligned_alloc(4096, 2 * kSharedArena));
  g_shadow_w.assign(2 * kSharedArena, 0);
  g_shadow_r.assign(2 * kSharedArena, 0);
}

[[noreturn]] void fail_in_fiber(cudaError_t err, const std::string& msg);

void fail(cudaError_t err, const std::string& msg) {
  Grid& g = *g_grid;
  if (g.aborted) return;
  g.aborted = true;
  g.error = err;
  std::string who;
  if (g.cur != nullptr)
    who = format(" [block (%u,%u,%u) thread (%u,%u,%u)]", g.bid.x, g.bid.y, g.bid.z, g.cur->tid.x,
                 g.cur->tid.y, g.cur->tid.z);
  g.message = g.name + ": " + msg + who;
}

[[noreturn]] void fail_in_fiber(cudaError_t err, const std::string& msg) {
  fail(err, msg);
  Grid& g = *g_grid;
  Fiber* f = g.cur;
  swapcontext(&f->ctx, &g.sched);
  // An aborted launch never resumes its fibers.
  abort();
}

void yield_to_scheduler() {
  Grid& g = *g_grid;
  Fiber* f = g.cur;
  swapcontext(&f->ctx, &g.sched);
  if (g.aborted) abort();  // unreachable: aborted fibers are not resumed
}

// ---- access checks -----------------------------------------------------------------------------
bool in_region(const Region& r, int64_t off, int size) {
  // Decompose off over the dims (outermost first); the innermost contiguous run may hold a
  // vector access spanning several elements.
  for (int d = 0; d < 3; ++d) {
    if (r.n[d] == 1) continue;
    const int64_t s = r.s[d];
    if (s == 0) continue;  // a broadcast dimension: every index is the same element
    const bool innermost = d == 2 || [&] {
      for (int e = d + 1; e < 3; ++e)
        if (r.n[e] != 1) return false;
      return true;
    }();
    if (innermost && s == r.elem) return off + size <= r.n[d] * s;
    const int64_t idx = off / s;
    if (idx >= r.n[d]) return false;
    off -= idx * s;
  }
  return off + size <= r.elem;
}

void check_shared(char* base, size_t limit, size_t off, int size, bool write, bool dynamic) {
  Grid& g = *g_grid;
  if (off + size > limit) {
    if (dynamic)
      fail_in_fiber(cudaErrorIllegalAddress,
                    format("%s of %d bytes at dynamic shared offset %zu, beyond the %zu bytes "
                           "the launch requested",
                           write ? "write" : "read", size, off, limit));
    fail_in_fiber(cudaErrorIllegalAddress,
                  format("%s of %d bytes at static shared offset %zu, beyond the %zu bytes "
                         "allocated",
                         write ? "write" : "read", size, off, limit));
  }
  if ((off % size) != 0 && (size == 2 || size == 4 || size == 8 || size == 16))
    fail_in_fiber(cudaErrorMisalignedAddress,
                  format("misaligned %d-byte shared %s at offset %zu", size,
                         write ? "write" : "read", off));
  const size_t sh = (base == g.dyn_arena ? kSharedArena : 0) + off;
  const uint64_t me = (g_epoch << 16) | static_cast<uint64_t>(g.cur->rank + 1);
  for (int b = 0; b < size; ++b) {
    uint64_t& w = g_shadow_w[sh + b];
    uint64_t& r = g_shadow_r[sh + b];
    const bool w_now = (w >> 16) == g_epoch && w != me;
    if (w_now)
      fail_in_fiber(cudaErrorLaunchFailure,
                    format("shared-memory race: %s of %s byte %zu, written by thread rank %d "
                           "since the last barrier (line %d)",
                           write ? "write" : "read", dynamic ? "dynamic shared" : "shared",
                           off + b, static_cast<int>(w & 0xffff) - 1, g.bar_line));
    if (write) {
      if ((r >> 16) == g_epoch && r != me)
        fail_in_fiber(cudaErrorLaunchFailure,
                      format("shared-memory race: write of %s byte %zu, read by thread rank %d "
                             "since the last barrier",
                             dynamic ? "dynamic shared" : "shared", off + b,
                             (r & 0xffff) == 0xffff ? -1 : static_cast<int>(r & 0xffff) - 1));
      w = me;
    } else {
      if ((r >> 16) != g_epoch) r = me;
      else if (r != me) r = (g_epoch << 16) | 0xffff;  // several readers
    }
  }
}

void check_access(const void* addr, int size, bool write, bool vector_hint) {
  Grid* gp = g_grid;
  if (gp == nullptr || gp->cur == nullptr) return;  // host code of the launcher: not checked
  Grid& g = *gp;
  const char* a = static_cast<const char*>(addr);
  Fiber* f = g.cur;
  if (a >= f->stack && a < f->stack + kStack) return;  // local memory
  if (a >= g.static_arena && a < g.static_arena + kSharedArena) {
    check_shared(g.static_arena, g.static_used, a - g.static_arena, size, write, false);
    return;
  }
  if (a >= g.dyn_arena && a < g.dyn_arena + kSharedArena) {
    check_shared(g.dyn_arena, g.spec.dynamic_smem, a - g.dyn_arena, size, write, true);
    return;
  }
  for (const Region& r : g.regions) {
    if (a < r.base || a >= r.base + r.extent) continue;
    const int64_t off = a - r.base;
    if (!in_region(r, off, size))
      fail_in_fiber(cudaErrorIllegalAddress,
                    format("%s of %d bytes at byte %lld of %s falls outside its elements",
                           write ? "write" : "read", size, static_cast<long long>(off),
                           r.what.c_str()));
    if (write && !r.writable)
      fail_in_fiber(cudaErrorIllegalAddress,
                    format("write to the read-only %s (byte %lld)", r.what.c_str(),
                           static_cast<long long>(off)));
    if ((reinterpret_cast<uintptr_t>(a) % size) != 0 &&
        (size == 2 || size == 4 || size == 8 || size == 16))
      fail_in_fiber(cudaErrorMisalignedAddress,
                    format("misaligned %d-byte %s of %s at byte %lld%s", size,
                           write ? "write" : "read", r.what.c_str(), static_cast<long long>(off),
                           vector_hint ? " (vector access)" : ""));
    return;
  }
  // Nearest buffer, for the message.
  std::string near = "no buffer";
  int64_t best = INT64_MAX;
  for (const Region& r : g.regions) {
    const int64_t d = a < r.base ? r.base - a : a - (r.base + r.extent);
    if (d < best) {
      best = d;
      if (a >= r.base && d == 0) near = "right after the end of " + r.what;
      else near = format("%lld bytes %s %s", static_cast<long long>(d),
                         a < r.base ? "before" : "after the end of", r.what.c_str());
    }
  }
  fail_in_fiber(cudaErrorIllegalAddress,
                format("%s of %d bytes outside every buffer of the launch (%s)",
                       write ? "write" : "read", size, near.c_str()));
}

// ---- fibers ------------------------------------------------------------------------------------
void fiber_main(unsigned lo, unsigned hi);

void (*g_thunk)(void*) = nullptr;
void* g_thunk_ctx = nullptr;

void fiber_main(unsigned, unsigned) {
  Grid& g = *g_grid;
  g_thunk(g_thunk_ctx);
  Fiber* f = g.cur;
  f->st = FState::Done;
  ++g.done;
  // A thread that leaves while others wait at a barrier, or while its warp waits at a shuffle
  // that names it, is a bug the GPU punishes with a hang or garbage.
  if (g.bar_arrived > 0)
    fail(cudaErrorLaunchFailure,
         format("thread exited while %d thread(s) wait at __syncthreads (line %d): a barrier not "
                "reached by every thread of the block",
                g.bar_arrived, g.bar_line));
  const Warp& w = g.warps[f->rank / 32];
  if (!g.aborted && w.arrived != 0 && ((w.mask >> (f->rank % 32)) & 1u))
    fail(cudaErrorLaunchFailure,
         format("lane %d exited while its warp waits at a shuffle (line %d) whose mask names it",
                f->rank % 32, w.line));
  swapcontext(&f->ctx, &g.sched);
  abort();
}

std::string describe_wait(const Grid& g) {
  std::string out;
  int shown = 0;
  for (const Fiber& f : g.fibers) {
    if (f.st == FState::Done || shown >= 4) continue;
    out += format("%s thread rank %d waits at %s (line %d)", shown ? ";" : "", f.rank,
                  f.st == FState::Barrier ? "__syncthreads" : "a shuffle", f.line);
    ++shown;
  }
  return out;
}

void run_block(Grid& g) {
  const int n = g.threads;
  g.done = 0;
  g.bar_arrived = 0;
  g.static_used = 0;
  g.static_keys.clear();
  ++g_epoch;
  for (Warp& w : g.warps) w = Warp{};
  // Shared memory starts as garbage on a GPU: NaN bytes make a read before a write visible.
  memset(g.static_arena, 0xff, std::min<size_t>(kSharedArena, g.max_static_seen + 256));
  memset(g.dyn_arena, 0xff, g.spec.dynamic_smem);
  for (int r = 0; r < n; ++r) {
    Fiber& f = g.fibers[r];
    f.rank = r;
    f.tid = dim3(r % g.spec.block.x, (r / g.spec.block.x) % g.spec.block.y,
                 r / (g.spec.block.x * g.spec.block.y));
    f.st = FState::Ready;
    f.stack = g_stacks + r * (kStack + kPage) + kPage;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 2, 0u, 0u);
  }
  while (!g.aborted && g.done < n) {
    bool progress = false;
    for (int r = 0; r < n && !g.aborted; ++r) {
      Fiber& f = g.fibers[r];
      if (f.st != FState::Ready) continue;
      g.cur = &f;
      swapcontext(&g.sched, &f.ctx);
      g.cur = nullptr;
      progress = true;
    }
    if (!progress && !g.aborted && g.done < n) {
      fail(cudaErrorLaunchFailure,
           format("deadlock: %d of %d threads exited and the others wait: %s", g.done, n,
                  describe_wait(g).c_str()));
    }
  }
  g.max_static_seen = std::max<int64_t>(g.max_static_seen, g.static_used);
}

}  // namespace

// ---- device API ---------------------------------------------------------------------------------
dim3 thread_idx() { return g_grid->cur->tid; }
dim3 block_idx() { return g_grid->bid; }
dim3 block_dim() { return g_grid->spec.block; }
dim3 grid_dim() { return g_grid->spec.grid; }

void syncthreads(int line) {
  Grid& g = *g_grid;
  Fiber* f = g.cur;
  if (g.done > 0)
    fail_in_fiber(cudaErrorLaunchFailure,
                  format("__syncthreads (line %d) after %d thread(s) of the block exited: a "
                         "barrier not reached by every thread",
                         line, g.done));
  const Warp& w = g.warps[f->rank / 32];
  if (w.arrived != 0)
    fail_in_fiber(cudaErrorLaunchFailure,
                  format("__syncthreads (line %d) while lanes of its warp wait at a shuffle "
                         "(line %d)",
                         line, w.line));
  if (g.bar_arrived == 0) {
    g.bar_line = line;
  } else if (g.bar_line != line) {
    fail_in_fiber(cudaErrorLaunchFailure,
                  format("threads of one block at different __syncthreads (lines %d and %d)",
                         g.bar_line, line));
  }
  if (++g.bar_arrived == g.threads) {
    g.bar_arrived = 0;
    ++g_epoch;
    for (Fiber& o : g.fibers)
      if (o.st == FState::Barrier) o.st = FState::Ready;
    return;
  }
  f->st = FState::Barrier;
  f->line = line;
  yield_to_scheduler();
}

uint32_t shfl(unsigned mask, uint32_t bits, int arg, int kind, int width, int line) {
  Grid& g = *g_grid;
  Fiber* f = g.cur;
  const int lane = f->rank % 32;
  const int wbase = f->rank - lane;
  Warp& w = g.warps[f->rank / 32];
  if (width != 32) fail_in_fiber(cudaErrorLaunchFailure, "the emulator supports shuffles of width 32 only");
  if (!((mask >> lane) & 1u))
    fail_in_fiber(cudaErrorLaunchFailure,
                  format("lane %d executes a shuffle (line %d) whose mask 0x%08x does not name it",
                         lane, line, mask));
  // A lane named in the mask must exist and must not have exited.
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    if (wbase + l >= g.threads || g.fibers[wbase + l].st == FState::Done)
      fail_in_fiber(cudaErrorLaunchFailure,
                    format("shuffle (line %d) with mask 0x%08x names lane %d, which %s", line, mask,
                           l, wbase + l >= g.threads ? "does not exist" : "has exited"));
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.line = line;
    w.kind = kind;
  } else if (w.mask != mask || w.line != line || w.kind != kind) {
    fail_in_fiber(cudaErrorLaunchFailure,
                  format("lanes of one warp at different shuffles (line %d mask 0x%08x, line %d "
                         "mask 0x%08x)",
                         w.line, w.mask, line, mask));
  }
  w.val[lane] = bits;
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    for (int l = 0; l < 32; ++l) {
      if (!((w.mask >> l) & 1u)) continue;
      int src;
      switch (w.kind) {
        case 0: src = l ^ w.arg[l]; break;
        case 1: src = l + w.arg[l] < 32 ? l + w.arg[l] : l; break;
        case 2: src = l - w.arg[l] >= 0 ? l - w.arg[l] : l; break;
        default: src = w.arg[l] & 31; break;
      }
      if (src < 0 || src > 31 || !((w.mask >> src) & 1u))
        fail_in_fiber(cudaErrorLaunchFailure,
                      format("lane %d reads lane %d in a shuffle (line %d) that does not name it",
                             l, src, w.line));
      w.res[l] = w.val[src];
    }
    w.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (wbase + l < g.threads && g.fibers[wbase + l].st == FState::Warp)
        g.fibers[wbase + l].st = FState::Ready;
    return w.res[lane];
  }
  f->st = FState::Warp;
  f->line = line;
  yield_to_scheduler();
  return w.res[lane];
}

void* shared_static(const void* key, size_t bytes, size_t align) {
  Grid& g = *g_grid;
  for (auto& [k, off] : g.static_keys)
    if (k == key) return g.static_arena + off;
  size_t off = (g.static_used + align - 1) / align * align;
  if (off + bytes > kSharedArena) fail_in_fiber(cudaErrorLaunchOutOfResources, "static shared memory over 256 KiB");
  g.static_keys.emplace_back(key, off);
  g.static_used = off + bytes;
  return g.static_arena + off;
}

void* shared_dynamic() { return g_grid->dyn_arena; }

void vector_access(const void* p, int bytes, bool write) { check_access(p, bytes, write, true); }

// ---- launches -------------------------------------------------------------------------------------
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (t_device < 0 || t_device >= static_cast<int>(s.devices.size())) return cudaErrorInvalidDevice;
  const DeviceModel& d = s.devices[t_device];
  FuncAttr& fa = s.attrs[{t_device, func}];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    // The runtime refuses more than the opt-in maximum minus the kernel's static shared memory.
    // The static size comes from the resource table when the test registered it.
    if (value < 0 || value > d.smem_optin) return cudaErrorInvalidValue;
    fa.max_dynamic = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100) return cudaErrorInvalidValue;
    fa.carveout = value;
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

namespace {
Grid* g_pending = nullptr;  // the launch begun by begin_launch, until run_grid

cudaError_t validate(const LaunchSpec& sp, const std::string& name, int& regs, int& static_smem) {
  State& s = state();
  if (t_device < 0 || t_device >= static_cast<int>(s.devices.size())) return cudaErrorInvalidDevice;
  const DeviceModel& d = s.devices[t_device];
  const dim3 b = sp.block, gr = sp.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      threads > static_cast<uint64_t>(d.threads_per_block))
    return cudaErrorInvalidConfiguration;
  if (gr.x == 0 || gr.y == 0 || gr.z == 0 || gr.x > 2147483647u || gr.y > 65535 || gr.z > 65535)
    return cudaErrorInvalidConfiguration;
  auto it = s.attrs.find({t_device, sp.func});
  const FuncAttr fa = it == s.attrs.end() ? FuncAttr{} : it->second;
  const std::string key = name + "@sm_" + std::to_string(d.cc_major * 10 + d.cc_minor);
  auto rt = s.resources.find(key);
  regs = rt == s.resources.end() ? 0 : rt->second.regs;
  static_smem = rt == s.resources.end() ? 0 : rt->second.static_smem;
  if (sp.dynamic_smem > static_cast<size_t>(fa.max_dynamic)) return cudaErrorInvalidValue;
  if (sp.dynamic_smem + static_smem > static_cast<size_t>(d.smem_optin)) return cudaErrorInvalidValue;
  // Registers are allocated per warp in units of 256.
  const uint64_t warps = (threads + 31) / 32;
  const uint64_t per_warp = (static_cast<uint64_t>(regs) * 32 + 255) / 256 * 256;
  if (regs > 255 || warps * per_warp > static_cast<uint64_t>(d.regs_per_block))
    return cudaErrorLaunchOutOfResources;
  return cudaSuccess;
}
}  // namespace

bool begin_launch(const LaunchSpec& spec) {
  State& s = state();
  const std::string name = short_name(spec.name);
  int regs = 0, static_smem = 0;
  cudaError_t e;
  bool execute;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    e = validate(spec, name, regs, static_smem);
    execute = s.execute;
    s.launch_log += format(
        "{\"kernel\": \"%s\", \"device\": %d, \"arch\": \"%s\", \"grid\": [%u, %u, %u], "
        "\"block\": [%u, %u, %u], \"dynamic_smem\": %zu, \"status\": %d}\n",
        name.c_str(), t_device,
        t_device >= 0 && t_device < static_cast<int>(s.devices.size()) ? s.devices[t_device].name : "?",
        spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y, spec.block.z,
        spec.dynamic_smem, static_cast<int>(e));
    if (e != cudaSuccess)
      s.last_error_msg = format("%s: launch refused by the mock runtime (%s)", name.c_str(),
                                cudaGetErrorString(e));
  }
  if (e != cudaSuccess) {
    t_last_error = e;
    return false;
  }
  if (!execute) return false;
  g_run_mu.lock();  // released by run_grid
  ensure_memory();
  Grid* g = new Grid();
  g->spec = spec;
  g->name = name;
  g->threads = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  g->fibers.resize(g->threads);
  g->warps.resize((g->threads + 31) / 32);
  g->static_arena = g_arena;
  g->dyn_arena = g_arena + kSharedArena;
  g_pending = g;
  return true;
}

void add_region(const void* base, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t n2,
                int64_t s2, int elem, bool writable, const char* what) {
  Grid* g = g_pending;
  if (g == nullptr || base == nullptr || n0 <= 0 || n1 <= 0 || n2 <= 0) return;
  Region r;
  r.base = static_cast<const char*>(base);
  r.n[0] = n0; r.s[0] = s0 * elem;
  r.n[1] = n1; r.s[1] = s1 * elem;
  r.n[2] = n2; r.s[2] = s2 * elem;
  r.elem = elem;
  r.extent = elem;
  for (int d = 0; d < 3; ++d) r.extent += (r.n[d] - 1) * r.s[d];
  r.writable = writable;
  r.what = what;
  g->regions.push_back(r);
}

void run_grid(void (*thunk)(void*), void* ctx, size_t ctx_bytes) {
  Grid* gp = g_pending;
  g_pending = nullptr;
  Grid& g = *gp;
  // The kernel arguments (copied by value into each thread) are read-only memory.
  {
    Region r;
    r.base = static_cast<const char*>(ctx);
    r.n[0] = r.n[1] = 1;
    r.n[2] = static_cast<int64_t>(ctx_bytes);
    r.s[0] = r.s[1] = 0;
    r.s[2] = 1;
    r.elem = 1;
    r.extent = static_cast<int64_t>(ctx_bytes);
    r.writable = false;
    r.what = "kernel arguments";
    g.regions.push_back(r);
  }
  g_thunk = thunk;
  g_thunk_ctx = ctx;
  g_grid = &g;
  const dim3 gr = g.spec.grid;
  for (unsigned z = 0; z < gr.z && !g.aborted; ++z)
    for (unsigned y = 0; y < gr.y && !g.aborted; ++y)
      for (unsigned x = 0; x < gr.x && !g.aborted; ++x) {
        g.bid = dim3(x, y, z);
        run_block(g);
      }
  g_grid = nullptr;
  if (g.aborted) {
    t_last_error = g.error;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    s.last_error_msg = g.message;
  }
  delete gp;
  g_run_mu.unlock();
}

}  // namespace emu

// ---- runtime API ----------------------------------------------------------------------------------
using emu::state;
using emu::t_device;
using emu::t_last_error;

cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (device < 0 || device >= static_cast<int>(state().devices.size())) return cudaErrorInvalidDevice;
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  std::lock_guard<std::mutex> lock(state().mu);
  *count = static_cast<int>(state().devices.size());
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (device < 0 || device >= static_cast<int>(state().devices.size())) return cudaErrorInvalidDevice;
  const emu::DeviceModel& d = state().devices[device];
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = d.threads_per_block; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_default; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.threads_per_sm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = d.regs_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = d.blocks_per_sm; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = d.smem_reserved; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return t_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// ---- the instrumentation hooks ---------------------------------------------------------------------
extern "C" {
#define FKD_EMU_HOOKS(N)                                                                              \
  void __tsan_read##N(void* a) { emu::check_access(a, N, false, N == 16); }                          \
  void __tsan_write##N(void* a) { emu::check_access(a, N, true, N == 16); }                          \
  void __tsan_unaligned_read##N(void* a) { emu::check_access(a, N, false, N == 16); }                \
  void __tsan_unaligned_write##N(void* a) { emu::check_access(a, N, true, N == 16); }                \
  void __tsan_volatile_read##N(void* a) { emu::check_access(a, N, false, N == 16); }                 \
  void __tsan_volatile_write##N(void* a) { emu::check_access(a, N, true, N == 16); }
FKD_EMU_HOOKS(1)
FKD_EMU_HOOKS(2)
FKD_EMU_HOOKS(4)
FKD_EMU_HOOKS(8)
FKD_EMU_HOOKS(16)
#undef FKD_EMU_HOOKS
// The compiler reports aggregate copies (a uint2 / uint4 load or store) as ranges; in kernel code
// those are vector accesses, which the GPU requires to be aligned to their size.
void __tsan_read_range(void* a, unsigned long n) {
  if (n == 2 || n == 4 || n == 8 || n == 16) {
    emu::check_access(a, static_cast<int>(n), false, n >= 8);
    return;
  }
  for (unsigned long i = 0; i < n; ++i) emu::check_access(static_cast<char*>(a) + i, 1, false, false);
}
void __tsan_write_range(void* a, unsigned long n) {
  if (n == 2 || n == 4 || n == 8 || n == 16) {
    emu::check_access(a, static_cast<int>(n), true, n >= 8);
    return;
  }
  for (unsigned long i = 0; i < n; ++i) emu::check_access(static_cast<char*>(a) + i, 1, true, false);
}
// Atomics of host code in the kernel files (the launchers' once-per-device flags).
#define FKD_EMU_ATOMICS(B, T)                                                                     \
  T __tsan_atomic##B##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##B##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##B##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##B##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##B##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##B##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
  }
FKD_EMU_ATOMICS(8, uint8_t)
FKD_EMU_ATOMICS(32, uint32_t)
FKD_EMU_ATOMICS(64, uint64_t)
#undef FKD_EMU_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}

// ---- C API for the tests ----------------------------------------------------------------------------
extern "C" {

int fastkd_emu_configure(const char* devices) {
  std::lock_guard<std::mutex> lock(state().mu);
  std::vector<emu::DeviceModel> out;
  std::string s(devices == nullptr ? "" : devices);
  size_t a = 0;
  while (a <= s.size()) {
    size_t b = s.find(',', a);
    if (b == std::string::npos) b = s.size();
    const std::string tok = s.substr(a, b - a);
    if (tok == "a100") out.push_back(emu::kA100);
    else if (tok == "h100") out.push_back(emu::kH100);
    else if (!tok.empty()) return -1;
    a = b + 1;
  }
  if (out.empty()) return -1;
  state().devices = out;
  state().attrs.clear();
  return static_cast<int>(out.size());
}

int fastkd_emu_set_device(int device) { return static_cast<int>(cudaSetDevice(device)); }

// cudaDeviceGetAttribute of a mock device (-1 if unknown), so the tests read the limits the
// runtime enforces instead of restating them.
int fastkd_emu_device_attribute(int device, int attr) {
  int v = -1;
  if (cudaDeviceGetAttribute(&v, static_cast<cudaDeviceAttr>(attr), device) != cudaSuccess) return -1;
  return v;
}

void fastkd_emu_set_execute(int execute) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().execute = execute != 0;
}

void fastkd_emu_set_resources(const char* kernel_at_arch, int regs, int static_smem) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().resources[kernel_at_arch] = emu::KernelResources{regs, static_smem};
}

// Newline-separated JSON objects, one per launch since the last call (then cleared).
const char* fastkd_emu_take_launch_log() {
  static thread_local std::string out;
  std::lock_guard<std::mutex> lock(state().mu);
  out.swap(state().launch_log);
  state().launch_log.clear();
  return out.c_str();
}

const char* fastkd_emu_last_error() {
  static thread_local std::string out;
  std::lock_guard<std::mutex> lock(state().mu);
  out = state().last_error_msg;
  return out.c_str();
}

}  // extern "C"
