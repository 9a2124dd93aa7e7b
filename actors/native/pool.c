/* One process-wide team of worker threads for the native kernels' parallel loops.
 *
 * Why not OpenMP: libgomp keeps a thread pool per calling thread, and once a process holds
 * more pool threads than CPUs, its threads stop spinning at barriers and sleep at once
 * ("throttled" spinning), so every parallel loop pays a futex wake-up. A specray process
 * loads its models on the main thread (torch's pool there) and decodes on another (the
 * serial decoder's loop, a Serve replica's), which is exactly that case: on a 2-vCPU Zen 3
 * VM the 1.5B's products of one step took 81 ms called from a second thread against 59 ms
 * from the main one (BENCHMARKS.md, issue 28). This team is one per process, whichever
 * thread calls, and waits as specray's GOMP_SPINCOUNT policy does (actors/threads.py): a
 * short spin, so a busy neighbour on shared cores keeps its core, then sleep.
 *
 * A loop splits [0, n) into contiguous equal ranges, one per thread (OpenMP's static
 * schedule); the caller runs the first. Loops called from several threads run one at a
 * time; a loop called from inside a running one runs inline. Nothing here touches floats,
 * so results do not depend on it.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include "pool.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif


#define MAX_WORKERS 255
#ifndef SPIN_NS
#define SPIN_NS 30000 /* a thread spins this long for the next loop (a worker) or its end (the caller), then sleeps */
#endif

static struct {
    pthread_mutex_t call; /* held by the thread whose loop runs */
    pthread_mutex_t mu;   /* guards sleepers, pairs with wake and finished */
    pthread_cond_t wake, finished;
    atomic_uint gen;      /* bumped once per loop: the workers' signal to start */
    atomic_uint done;     /* workers finished with the current loop */
    atomic_int caller_sleeps; /* the caller gave up spinning: the last worker done wakes it */
    int workers, sleepers;
    unsigned start_gen[MAX_WORKERS + 1];
    specray_range_fn fn; /* the current loop, written before gen is bumped */
    void *ctx;
    int64_t n;
    int threads;
} pool = {.call = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .finished = PTHREAD_COND_INITIALIZER};

static _Thread_local int in_loop;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Thread `id`'s range of the current loop (ids past the loop's thread count get none). */
static void run_share(int id) {
    if (id >= pool.threads) return;
    int64_t begin = pool.n * id / pool.threads, end = pool.n * (id + 1) / pool.threads;
    if (begin < end) {
        in_loop = 1;
        pool.fn(pool.ctx, begin, end);
        in_loop = 0;
    }
}

/* *word once it differs from `value`, or `value` after SPIN_NS of spinning. */
static unsigned spin_while(atomic_uint *word, unsigned value) {
    int64_t until = 0;
    for (int spins = 0;; spins++) {
        unsigned v = atomic_load(word);
        if (v != value) return v;
        if ((spins & 63) == 63) {
            int64_t t = now_ns();
            if (!until) until = t + SPIN_NS;
            else if (t > until) return v;
        }
        RELAX();
    }
}

/* The generation after `seen`: spin for SPIN_NS, then sleep until it comes. */
static unsigned next_gen(unsigned seen) {
    unsigned g = spin_while(&pool.gen, seen);
    if (g != seen) return g;
    pthread_mutex_lock(&pool.mu);
    pool.sleepers++;
    while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
    pool.sleepers--;
    pthread_mutex_unlock(&pool.mu);
    return g;
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool.start_gen[id];
    for (;;) {
        seen = next_gen(seen);
        run_share(id);
        /* seq_cst with the caller's caller_sleeps store and done load: the last worker either
         * sees it asleep and wakes it (under mu, so not before it waits) or it sees all done */
        if (atomic_fetch_add(&pool.done, 1) + 1 == (unsigned)pool.workers && atomic_load(&pool.caller_sleeps)) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.finished);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own on its first loop. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.finished, NULL);
    atomic_store(&pool.caller_sleeps, 0);
    pool.workers = pool.sleepers = 0;
    in_loop = 0;
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

static int start_worker(void) {
    pthread_once(&fork_once, register_fork_handler);
    int id = pool.workers + 1;
    pool.start_gen[id] = atomic_load_explicit(&pool.gen, memory_order_relaxed);
    sigset_t all, old; /* signals go to the caller's threads (Python's handlers), never to a worker */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)id);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return -1;
    pool.workers = id;
    return 0;
}

/* fn(ctx, begin, end) over [0, n) on up to `threads` threads (the caller one of them). */
void specray_parallel(int64_t n, int threads, specray_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || n == 1 || in_loop) {
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.call);
    while (pool.workers < threads - 1 && start_worker() == 0) {
    }
    if (pool.workers < threads - 1) threads = pool.workers + 1; /* no more threads to be had: fewer */
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.threads = threads;
    atomic_store(&pool.done, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_share(0);
    /* every worker counts itself done, its range empty or not, before the loop's fields change;
     * the caller spins as the workers do, then sleeps (a worker that lost its core to a
     * neighbour process should get it back, not see it spun away) */
    const unsigned all = (unsigned)pool.workers;
    unsigned done = atomic_load(&pool.done);
    while (done < all) {
        const unsigned before = done;
        done = spin_while(&pool.done, before);
        if (done != before) continue; /* progress: spin on */
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.caller_sleeps, 1);
        while ((done = atomic_load(&pool.done)) < all) pthread_cond_wait(&pool.finished, &pool.mu);
        atomic_store(&pool.caller_sleeps, 0);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&pool.call);
}

/* Worker threads started so far (for tests). */
int specray_pool_workers(void) { return pool.workers; }

/* For tests: `loops` loops of n indices on `threads` threads, where every range but the
 * caller's sleeps 200 us per index (so the caller outlasts its spin and sleeps) and the
 * caller pauses `pause_us` between loops (so the workers sleep too). The sum of every
 * index seen: loops * n * (n - 1) / 2 when no range was lost or run twice. */
static void selftest_range(void *ctx, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        if (begin > 0) nanosleep(&(struct timespec){0, 200000}, NULL);
        atomic_fetch_add((atomic_llong *)ctx, i);
    }
}

int64_t specray_pool_selftest(int loops, int threads, int64_t n, int pause_us) {
    atomic_llong sum;
    atomic_init(&sum, 0);
    for (int l = 0; l < loops; l++) {
        specray_parallel(n, threads, selftest_range, &sum);
        if (pause_us > 0) nanosleep(&(struct timespec){0, pause_us * 1000L}, NULL);
    }
    return atomic_load(&sum);
}
