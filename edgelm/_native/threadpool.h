// edgelm native kernels: a small persistent worker pool.
//
// The calling thread takes part in every job; `threads()` counts it. A job is a count of
// tasks and a function of the task index; participants take tasks from a shared atomic
// counter, so uneven tasks balance themselves. Between jobs, workers spin for a short while
// (decode issues matmuls back to back) and then sleep on a condition variable.
//
// One job runs at a time (run_mu_); callers from several Python threads queue up. The pool
// survives fork(): the child drops the parent's (now nonexistent) workers and starts fresh
// ones on its next job.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define EDGELM_HAVE_ATFORK 1
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define EDGELM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define EDGELM_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define EDGELM_CPU_RELAX() ((void)0)
#endif

namespace edgelm {

class ThreadPool {
public:
    static constexpr int kMaxThreads = 512;

    static ThreadPool& instance() {
        // Leaked on purpose: workers must never be joined from static destructors.
        static ThreadPool* pool = [] {
            auto* p = new ThreadPool();
#if defined(EDGELM_HAVE_ATFORK)
            pthread_atfork(&ThreadPool::atfork_prepare, &ThreadPool::atfork_parent, &ThreadPool::atfork_child);
#endif
            return p;
        }();
        return *pool;
    }

    int threads() const { return nthreads_.load(std::memory_order_relaxed); }

    // n >= 1 (the caller validates). Workers start lazily on the next job.
    void set_threads(int n) {
        std::lock_guard<std::mutex> run_lock(run_mu_);
        if (n == nthreads_.load()) return;
        stop_workers();
        nthreads_.store(n);
    }

    // Runs f(task) for task in [0, ntasks) on up to threads() threads; returns when all are done.
    template <class F>
    void run(int64_t ntasks, F& f, bool allow_parallel = true) {
        if (ntasks <= 0) return;
        auto call = [](void* ctx, int64_t t) { (*static_cast<F*>(ctx))(t); };
        std::lock_guard<std::mutex> run_lock(run_mu_);
        const int nt = nthreads_.load();
        if (nt <= 1 || ntasks == 1 || !allow_parallel) {
            for (int64_t t = 0; t < ntasks; ++t) f(t);
            return;
        }
        if (static_cast<int>(workers_.size()) != nt - 1) start_workers(nt - 1);
        fn_ = call;
        ctx_ = &f;
        ntasks_ = ntasks;
        next_.store(0, std::memory_order_relaxed);
        pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
        bool wake;
        {
            std::lock_guard<std::mutex> lk(mu_);
            gen_.fetch_add(1, std::memory_order_release);
            wake = sleepers_ > 0;
        }
        if (wake) cv_.notify_all();
        do_tasks();
        // Wait for the workers: spin briefly, then sleep.
        if (pending_.load(std::memory_order_acquire) != 0) {
            const auto t0 = std::chrono::steady_clock::now();
            int spins = 0;
            while (pending_.load(std::memory_order_acquire) != 0) {
                EDGELM_CPU_RELAX();
                if ((++spins & 255) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
                    std::unique_lock<std::mutex> lk(mu_);
                    done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
                    break;
                }
            }
        }
        fn_ = nullptr;
        ctx_ = nullptr;
    }

private:
    static constexpr std::chrono::microseconds kSpin{200};

    ThreadPool() {
        unsigned hc = std::thread::hardware_concurrency();
        nthreads_.store(hc == 0 ? 1 : (hc > kMaxThreads ? kMaxThreads : static_cast<int>(hc)));
    }

    void do_tasks() {
        for (;;) {
            const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
            if (t >= ntasks_) break;
            fn_(ctx_, t);
        }
    }

    void worker_main(uint64_t seen) {
        for (;;) {
            uint64_t g;
            const auto t0 = std::chrono::steady_clock::now();
            int spins = 0;
            while ((g = gen_.load(std::memory_order_acquire)) == seen) {
                if (stop_.load(std::memory_order_relaxed)) return;
                EDGELM_CPU_RELAX();
                if ((++spins & 255) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
                    std::unique_lock<std::mutex> lk(mu_);
                    ++sleepers_;
                    cv_.wait(lk, [&] {
                        return gen_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_relaxed);
                    });
                    --sleepers_;
                }
            }
            if (stop_.load(std::memory_order_relaxed)) return;
            seen = g;
            do_tasks();
            if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                std::lock_guard<std::mutex> lk(mu_);
                done_cv_.notify_one();
            }
        }
    }

    // Both called with run_mu_ held and no job in flight.
    void start_workers(int n) {
        stop_workers();
        stop_.store(false);
        const uint64_t g = gen_.load();
        workers_.reserve(n);
        for (int i = 0; i < n; ++i) workers_.emplace_back(&ThreadPool::worker_main, this, g);
    }
    void stop_workers() {
        if (workers_.empty()) return;
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_.store(true);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        stop_.store(false);
    }

#if defined(EDGELM_HAVE_ATFORK)
    // Hold run_mu_ across fork so no job is in flight in the child.
    static void atfork_prepare() { instance().run_mu_.lock(); }
    static void atfork_parent() { instance().run_mu_.unlock(); }
    static void atfork_child() {
        ThreadPool& p = instance();
        // The parent's workers do not exist here. Their std::thread handles must be neither
        // joined nor destroyed (that would terminate), so leak them; a worker may also have
        // held mu_ at the fork, so rebuild the synchronisation objects.
        new std::vector<std::thread>(std::move(p.workers_));
        p.workers_ = std::vector<std::thread>();
        new (&p.mu_) std::mutex();
        new (&p.cv_) std::condition_variable();
        new (&p.done_cv_) std::condition_variable();
        new (&p.run_mu_) std::mutex();
        p.sleepers_ = 0;
        p.stop_.store(false);
        p.pending_.store(0);
    }
#endif

    std::mutex run_mu_;  // one job (or set_threads) at a time
    std::mutex mu_;      // guards sleepers_, pairs with cv_ / done_cv_
    std::condition_variable cv_;
    std::condition_variable done_cv_;
    std::vector<std::thread> workers_;
    std::atomic<int> nthreads_{1};
    std::atomic<uint64_t> gen_{0};
    std::atomic<bool> stop_{false};
    std::atomic<int> pending_{0};
    std::atomic<int64_t> next_{0};
    int sleepers_ = 0;
    int64_t ntasks_ = 0;
    void (*fn_)(void*, int64_t) = nullptr;
    void* ctx_ = nullptr;
};

}  // namespace edgelm
