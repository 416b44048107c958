/* lca.h — the plain-C ABI between the Python binding (module.c) and the engines.
 *
 * One params struct describes a whole call: sizes, LCA parameters, and for every array a
 * pointer plus element strides (batch, token, head; the last dimension is always contiguous).
 * The binding validates; engines trust the struct and return a status, never exit().
 *
 * MLA in absorbed form is run as GQA with one key/value head: k = [c; r] (width Dc+Dr),
 * v = the first Dc columns of k (v_in_k = 1), condensed keys pool their first Dc columns and
 * copy the rest from the anchor (d_pool = Dc).  GQA "anchor" is d_pool = 0, "pool" d_pool = D.
 */
#ifndef LCA_H
#define LCA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LCA_F32 = 0, LCA_F64 = 1, LCA_BF16 = 2, LCA_F16 = 3 } lca_dtype;

typedef enum {
    LCA_OK = 0,
    LCA_ERR_NOMEM = 1,     /* a workspace allocation failed */
    LCA_ERR_ARG = 2,       /* params inconsistent (the binding should have caught it) */
    LCA_ERR_CUDA = 3,      /* a CUDA call or launch failed; err names it */
    LCA_ERR_UNSUPPORTED = 4,  /* a shape the CUDA engine does not cover; err names it */
} lca_status;

/* A strided 4-D view (B, T, H, D): element (b, t, h, d) at p[b*sb + t*st + h*sh + d]. */
typedef struct {
    void *p;
    int64_t sb, st, sh;
} lca_view;

typedef struct {
    lca_dtype dtype;           /* of q, k, v, kbar, vbar, out (and of lse and alpha on the CPU;
                                  the CUDA engine keeps those two in float32); anchor is int32 */
    int64_t B, L, H, Hkv;      /* batch, length, query heads, key/value heads */
    int64_t D, Dv;             /* key (= query) width, value width */
    int64_t g, w, n;           /* group_size, window (clamped to <= L), n_summary */
    int64_t m;                 /* condensed entries available per (b, kv head): rows of kbar */
    int64_t d_score;           /* leading key columns used by the summary score */
    int64_t d_pool;            /* leading key columns pooled; the rest copy the anchor */
    int v_in_k;                /* v is k[..., :Dv] (and vbar, dv likewise): MLA absorbed */
    double scale, rep_bias;
    lca_view q, k, v;          /* (B, L, H, D), (B, L, Hkv, D), (B, L, Hkv, Dv) */
    lca_view kbar, vbar;       /* (B, m, Hkv, D), (B, m, Hkv, Dv) */
    lca_view anchor, alpha;    /* (B, m, Hkv) int32 with sh = 1; (B, m, Hkv, g) */
    lca_view out, dout;        /* (B, L, H, Dv) */
    lca_view lse;              /* (B, H, L) stored as sb, sh in st's place: element (b,h,t) at
                                  p[b*sb + h*st + t] */
    lca_view dq, dk, dv;       /* gradients, same layouts as q, k, v */
    int num_threads;           /* <= 0: the engine's default */
} lca_params;

/* Number of condensed entries query position t sees (SPEC §3). */
static inline int64_t lca_num_condensed(int64_t t, int64_t g, int64_t w) {
    return t + 1 < w ? 0 : (t + 1 - w) / g;
}

/* One decode step of a condensed cache (SPEC §6; lca/cache.py).  Every sequence of the batch
 * has seen T tokens; the step appends token T (ring slot T % R), adds its query (summed over
 * the query heads of each kv head) to the running sum of its group when it is one of the last n
 * of the group (sum slot (T / g) % S), condenses the groups the query at T needs, attends over
 * condensed rows [0, G_T) and the ring's exact tokens [G_T g, T], writes out, and condenses the
 * groups the state after T + 1 tokens holds: min(G_{T+1}, floor((T+1)/g)) rows in all.
 * Views are (B, rows, kv heads, width) with strides (sb, st, sh); q and out are (B, H, width)
 * and k, v the new token (B, Hkv, width), with st unused. */
typedef struct {
    lca_dtype dtype;           /* of every array but qsum (REAL on the CPU, float32 on CUDA) */
    int64_t B, H, Hkv, D, Dv;
    int64_t g, w, n, d_score, d_pool;
    int v_in_k;                /* vbar / vr / v are prefix views of kbar / kr / k (MLA) */
    double scale, rep_bias;
    int64_t T;                 /* tokens seen before this step: the new token's position */
    int64_t M, R, S;           /* condensed rows, ring slots, summary-sum slots */
    lca_view q, k, v, out;
    lca_view kbar, vbar, kr, vr, qsum;
    void *work;                /* CUDA: split-softmax partials, nsplit_max * B * H * (Dv + 2)
                                  floats, then B * H arrival counters (32-bit, zero before the
                                  first step; each step leaves them zero) */
    int64_t nsplit_max;
    int num_threads;
} lca_decode_params;

/* The decode geometry both engines and the cache share. */
static inline int64_t lca_cache_condensed(int64_t T, int64_t g, int64_t w) {
    const int64_t G = lca_num_condensed(T, g, w), F = T / g;   /* entries after T tokens */
    return G < F ? G : F;
}
int lca_cpu_decode_step(const lca_decode_params *p, char *err, int errlen);
int lca_cuda_decode_step(const lca_decode_params *p, int device, void *stream, char *err,
                         int errlen);
/* The partial kernel the last lca_cuda_decode_step call launched: "bulk" (Hopper, absorbed MLA),
 * "mma", "simt" ("": none). */
