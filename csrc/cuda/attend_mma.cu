/* attend_mma.cu — SPEC §3 attention forward on tensor cores (mma.sync m16n8k16, sm_80+),
 * FlashAttention-2 order, for bf16/fp16 with (D, Dv) in {(64, 64), (128, 128), (192, 128)}:
 * GQA/MHA head dims and the non-absorbed MLA shape.  Other shapes use attend_fwd.cu.
 *
 * A block owns 64 score rows of one (batch, kv head): rows R0 .. R0+63 of the flattened
 * (position, head-in-group) space, so the hg query heads sharing a kv head read its keys once.
 * Four warps, 16 rows each.  Keys come in blocks of 64: the condensed entries [0, G(t_last)),
 * then the exact tokens [G(t_first)*g, t_last]; each row masks to its own ranges (SPEC §3).
 * Per block: K and V tiles to shared memory (16-byte loads), S = Q K^T (Q fragments held in
 * registers; K fragments by ldmatrix), online softmax in float32 (base 2; masks only on the
 * key blocks that some row of the tile sees in part), O += P V with P re-packed as A fragments
 * and V read by ldmatrix.trans.  K/V tiles are double-buffered with cp.async: block i+1 loads
 * while block i computes.  Row tiles run heaviest first.  Not yet: wgmma (sm_90a), warp
 * specialisation, TMA. */
#include "mma.cuh"

namespace lca {

constexpr int kRows = 64, kKeys = 64, kPad = 8, kThreads = 128;

/* Copy n rows of width W (multiple of 8) from a strided global view into a padded tile; rows
 * n .. kKeys-1 are zeroed.  src(i) gives row i's address.  ASYNC: with cp.async (16 bytes a
 * thread, completion through cp.async.wait_group), else plain loads. */
template <typename T, int W, bool ASYNC, typename F>
__device__ __forceinline__ void load_tile(T *tile, int n, F src) {
    constexpr int V = W / 8;                       /* 16-byte vectors per row */
    for (int i = threadIdx.x; i < kKeys * V; i += kThreads) {
        const int r = i / V, c = (i % V) * 8;
        T *dst = tile + r * (W + kPad) + c;
        if (r < n && ASYNC) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src(r) + c));
        } else {
            *(uint4 *)dst = r < n ? *(const uint4 *)(src(r) + c) : make_uint4(0, 0, 0, 0);
        }
    }
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads) lca_attend_mma_kernel(lca_params p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    /* Q, then two stages of (K, V): the next block's tiles load while this one computes */
    T *Qs = (T *)smem_raw;
    constexpr int kStage = kKeys * (D + kPad) + kKeys * (DV + kPad);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z, h = blockIdx.y;
    /* the last row tiles see the most condensed entries: launch them first (less tail) */
    const int64_t R0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * kRows, nrows = p.L * hg;
    const int64_t t_first = R0 / hg;
    const int64_t t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;

    /* Q tile -> shared -> A fragments in registers */
    load_tile<T, D, false>(Qs, (int)(nrows - R0 < kRows ? nrows - R0 : kRows), [&](int r) {
        const int64_t R = R0 + r;
        return row<const T>(p.q, b, R / hg, h * hg + R % hg);
    });
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const T *base = Qs + (warp * 16 + gq) * (D + kPad) + ks * 16 + 2 * tq;
        qf[ks][0] = *(const uint32_t *)base;
        qf[ks][1] = *(const uint32_t *)(base + 8 * (D + kPad));
        qf[ks][2] = *(const uint32_t *)(base + 8);
        qf[ks][3] = *(const uint32_t *)(base + 8 * (D + kPad) + 8);
    }

    /* this thread's two rows: their positions and visible ranges */
    int64_t tr[2], Gr[2];
    bool live[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int64_t R = R0 + warp * 16 + gq + 8 * i;
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = num_condensed(tr[i], p.g, p.w);
    }
    float o[DV / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < DV / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale_l2 = (float)p.scale * 1.4426950408889634f;      /* logits in log2 units */
    const float rep_bias_l2 = (float)p.rep_bias * 1.4426950408889634f;
    const int64_t Gmax = num_condensed(t_last, p.g, p.w);
    const int64_t Gmin = num_condensed(t_first, p.g, p.w);
    const int64_t e_hi = Gmax * p.g;                 /* every row's exact range starts by here */
    const bool all_live = R0 + kRows <= nrows;
    const int64_t e0 = num_condensed(t_first, p.g, p.w) * p.g;
    const int64_t ncond_blocks = (Gmax + kKeys - 1) / kKeys;
    const int64_t nblocks = ncond_blocks + (t_last + 1 - e0 + kKeys - 1) / kKeys;

    /* block blk: condensed entries first, then exact tokens; issue its tile loads */
    auto block_start = [&](int64_t blk) {
        return blk < ncond_blocks ? blk * kKeys : e0 + (blk - ncond_blocks) * kKeys;
    };
    auto issue = [&](int64_t blk) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
        T *Ks = Qs + kRows * (D + kPad) + (blk & 1) * kStage, *Vs = Ks + kKeys * (D + kPad);
        const lca_view &kv = cond ? p.kbar : p.k, &vv = cond ? p.vbar : p.v;
        load_tile<T, D, true>(Ks, nk, [&](int r) { return row<const T>(kv, b, key0 + r, h); });
        load_tile<T, DV, true>(Vs, nk, [&](int r) { return row<const T>(vv, b, key0 + r, h); });
        cp_async_commit();
    };
    if (nblocks > 0) issue(0);

    for (int64_t blk = 0; blk < nblocks; blk++) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk);
        if (blk + 1 < nblocks) {
            issue(blk + 1);                               /* the other stage: free since the */
            cp_async_wait<1>();                           /* barrier that ended blk - 1 */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T *Ks = Qs + kRows * (D + kPad) + (blk & 1) * kStage, *Vs = Ks + kKeys * (D + kPad);

        /* S = Q K^T for this warp's 16 rows x 64 keys */
        float s[kKeys / 8][4];
#pragma unroll
        for (int n = 0; n < kKeys / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
            for (int n = 0; n < kKeys / 8; n += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, Ks + (n * 8 + (lane & 7) + ((lane >> 4) << 3)) * (D + kPad) +
                                    ks * 16 + ((lane >> 3) & 1) * 8);
                mma16816<T>(s[n], qf[ks], kf[0], kf[1]);
                mma16816<T>(s[n + 1], qf[ks], kf[2], kf[3]);
            }

        /* scale (log2 domain), mask only where some row of the tile sees part of this key
         * block, online softmax (rows i = 0: gq, 1: gq + 8) */
        const int64_t kend = cond ? Gmin : t_first + 1;            /* all rows see [.., kend) */
        const bool full = all_live && key0 + kKeys <= kend && (cond || key0 >= e_hi);
        const float bias = cond ? rep_bias_l2 : 0.0f;
        float bmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (full) {
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float &x = s[n][2 * i + e];
                        x = fmaf(x, scale_l2, bias);
                        bmax[i] = fmaxf(bmax[i], x);
                    }
            } else {
                const int64_t lo = cond ? 0 : Gr[i] * p.g, hi = cond ? Gr[i] : tr[i] + 1;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int64_t key = key0 + n * 8 + 2 * tq + e;
                        float &x = s[n][2 * i + e];
                        x = (live[i] && key >= lo && key < hi) ? fmaf(x, scale_l2, bias)
                                                               : -INFINITY;
                        bmax[i] = fmaxf(bmax[i], x);
                    }
            }
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 1));
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 2));
            const float mnew = fmaxf(m[i], bmax[i]);
            const float base = mnew == -INFINITY ? 0.0f : mnew;   /* a row with nothing yet */
            const float corr = ex2(m[i] - base);
            m[i] = mnew;
            l[i] *= corr;
