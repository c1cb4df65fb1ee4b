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

#include <algorithm>
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

// Batch-invariant mode (module switch `set_deterministic`): every row of a product and every
// query of attention is computed by the same sequence of float operations, whatever the
// number of rows in the call, the chunk a prompt was cut into, or what the cache held before.
// qd8 products then always take the packed GEMM route (its per-row sum is a fixed sequence
// over the blocks, for any number of rows); attention walks the keys in fixed 64-slot blocks
// without compacting them, and splits work over query heads rather than keys. See
// docs/kernels.md, "Batch invariance".
// The setting belongs to the calling thread (two engines in two threads may differ); a
// thread-pool job carries its caller's setting to the workers that run its tasks.
inline int& deterministic_mode() {
    thread_local int m = 0;
    return m;
}
inline bool deterministic() { return deterministic_mode() != 0; }

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
        // A job is published as one claim word (job | ntasks | next task), so a worker that
        // wakes late can never claim a task of a job other than the one it read. Completion
        // is counted per task, not per worker: the caller waits only for tasks a worker has
        // actually claimed, never for a worker the OS has not scheduled yet (on a busy host
        // that wait was a whole time slice per call).
        for (int64_t base = 0; base < ntasks; base += kMaxTasks) {
            const int64_t cnt = std::min<int64_t>(kMaxTasks, ntasks - base);
            fn_ = call;
            ctx_ = &f;
            base_ = base;
            det_ = deterministic_mode();
            done_.store(0, std::memory_order_relaxed);
            const uint64_t job = (job_ = (job_ + 1) & kJobMask);
            claim_.store((job << 40) | (static_cast<uint64_t>(cnt) << 20), std::memory_order_release);
            bool wake;
            {
                std::lock_guard<std::mutex> lk(mu_);
                gen_.fetch_add(1, std::memory_order_release);
                wake = sleepers_ > 0;
            }
            if (wake) cv_.notify_all();
            do_tasks();
            if (done_.load(std::memory_order_acquire) != cnt) {
                const auto t0 = std::chrono::steady_clock::now();
                int spins = 0;
                while (done_.load(std::memory_order_acquire) != cnt) {
                    EDGELM_CPU_RELAX();
                    if ((++spins & 255) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
                        std::unique_lock<std::mutex> lk(mu_);
                        done_cv_.wait(lk, [&] { return done_.load(std::memory_order_acquire) == cnt; });
                        break;
                    }
                }
            }
        }
        fn_ = nullptr;
        ctx_ = nullptr;
    }

private:
    static constexpr std::chrono::microseconds kSpin{200};
    static constexpr int64_t kMaxTasks = (int64_t{1} << 20) - 1;  // tasks per claim word
    static constexpr uint64_t kJobMask = (uint64_t{1} << 24) - 1;

    ThreadPool() {
        unsigned hc = std::thread::hardware_concurrency();
        nthreads_.store(hc == 0 ? 1 : (hc > kMaxThreads ? kMaxThreads : static_cast<int>(hc)));
    }

    // Claim and run tasks of the job currently published in claim_. A task is claimed by
    // a CAS on the whole word, so a stale reader (a worker that read the word of a job that
    // has since finished) fails the CAS and stops. While any claimed task is unfinished the
    // job cannot finish, so fn_/ctx_/base_ read after a successful claim are that job's.
    void do_tasks() {
        uint64_t v = claim_.load(std::memory_order_acquire);
        for (;;) {
            const uint64_t cnt = (v >> 20) & 0xFFFFF, next = v & 0xFFFFF;
            if (next >= cnt) return;
            if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                continue;
            deterministic_mode() = det_;
            fn_(ctx_, base_ + static_cast<int64_t>(next));
            if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<int64_t>(cnt)) {
                std::lock_guard<std::mutex> lk(mu_);
                done_cv_.notify_one();
            }
            v = claim_.load(std::memory_order_acquire);
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
        }
    }

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
        p.done_.store(0);
        p.claim_.store(0);
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
    std::atomic<uint64_t> claim_{0};  // job (24 bits) | task count (20) | next task (20)
    std::atomic<int64_t> done_{0};    // tasks of the current job finished
    uint64_t job_ = 0;
    int64_t base_ = 0;                // index of the job's first task (jobs over kMaxTasks are split)
    int det_ = 0;                     // the caller's batch-invariant setting, for the job's tasks
    int sleepers_ = 0;
    void (*fn_)(void*, int64_t) = nullptr;
    void* ctx_ = nullptr;
};

}  // namespace edgelm
