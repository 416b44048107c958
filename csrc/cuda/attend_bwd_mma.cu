/* attend_bwd_mma.cu — steps 3 and 4 of the backward (see attend_bwd.cu) on tensor cores
 * (mma.sync m16n8k16, float32 accumulation, sm_80+) for bf16/fp16 with (D, Dv) in {(64, 64),
 * (128, 128), (192, 128)}: GQA/MHA head dims and the non-absorbed MLA shape.  Rows are the
 * flattened (position, head-in-group) space of one (batch, kv head), as in attend_mma.cu, so
 * the hg query heads sharing a kv head share its key tiles.  All tiles are row-major in shared
 * memory with 8 elements of padding (ldmatrix without bank conflicts); the transposed operands
 * come from ldmatrix.trans.
 *
 * dq kernel: a block owns 128 rows (8 warps x 16) and walks the key blocks of 64 a row tile of
 * the forward sees (the condensed entries, then the exact tokens), K/V tiles double-buffered
 * with cp.async:  S = Q K^T,  P = exp2(S tau log2e + bias - lse log2e) masked,  dP = dO V^T,
 *                 dS = P (dP - delta),  dQ += dS K.
 * dk/dv kernel: a block owns 128 keys (8 warps x 16) — condensed entries or exact tokens of one
 * (batch, kv head) — holds K and V in shared memory, and walks the row tiles of 32 rows that
 * see them, Q/dO tiles double-buffered:  S^T = K Q^T,  dP^T = V dO^T,  dV += P^T dO,
 *                 dK += dS^T Q.
 * Each output row belongs to one warp of one block and is summed in row order: deterministic.
 * dq is written whole; dk/dv are per key, so no atomics.  On a compute 9.0 device, for (D, Dv)
 * in {(128, 128), (192, 128)}, the wgmma/TMA kernels of attend_bwd_dq_sm90a.cu and
 * attend_bwd_dkdv_sm90a.cu run instead (the latter when H / Hkv divides 64; each falls back to
 * its twin here when a tensor map cannot express the views; LCA_CUDA_DISABLE=wgmma: both here). */
#include <algorithm>

#include "bwd.cuh"
#include "mma.cuh"

namespace lca {
namespace bwdmma {

constexpr int kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;


/* Row R of the flattened (position, head-in-group) space -> position t, query head index within
 * the group; 32-bit (the launcher checks L * hg < 2^31), no division when hg = 1. */
__device__ __forceinline__ void split_row(int64_t R, uint32_t hg, int64_t &t, int64_t &i) {
    const uint32_t Ru = (uint32_t)R, tu = hg == 1 ? Ru : Ru / hg;
    t = tu, i = Ru - tu * hg;
}

/* Rows [0, n) of a ROWS x W tile (ld W + kPad) from src(r), 16 bytes a thread; rows n .. ROWS-1
 * zeroed.  ASYNC: cp.async (completed by wait_groups), else plain loads. */
template <typename T, int ROWS, int W, int NT, bool ASYNC, typename F>
__device__ __forceinline__ void load_rows(T *tile, int n, F src) {
    constexpr int V = W / 8;
    for (int i = threadIdx.x; i < ROWS * V; i += NT) {
        const int r = i / V, c = (i % V) * 8;
        T *dst = tile + r * (W + kPad) + c;
        if (r < n && ASYNC) cp_async16(dst, src(r) + c);
        else *(uint4 *)dst = r < n ? *(const uint4 *)(src(r) + c) : make_uint4(0, 0, 0, 0);
    }
}

/* A fragment (16 x 16 at row m0, column k0) of a row-major [m][k] tile. */
template <typename T, int LD>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T *tile, int m0, int k0, int lane) {
    ldmatrix_x4(a, tile + (m0 + (lane & 15)) * LD + k0 + (lane >> 4) * 8);
}
/* B fragments of n-tiles n0 and n0 + 8 (k0 .. k0+15) from a row-major [n][k] tile. */
template <typename T, int LD>
__device__ __forceinline__ void frag_b(uint32_t (&b)[4], const T *tile, int n0, int k0, int lane) {
    ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + k0 + ((lane >> 3) & 1) * 8);
}
/* B fragments of n-tiles n0 and n0 + 8 (k0 .. k0+15) from a row-major [k][n] tile. */
template <typename T, int LD>
__device__ __forceinline__ void frag_bt(uint32_t (&b)[4], const T *tile, int n0, int k0, int lane) {
    ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * LD + n0 + (lane >> 4) * 8);
}

