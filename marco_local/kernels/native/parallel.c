/* marco_parallel_for (platform.h): OpenMP when the build has it, else a pool of worker threads.
 *
 * Why a pool of our own: compilers without OpenMP (Apple clang, a build where the OpenMP runtime would clash with
 * torch's) must still use every core. The pool is started on first use and grows to the largest thread count asked
 * for. Workers spin briefly between jobs (a decode step runs many short parallel regions back to back), then sleep on
 * a condition variable. One job runs at a time: a call made while another runs (another Python thread, or a nested
 * call from inside a job) runs its loop on the calling thread. After fork() the child starts a fresh pool.
 */
#include <stdint.h>

#include "ggml_dot.h"
#include "platform.h"

/* Thread t's share of [0, n) among nt threads: the first n % nt threads take one more. */
static void split(int n, int nt, int t, int *begin, int *end) {
    int q = n / nt, r = n % nt;
    *begin = t * q + (t < r ? t : r);
    *end = *begin + q + (t < r);
}

#if defined(_OPENMP)

/* declared here rather than through omp.h: macOS builds link torch's libomp without its header */
int omp_get_thread_num(void);
int omp_get_num_threads(void);

void marco_parallel_for(int n, int n_threads, marco_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int nt = n_threads < n ? n_threads : n;
    if (nt <= 1) {
        fn(ctx, 0, n);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int b, e;
        split(n, omp_get_num_threads(), omp_get_thread_num(), &b, &e);
        if (b < e) fn(ctx, b, e);
    }
}

#define MARCO_THREADING "openmp"

#else /* a pool of POSIX or Win32 threads */

#if defined(_WIN32)
#include <windows.h>
typedef SRWLOCK mutex_t;
typedef CONDITION_VARIABLE cond_t;
static void mutex_init(mutex_t *m) { InitializeSRWLock(m); }
static void mutex_lock(mutex_t *m) { AcquireSRWLockExclusive(m); }
static int mutex_trylock(mutex_t *m) { return TryAcquireSRWLockExclusive(m) ? 0 : 1; }
static void mutex_unlock(mutex_t *m) { ReleaseSRWLockExclusive(m); }
static void cond_init(cond_t *c) { InitializeConditionVariable(c); }
static void cond_wait(cond_t *c, mutex_t *m) { SleepConditionVariableSRW(c, m, INFINITE, 0); }
static void cond_broadcast(cond_t *c) { WakeAllConditionVariable(c); }
static int process_id(void) { return (int)GetCurrentProcessId(); }
static int64_t now_us(void) {
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (int64_t)((double)t.QuadPart * 1e6 / (double)f.QuadPart);
}
static DWORD WINAPI worker_main(LPVOID arg);
static int start_thread(intptr_t id) {
    HANDLE h = CreateThread(NULL, 0, worker_main, (LPVOID)id, 0, NULL);
    if (!h) return -1;
    CloseHandle(h);
    return 0;
}
#else
#include <pthread.h>
#include <time.h>
#include <unistd.h>
typedef pthread_mutex_t mutex_t;
typedef pthread_cond_t cond_t;
static void mutex_init(mutex_t *m) { pthread_mutex_init(m, NULL); }
static void mutex_lock(mutex_t *m) { pthread_mutex_lock(m); }
static int mutex_trylock(mutex_t *m) { return pthread_mutex_trylock(m); }
static void mutex_unlock(mutex_t *m) { pthread_mutex_unlock(m); }
static void cond_init(cond_t *c) { pthread_cond_init(c, NULL); }
static void cond_wait(cond_t *c, mutex_t *m) { pthread_cond_wait(c, m); }
static void cond_broadcast(cond_t *c) { pthread_cond_broadcast(c); }
static int process_id(void) { return (int)getpid(); }
static int64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}
static void *worker_main(void *arg);
static int start_thread(intptr_t id) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker_main, (void *)id)) return -1;
    pthread_detach(t);
    return 0;
}
#endif

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define LOAD(p) __atomic_load_n(p, __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n(p, v, __ATOMIC_RELEASE)
#define MAX_WORKERS 255
/* Waiting spins (pause) for up to SPIN_US, then sleeps: a decode step's regions come a few microseconds apart, and a
 * sleeping worker takes tens of microseconds (far more on a busy machine) to wake. Yielding the core instead would
 * hand it to another process for a whole time slice. */
#define SPIN_US 200

/* Spins while *p == v (for_zero: while *p != 0), for up to SPIN_US. */
static void spin(int *p, int v, int for_zero) {
    int64_t start = 0;
    for (int i = 1; for_zero ? LOAD(p) != 0 : LOAD(p) == v; i++) {
        cpu_relax();
        if ((i & 255) == 0) { /* read the clock now and then */
            int64_t t = now_us();
            if (!start)
                start = t;
            else if (t - start > SPIN_US)
                return;
        }
    }
}

static struct {
    int pid;             /* the process that started the workers (0: none yet) */
    int n_workers;       /* workers started; worker i (1-based) runs range i of a job */
    int generation;      /* bumped per job (atomic) */
    int start_generation; /* the generation a worker being started has seen (workers start between jobs) */
    int pending;         /* workers yet to finish the current job (atomic) */
    marco_range_fn fn;   /* the current job: written before `generation` is bumped */
    void *ctx;
    int n, nt;
    mutex_t lock;        /* guards sleeping and waking */
    cond_t wake, done;
    mutex_t dispatch;    /* held by the thread whose job runs */
} pool;

static MARCO_THREAD_LOCAL int in_worker;

static void run_share(int id) {
    int b, e;
    if (id < pool.nt) {
        split(pool.n, pool.nt, id, &b, &e);
        if (b < e) pool.fn(pool.ctx, b, e);
    }
}

static void worker_loop(int id) {
    in_worker = 1;
    int seen = pool.start_generation;
    for (;;) {
        spin(&pool.generation, seen, 0);
        int g = LOAD(&pool.generation);
        if (g == seen) {
            mutex_lock(&pool.lock);
            while ((g = LOAD(&pool.generation)) == seen) cond_wait(&pool.wake, &pool.lock);
            mutex_unlock(&pool.lock);
        }
        seen = g;
        run_share(id);
        if (__atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL) == 0) {
            mutex_lock(&pool.lock);
            cond_broadcast(&pool.done);
            mutex_unlock(&pool.lock);
        }
    }
}