const char *lca_cuda_last_decode_kernel(void);

/* CPU engine (csrc/cpu). Each returns an lca_status and writes a message into err. */
int lca_cpu_condense(const lca_params *p, char *err, int errlen);
int lca_cpu_attend_fwd(const lca_params *p, char *err, int errlen);
/* SPEC §5 backward into the zeroed p->dq, p->dk, p->dv.  The condensation the forward attended
 * to is recomputed, or, with p->kbar.p set, taken as given: p->kbar, p->vbar (B, L / g, Hkv,
 * D / Dv; with v_in_k vbar is kbar's prefix view), the forward's own (lca_cpu_condense's) —
 * the pooling weights of the condensation's backward are recomputed either way. */
int lca_cpu_attention_bwd(const lca_params *p, char *err, int errlen);
/* The backward of condense alone: dL/dkbar, dL/dvbar (B, L / g, Hkv, D / Dv; dvbar unused with
 * v_in_k, dkbar then holding the value columns' gradients) accumulated through the pooling
 * weights, the anchor copy and the summary queries into the zeroed p->dq, p->dk, p->dv. */
int lca_cpu_condense_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                         char *err, int errlen);
/* The backward of attend (SPEC §3 over the given condensed entries p->kbar, p->vbar, p->m
 * rows): dq, dk, dv accumulated into the zeroed p->dq, p->dk, p->dv, and the entries' own
 * gradients into the zeroed dkbar, dvbar (B, m, Hkv, D / Dv; with v_in_k dvbar is dkbar's
 * prefix view).  No condensation is involved. */
int lca_cpu_attend_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                       char *err, int errlen);
int lca_cpu_max_threads(void);

/* CUDA engine (csrc/cuda), compiled when setup.py finds nvcc.  Pointers are device pointers on
 * `device`; work is queued on `stream` (a cudaStream_t) and never synchronised here. */
int lca_cuda_condense(const lca_params *p, int device, void *stream, char *err, int errlen);
int lca_cuda_attend_fwd(const lca_params *p, int device, void *stream, char *err, int errlen);
int lca_cuda_device_count(void);
/* SPEC §5 backward on the GPU: dq, dk, dv (every element written; v_in_k: dv is dk's prefix
 * view) from dout, q, k, v, out and the forward's lse (float32).  Needs a scratch buffer of
 * lca_cuda_bwd_workspace(p) bytes (rows of condensed entries: L / g, or p->m when more),
 * 256-byte aligned, allocated by the caller on the device
 * (stream-ordered: it may be reused once the work queued on `stream` is done).  Deterministic:
 * the same inputs give bit-identical gradients.  With p->alpha.p set, the forward's condensation
 * is given instead of recomputed (one condensation less: 0.7 ms at 128K): p->kbar, p->vbar
 * (B, L / g, Hkv, D / Dv, unit column stride; with v_in_k vbar is kbar's prefix view),
 * p->anchor (B, L / g, Hkv) int32 and p->alpha (B, L / g, Hkv, g) float32, both contiguous —
 * lca_cuda_condense's outputs for these q, k, v; they are only read. */
int64_t lca_cuda_bwd_workspace(const lca_params *p);
int lca_cuda_attention_bwd(const lca_params *p, void *workspace, int64_t workspace_bytes,
                           int device, void *stream, char *err, int errlen);
/* The two parts of lca_cuda_attention_bwd on their own, as lca_cpu_attend_bwd and
 * lca_cpu_condense_bwd (same arguments and contracts, except that every element of dq, dk, dv,
 * dkbar, dvbar is written: the outputs need not be zeroed), with a workspace of
 * lca_cuda_bwd_workspace(p) bytes as above (p->m set: the given rows for attend_bwd).
 *   attend_bwd: SPEC §3's backward over the given p->kbar, p->vbar (p->m rows, any number at
 *     least the last query's G_t; rows no query sees get zero gradients): dq, dk, dv without
 *     any condensation term, and the entries' gradients into dkbar, dvbar (B, m, Hkv, D / Dv;
 *     with v_in_k dvbar is dkbar's prefix view, dkbar then holding the value columns' sums).
 *   condense_bwd: given dkbar, dvbar (B, L / g, Hkv, D / Dv; dvbar unused with v_in_k), the
 *     condensation recomputed, and dq, dk, dv = its backward alone (zero outside the groups'
 *     terms).  attention_bwd = attend_bwd (on the recomputed entries) + condense_bwd. */
int lca_cuda_attend_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                        void *workspace, int64_t workspace_bytes, int device, void *stream,
                        char *err, int errlen);
int lca_cuda_condense_bwd(const lca_params *p, const lca_view *dkbar, const lca_view *dvbar,
                          void *workspace, int64_t workspace_bytes, int device, void *stream,
                          char *err, int errlen);
/* The kernel the last lca_cuda_attend_fwd call launched: "mla_wgmma", "mla", "wide", "mma",
 * "simt" ("": none). */
const char *lca_cuda_last_attend_kernel(void);
/* The dq kernel the last CUDA backward call launched: "wgmma", "mma", "simt" ("": none). */
const char *lca_cuda_last_bwd_dq_kernel(void);
/* What the last CUDA backward's Hopper kernels finished themselves (their folded epilogues):
 * 1 the exact keys' dk, dv (the dk/dv kernel), | 2 dq (the dq kernel); 0 none. */
int lca_cuda_last_bwd_folded(void);

#ifdef __cplusplus
}
#endif
#endif /* LCA_H */
