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