#if defined(_WIN32)
static DWORD WINAPI worker_main(LPVOID arg) {
    worker_loop((int)(intptr_t)arg);
    return 0;
}
#else
static void *worker_main(void *arg) {
    worker_loop((int)(intptr_t)arg);
    return NULL;
}
#endif

#if defined(_WIN32)
static INIT_ONCE once = INIT_ONCE_STATIC_INIT;
static BOOL CALLBACK init_pool(PINIT_ONCE o, PVOID p, PVOID *c) {
    (void)o, (void)p, (void)c;
    mutex_init(&pool.dispatch);
    return TRUE;
}
static void pool_once(void) { InitOnceExecuteOnce(&once, init_pool, NULL, NULL); }
#else
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init_pool(void) { mutex_init(&pool.dispatch); }
static void pool_once(void) { pthread_once(&once, init_pool); }
#endif

void marco_parallel_for(int n, int n_threads, marco_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int nt = n_threads < n ? n_threads : n;
    if (nt > MAX_WORKERS + 1) nt = MAX_WORKERS + 1;
    if (nt <= 1 || in_worker) {
        fn(ctx, 0, n);
        return;
    }
    pool_once();
    if (mutex_trylock(&pool.dispatch)) { /* another job is running */
        fn(ctx, 0, n);
        return;
    }
    if (pool.pid != process_id()) { /* first use, or a forked child: the workers of the parent are not here */
        pool.pid = process_id();
        pool.n_workers = 0;
        mutex_init(&pool.lock);
        cond_init(&pool.wake);
        cond_init(&pool.done);
    }
    pool.start_generation = LOAD(&pool.generation);
    while (pool.n_workers < nt - 1 && start_thread(pool.n_workers + 1) == 0) pool.n_workers++;
    if (nt > pool.n_workers + 1) nt = pool.n_workers + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.nt = nt;
    STORE(&pool.pending, pool.n_workers); /* every worker acknowledges every job, taking part or not */
    mutex_lock(&pool.lock);
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_ACQ_REL);
    cond_broadcast(&pool.wake);
    mutex_unlock(&pool.lock);
    run_share(0);
    spin(&pool.pending, 0, 1);
    if (LOAD(&pool.pending)) {
        mutex_lock(&pool.lock);
        while (LOAD(&pool.pending)) cond_wait(&pool.done, &pool.lock);
        mutex_unlock(&pool.lock);
    }
    mutex_unlock(&pool.dispatch);
}

#define MARCO_THREADING "threads"

#endif

/* How this library was built: the instruction set its kernels were compiled for, then "openmp" or "threads". */
MARCO_API const char *marco_build_info(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return "avx512 vnni " MARCO_THREADING;
#elif defined(__AVX512F__)
    return "avx512 " MARCO_THREADING;
#elif defined(__AVX2__)
    return "avx2 " MARCO_THREADING;
#elif defined(MARCO_NEON_DOTS)
    return "neon " MARCO_THREADING;
#else
    return "portable " MARCO_THREADING;
#endif
}

/* Test hook: how many distinct threads ran a parallel_for of n_threads ranges. */
static void mark_thread(void *ctx, int begin, int end) {
    static MARCO_THREAD_LOCAL char here;
    for (int i = begin; i < end; i++) ((uintptr_t *)ctx)[i] = (uintptr_t)&here;
}

MARCO_API int marco_threads_used(int n_threads) {
    uintptr_t ids[256] = {0};
    if (n_threads < 1 || n_threads > 256) return -1;
    marco_parallel_for(n_threads, n_threads, mark_thread, ids);
    int distinct = 0;
    for (int i = 0; i < n_threads; i++) {
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= ids[j] == ids[i];
        distinct += !seen;
    }
    return distinct;
}
