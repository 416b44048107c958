/* decode.c — the CPU decode step of the condensed cache (SPEC §6; lca.h: lca_decode_params).
 *
 * One query token per sequence.  Per (batch, kv head), in order: the new token's key (and
 * value) into ring slot T % R; its query, summed over the query heads sharing the kv head, into
 * the running sum of its group when it is one of the group's last n; the condensation of any
 * group the query at T needs that is not condensed yet (only with window 0, where the group
 * ends at T); attention over the condensed rows [0, G_T) and the exact tokens [G_T g, T] in one
 * online softmax; then the condensation of the group that leaves the window for the next query,
 * from its stored sum (never from raw queries).  Accumulation in the element type (float32 or
 * float64).  No allocation beyond one small per-thread workspace of O(H (D + Dv)). */
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

#define NKD 64           /* keys per block of the online softmax */
#define NK NKD           /* simd.inc's block width (its pack_t is unused here) */

#define REAL float
#define FN(x) x##_f32
#define IS_F32 1
#define EXP1 expf
#include "simd.inc"
#include "decode.inc"
#undef REAL
#undef FN
#undef IS_F32
#undef EXP1
#undef VW
#undef VEC
#undef LOADV
#undef STOREV

#define REAL double
#define FN(x) x##_f64
#define IS_F32 0
#define EXP1 exp
#include "simd.inc"
#include "decode.inc"
#undef REAL
#undef FN
#undef IS_F32
#undef EXP1

int lca_cpu_decode_step(const lca_decode_params *p, char *err, int errlen) {
    if (p->B == 0 || p->Hkv == 0) return LCA_OK;
    int nt = p->num_threads > 0 ? p->num_threads : omp_get_max_threads();
    if ((double)p->B * (double)p->H * (double)(p->T + 1) * (double)(p->D + p->Dv) < 2e6) nt = 1;
    if (nt > p->B * p->Hkv) nt = (int)(p->B * p->Hkv);
    int s = p->dtype == LCA_F32 ? decode_step_f32(p, nt) : decode_step_f64(p, nt);
    if (s == LCA_ERR_NOMEM)
        snprintf(err, (size_t)errlen, "decode step: out of memory allocating the CPU workspace");
    return s;
}
