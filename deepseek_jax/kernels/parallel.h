// A parallel loop over XLA's intra-op thread pool for the CPU kernels (latent_decode.cc,
// moe_decode.cc): items taken one at a time from a shared counter by the caller and
// num_threads - 1 pool tasks (the pool has a thread per core: the caller beside all of them
// would put three threads on two cores).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dsj {

// fn(i) for i in [0, n), each exactly once; returns when all have returned. A pool task that
// starts after the work ran out finds the counter past n and touches nothing else (it holds
// the counter through its own shared_ptr); fn is only called, so only dereferences what it
// captured, for an item some thread took, and the caller waits for every such item.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto next = std::make_shared<std::atomic<int64_t>>(0);
  auto done = std::make_shared<std::atomic<int64_t>>(0);
  auto work = [next, done, n, fn]() {
    for (int64_t i; (i = next->fetch_add(1)) < n;) {
      fn(i);
      done->fetch_add(1);
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t)
    pool.Schedule([next, n, work]() { if (next->load() < n) work(); });
  work();
  while (done->load() < n) std::this_thread::yield();
}

}  // namespace dsj
