/* attend_mla.cu — SPEC §3 attention forward on tensor cores (mma.sync m16n8k16, sm_80+) for the
 * absorbed MLA shapes: keys [c; r] of width D = Dc + Dr, values v = k[..., :Dc] (v_in_k = 1),
 * (D, Dv) in {(576, 512), (288, 256)}, bf16/fp16; and, with a separate value tile, GQA/MHA head
 * dim 256/256 (VK = false).  Other shapes use attend_mma.cu or the SIMT path of attend_fwd.cu.
 *
 * A block owns 64 score rows of one (batch, kv head): rows R0 .. R0+63 of the flattened
 * (position, head-in-group) space, so with Hkv = 1 every key tile is read once for all H heads
 * (64 rows = 64/H positions x H heads, or part of one position's heads when H > 64).  Keys come
 * in blocks of 64: the condensed entries [0, G(t_last)), then the exact tokens
 * [G(t_first)*g, t_last]; each row masks to its own ranges (SPEC §3).  A key tile holds the
 * whole key row, so the value tile is its first Dv columns: loaded once, used twice.
 *
 * Eight warps: warp (rg, half), rg = warp & 3 owns rows 16*rg .. 16*rg+15, half = warp >> 2
 * owns keys 32*half .. +31 of S = Q K^T (full depth D) and output columns half*Dv/2 .. +Dv/2
 * (Dv/2 float32 accumulators per row: 128 registers a thread at Dv = 512).  The two warps of a
 * row group exchange their row maxima and (at the end) row sums through shared memory and share
 * P (bf16/fp16) through shared memory, synchronising on a named barrier of 64 threads.  Q stays
 * in shared memory (ldmatrix per use: the 576-deep fragments do not fit in registers next to
 * the accumulators).  K tiles are double-buffered with cp.async.  Shared memory at D = 576:
 * Q 72 KB + 2 x K 72 KB + P 9 KB = 226 KB (rows XOR-swizzled in 16-byte chunks instead of
 * padded, to fit under the 227 KB a block may take on sm_90); one block (8 warps) per SM.
 * Tiles are issued heaviest first (last positions see the most condensed entries). */
#include "mma.cuh"

namespace lca {
namespace mla {

constexpr int kRows = 64, kKeys = 64, kThreads = 256, kPs = kKeys + 8;

/* Shared-memory layout of a tile with rows of D elements: 16-byte chunk c of row r.  D = 576
 * (72 chunks, a multiple of 8): unpadded, chunk index XOR (r & 7), so the 8 rows an ldmatrix
 * reads hit 8 different bank groups.  Otherwise rows are padded by one chunk (odd stride). */
template <int D> struct Layout {
    static constexpr bool kSwz = (D / 8) % 8 == 0;
    static constexpr int RS = kSwz ? D : D + 8;
    static __device__ __forceinline__ int at(int r, int c) {
        return r * RS + (kSwz ? (c ^ (r & 7)) : c) * 8;
    }
};

/* the two warps of row group rg (warps rg and rg + 4): 64 threads on barrier 1 + rg */
__device__ __forceinline__ void pair_sync(int rg) {
    asm volatile("bar.sync %0, 64;\n" ::"r"(rg + 1));
}

/* Copy n rows of width D from a strided global view into a tile (cp.async, 16 bytes a thread);
 * rows n .. 63 are zeroed (a value row times p = 0 must stay 0).  src(r): row r's address. */
template <typename T, int D, typename F>
__device__ __forceinline__ void load_tile(T *tile, int n, F src) {
    constexpr int V = D / 8;
    for (int i = threadIdx.x; i < kKeys * V; i += kThreads) {
        const int r = i / V, c = i % V;
        T *dst = tile + Layout<D>::at(r, c);
        if (r < n) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a),
                         "l"(src(r) + 8 * c));
        } else {
            *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
    }
}

