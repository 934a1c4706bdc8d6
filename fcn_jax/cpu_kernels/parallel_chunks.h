// ParallelChunks(pool, chunks, fn) runs fn(c) for c in [0, chunks) on the
// calling thread and on helpers scheduled on XLA:CPU's thread pool, the one
// that runs XLA's own ops. Chunks are taken from a shared counter, so a core
// busy with another op simply takes fewer of them, and a helper that starts
// after the last chunk was taken returns at once: the call waits only for
// chunks already running, never for a task still queued (XLA may run tasks on
// a pool of one thread, or on the caller). Spawning threads per call instead
// left a quarter of the step's core time idle.
#ifndef FCN_JAX_CPU_KERNELS_PARALLEL_CHUNKS_H_
#define FCN_JAX_CPU_KERNELS_PARALLEL_CHUNKS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace fcn_jax {

struct ChunkCounter {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable all_done;
};

// Takes chunks until none are left; returns after its last one is counted.
template <typename Fn>
void TakeChunks(ChunkCounter& counter, int64_t chunks, const Fn& fn) {
  int64_t finished = 0;
  for (int64_t c; (c = counter.next.fetch_add(1)) < chunks; ++finished) fn(c);
  if (finished == 0) return;
  std::lock_guard<std::mutex> lock(counter.mutex);
  counter.done += finished;
  if (counter.done == chunks) counter.all_done.notify_all();
}

template <typename Fn>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t chunks, const Fn& fn) {
  if (chunks <= 0) return;
  auto counter = std::make_shared<ChunkCounter>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    // fn is only called while chunks remain, i.e. while this call waits.
    pool.Schedule([counter, chunks, fn_ptr = &fn] {
      TakeChunks(*counter, chunks, *fn_ptr);
    });
  }
  TakeChunks(*counter, chunks, fn);
  std::unique_lock<std::mutex> lock(counter->mutex);
  counter->all_done.wait(lock, [&] { return counter->done == chunks; });
}

}  // namespace fcn_jax

#endif  // FCN_JAX_CPU_KERNELS_PARALLEL_CHUNKS_H_
