/* engine.c — the CPU engine: instantiates simd.inc + attn.inc for float and double and
 * exposes the lca.h entry points.  OpenMP threads over (batch, kv head, query tile).
 *
 * The tile functions are compiled once per instruction set (AVX-512, AVX2+FMA, baseline x86-64)
 * and picked at load time (GCC target_clones), so one build runs well on any x86-64 machine.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lca.h"

#define LCA_INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LCA_NO_CLONES)
#define LCA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LCA_CLONES
#endif

#define NK 64            /* keys per block */
#define TILE_ROWS 128    /* score rows (query positions x heads) per tile */

static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : x > hi ? hi : x;
}

#define REAL float
#define FN(x) x##_f32
#define IS_F32 1
#include "simd.inc"
#include "attn.inc"
#undef REAL
#undef FN
#undef IS_F32
#undef VW
#undef VEC
#undef LOADV
#undef STOREV

#define REAL double
#define FN(x) x##_f64
#define IS_F32 0
#include "simd.inc"
#include "attn.inc"
#undef REAL
#undef FN
#undef IS_F32

int lca_cpu_max_threads(void) { return omp_get_max_threads(); }

/* Threads for a call: all of them, except for problems so small (under ~1 ms of work) that
 * waking a team costs more than it saves, above all on a busy machine. */
static int threads_for(const lca_params *p) {
    if (p->num_threads > 0) return p->num_threads;
    const double span = (double)(p->L < p->w + p->L / p->g + NK ? p->L : p->w + p->L / p->g + NK);
    const double flops = 2.0 * (double)p->B * (double)p->H * (double)p->L * span *
                         (double)(p->D + p->Dv);
    return flops < 2e7 ? 1 : omp_get_max_threads();
}

static int finish(int status, const char *what, char *err, int errlen) {
    if (status == LCA_ERR_NOMEM)
        snprintf(err, (size_t)errlen, "%s: out of memory allocating the CPU workspace", what);
    return status;
}

int lca_cpu_condense(const lca_params *p, char *err, int errlen) {
    if (p->B == 0 || p->L / p->g == 0 || p->Hkv == 0) return LCA_OK;
    int s = p->dtype == LCA_F32 ? condense_f32(p, threads_for(p)) : condense_f64(p, threads_for(p));
    return finish(s, "condense", err, errlen);
}

int lca_cpu_attend_fwd(const lca_params *p, char *err, int errlen) {
    if (p->B == 0 || p->L == 0) return LCA_OK;
    int s = p->dtype == LCA_F32 ? attend_fwd_f32(p, threads_for(p))
                                : attend_fwd_f64(p, threads_for(p));
    return finish(s, "attention", err, errlen);
}

int lca_cpu_attention_bwd(const lca_params *p, char *err, int errlen) {
    if (p->B == 0 || p->L == 0) return LCA_OK;
    int s = p->dtype == LCA_F32 ? attention_bwd_f32(p, NULL, NULL, threads_for(p))
                                : attention_bwd_f64(p, NULL, NULL, threads_for(p));
    return finish(s, "attention backward", err, errlen);
}

int lca_cpu_condense_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                         char *err, int errlen) {
    if (p->B == 0 || p->L / p->g == 0 || p->Hkv == 0) return LCA_OK;
    int s = p->dtype == LCA_F32 ? condense_bwd_f32(p, dkbar, dvbar, threads_for(p))
                                : condense_bwd_f64(p, dkbar, dvbar, threads_for(p));
    return finish(s, "condense backward", err, errlen);
}

int lca_cpu_attend_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                       char *err, int errlen) {
    if (p->B == 0 || p->L == 0) return LCA_OK;     /* (the caller zeroes dkbar and dvbar) */
    int s = p->dtype == LCA_F32 ? attention_bwd_f32(p, dkbar, dvbar, threads_for(p))
                                : attention_bwd_f64(p, dkbar, dvbar, threads_for(p));
    return finish(s, "attend backward", err, errlen);
}
