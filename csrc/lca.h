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

/* CPU engine (csrc/cpu). Each returns an lca_status and writes a message into err. */
int lca_cpu_condense(const lca_params *p, char *err, int errlen);
int lca_cpu_attend_fwd(const lca_params *p, char *err, int errlen);
int lca_cpu_attention_bwd(const lca_params *p, char *err, int errlen);
int lca_cpu_max_threads(void);

/* CUDA engine (csrc/cuda), compiled when setup.py finds nvcc.  Pointers are device pointers on
 * `device`; work is queued on `stream` (a cudaStream_t) and never synchronised here. */
int lca_cuda_condense(const lca_params *p, int device, void *stream, char *err, int errlen);
int lca_cuda_attend_fwd(const lca_params *p, int device, void *stream, char *err, int errlen);
int lca_cuda_device_count(void);
/* The kernel the last lca_cuda_attend_fwd call launched: "mla_wgmma", "mla", "wide", "mma",
 * "simt" ("": none). */
const char *lca_cuda_last_attend_kernel(void);

#ifdef __cplusplus
}
#endif
#endif /* LCA_H */
