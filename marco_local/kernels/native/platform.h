/* What differs between compilers and operating systems for the native kernels: symbol export, thread-local storage,
 * and the parallel-for every multithreaded kernel goes through.
 *
 * marco_parallel_for splits [0, n) into one contiguous range per thread (OpenMP's static schedule) and runs
 * fn(ctx, begin, end) on each: with OpenMP where the build has it, else on a small pool of POSIX or Win32 threads
 * (parallel.c). Each output is computed by exactly one thread, so results do not depend on the thread count or on
 * which of the two builds runs.
 */
#ifndef MARCO_PLATFORM_H
#define MARCO_PLATFORM_H

/* Functions Python binds: a DLL exports only what is marked (mingw and clang alike once one symbol is). */
#if defined(_WIN32)
#define MARCO_API __declspec(dllexport)
#else
#define MARCO_API __attribute__((visibility("default")))
#endif

#define MARCO_THREAD_LOCAL _Thread_local

typedef void (*marco_range_fn)(void *ctx, int begin, int end);

void marco_parallel_for(int n, int n_threads, marco_range_fn fn, void *ctx);

#endif
