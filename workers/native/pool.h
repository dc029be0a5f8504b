// A small thread pool for the decode kernels: workers spin briefly after each job, then sleep.
//
// Why not torch's OpenMP pool (at::parallel_for): its workers go to sleep between the many short
// kernel calls of a decode step, and waking them (a futex and an inter-processor interrupt; slow
// on a VM) costs more than a batch-1 GEMV takes. Here a worker keeps polling for the next job for
// up to kSpin after its last one, yielding the core to anything else runnable, so a decode step
// finds it awake, and an idle process has every worker asleep within that window.
//
// A job is cut into more chunks than threads and every thread, the caller included, takes the next
// chunk until none is left, so a worker that the OS has descheduled delays at most the one chunk it
// holds. One job at a time: a second caller while a job runs does its work alone on its own thread.
#pragma once
#include <pthread.h>
#include <sched.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace moeshard {

class SpinPool {
 public:
  using Range = std::function<void(int64_t, int64_t)>;
  // How long a worker polls after its last job: MOESHARD_NATIVE_SPIN_US, default 1000 (0: sleep at once).
  static std::chrono::microseconds spin_window() {
    static const std::chrono::microseconds w{[] {
      const char* v = std::getenv("MOESHARD_NATIVE_SPIN_US");
      return v && *v ? std::max(0L, std::strtol(v, nullptr, 10)) : 1000L;
    }()};
    return w;
  }
  static constexpr int64_t kChunksPerThread = 4;

  static SpinPool& get() {
    static SpinPool* pool = [] {
      auto* p = new SpinPool();   // never destroyed: detached workers may outlive static destructors
      pthread_atfork(nullptr, nullptr, [] { get().forget_after_fork(); });
      return p;
    }();
    return *pool;
  }

  // fn(begin, end) over [0, n) in chunks of at least `grain`, on up to `threads` threads (the
  // caller is one). Returns when every chunk is done.
  void run(int64_t n, int64_t grain, int threads, const Range& fn) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * kChunksPerThread, (n + grain - 1) / grain));
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (threads <= 1 || chunks == 1 || !busy.owns_lock()) {
      fn(0, n);
      return;
    }
    ensure_workers(threads - 1);
    job_ = &fn;
    job_n_ = n;
    job_chunks_ = chunks;
    job_helpers_ = threads - 1;      // workers past this many sit the job out (the thread count fell)
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(epoch << 32, std::memory_order_seq_cst);          // publishes the job: chunk 0 next
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    take_chunks(epoch);
    while (done_.load(std::memory_order_acquire) < chunks) sched_yield();
  }

 private:
  // Take and run chunks of job `epoch` until none is left (or another job has begun).
  void take_chunks(uint64_t epoch) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if ((t >> 32) != epoch || int64_t(t & 0xFFFFFFFFu) >= job_chunks_) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      const int64_t c = int64_t(t & 0xFFFFFFFFu);
      (*job_)(job_n_ * c / job_chunks_, job_n_ * (c + 1) / job_chunks_);
      done_.fetch_add(1, std::memory_order_release);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void ensure_workers(int want) {
    while (int(workers_.size()) < want) {
      const uint64_t seen = ticket_.load(std::memory_order_seq_cst) >> 32;   // before this job's epoch
      const int index = int(workers_.size());
      workers_.emplace_back([this, seen, index] { work(seen, index); });
      workers_.back().detach();
    }
  }

  void work(uint64_t seen, int index) {
    for (;;) {
      uint64_t e;
      auto start = std::chrono::steady_clock::now();
      int polls = 0;
      while ((e = ticket_.load(std::memory_order_acquire) >> 32) == seen) {
        if (++polls % 64 == 0) {
          if (std::chrono::steady_clock::now() - start > spin_window()) {
            std::unique_lock<std::mutex> lk(mu_);
            sleeping_.fetch_add(1, std::memory_order_seq_cst);
            cv_.wait(lk, [&] { return (ticket_.load(std::memory_order_seq_cst) >> 32) != seen; });
            sleeping_.fetch_sub(1, std::memory_order_seq_cst);
            start = std::chrono::steady_clock::now();
          } else {
            sched_yield();
          }
        }
        _mm_pause();
      }
      seen = e;
      if (index < job_helpers_) take_chunks(e);
    }
  }

  // The child of a fork has none of the parent's threads: start afresh (the old objects leak).
  void forget_after_fork() {
    new (&run_mu_) std::mutex();
    new (&mu_) std::mutex();
    new (&cv_) std::condition_variable();
    for (auto& t : workers_) new (&t) std::thread();
    workers_.clear();
    sleeping_.store(0);
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ticket_{0};   // epoch of the current job (high 32 bits), next chunk (low 32)
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  const Range* job_ = nullptr;
  int64_t job_n_ = 0, job_chunks_ = 1;
  int job_helpers_ = 0;
};

}  // namespace moeshard
