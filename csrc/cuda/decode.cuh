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