/* ------------------------------------------------------------------------------------------ */

constexpr int kQWarps = 8, kQRows = 16 * kQWarps, kQKeys = 64;

template <typename T, int D, int DV>
constexpr size_t dq_smem() {
    return sizeof(T) * (size_t)(kQRows * (D + kPad) + kQRows * (DV + kPad) +
                                2 * (kQKeys * (D + kPad) + kQKeys * (DV + kPad)));
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(32 * kQWarps, 1) dq_kernel(lca_params p, BwdWork w) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int LDQ = D + kPad, LDV = DV + kPad, NT = 32 * kQWarps;
    constexpr int kStage = kQKeys * LDQ + kQKeys * LDV;
    T *Qs = (T *)smem_raw, *dOs = Qs + kQRows * LDQ, *stages = dOs + kQRows * LDV;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t hg = p.H / p.Hkv, L = p.L, nrows = L * hg;
    /* blockIdx.x = row tile x (batch, kv head), the (batch, kv head) fastest and the tiles of
     * the longest rows (the last positions) first in every head */
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), tile = blockIdx.x / nbh, bh = blockIdx.x - tile * nbh;
    const int64_t b = bh / (uint32_t)p.Hkv, h = bh - (uint32_t)b * (uint32_t)p.Hkv;
    const int64_t R0 = ((nrows + kQRows - 1) / kQRows - 1 - (int64_t)tile) * kQRows;
    const int nvalid = (int)(nrows - R0 < kQRows ? nrows - R0 : kQRows);
    const int64_t t_first = R0 / hg, t_last = (R0 + nvalid - 1) / hg;

    load_rows<T, kQRows, D, NT, true>(Qs, nvalid, [&](int r) {
        const int64_t R = R0 + r;
        return row<const T>(p.q, b, R / hg, h * hg + R % hg);
    });
    load_rows<T, kQRows, DV, NT, true>(dOs, nvalid, [&](int r) {
        const int64_t R = R0 + r;
        return row<const T>(p.dout, b, R / hg, h * hg + R % hg);
    });
    cp_async_commit();

    int64_t tr[2], Gr[2];
    bool live[2];
    float lse2[2], dl[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int64_t R = R0 + warp * 16 + gq + 8 * i;
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = num_condensed(tr[i], p.g, p.w);
        const int64_t hq = h * hg + (live[i] ? R % hg : 0);
        lse2[i] = live[i] ? ((const float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] * kLog2e
                          : 0.0f;
        dl[i] = live[i] ? w.delta[(b * p.H + hq) * L + tr[i]] : 0.0f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
    const float sl2 = (float)p.scale * kLog2e, bl2 = (float)p.rep_bias * kLog2e;
    const int64_t Gmax = num_condensed(t_last, p.g, p.w);
    const int64_t e0 = num_condensed(t_first, p.g, p.w) * p.g;
    const int64_t ncb = (Gmax + kQKeys - 1) / kQKeys;
    const int64_t nblocks = ncb + (t_last + 1 - e0 + kQKeys - 1) / kQKeys;
    auto block_start = [&](int64_t blk) {
        return blk < ncb ? blk * kQKeys : e0 + (blk - ncb) * kQKeys;
    };
    auto issue = [&](int64_t blk) {
        const bool cond = blk < ncb;
        const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = (int)(kend - key0 < kQKeys ? kend - key0 : kQKeys);
        T *Ks = stages + (blk & 1) * kStage, *Vs = Ks + kQKeys * LDQ;
        const lca_view &kv = cond ? p.kbar : p.k, &vv = cond ? p.vbar : p.v;
        load_rows<T, kQKeys, D, NT, true>(Ks, nk, [&](int r) { return row<const T>(kv, b, key0 + r, h); });
        load_rows<T, kQKeys, DV, NT, true>(Vs, nk, [&](int r) { return row<const T>(vv, b, key0 + r, h); });
        cp_async_commit();
    };
    if (nblocks > 0) issue(0);

    for (int64_t blk = 0; blk < nblocks; blk++) {
        const bool cond = blk < ncb;
        const int64_t key0 = block_start(blk);
        if (blk + 1 < nblocks) {
            issue(blk + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T *Ks = stages + (blk & 1) * kStage, *Vs = Ks + kQKeys * LDQ;

        float s[kQKeys / 8][4], dp[kQKeys / 8][4];
#pragma unroll
        for (int n = 0; n < kQKeys / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {                       /* S = Q K^T */
            uint32_t a[4];
            frag_a<T, LDQ>(a, Qs, warp * 16, ks * 16, lane);
#pragma unroll
            for (int n = 0; n < kQKeys / 8; n += 2) {
                uint32_t bb[4];
                frag_b<T, LDQ>(bb, Ks, n * 8, ks * 16, lane);
                mma16816<T>(s[n], a, bb[0], bb[1]);
                mma16816<T>(s[n + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int ks = 0; ks < DV / 16; ks++) {                      /* dP = dO V^T */
            uint32_t a[4];
            frag_a<T, LDV>(a, dOs, warp * 16, ks * 16, lane);
#pragma unroll
            for (int n = 0; n < kQKeys / 8; n += 2) {
                uint32_t bb[4];
                frag_b<T, LDV>(bb, Vs, n * 8, ks * 16, lane);
                mma16816<T>(dp[n], a, bb[0], bb[1]);
                mma16816<T>(dp[n + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {                               /* P, dS (into s) */
            const int lo = live[i] ? (cond ? 0 : (int)(Gr[i] * p.g)) : 1;   /* dead: empty */
            const int hi = live[i] ? (cond ? (int)Gr[i] : (int)tr[i] + 1) : 0;
            const float bias = cond ? bl2 : 0.0f;
            const int kb = (int)key0 + 2 * tq;
#pragma unroll
            for (int n = 0; n < kQKeys / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int key = kb + n * 8 + e;
                    const bool vis = key >= lo && key < hi;
                    const float pr = vis ? ex2(s[n][2 * i + e] * sl2 + bias - lse2[i]) : 0.0f;
                    s[n][2 * i + e] = pr * (dp[n][2 * i + e] - dl[i]);
                }
        }
#pragma unroll
        for (int kk = 0; kk < kQKeys / 16; kk++) {                  /* dQ += dS K */
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                   pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                uint32_t bb[4];
                frag_bt<T, LDQ>(bb, Ks, n * 8, kk * 16, lane);
                mma16816<T>(acc[n], a, bb[0], bb[1]);
                mma16816<T>(acc[n + 1], a, bb[2], bb[3]);
            }
        }
        __syncthreads();                                            /* stage may be refilled */
    }
    if (nblocks == 0) cp_async_wait<0>();

    const float scale = (float)p.scale;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!live[i]) continue;
        const int64_t R = R0 + warp * 16 + gq + 8 * i, hq = h * hg + R % hg;
        float *dst = w.dq + ((b * L + tr[i]) * p.H + hq) * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(float2 *)(dst + n * 8 + 2 * tq) =
                make_float2(acc[n][2 * i] * scale, acc[n][2 * i + 1] * scale);
    }
}

/* ------------------------------------------------------------------------------------------ */

constexpr int kKWarps = 8, kKKeys = 16 * kKWarps, kKRows = 32;

template <typename T, int D, int DV>
constexpr size_t dkdv_smem() {
    return sizeof(T) * (size_t)(kKKeys * (D + kPad) + kKKeys * (DV + kPad) +
                                2 * (kKRows * (D + kPad) + kKRows * (DV + kPad))) +
           2 * kKRows * 4 * sizeof(float);
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(32 * kKWarps, 1) dkdv_kernel(lca_params p, BwdWork w) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int LDQ = D + kPad, LDV = DV + kPad, NT = 32 * kKWarps;
    constexpr int kStage = kKRows * LDQ + kKRows * LDV;
    static_assert(NT == 8 * kKRows && D % 64 == 0 && DV % 64 == 0, "8 loader threads a row");
    T *Ks = (T *)smem_raw, *Vs = Ks + kKKeys * LDQ, *stages = Vs + kKKeys * LDV;
    float *rowinfo = (float *)(stages + 2 * kStage);      /* [stage][lse, delta, lo, hi][row] */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t hg = p.H / p.Hkv, L = p.L, g = p.g, m = p.m;
    /* blockIdx.x = key block x (batch, kv head), the (batch, kv head) fastest: the condensed
     * blocks of every head (longest first) start before any exact block, so no long block is
     * left for the end of the grid */
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), kb = blockIdx.x / nbh, bh = blockIdx.x - kb * nbh;
    const int64_t b = bh / (uint32_t)p.Hkv, h = bh - (uint32_t)b * (uint32_t)p.Hkv;
    const int64_t ncb = (m + kKKeys - 1) / kKKeys;
    const bool cond = kb < ncb;                           /* condensed blocks first: longest */
    const int64_t key0 = cond ? (int64_t)kb * kKKeys : ((int64_t)kb - ncb) * kKKeys;
    const int64_t nkeys = cond ? m : L;
    const int nk = (int)(nkeys - key0 < kKKeys ? nkeys - key0 : kKKeys);
    int64_t Rb, Re;                                       /* the rows that see these keys */
    if (cond) {
        Rb = ((key0 + 1) * g + p.w - 1) * hg, Re = L * hg;
    } else {
        int64_t tmax = ((key0 + nk - 1) / g + 1) * g + p.w - 2;
        if (tmax > L - 1) tmax = L - 1;
        Rb = key0 * hg, Re = (tmax + 1) * hg;
    }
    const int64_t ntiles = Re > Rb ? (Re - Rb + kKRows - 1) / kKRows : 0;

    const lca_view &kv = cond ? p.kbar : p.k, &vv = cond ? p.vbar : p.v;
    load_rows<T, kKKeys, D, NT, true>(Ks, nk, [&](int r) { return row<const T>(kv, b, key0 + r, h); });
    load_rows<T, kKKeys, DV, NT, true>(Vs, nk, [&](int r) { return row<const T>(vv, b, key0 + r, h); });
    cp_async_commit();

    /* One row tile: 8 threads a row, each 16-byte chunks lc, lc + 8, ... of its q and dO rows;
     * the row's lse and delta come by cp.async with the tile (no thread waits on a global load
     * here), its visible key range [lo, hi) is computed by a third thread of the row. */
    const int lr = threadIdx.x >> 3, lc = threadIdx.x & 7;
    auto issue = [&](int64_t it) {
        const int64_t R = Rb + it * kKRows + lr;
        T *Qs = stages + (it & 1) * kStage, *dOs = Qs + kKRows * LDQ;
        float *info = rowinfo + (it & 1) * 4 * kKRows;
        if (R < Re) {
            int64_t t, i;
            split_row(R, (uint32_t)hg, t, i);
            const int64_t hq = h * hg + i;
            const T *qr = row<const T>(p.q, b, t, hq), *dr = row<const T>(p.dout, b, t, hq);
#pragma unroll
            for (int j = 0; j < D / 64; j++) cp_async16(Qs + lr * LDQ + lc * 8 + 64 * j, qr + lc * 8 + 64 * j);
#pragma unroll
            for (int j = 0; j < DV / 64; j++) cp_async16(dOs + lr * LDV + lc * 8 + 64 * j, dr + lc * 8 + 64 * j);
            if (lc == 0) {
                cp_async4(info + lr, (const float *)p.lse.p + b * p.lse.sb + hq * p.lse.st + t);
            } else if (lc == 1) {
                cp_async4(info + kKRows + lr, w.delta + (b * p.H + hq) * L + t);
            } else if (lc == 2) {
                const int G = ncond32((int)t, (int)g, (int)p.w);
                ((int *)info)[2 * kKRows + lr] = cond ? 0 : G * (int)g;
                ((int *)info)[3 * kKRows + lr] = cond ? G : (int)t + 1;
            }
        } else {                                          /* past the last row: zeros, masked */
#pragma unroll
            for (int j = 0; j < D / 64; j++) *(uint4 *)(Qs + lr * LDQ + lc * 8 + 64 * j) = make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int j = 0; j < DV / 64; j++) *(uint4 *)(dOs + lr * LDV + lc * 8 + 64 * j) = make_uint4(0, 0, 0, 0);
            if (lc < 4) ((int *)info)[lc * kKRows + lr] = 0;
        }
        cp_async_commit();
    };

    float dk[D / 8][4], dv[DV / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0;
#pragma unroll
    for (int n = 0; n < DV / 8; n++) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0;
    const float sl2 = (float)p.scale * kLog2e, bias = cond ? (float)p.rep_bias * kLog2e : 0.0f;
    const int kw = warp * 16;                            /* this warp's keys: kw .. kw + 15 */
    const int mykey = (int)key0 + kw + gq;               /* this thread's: mykey, mykey + 8 */
    if (ntiles > 0) issue(0);

    for (int64_t it = 0; it < ntiles; it++) {
        if (it + 1 < ntiles) {
            issue(it + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T *Qs = stages + (it & 1) * kStage, *dOs = Qs + kKRows * LDQ;
        const float *info = rowinfo + (it & 1) * 4 * kKRows;

        float s[kKRows / 8][4], dp[kKRows / 8][4];
#pragma unroll
        for (int n = 0; n < kKRows / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {                       /* S^T = K Q^T */
            uint32_t a[4];
            frag_a<T, LDQ>(a, Ks, kw, ks * 16, lane);
#pragma unroll
            for (int n = 0; n < kKRows / 8; n += 2) {
                uint32_t bb[4];
                frag_b<T, LDQ>(bb, Qs, n * 8, ks * 16, lane);
                mma16816<T>(s[n], a, bb[0], bb[1]);
                mma16816<T>(s[n + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int ks = 0; ks < DV / 16; ks++) {                      /* dP^T = V dO^T */
            uint32_t a[4];
            frag_a<T, LDV>(a, Vs, kw, ks * 16, lane);
#pragma unroll
            for (int n = 0; n < kKRows / 8; n += 2) {
                uint32_t bb[4];
                frag_b<T, LDV>(bb, dOs, n * 8, ks * 16, lane);
                mma16816<T>(dp[n], a, bb[0], bb[1]);
                mma16816<T>(dp[n + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < kKRows / 8; n++)                        /* P^T (s), dS^T (dp) */
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int r = n * 8 + 2 * tq + e;
                const float l2 = info[r] * kLog2e, dl = info[kKRows + r];
                const int lo = ((const int *)info)[2 * kKRows + r];
                const int hi = ((const int *)info)[3 * kKRows + r];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int key = mykey + 8 * i;
                    const bool vis = key >= lo && key < hi;
                    const float pr = vis ? ex2(s[n][2 * i + e] * sl2 + bias - l2) : 0.0f;
                    s[n][2 * i + e] = pr;
                    dp[n][2 * i + e] = pr * (dp[n][2 * i + e] - dl);
                }
            }
#pragma unroll
        for (int kk = 0; kk < kKRows / 16; kk++) {
            const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                    pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < DV / 8; n += 2) {                   /* dV += P^T dO */
                uint32_t bb[4];
                frag_bt<T, LDV>(bb, dOs, n * 8, kk * 16, lane);
                mma16816<T>(dv[n], pa, bb[0], bb[1]);
                mma16816<T>(dv[n + 1], pa, bb[2], bb[3]);
            }
            const uint32_t da[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]),
                                    pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                    pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {                    /* dK += dS^T Q */
                uint32_t bb[4];
                frag_bt<T, LDQ>(bb, Qs, n * 8, kk * 16, lane);
                mma16816<T>(dk[n], da, bb[0], bb[1]);
                mma16816<T>(dk[n + 1], da, bb[2], bb[3]);
            }
        }
        __syncthreads();
    }
    if (ntiles == 0) cp_async_wait<0>();

    const float scale = (float)p.scale;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int kr = kw + gq + 8 * i;
        if (kr >= nk) continue;
        const int64_t key = key0 + kr;
        float *dkd = cond ? w.dkb + ((b * m + key) * p.Hkv + h) * D : w.dk + ((b * L + key) * p.Hkv + h) * D;
        float *dvd = cond ? w.dvb + ((b * m + key) * p.Hkv + h) * DV : w.dv + ((b * L + key) * p.Hkv + h) * DV;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(float2 *)(dkd + n * 8 + 2 * tq) = make_float2(dk[n][2 * i] * scale, dk[n][2 * i + 1] * scale);
#pragma unroll
        for (int n = 0; n < DV / 8; n++)
            *(float2 *)(dvd + n * 8 + 2 * tq) = make_float2(dv[n][2 * i], dv[n][2 * i + 1]);
    }
}

inline int64_t dq_tiles(const lca_params *p) {
    return (p->L * (p->H / p->Hkv) + kQRows - 1) / kQRows;
}
inline int64_t dkdv_blocks(const lca_params *p) {
    return (p->m + kKKeys - 1) / kKKeys + (p->L + kKKeys - 1) / kKKeys;
}

/* which dq kernel the last launch ran (lca_cuda_bwd_mma_dq_kernel) */
static const char *last_dq_kernel = "";

/* fold: the caller runs the condensation's backward next and then, as *folded says, the wgmma
 * dk/dv kernel's exact blocks (kDkdvExactFold) and the folded dq kernel: only the condensed
 * entries' dk/dv blocks (and dq, when it is not folded) run here */
template <typename T, int D, int DV>
int launch(const lca_params *p, const BwdWork *w, int device, cudaStream_t stream, int fold,
           int *folded) {
    const size_t sq = dq_smem<T, D, DV>(), sk = dkdv_smem<T, D, DV>();
    auto kq = dq_kernel<T, D, DV>;
    auto kk = dkdv_kernel<T, D, DV>;
    if (cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sq) != cudaSuccess ||
        cudaFuncSetAttribute(kk, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sk) != cudaSuccess)
        return LCA_ERR_CUDA;
    const int64_t nbh = p->B * p->Hkv;
    int dq = LCA_BWD_NOT_HANDLED, dkdv = LCA_BWD_NOT_HANDLED;
#ifndef LCA_NO_SM90A
    /* on compute 9.0 the wgmma kernels (attend_bwd_dq_sm90a.cu, attend_bwd_dkdv_sm90a.cu) */
    const bool hopper = !kernel_disabled("wgmma");
    const bool dq90 = hopper && lca_cuda_bwd_dq_wgmma_supported(p, device);
    const bool dk90 = hopper && lca_cuda_bwd_dkdv_wgmma_supported(p, device);
    const bool dkfold = fold && dk90 && lca_cuda_bwd_dkdv_wgmma_folds(p, device);
    bool dqfold = dkfold && dq90 && lca_cuda_bwd_dq_wgmma_folds(p, device);
    if (dq90 && !dqfold) dq = lca_cuda_bwd_dq_wgmma(p, w, stream, 0);
    if (dq != LCA_BWD_NOT_HANDLED && dq != LCA_OK) return dq;
    if (dk90) dkdv = lca_cuda_bwd_dkdv_wgmma(p, w, stream, dkfold ? kDkdvCondensed : kDkdvAll);
    if (dkdv != LCA_BWD_NOT_HANDLED && dkdv != LCA_OK) return dkdv;
    if (dkdv == LCA_OK && dkfold) *folded = LCA_FOLD_DKDV | (dqfold ? LCA_FOLD_DQ : 0);
    if (dqfold && !*folded) {          /* no fold after all (no tensor maps): dq in float32 */
        dqfold = false;
        dq = lca_cuda_bwd_dq_wgmma(p, w, stream, 0);
        if (dq != LCA_BWD_NOT_HANDLED && dq != LCA_OK) return dq;
    }
    if (dqfold) dq = LCA_OK;           /* the caller launches it */
#endif
    last_dq_kernel = dq == LCA_OK ? "wgmma" : "mma";
    if (dq != LCA_OK) kq<<<(unsigned)(dq_tiles(p) * nbh), 32 * kQWarps, sq, stream>>>(*p, *w);
    if (dkdv != LCA_OK) kk<<<(unsigned)(dkdv_blocks(p) * nbh), 32 * kKWarps, sk, stream>>>(*p, *w);
    return LCA_OK;
}

}  // namespace bwdmma
}  // namespace lca

/* Whether the tensor-core kernels cover this call: dtype, widths, separate v, 16-byte rows,
 * and their shared memory within the device's opt-in limit (an A100 or an sm_86/89 part has
 * less than the H200: those take the portable kernels instead of failing). */
extern "C" int lca_cuda_bwd_mma_supported(const lca_params *p, int device) {
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!((p->D == 64 && p->Dv == 64) || (p->D == 128 && p->Dv == 128) ||
          (p->D == 192 && p->Dv == 128)))
        return 0;
    if (p->v_in_k || p->L * (p->H / p->Hkv) >= 2147483647 || p->w >= 2147483647) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->dout};
    if (!lca::rows_aligned16(vs)) return 0;
    using namespace lca::bwdmma;
    if (std::max(dq_tiles(p), dkdv_blocks(p)) * p->B * p->Hkv > 2147483647) return 0;  /* grid.x */
    size_t need;                            /* the larger of the two kernels' (bf16 = fp16) */
    if (p->D == 64) need = std::max(dq_smem<__half, 64, 64>(), dkdv_smem<__half, 64, 64>());
    else if (p->D == 128) need = std::max(dq_smem<__half, 128, 128>(), dkdv_smem<__half, 128, 128>());
    else need = std::max(dq_smem<__half, 192, 128>(), dkdv_smem<__half, 192, 128>());
    return lca::device_fits(device, need, false);
}

extern "C" int lca_cuda_bwd_mma(const lca_params *p, const lca::BwdWork *w, int device,
                                void *stream, int fold, int *folded) {
    using namespace lca::bwdmma;
    cudaStream_t s = (cudaStream_t)stream;
    *folded = 0;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 64)
        return bf ? launch<__nv_bfloat16, 64, 64>(p, w, device, s, fold, folded)
                  : launch<__half, 64, 64>(p, w, device, s, fold, folded);
    if (p->D == 128)
        return bf ? launch<__nv_bfloat16, 128, 128>(p, w, device, s, fold, folded)
                  : launch<__half, 128, 128>(p, w, device, s, fold, folded);
    return bf ? launch<__nv_bfloat16, 192, 128>(p, w, device, s, fold, folded)
              : launch<__half, 192, 128>(p, w, device, s, fold, folded);
}

extern "C" const char *lca_cuda_bwd_mma_dq_kernel(void) { return lca::bwdmma::last_dq_kernel; }
