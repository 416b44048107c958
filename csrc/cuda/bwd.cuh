/* bwd.cuh — what the backward files share: the float32 scratch the backward works in (carved
 * out of one workspace the caller allocates; see lca_cuda_bwd_workspace) and the tensor-core
 * entry points of attend_bwd_mma.cu and the Hopper kernels. */
#pragma once
#include "common.cuh"

namespace lca {

/* Contiguous buffers, all float32 except anchor (int32) and kbar/vbar (the input dtype):
 *   dq (B, L, H, D), dk (B, L, Hkv, D), dv (B, L, Hkv, Dv)   gradients before conversion
 *   dkb (B, m, Hkv, D), dvb (B, m, Hkv, Dv)                    gradients of the condensed entries
 *   delta (B, H, L)                                            rowsum(dO o O)
 *   alpha (B, m, Hkv, g), anchor (B, m, Hkv)                   the recomputed condensation
 *   kbar (B, m, Hkv, D), vbar (B, m, Hkv, Dv)                  the entries the forward attended
 *   qbar (B, m, Hkv, D), dqb (B, m, Hkv, D), dsc (B, m, Hkv, g)  the condensation backward's
 *       per-group terms: the summary query, its gradient / (n hg) (added to the group's last n
 *       query rows), the scores' gradient (added, times qbar, to the group's key rows)
 * With v_in_k, dv / dvb / vbar are the first Dv columns of dk / dkb / kbar (same pointers). */
struct BwdWork {
    float *dq, *dk, *dv, *dkb, *dvb, *delta, *alpha, *qbar, *dqb, *dsc;
    int32_t *anchor;
    void *kbar, *vbar;
    int64_t ldv;                     /* row stride of dv and dvb: Dv, or D with v_in_k */
};

/* G_t of SPEC §3 in 32-bit arithmetic (t, w, g < 2^31), for the kernels that index positions
 * in 32 bits. */
__device__ __forceinline__ int ncond32(int t, int g, int w) {
    return t + 1 < w ? 0 : (int)((uint32_t)(t + 1 - w) / (uint32_t)g);
}

}  // namespace lca

/* A Hopper launcher's status when it launched nothing and the caller should run its
 * mma.sync kernel instead (e.g. the driver refused a tensor map); distinct from every
 * lca_status. */
#define LCA_BWD_NOT_HANDLED (-1)

/* attend_bwd_mma.cu: tensor-core dq and dk/dv kernels, and the calls they cover (on a compute
 * 9.0 device the two wgmma kernels below run instead where they apply). */
extern "C" int lca_cuda_bwd_mma_supported(const lca_params *p, int device);
/* fold (the whole backward): where the Hopper kernels can, launch only the condensed entries'
 * dk/dv blocks here and set *folded: LCA_FOLD_DKDV (the caller runs the exact blocks with
 * kDkdvExactFold after the condensation's backward) | LCA_FOLD_DQ (and then the dq kernel
 * with fold: it is not launched here) */
#define LCA_FOLD_DKDV 1
#define LCA_FOLD_DQ 2
extern "C" int lca_cuda_bwd_mma(const lca_params *p, const lca::BwdWork *w, int device,
                                void *stream, int fold, int *folded);
/* The dq kernel the last lca_cuda_bwd_mma call launched: "wgmma" or "mma". */
extern "C" const char *lca_cuda_bwd_mma_dq_kernel(void);

/* attend_bwd_dq_sm90a.cu (sm_90a only; absent when setup.py defines LCA_NO_SM90A): the wgmma
 * dq kernel for (D, Dv) = (192, 128) and (128, 128).  lca_cuda_bwd_dq_wgmma returns LCA_OK,
 * LCA_BWD_NOT_HANDLED or an error. */
extern "C" int lca_cuda_bwd_dq_wgmma_supported(const lca_params *p, int device);
extern "C" int lca_cuda_bwd_dq_wgmma(const lca_params *p, const lca::BwdWork *w, void *stream,
                                     int fold);
/* fold: the same kernel writing the final dq (the input dtype into p->dq, the condensation's
 * term added: bwd_finish_vec_kernel MODE 0's bits) after the condensation's backward */
extern "C" int lca_cuda_bwd_dq_wgmma_folds(const lca_params *p, int device);

/* attend_bwd_dkdv_sm90a.cu (likewise): the wgmma dk/dv kernel for the same shapes when H / Hkv
 * divides 64; LCA_OK, LCA_BWD_NOT_HANDLED or an error.  part: which blocks (kDkdvAll; or
 * kDkdvCondensed, then after the condensation's backward kDkdvExactFold, whose blocks write the
 * final dk, dv). */
enum { kDkdvAll = 0, kDkdvCondensed = 1, kDkdvExactFold = 2 };
extern "C" int lca_cuda_bwd_dkdv_wgmma_supported(const lca_params *p, int device);
extern "C" int lca_cuda_bwd_dkdv_wgmma_folds(const lca_params *p, int device);
extern "C" int lca_cuda_bwd_dkdv_wgmma(const lca_params *p, const lca::BwdWork *w, void *stream,
                                       int part);
