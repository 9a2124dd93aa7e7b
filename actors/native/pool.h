/* The native kernels' parallel loops (pool.c): fn(ctx, begin, end) over [0, n) on up to
 * `threads` threads, the caller one of them. */
#ifndef SPECRAY_POOL_H
#define SPECRAY_POOL_H
#include <stdint.h>

typedef void (*specray_range_fn)(void *ctx, int64_t begin, int64_t end);
void specray_parallel(int64_t n, int threads, specray_range_fn fn, void *ctx);

#endif