#pragma unroll
            for (int n = 0; n < DV / 8; n++) o[n][2 * i] *= corr, o[n][2 * i + 1] *= corr;
#pragma unroll
            for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float &x = s[n][2 * i + e];
                    x = ex2(x - base);
                    l[i] += x;
                }
        }

        /* O += P V: P (16 x 64) as four A fragments; V^T fragments by ldmatrix.trans */
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                   pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < DV / 8; n += 2) {
                uint32_t bf[4];
                const int r = kk * 16 + (lane & 15), c = n * 8 + (lane >> 4) * 8;
                ldmatrix_x4_trans(bf, Vs + r * (DV + kPad) + c);
                mma16816<T>(o[n], a, bf[0], bf[1]);
                mma16816<T>(o[n + 1], a, bf[2], bf[3]);
            }
        }
        __syncthreads();                                  /* this stage may be refilled */
    }

    /* epilogue: finish the row sums across the quad, normalise, store out and lse */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (!live[i]) continue;
        const int64_t R = R0 + warp * 16 + gq + 8 * i, hq = h * hg + R % hg;
        T *dst = row<T>(p.out, b, tr[i], hq);
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int n = 0; n < DV / 8; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (tq == 0)
            ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] =
                (m[i] + __log2f(l[i])) * 0.6931471805599453f;
    }
}

template <typename T, int D, int DV> int launch_mma(const lca_params *p, cudaStream_t stream) {
    const size_t smem = sizeof(T) * (size_t)(kRows * (D + kPad) +
                                             2 * (kKeys * (D + kPad) + kKeys * (DV + kPad)));
    auto kernel = lca_attend_mma_kernel<T, D, DV>;
    return launch_row_tiles(kernel, p, kRows, kThreads, smem, stream);
}

}  // namespace lca

/* Whether attend_mma covers this call: dtype, widths, and 16-byte aligned rows. */
extern "C" int lca_cuda_mma_supported(const lca_params *p) {
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!((p->D == 64 && p->Dv == 64) || (p->D == 128 && p->Dv == 128) ||
          (p->D == 192 && p->Dv == 128)))
        return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->out};
    if (!lca::rows_aligned16(vs)) return 0;
    return (p->L * (p->H / p->Hkv) + lca::kRows - 1) / lca::kRows <= 2147483647 &&
           p->Hkv <= 65535 && p->B <= 65535;
}

extern "C" int lca_cuda_attend_mma(const lca_params *p, void *stream) {
    using namespace lca;
    cudaStream_t s = (cudaStream_t)stream;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 64) return bf ? launch_mma<__nv_bfloat16, 64, 64>(p, s) : launch_mma<__half, 64, 64>(p, s);
    if (p->D == 128) return bf ? launch_mma<__nv_bfloat16, 128, 128>(p, s) : launch_mma<__half, 128, 128>(p, s);
    return bf ? launch_mma<__nv_bfloat16, 192, 128>(p, s) : launch_mma<__half, 192, 128>(p, s);
}
