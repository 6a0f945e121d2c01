#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "lorart/common.h"

namespace lorart {
namespace detail {
namespace {

thread_local bool t_in_parallel = false;

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // leaked on purpose: no join at static destruction
    return *pool;
  }

  int num_threads() const { return nthreads_.load(); }
  void set_num_threads(int n) {
    std::lock_guard<std::mutex> run(run_mu_);
    nthreads_ = std::max(1, n);
  }

  // Runs fn(i) for i in [0, tasks) across the pool and the caller.
  void run(int tasks, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock()) {  // another caller is using the pool: do it inline
      for (int i = 0; i < tasks; ++i) fn(i);
      return;
    }
    ensure_workers(nthreads_.load() - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      pending_ = tasks;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Pool() {
    unsigned hc = std::thread::hardware_concurrency();
    nthreads_ = hc ? static_cast<int>(hc) : 1;
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back([this] { loop(); });
      workers_.back().detach();
    }
  }

  void work() {
    t_in_parallel = true;
    for (;;) {
      int i = next_.fetch_add(1);
      if (i >= tasks_) break;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
    t_in_parallel = false;
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen && fn_ != nullptr; });
        seen = generation_;
      }
      work();
    }
  }

  std::atomic<int> nthreads_{1};
  std::mutex run_mu_;  // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<int> tasks_{0};
  std::atomic<int> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  Pool& pool = Pool::get();
  int64_t max_chunks = (n + grain - 1) / grain;
  int threads = pool.num_threads();
  if (t_in_parallel || threads <= 1 || max_chunks <= 1) {
    fn(0, n);
    return;
  }
  int chunks = static_cast<int>(std::min<int64_t>(max_chunks, threads));
  int64_t per = (n + chunks - 1) / chunks;
  pool.run(chunks, [&](int c) {
    int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) fn(b, e);
  });
}

}  // namespace detail

void set_num_threads(int n) { detail::Pool::get().set_num_threads(n); }
int get_num_threads() { return detail::Pool::get().num_threads(); }

}  // namespace lorart
