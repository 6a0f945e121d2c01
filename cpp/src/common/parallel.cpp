#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "lorart/common.h"

namespace lorart {
namespace detail {
namespace {

thread_local bool t_in_parallel = false;

// Each parallel region is a Job owned by shared_ptr: a worker that wakes late holds
// the job it was woken for, never the next one, so a task can neither run twice nor
// run after its region has returned.
struct Job {
  const std::function<void(int)>* fn = nullptr;
  int tasks = 0;
  std::atomic<int> next{0};
  std::atomic<int> pending{0};
  std::mutex mu;
  std::condition_variable done;
  std::exception_ptr error;

  void work() {
    const bool outer = t_in_parallel;
    t_in_parallel = true;
    for (;;) {
      int i = next.fetch_add(1);
      if (i >= tasks) break;
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu);
        if (!error) error = std::current_exception();
      }
      if (pending.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(mu);
        done.notify_all();
      }
    }
    t_in_parallel = outer;
  }
};

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
    int helpers = std::min(tasks, nthreads_.load()) - 1;
    ensure_workers(helpers);
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->tasks = tasks;
    job->pending = tasks;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    job->work();
    {
      std::unique_lock<std::mutex> lk(job->mu);
      job->done.wait(lk, [&] { return job->pending.load() == 0; });
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
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

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen && job_ != nullptr; });
        seen = generation_;
        job = job_;
      }
      job->work();
    }
  }

  std::atomic<int> nthreads_{1};
  std::mutex run_mu_;  // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
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