template <typename T, int D, int DV, bool VK>
__global__ void __launch_bounds__(kThreads, 1) lca_attend_mla_kernel(lca_params p) {
    using Ly = Layout<D>;
    using Lv = Layout<DV>;
    /* a stage: the key tile, then (unless v = k[..., :DV]) the value tile */
    constexpr int kStage = kKeys * Ly::RS + (VK ? 0 : kKeys * Lv::RS);
    constexpr int kHalfV = DV / 2, kNT = kHalfV / 8;      /* output columns / n-tiles a warp */
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *Qs = (T *)smem_raw;
    T *Kst = Qs + kRows * Ly::RS;                         /* two stages */
    T *Ps = Kst + 2 * kStage;                             /* kRows x kPs */
    float *xmax = (float *)(Ps + kRows * kPs);            /* [2][kRows] */
    float *xsum = xmax + 2 * kRows;                       /* [2][kRows] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int rg = warp & 3, half = warp >> 2;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z, h = blockIdx.y;
    const int64_t nrows = p.L * hg;
    const int64_t R0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * kRows;   /* heaviest first */
    const int64_t t_first = R0 / hg;
    const int64_t t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;

    /* Q tile (its own cp.async group, waited for with the first key tile) */
    load_tile<T, D>(Qs, (int)(nrows - R0 < kRows ? nrows - R0 : kRows), [&](int r) {
        const int64_t R = R0 + r;
        return row<const T>(p.q, b, R / hg, h * hg + R % hg);
    });
    cp_async_commit();

    /* this thread's two rows (i = 0: gq, 1: gq + 8 of the row group) */
    int64_t tr[2], Gr[2];
    bool live[2];
    int lr[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        lr[i] = rg * 16 + gq + 8 * i;
        const int64_t R = R0 + lr[i];
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = num_condensed(tr[i], p.g, p.w);
    }
    float o[kNT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < kNT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale = (float)p.scale, bias = (float)p.rep_bias;
    const int64_t Gmax = num_condensed(t_last, p.g, p.w);
    const int64_t e0 = num_condensed(t_first, p.g, p.w) * p.g;
    const int64_t ncond_blocks = (Gmax + kKeys - 1) / kKeys;
    const int64_t nblocks = ncond_blocks + (t_last + 1 - e0 + kKeys - 1) / kKeys;  /* >= 1 */

    auto block_start = [&](int64_t blk) {
        return blk < ncond_blocks ? blk * kKeys : e0 + (blk - ncond_blocks) * kKeys;
    };
    auto issue = [&](int64_t blk) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
        const lca_view &kv = cond ? p.kbar : p.k;
        T *Ks = Kst + (blk & 1) * kStage;
        load_tile<T, D>(Ks, nk, [&](int r) { return row<const T>(kv, b, key0 + r, h); });
        if (!VK) {
            const lca_view &vv = cond ? p.vbar : p.v;
            load_tile<T, DV>(Ks + kKeys * Ly::RS, nk,
                             [&](int r) { return row<const T>(vv, b, key0 + r, h); });
        }
        cp_async_commit();
    };
    issue(0);

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
        const T *Ks = Kst + (blk & 1) * kStage;
        const T *Vs = VK ? Ks : Ks + kKeys * Ly::RS;

        /* S = Q K^T: this warp's 16 rows x 32 keys, depth D */
        float s[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
#pragma unroll 6
        for (int ks = 0; ks < D / 16; ks++) {
            uint32_t a[4];
            ldmatrix_x4(a, Qs + Ly::at(rg * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
            for (int nn = 0; nn < 2; nn++) {
                uint32_t kb[4];
                ldmatrix_x4(kb, Ks + Ly::at(half * 32 + nn * 16 + (lane & 7) + ((lane >> 4) << 3),
                                        2 * ks + ((lane >> 3) & 1)));
                mma16816<T>(s[2 * nn], a, kb[0], kb[1]);
                mma16816<T>(s[2 * nn + 1], a, kb[2], kb[3]);
            }
        }

        /* mask, scale; row maxima over both halves of the key block */
        float bmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int64_t lo = cond ? 0 : Gr[i] * p.g, hi = cond ? Gr[i] : tr[i] + 1;
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int64_t key = key0 + half * 32 + n * 8 + 2 * tq + e;
                    float &x = s[n][2 * i + e];
                    x = (live[i] && key >= lo && key < hi) ? x * scale + (cond ? bias : 0.0f)
                                                           : -INFINITY;
                    bmax[i] = fmaxf(bmax[i], x);
                }
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 1));
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 2));
            if (tq == 0) xmax[half * kRows + lr[i]] = bmax[i];
        }
        pair_sync(rg);

        /* online softmax (both warps of the pair reach the same m), P to shared memory */
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const float mnew = fmaxf(m[i], fmaxf(bmax[i], xmax[(1 - half) * kRows + lr[i]]));
            const float base = mnew == -INFINITY ? 0.0f : mnew;   /* a row with nothing yet */
            const float corr = __expf(m[i] - base);
            m[i] = mnew;
            l[i] *= corr;
