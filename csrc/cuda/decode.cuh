/* decode.cuh — what decode.cu (the step and its portable kernels) and decode_sm90a.cu (the
 * Hopper partial kernel) share: the step's geometry and the split-softmax workspace layout. */
#pragma once
#include "mma.cuh"

namespace lca {

struct DecArgs {
    lca_decode_params p;
    int64_t G, e0, N, per;     /* condensed rows visible, first exact token, visible entries,
                                  entries per split (a multiple of kDecKeys) */
    int nsplit, hchunks;
    unsigned *count;           /* the workspace's arrival counters ((b, kv head, head chunk)),
                                  when the partial kernel merges the splits itself; else null */
    int append;                /* the partial kernel appends the token itself (the append kernel
                                  is not launched; the new key row is read from k) */
};

constexpr int kDecKeys = 32;   /* keys per shared-memory tile */
constexpr int kDecPad = 8;     /* row padding (elements) against bank conflicts */

/* partial results of (b, query head hq, split s): o[Dv], m, l */
__device__ __forceinline__ float *partial(const DecArgs &a, int64_t b, int64_t hq, int s) {
    return (float *)a.p.work + ((b * a.p.H + hq) * a.nsplit + s) * (a.p.Dv + 2);
}

/* The online-softmax update of rows gq + 8 i of a warp's m16 fragment for one key tile: bmax
 * (the lane's maximum of the tile's scores x[kk][0..3], masked ones -INFINITY) is reduced over
 * the quad, the running maximum m and sum l and O's columns are rescaled, and x becomes
 * exp(x - max), added into l.  A row with nothing visible yet keeps base 0. */
template <int KK, int NTV>
__device__ __forceinline__ void dec_softmax_update(float (&x)[KK][4], float bmax, float &m,
                                                   float &l, float (&o)[NTV][4], int i) {
    bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
    bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
    const float mnew = fmaxf(m, bmax);
    const float base = mnew == -INFINITY ? 0.0f : mnew;
    const float corr = __expf(m - base);
    m = mnew;
    l *= corr;
#pragma unroll
    for (int n = 0; n < NTV; n++) o[n][2 * i] *= corr, o[n][2 * i + 1] *= corr;
#pragma unroll
    for (int kk = 0; kk < KK; kk++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            x[kk][e] = __expf(x[kk][e] - base);
            l += x[kk][e];
        }
}

/* The append of element d of the new token's key for (b, kv head h): into its ring slot, and,
 * when the token is one of its group's summary tokens, the sum of its query heads (in head
 * order) into the group's summary sum.  UNROLL: loads in flight (fewer under a small
 * setmaxnreg budget). */
template <typename T, int UNROLL = 8>
__device__ __forceinline__ void dec_append_key(const lca_decode_params &p, int64_t b, int64_t h,
                                               int64_t d) {
    const int64_t T_ = p.T, slot = T_ % p.R, hg = p.H / p.Hkv;
    row<T>(p.kr, b, slot, h)[d] = row<const T>(p.k, b, 0, h)[d];
    if (T_ % p.g >= p.g - p.n) {
        const bool first = T_ % p.g == p.g - p.n;
        const T *q = row<const T>(p.q, b, 0, h * hg) + d;
        float acc = 0;
#pragma unroll UNROLL
        for (int64_t hh = 0; hh < hg; hh++) acc += to_f(q[hh * p.q.sh]);
        float *dst = row<float>(p.qsum, b, (T_ / p.g) % p.S, h) + d;
        *dst = first ? acc : *dst + acc;
    }
}

/* the arrival counters after the partials: B * H of them (at least B * Hkv * hchunks), zero
 * between steps (the block that merges a chunk's splits resets its counter) */
__host__ __device__ inline unsigned *dec_counters(const lca_decode_params &p) {
    return (unsigned *)((float *)p.work + p.nsplit_max * p.B * p.H * (p.Dv + 2));
}

}  // namespace lca

/* decode_sm90a.cu (sm_90a only; absent when setup.py defines LCA_NO_SM90A): the absorbed-MLA
 * partial kernel fed by bulk copies.  _supported returns the m-tiles (16 heads each) per block
 * it would use, 0 when it does not cover the step on `device`. */
extern "C" int lca_cuda_dec_bulk_supported(const lca_decode_params *p, int device);
extern "C" int lca_cuda_dec_bulk_partial(const lca::DecArgs *a, int mt, void *stream);
/* Up to how many splits that kernel also merges (when a->count is set; the step then launches
 * no combine kernel): the warp-specialised kernel's bound, 0 for the other variants. */
extern "C" int lca_cuda_dec_bulk_merges(const lca_decode_params *p, int mt);
/* Whether that kernel appends the step's token itself (the step then launches no append kernel;
 * only when no condensation must run before the partial kernel). */
extern "C" int lca_cuda_dec_bulk_appends(const lca_decode_params *p, int mt);