#pragma unroll
            for (int n = 0; n < kNT; n++) o[n][2 * i] *= corr, o[n][2 * i + 1] *= corr;
#pragma unroll
            for (int n = 0; n < 4; n++) {
                const float p0 = __expf(s[n][2 * i] - base), p1 = __expf(s[n][2 * i + 1] - base);
                l[i] += p0 + p1;
                *(uint32_t *)(Ps + lr[i] * kPs + half * 32 + n * 8 + 2 * tq) = pack2<T>(p0, p1);
            }
        }
        pair_sync(rg);

        /* O += P V: P (16 x 64) from shared memory, V = the tile's first DV columns */
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++) {
            uint32_t a[4];
            ldmatrix_x4(a, Ps + (rg * 16 + (lane & 15)) * kPs + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int n = 0; n < kNT; n += 2) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, Vs + (VK ? Ly::at(kk * 16 + (lane & 15),
                                                    (half * kHalfV + n * 8) / 8 + (lane >> 4))
                                             : Lv::at(kk * 16 + (lane & 15),
                                                    (half * kHalfV + n * 8) / 8 + (lane >> 4))));
                mma16816<T>(o[n], a, vb[0], vb[1]);
                mma16816<T>(o[n + 1], a, vb[2], vb[3]);
            }
        }
        __syncthreads();                                  /* this stage may be refilled */
    }

    /* epilogue: row sums over the quad and the pair, normalise, store out (and lse) */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (tq == 0) xsum[half * kRows + lr[i]] = l[i];
    }
    pair_sync(rg);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!live[i]) continue;
        const float lt = l[i] + xsum[(1 - half) * kRows + lr[i]];
        const int64_t R = R0 + lr[i], hq = h * hg + R % hg;
        T *dst = row<T>(p.out, b, tr[i], hq) + half * kHalfV;
        const float inv = 1.0f / lt;
#pragma unroll
        for (int n = 0; n < kNT; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (half == 0 && tq == 0)
            ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] = m[i] + logf(lt);
    }
}

template <int D, int DV, bool VK> constexpr size_t smem_bytes() {
    return 2 * (size_t)(3 * kRows * Layout<D>::RS + (VK ? 0 : 2 * kKeys * Layout<DV>::RS) +
                        kRows * kPs) + 4 * 4 * kRows;
}

template <typename T, int D, int DV, bool VK>
int launch(const lca_params *p, cudaStream_t stream) {
    constexpr size_t smem = smem_bytes<D, DV, VK>();
    auto kernel = lca_attend_mla_kernel<T, D, DV, VK>;
    return launch_row_tiles(kernel, p, kRows, kThreads, smem, stream);
}

}  // namespace mla
}  // namespace lca

/* Whether attend_mla covers this call: dtype, the absorbed widths with v = k[..., :Dv] or GQA
 * 256/256, 16-byte aligned rows, and enough shared memory on `device` (226 KB at D = 576 and
 * 170 KB at 256/256: sm_90, not sm_80). */
extern "C" int lca_cuda_mla_supported(const lca_params *p, int device) {
    using namespace lca::mla;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    size_t need;
    if (p->v_in_k && p->D == 576 && p->Dv == 512) need = smem_bytes<576, 512, true>();
    else if (p->v_in_k && p->D == 288 && p->Dv == 256) need = smem_bytes<288, 256, true>();
    else if (!p->v_in_k && p->D == 256 && p->Dv == 256) need = smem_bytes<256, 256, false>();
    else return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->out};
    if (!lca::rows_aligned16(vs) || !lca::device_fits(device, need, false)) return 0;
    return (p->L * (p->H / p->Hkv) + kRows - 1) / kRows <= 2147483647 && p->Hkv <= 65535 &&
           p->B <= 65535;
}

extern "C" int lca_cuda_attend_mla(const lca_params *p, void *stream) {
    using namespace lca::mla;
    cudaStream_t s = (cudaStream_t)stream;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 576)
        return bf ? launch<__nv_bfloat16, 576, 512, true>(p, s)
                  : launch<__half, 576, 512, true>(p, s);
    if (p->D == 288)
        return bf ? launch<__nv_bfloat16, 288, 256, true>(p, s)
                  : launch<__half, 288, 256, true>(p, s);
    return bf ? launch<__nv_bfloat16, 256, 256, false>(p, s)
              : launch<__half, 256, 256, false>(p, s);
}
