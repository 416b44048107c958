/* attend_bwd_dkdv_sm90a.cu — step 4 of the backward (attend_bwd.cu), the key side: dK and dV of
 * one block of 128 keys (condensed entries or exact tokens of one (batch, kv head)), on
 * Hopper's warpgroup tensor cores (wgmma, sm_90a only) for bf16/fp16 with (D, Dv) in
 * {(192, 128), (128, 128)}.  It computes what attend_bwd_mma.cu's dkdv_kernel computes (the
 * same products, float32 accumulation, each key's sums in row-tile order: deterministic; at
 * D = 192 dS^T is formed from P^T as rounded to the input type, see below), and runs instead of
 * it on a compute 9.0 device (LCA_CUDA_DISABLE=wgmma selects it back).  H200, SPEC §9 shape at
 * 128K: 28.1–30.8 ms (445–488 TFLOP/s on its 1280 FLOP a pair and head); at 32K 3.0 ms
 * against the mma.sync kernel's 6.0.
 *
 * A block: 384 threads in three warpgroups, specialised.
 *   - warpgroup 0, the producer: lane 0 of its first warp loads the block's K (128 x D) and
 *     V (128 x 128) once, then streams the row tiles that see these keys — Q (64 x D) and dO
 *     (64 x 128) of 64 rows of the flattened (position, head-in-group) space — by TMA into a
 *     ring of kStages stages; the warp's 32 lanes write each row's softmax terms beside the
 *     tile (bias - lse log2e, delta, and the visible key range [lo, hi) of SPEC §3) and arrive
 *     on the stage's `full` mbarrier with it; the stage is refilled once both consumers
 *     released it on `empty`.
 *   - warpgroups 1 and 2, the consumers, own 64 keys each.  Per row tile:
 *         S^T  = K Q^T     D / 16 wgmma m64n64k16, K and Q from shared memory
 *         dP^T = V dO^T    8 wgmma m64n64k16
 *         P^T  = exp2(S^T tau log2e + bias - lse log2e), masked to exactly 0
 *         dS^T = P^T (dP^T - delta), masked to exactly 0
 *         dV  += P^T dO    4 wgmma m64n128k16, P^T from registers, dO read N-major
 *         dK  += dS^T Q    4 wgmma m64nDk16, dS^T from registers, Q read N-major
 *     The two consumers run unsynchronised, so one's exponentials run under the other's
 *     products.  At D = 128 S^T and dP^T are issued together; at D = 192 the dK (96) and dV
 *     (64) accumulators leave room for one of them at a time (240 registers), so S^T is waited
 *     for and P^T packed before dP^T is issued beside dV, and dS^T takes P^T from the packed
 *     values.
 * Masks are applied only on row tiles some row of which sees part of the block.  A partial
 * last row tile has its rows past the range zeroed (the TMA box brings later rows, which may
 * hold non-finite values no product may see).
 *
 * Q and dO tiles come through a 5-d tensor map (columns, head in group, kv head, position,
 * batch) with boxes (64, hg, 1, 64 / hg, 1): the 64 rows of a tile in the flattened order, so
 * the kernel needs hg to divide 64.  Shared memory: every tile 128-byte swizzled in 64-column
 * blocks (the layout of attend_gqa_sm90a.cu), K and V 80 KB and 3 stages of 41 KB at
 * D = 192; one block per SM.  Blocks run the condensed entries (the longest) first.
 *
 * LCA_DKDV90_VARIANT=1 runs variant 1 instead (below: 64-key blocks, one warpgroup computing
 * dV and one dK; slower on the H200, not the default). */
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "bwd.cuh"
#include "wgmma.cuh"

namespace lca {
namespace dkdv90 {

constexpr int kKeys = 128, kRows = 64, kDV = 128, kThreads = 384;
constexpr float kLog2e = 1.4426950408889634f;

template <int D> struct Layout {
    static constexpr int kStages = D == 192 ? 3 : 4;
    static constexpr int kK = kKeys * D, kV = kKeys * kDV;      /* elements */
    static constexpr int kQ = kRows * D, kO = kRows * kDV;
    static constexpr int kStage = kQ + kO;
    static constexpr size_t kInfo = (size_t)kStages * kRows * sizeof(float4);
    static constexpr size_t kBytes =
        2 * (size_t)(kK + kV + kStages * kStage) + kInfo + (2 * kStages + 1) * 8 + 1024;
};

/* k, v (rows L), kbar, vbar (rows m) as in the forward's maps, boxes of 128 rows; q and dout as
 * 5-d tensors, boxes of one 64-row tile */
struct Maps {
    CUtensorMap k, v, kbar, vbar, q, dout;
};

/* the two values pack2 packed */
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
    return make_float2(__half2float(__ushort_as_half((unsigned short)(v & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(v >> 16))));
}

/* A fragments (m16n8k16, this warp's 16 keys x 16 rows kk) of the rows of x */
template <typename T>
__device__ __forceinline__ void pack_frags(uint32_t (&a)[kRows / 16][4],
                                           const float (&x)[kRows / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < kRows / 16; kk++) {
        a[kk][0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
        a[kk][1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
        a[kk][2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        a[kk][3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    lca_bwd_dkdv_wgmma_kernel(lca_params p, BwdWork w, const __grid_constant__ Maps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Ly = Layout<D>;
    constexpr int kStages = Ly::kStages;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    T *Ks = (T *)base, *Vs = Ks + Ly::kK, *St = Vs + Ly::kV;   /* St: kStages x (Q, dO) */
    float4 *info = (float4 *)(St + kStages * Ly::kStage);      /* kStages x kRows */
    uint64_t *full = (uint64_t *)(info + kStages * kRows), *empty = full + kStages;
    uint64_t *kv_full = empty + kStages;

    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int hg = p.H / p.Hkv, g = (int)p.g, win = (int)p.w;
    /* blockIdx.x = key block x (batch, kv head), the (batch, kv head) fastest, the condensed
     * blocks (every row after a point sees them: the longest) first */
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), kb = blockIdx.x / nbh, bh = blockIdx.x - kb * nbh;
    const int b = (int)(bh / (uint32_t)p.Hkv), h = (int)(bh - (uint32_t)b * (uint32_t)p.Hkv);
    const int ncb = (int)((p.m + kKeys - 1) / kKeys);
    const bool cond = (int)kb < ncb;
    const int key0 = cond ? (int)kb * kKeys : ((int)kb - ncb) * kKeys;
    const int nkeys = cond ? (int)p.m : (int)p.L;
    const int nk = nkeys - key0 < kKeys ? nkeys - key0 : kKeys;
    int64_t Rb, Re;                                       /* the rows that see these keys */
    if (cond) {
        Rb = ((int64_t)(key0 + 1) * g + win - 1) * hg, Re = p.L * hg;
    } else {
        int64_t tmax = ((int64_t)(key0 + nk - 1) / g + 1) * g + win - 2;
        if (tmax > p.L - 1) tmax = p.L - 1;
        Rb = (int64_t)key0 * hg, Re = (tmax + 1) * hg;
    }
    const int ntiles = Re > Rb ? (int)((Re - Rb + kRows - 1) / kRows) : 0;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbar_init(&full[s], 32);                       /* the producer warp's lanes */
            mbar_init(&empty[s], 8);                       /* one lane of each consumer warp */
        }
        mbar_init(kv_full, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid >= 32) return;
        const int lane = tid;
        if (lane == 0) {
            const CUtensorMap *mk = cond ? &tm.kbar : &tm.k, *mv = cond ? &tm.vbar : &tm.v;
            mbar_expect_tx(kv_full, 2u * (Ly::kK + Ly::kV));
#pragma unroll
            for (int cb = 0; cb < D / 64; cb++)
                tma_load(Ks + cb * kKeys * 64, mk, cb * 64, h, key0, b, kv_full);
#pragma unroll
            for (int cb = 0; cb < kDV / 64; cb++)
                tma_load(Vs + cb * kKeys * 64, mv, cb * 64, h, key0, b, kv_full);
        }
        const float bias = cond ? (float)p.rep_bias * kLog2e : 0.0f;
        for (int it = 0; it < ntiles; it++) {
            const int st = it % kStages;
            if (it >= kStages) mbar_wait(&empty[st], (uint32_t)((it / kStages - 1) & 1));
            const int64_t R0 = Rb + (int64_t)it * kRows;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int r = 2 * lane + j;
                const int64_t R = R0 + r;
                float4 f = make_float4(0.0f, 0.0f, __int_as_float(0), __int_as_float(0));
                if (R < Re) {                              /* else nothing visible: lo = hi = 0 */
                    const int t = (int)(R / hg), hq = h * hg + (int)(R - (int64_t)t * hg);
                    const float lse =
                        ((const float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + t];
                    const float dl = w.delta[((int64_t)b * p.H + hq) * p.L + t];
                    const int G = ncond32(t, g, win);
                    f = make_float4(bias - lse * kLog2e, dl, __int_as_float(cond ? 0 : G * g),
                                    __int_as_float(cond ? G : t + 1));
                }
                info[st * kRows + r] = f;
            }
            if (lane == 0) {
                T *Qt = St + st * Ly::kStage, *Ot = Qt + Ly::kQ;
                const int t0 = (int)(R0 / hg);
                mbar_expect_tx(&full[st], 2u * Ly::kStage);
#pragma unroll
                for (int cb = 0; cb < D / 64; cb++)
                    tma_load5(Qt + cb * kRows * 64, &tm.q, cb * 64, 0, h, t0, b, &full[st]);
#pragma unroll
                for (int cb = 0; cb < kDV / 64; cb++)
                    tma_load5(Ot + cb * kRows * 64, &tm.dout, cb * 64, 0, h, t0, b, &full[st]);
            } else {
                mbar_arrive(&full[st]);
            }
        }
        return;
    }

    /* consumer warpgroup cw: keys key0 + 64 cw .. + 63 */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const T *Kw = Ks + cw * 64 * 64, *Vw = Vs + cw * 64 * 64;    /* 64-column blocks of 128 rows */
    const int kfirst = key0 + cw * 64 + warp * 16 + gq;          /* this thread's: +0, +8 */
    const float sl2 = (float)p.scale * kLog2e;
    /* D = 192: S^T and dP^T in turn (P^T packed before dP^T is issued), as the two together
       with P^T, dS^T and the dK, dV accumulators exceed the 240 registers */
    constexpr bool kSplit = D > 128;

    float dk[D / 8][4], dv[kDV / 8][4], s[kRows / 8][4], dp[kRows / 8][4];
    uint32_t pa[kRows / 16][4], da[kRows / 16][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0;
#pragma unroll
    for (int n = 0; n < kDV / 8; n++) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0;

    mbar_wait(kv_full, 0);
    for (int it = 0; it < ntiles; it++) {
        const int st = it % kStages;
        mbar_wait(&full[st], (uint32_t)((it / kStages) & 1));
        T *Qt = St + st * Ly::kStage, *Ot = Qt + Ly::kQ;
        const int64_t R0 = Rb + (int64_t)it * kRows;
        const int nr = Re - R0 < kRows ? (int)(Re - R0) : kRows;
        if (nr < kRows) {
            /* rows past the range: zeros (both consumers, half each, before either reads) */
            constexpr int kQc = D / 8, kC = kQc + kDV / 8;      /* 16-byte chunks a row */
            for (int i = nr * kC + cw * 128 + tid; i < kRows * kC; i += 256) {
                const int r = i / kC, c = i % kC;
                T *tile = c < kQc ? Qt : Ot;
                const int cc = c < kQc ? c : c - kQc;
                *(uint4 *)(tile + (cc >> 3) * (kRows * 64) + r * 64 + (((cc & 7) ^ (r & 7)) << 3)) =
                    make_uint4(0, 0, 0, 0);
            }
            fence_async_smem();
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
        }
        /* every row of the tile sees every key of the block: no masks */
        const int ta = (int)(R0 / hg), tz = (int)((R0 + nr - 1) / hg);
        const bool fullv = nr == kRows && (cond ? key0 + nk <= ncond32(ta, g, win)
                                                : key0 + nk - 1 <= ta &&
                                                      ncond32(tz, g, win) * g <= key0);
        const float4 *inf = info + st * kRows;
        /* f(n, e, i, row terms): element (n, e) of key i of this thread, masked to exactly 0 */
        auto each = [&](auto f) {
#pragma unroll
            for (int n = 0; n < kRows / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float4 r = inf[n * 8 + 2 * tq + e];
                    const int lo = __float_as_int(r.z), hi = __float_as_int(r.w);
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        const int key = kfirst + 8 * i;
                        f(n, e, i, r, fullv || (key >= lo && key < hi));
                    }
                }
        };
        auto qk = [&]() {                                         /* S^T = K Q^T */
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_ss<kRows, T>(s, gdesc(Kw + cb * kKeys * 64 + kin, 16, 1024),
                                   gdesc(Qt + cb * kRows * 64 + kin, 16, 1024), ks > 0);
            }
        };
        auto vdo = [&]() {                                        /* dP^T = V dO^T */
#pragma unroll
            for (int ks = 0; ks < kDV / 16; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_ss<kRows, T>(dp, gdesc(Vw + cb * kKeys * 64 + kin, 16, 1024),
                                   gdesc(Ot + cb * kRows * 64 + kin, 16, 1024), ks > 0);
            }
        };
        auto dv_add = [&]() {                                     /* dV += P^T dO */
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++)
                wgmma_rs<kDV, T, 1>(dv, pa[kk], gdesc(Ot + kk * 16 * 64, kRows * 64 * 2, 1024), 1);
        };
        auto dk_add = [&]() {                                     /* dK += dS^T Q */
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++)
                wgmma_rs<D, T, 1>(dk, da[kk], gdesc(Qt + kk * 16 * 64, kRows * 64 * 2, 1024), 1);
        };
        wg_reg_fence(s);
        wg_reg_fence(dp);
        wg_fence();
        qk();
        if constexpr (!kSplit) vdo();
        wg_commit();
        wg_wait<0>();
        wg_reg_fence(s);
        wg_reg_fence(dp);
        if constexpr (kSplit) {
            /* P^T packed at once; dP^T and dV issued together; dS^T from the packed P^T */
            each([&](int n, int e, int i, float4 r, bool vis) {
                float &x = s[n][2 * i + e];
                x = vis ? ex2(fmaf(x, sl2, r.x)) : 0.0f;
            });
            pack_frags<T>(pa, s);
            wg_reg_fence(pa);
            wg_fence();
            vdo();
            wg_commit();
            dv_add();
            wg_commit();
            wg_wait<1>();
            wg_reg_fence(dp);
            each([&](int n, int e, int i, float4 r, bool vis) {
                const float2 pr = unpack2<T>(pa[n >> 1][2 * (n & 1) + i]);
                float &x = dp[n][2 * i + e];
                x = vis ? (e ? pr.y : pr.x) * (x - r.y) : 0.0f;
            });
            pack_frags<T>(da, dp);
            wg_reg_fence(da);
            wg_fence();
            dk_add();
            wg_commit();
        } else {
            each([&](int n, int e, int i, float4 r, bool vis) {
                float &x = s[n][2 * i + e], &y = dp[n][2 * i + e];
                const float pr = ex2(fmaf(x, sl2, r.x));
                y = vis ? pr * (y - r.y) : 0.0f;
                x = vis ? pr : 0.0f;
            });
            pack_frags<T>(pa, s);
            pack_frags<T>(da, dp);
            wg_reg_fence(pa);
            wg_reg_fence(da);
            wg_fence();
            dv_add();
            dk_add();
            wg_commit();
        }
        /* waiting here keeps P^T and dS^T (the products' A registers) from living beside the
           next tile's S^T and dP^T: 256 registers at D = 192 */
        wg_wait<0>();
        wg_reg_fence(dk);
        wg_reg_fence(dv);
        wg_reg_fence(pa);
        wg_reg_fence(da);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[st]);             /* the stage is read no more */
    }

    /* dK (times tau) and dV of this thread's two keys, float32 */
    const float scale = (float)p.scale;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int kr = kfirst - key0 + 8 * i;
        if (kr >= nk) continue;
        const int64_t key = key0 + kr;
        float *dkd = cond ? w.dkb + (((int64_t)b * p.m + key) * p.Hkv + h) * D
                          : w.dk + (((int64_t)b * p.L + key) * p.Hkv + h) * D;
        float *dvd = cond ? w.dvb + (((int64_t)b * p.m + key) * p.Hkv + h) * kDV
                          : w.dv + (((int64_t)b * p.L + key) * p.Hkv + h) * kDV;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(float2 *)(dkd + n * 8 + 2 * tq) =
                make_float2(dk[n][2 * i] * scale, dk[n][2 * i + 1] * scale);
#pragma unroll
        for (int n = 0; n < kDV / 8; n++)
            *(float2 *)(dvd + n * 8 + 2 * tq) = make_float2(dv[n][2 * i], dv[n][2 * i + 1]);
    }
#endif
}

/* Host: the 5-d tensor map of a query-side view (B, L, H, cols) — (cols, hg, Hkv, L, B) —
 * with boxes of one row tile (64 columns, hg, 1, 64 / hg, 1), so a box is 64 consecutive rows
 * of the flattened (position, head-in-group) space of one kv head. */
template <typename T>
inline bool make_rows_map(CUtensorMap *m, const lca_view &v, int64_t cols, int64_t hg,
                          int64_t Hkv, int64_t L, int64_t B) {
    const auto enc = encode_tiled();
    if (!enc || L < 1 || L > 2147483647 || kRows % hg) return false;
    const int64_t es = (int64_t)sizeof(T);
    int64_t sh = v.sh * es, st = v.st * es, sb = v.sb * es;
    if (hg * Hkv == 1) sh = cols * es;                   /* a dimension of one: any stride */
    if (L == 1) st = sh * hg * Hkv;
    if (B == 1) sb = st * L;
    if (sh <= 0 || st <= 0 || sb <= 0) return false;
    const cuuint64_t dim[5] = {(cuuint64_t)cols, (cuuint64_t)hg, (cuuint64_t)Hkv, (cuuint64_t)L,
                               (cuuint64_t)B};
    const cuuint64_t stride[4] = {(cuuint64_t)sh, (cuuint64_t)(sh * hg), (cuuint64_t)st,
                                  (cuuint64_t)sb};
    const cuuint32_t box[5] = {64, (cuuint32_t)hg, 1, (cuuint32_t)(kRows / hg), 1};
    const cuuint32_t one[5] = {1, 1, 1, 1, 1};
    const CUtensorMapDataType dt = std::is_same<T, __half>::value
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return enc(m, dt, 5, v.p, dim, stride, box, one, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

inline int64_t nblocks(const lca_params *p) {
    return (p->m + kKeys - 1) / kKeys + (p->L + kKeys - 1) / kKeys;
}

/* LCA_OK, or LCA_BWD_NOT_HANDLED when a tensor map cannot express the views (the caller then
 * runs the mma.sync kernel), or LCA_ERR_CUDA */
template <typename T, int D>
int launch(const lca_params *p, const BwdWork *w, cudaStream_t stream) {
    Maps tm;
    memset(&tm, 0, sizeof tm);
    const int64_t hg = p->H / p->Hkv;
    bool ok = make_map<T>(&tm.k, p->k, D, p->L, p->Hkv, p->B, kKeys) &&
              make_map<T>(&tm.v, p->v, kDV, p->L, p->Hkv, p->B, kKeys) &&
              make_rows_map<T>(&tm.q, p->q, D, hg, p->Hkv, p->L, p->B) &&
              make_rows_map<T>(&tm.dout, p->dout, kDV, hg, p->Hkv, p->L, p->B);
    if (ok && p->m > 0)
        ok = make_map<T>(&tm.kbar, p->kbar, D, p->m, p->Hkv, p->B, kKeys) &&
             make_map<T>(&tm.vbar, p->vbar, kDV, p->m, p->Hkv, p->B, kKeys);
    else if (ok) {                                       /* no condensed rows: never read */
        tm.kbar = tm.k;
        tm.vbar = tm.v;
    }
    if (!ok) return LCA_BWD_NOT_HANDLED;
    auto kernel = lca_bwd_dkdv_wgmma_kernel<T, D>;
    const size_t smem = Layout<D>::kBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    kernel<<<(unsigned)(nblocks(p) * p->B * p->Hkv), kThreads, smem, stream>>>(*p, *w, tm);
    return LCA_OK;
}

/* ---- Variant 1 (LCA_DKDV90_VARIANT=1): the role split ----------------------------------------
 * Run on the H200 (003aa07): every dk/dv test passes for it (bit for bit equal to the kernel
 * above at D = 192), but it is slower: the backward at 128K, SPEC §9 shape, 57.7 ms of kernel
 * time against 52.5 with the kernel above (dk/dv ~36 against ~30 ms), likely the doubled
 * L2 -> SM traffic of Q / dO tiles with 64-key blocks (not profiled).  Kept as an opt-in for
 * that work (a cluster of two blocks sharing the tiles by multicast, a fifth stage).
 * A block: 64 keys (kKeys1; condensed entries or exact tokens, ordered and ranged as above),
 * 384 threads in three warpgroups:
 *   - warpgroup 0, the producer, as above: K (64 x D) and V (64 x 128) once, then the row tiles
 *     (Q, dO, row terms) into a ring of kStages stages on full / empty mbarriers.
 *   - warpgroup 1, the V role (dV 64 + S^T 32 + P^T 16 + K's A fragments 48 registers):
 *         S^T  = K Q^T             D / 16 wgmma m64n64k16, K from registers (loaded once from
 *                                  shared memory), Q from shared memory
 *         P^T  = exp2(S^T tau log2e + bias - lse log2e), masked to exactly 0, rounded to T
 *         P^T -> the P buffer (i & 1), arrive on pready[i & 1]
 *         dV  += P^T dO            4 wgmma m64n128k16, P^T from registers, dO N-major
 *   - warpgroup 2, the K role (dK 96 + dP^T 32 + dS^T 16 + P^T 16 + V's A fragments 32):
 *         dP^T = V dO^T            8 wgmma m64n64k16, V from registers, dO from shared memory
 *         wait pready[i & 1]; P^T from the P buffer
 *         dS^T = P^T (dP^T - delta), masked to exactly 0 (P^T as rounded: the D = 192 numerics
 *                of the kernel above, at D = 128 too)
 *         arrive on pfree[i & 1]
 *         dK  += dS^T Q            4 wgmma m64nDk16, dS^T from registers, Q N-major
 * Per tile i each role issues its first product of tile i and its second of tile i - 1
 * together (two groups), waits for the first, does tile i's elementwise work under the second,
 * waits for it (its stage of tile i - 1 is then released, its A registers free), and packs
 * tile i's A operand for the next turn.  No wgmma is in flight across the loop's back edge:
 * with the next tile's first product issued before the elementwise work (double-buffered
 * fragments, the first design) ptxas serialised every wgmma (C7514 / C7520: it cannot follow
 * in-flight accumulators through the loop), so this is the FlashAttention-3 intra-warpgroup
 * overlap instead; the other role's products fill the tensor cores while one waits.
 * The P buffer holds each thread's packed A fragments in register order (Pb[buf][kk][thread]):
 * no wgmma reads it, and the K role's thread of the same index reads exactly what the V role's
 * thread wrote (the two warpgroups have the same fragment layout); 16-byte stores and loads,
 * 32 consecutive a warp, no bank conflicts.
 * mbarriers: full[s] (32: the producer warp's lanes, + TMA bytes), empty[s] (8: one lane of
 * each of the 8 consumer warps, once the wgmma reading the stage completed; the last tile's
 * stage is never released, no one waits for it), kv_full (1 + TMA bytes), pready[b] (128: the
 * V role's threads, each after its stores), pfree[b] (128: the K role's threads, each after
 * its loads were consumed; only for tiles i with i + 2 < ntiles, the ones the V role waits for
 * before it rewrites buffer b).  The partial last row tile is zeroed past the range by both
 * roles (half each) behind named barrier 1 (256 threads) when they take it.
 * Numerics: the same products on the same row tiles (a 64-key block's first row is that of
 * the 128-key one, or 64 g hg (condensed) / 64 hg (exact) rows later: the tile boundaries
 * coincide, and the 128-key kernel's extra tiles add exact zeros to these keys), so at D = 192
 * dK and dV should equal the kernel above's bit for bit (assuming a wgmma with A from
 * registers rounds as one with A from shared memory). */
constexpr int kKeys1 = 64;

template <int D> struct Layout1 {
    static constexpr int kStages = D == 192 ? 4 : 5;
    static constexpr int kK = kKeys1 * D, kV = kKeys1 * kDV;    /* elements */
    static constexpr int kQ = kRows * D, kO = kRows * kDV;
    static constexpr int kStage = kQ + kO;
    static constexpr size_t kInfo = (size_t)kStages * kRows * sizeof(float4);
    static constexpr int kPb = (kRows / 16) * 128;                /* uint4 a P buffer */
    static constexpr size_t kBytes = 2 * (size_t)(kK + kV + kStages * kStage) + kInfo +
                                     2 * kPb * sizeof(uint4) + (2 * kStages + 5) * 8 + 1024;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    lca_bwd_dkdv_split_kernel(lca_params p, BwdWork w, const __grid_constant__ Maps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Ly = Layout1<D>;
    constexpr int kStages = Ly::kStages, kB = kKeys1;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    T *Ks = (T *)base, *Vs = Ks + Ly::kK, *St = Vs + Ly::kV;   /* St: kStages x (Q, dO) */
    float4 *info = (float4 *)(St + kStages * Ly::kStage);      /* kStages x kRows */
    uint4 *Pb = (uint4 *)(info + kStages * kRows);              /* 2 x kPb */
    uint64_t *full = (uint64_t *)(Pb + 2 * Ly::kPb), *empty = full + kStages;
    uint64_t *kv_full = empty + kStages, *pready = kv_full + 1, *pfree = pready + 2;

    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int hg = p.H / p.Hkv, g = (int)p.g, win = (int)p.w;
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), kb = blockIdx.x / nbh, bh = blockIdx.x - kb * nbh;
    const int b = (int)(bh / (uint32_t)p.Hkv), h = (int)(bh - (uint32_t)b * (uint32_t)p.Hkv);
    const int ncb = (int)((p.m + kB - 1) / kB);
    const bool cond = (int)kb < ncb;
    const int key0 = cond ? (int)kb * kB : ((int)kb - ncb) * kB;
    const int nkeys = cond ? (int)p.m : (int)p.L;
    const int nk = nkeys - key0 < kB ? nkeys - key0 : kB;
    int64_t Rb, Re;                                       /* the rows that see these keys */
    if (cond) {
        Rb = ((int64_t)(key0 + 1) * g + win - 1) * hg, Re = p.L * hg;
    } else {
        int64_t tmax = ((int64_t)(key0 + nk - 1) / g + 1) * g + win - 2;
        if (tmax > p.L - 1) tmax = p.L - 1;
        Rb = (int64_t)key0 * hg, Re = (tmax + 1) * hg;
    }
    const int ntiles = Re > Rb ? (int)((Re - Rb + kRows - 1) / kRows) : 0;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbar_init(&full[s], 32);                       /* the producer warp's lanes */
            mbar_init(&empty[s], 8);                       /* one lane of each consumer warp */
        }
        mbar_init(kv_full, 1);
        for (int i = 0; i < 2; i++) {
            mbar_init(&pready[i], 128);                    /* the V role's threads */
            mbar_init(&pfree[i], 128);                     /* the K role's threads */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid >= 32) return;
        const int lane = tid;
        if (lane == 0) {
            const CUtensorMap *mk = cond ? &tm.kbar : &tm.k, *mv = cond ? &tm.vbar : &tm.v;
            mbar_expect_tx(kv_full, 2u * (Ly::kK + Ly::kV));
#pragma unroll
            for (int cb = 0; cb < D / 64; cb++)
                tma_load(Ks + cb * kB * 64, mk, cb * 64, h, key0, b, kv_full);
#pragma unroll
            for (int cb = 0; cb < kDV / 64; cb++)
                tma_load(Vs + cb * kB * 64, mv, cb * 64, h, key0, b, kv_full);
        }
        const float bias = cond ? (float)p.rep_bias * kLog2e : 0.0f;
        for (int it = 0; it < ntiles; it++) {
            const int st = it % kStages;
            if (it >= kStages) mbar_wait(&empty[st], (uint32_t)((it / kStages - 1) & 1));
            const int64_t R0 = Rb + (int64_t)it * kRows;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int r = 2 * lane + j;
                const int64_t R = R0 + r;
                float4 f = make_float4(0.0f, 0.0f, __int_as_float(0), __int_as_float(0));
                if (R < Re) {                              /* else nothing visible: lo = hi = 0 */
                    const int t = (int)(R / hg), hq = h * hg + (int)(R - (int64_t)t * hg);
                    const float lse =
                        ((const float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + t];
                    const float dl = w.delta[((int64_t)b * p.H + hq) * p.L + t];
                    const int G = ncond32(t, g, win);
                    f = make_float4(bias - lse * kLog2e, dl, __int_as_float(cond ? 0 : G * g),
                                    __int_as_float(cond ? G : t + 1));
                }
                info[st * kRows + r] = f;
            }
            if (lane == 0) {
                T *Qt = St + st * Ly::kStage, *Ot = Qt + Ly::kQ;
                const int t0 = (int)(R0 / hg);
                mbar_expect_tx(&full[st], 2u * Ly::kStage);
#pragma unroll
                for (int cb = 0; cb < D / 64; cb++)
                    tma_load5(Qt + cb * kRows * 64, &tm.q, cb * 64, 0, h, t0, b, &full[st]);
#pragma unroll
                for (int cb = 0; cb < kDV / 64; cb++)
                    tma_load5(Ot + cb * kRows * 64, &tm.dout, cb * 64, 0, h, t0, b, &full[st]);
            } else {
                mbar_arrive(&full[st]);
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int role = wg - 1;                               /* 0: V role, 1: K role */
    const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const int kfirst = key0 + warp * 16 + gq;              /* this thread's keys: +0, +8 */
    const float sl2 = (float)p.scale * kLog2e;

    auto qtile = [&](int it) { return St + (it % kStages) * Ly::kStage; };
    auto otile = [&](int it) { return St + (it % kStages) * Ly::kStage + Ly::kQ; };
    /* take row tile it: wait for it; a partial one zeroed past the range (both roles, half
       each, before either issues a product on it) */
    auto acquire = [&](int it) {
        const int st = it % kStages;
        mbar_wait(&full[st], (uint32_t)((it / kStages) & 1));
        const int64_t R0 = Rb + (int64_t)it * kRows;
        if (Re - R0 < kRows) {
            const int nr = (int)(Re - R0);
            T *Qt = St + st * Ly::kStage, *Ot = Qt + Ly::kQ;
            constexpr int kQc = D / 8, kC = kQc + kDV / 8;      /* 16-byte chunks a row */
            for (int i = nr * kC + role * 128 + tid; i < kRows * kC; i += 256) {
                const int r = i / kC, c = i % kC;
                T *tile = c < kQc ? Qt : Ot;
                const int cc = c < kQc ? c : c - kQc;
                *(uint4 *)(tile + (cc >> 3) * (kRows * 64) + r * 64 + (((cc & 7) ^ (r & 7)) << 3)) =
                    make_uint4(0, 0, 0, 0);
            }
            fence_async_smem();
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
        }
    };
    /* this warpgroup reads row tile it no more (its products on it completed) */
    auto release = [&](int it) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[it % kStages]);
    };
    /* row tile it's visibility: whether every row sees every key of the block, and its row
       terms (computed before a tile's products are issued: no branch runs beside them) */
    struct TileVis {
        bool fullv;
        const float4 *inf;
    };
    auto tile_vis = [&](int it) {
        const int64_t R0 = Rb + (int64_t)it * kRows;
        const int nr = Re - R0 < kRows ? (int)(Re - R0) : kRows;
        const int ta = (int)(R0 / hg), tz = (int)((R0 + nr - 1) / hg);
        TileVis v;
        v.fullv = nr == kRows && (cond ? key0 + nk <= ncond32(ta, g, win)
                                       : key0 + nk - 1 <= ta && ncond32(tz, g, win) * g <= key0);
        v.inf = info + (it % kStages) * kRows;
        return v;
    };
    /* f(n, e, i, row terms, visible) over this thread's elements of a row tile */
    auto each = [&](const TileVis &v, auto f) {
#pragma unroll
        for (int n = 0; n < kRows / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float4 r = v.inf[n * 8 + 2 * tq + e];
                const int lo = __float_as_int(r.z), hi = __float_as_int(r.w);
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int key = kfirst + 8 * i;
                    f(n, e, i, r, v.fullv || (key >= lo && key < hi));
                }
            }
    };

    mbar_wait(kv_full, 0);
    if (role == 0) {
        /* ---- V role: S^T = K Q^T with K from registers ---- */
        float dv[kDV / 8][4], s[kRows / 8][4];
        uint32_t pa[kRows / 16][4], ka[D / 16][4];
#pragma unroll
        for (int n = 0; n < kDV / 8; n++) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0;
        {
            const int r0 = warp * 16 + gq;
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int r = r0 + 8 * (j & 1), c = ks * 16 + 2 * tq + 8 * (j >> 1);
                    ka[ks][j] = *(const uint32_t *)(Ks + sw(r, c >> 3) + (c & 7));
                }
        }
        wg_reg_fence(dv);
        wg_reg_fence(ka);
        /* tile it's P^T: from S^T (waited for), masked, rounded into pa, and published */
        auto publish = [&](int it) {
            const int pbuf = it & 1;
            if (it >= 2) mbar_wait(&pfree[pbuf], (uint32_t)(((it >> 1) - 1) & 1));
            uint4 *pw = Pb + pbuf * Ly::kPb + tid;
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++)
                pw[kk * 128] = make_uint4(pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3]);
            mbar_arrive(&pready[pbuf]);
        };
        auto qk = [&](const T *Qt) {                                      /* S^T = K Q^T */
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_rs<kRows, T, 0>(s, ka[ks], gdesc(Qt + cb * kRows * 64 + kin, 16, 1024),
                                      ks > 0);
            }
        };
        auto dv_add = [&](const T *Ot) {                                  /* dV += P^T dO */
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++)
                wgmma_rs<kDV, T, 1>(dv, pa[kk], gdesc(Ot + kk * 16 * 64, kRows * 64 * 2, 1024), 1);
        };
        auto exp_p = [&](const TileVis &v) {
            each(v, [&](int n, int e, int i, float4 r, bool vis) {
                float &x = s[n][2 * i + e];
                x = vis ? ex2(fmaf(x, sl2, r.x)) : 0.0f;
            });
        };
        if (ntiles > 0) {
            /* tile 0 */
            acquire(0);
            TileVis v = tile_vis(0);
            wg_reg_fence(s);
            wg_fence();
            qk(qtile(0));
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(s);
            exp_p(v);
            pack_frags<T>(pa, s);
            publish(0);
            /* tile it: S^T_it and dV_it-1 issued together; P^T_it under dV_it-1 */
            for (int it = 1; it < ntiles; it++) {
                acquire(it);
                v = tile_vis(it);
                wg_reg_fence(s);
                wg_reg_fence(pa);
                wg_fence();
                qk(qtile(it));
                wg_commit();
                dv_add(otile(it - 1));
                wg_commit();
                wg_wait<1>();
                wg_reg_fence(s);
                exp_p(v);
                wg_wait<0>();
                wg_reg_fence(dv);
                wg_reg_fence(pa);
                release(it - 1);
                pack_frags<T>(pa, s);
                publish(it);
            }
            wg_reg_fence(pa);
            wg_fence();
            dv_add(otile(ntiles - 1));
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(dv);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (warp * 16 + gq + 8 * i >= nk) continue;
            const int64_t key = kfirst + 8 * i;
            float *dvd = cond ? w.dvb + (((int64_t)b * p.m + key) * p.Hkv + h) * kDV
                              : w.dv + (((int64_t)b * p.L + key) * p.Hkv + h) * kDV;
#pragma unroll
            for (int n = 0; n < kDV / 8; n++)
                *(float2 *)(dvd + n * 8 + 2 * tq) = make_float2(dv[n][2 * i], dv[n][2 * i + 1]);
        }
    } else {
        /* ---- K role: dP^T = V dO^T with V from registers ---- */
        float dk[D / 8][4], dp[kRows / 8][4];
        uint32_t da[kRows / 16][4], va[kDV / 16][4];
#pragma unroll
        for (int n = 0; n < D / 8; n++) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0;
        {
            const int r0 = warp * 16 + gq;
#pragma unroll
            for (int ks = 0; ks < kDV / 16; ks++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int r = r0 + 8 * (j & 1), c = ks * 16 + 2 * tq + 8 * (j >> 1);
                    va[ks][j] = *(const uint32_t *)(Vs + sw(r, c >> 3) + (c & 7));
                }
        }
        wg_reg_fence(dk);
        wg_reg_fence(va);
        auto vdo = [&](const T *Ot) {                                     /* dP^T = V dO^T */
#pragma unroll
            for (int ks = 0; ks < kDV / 16; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_rs<kRows, T, 0>(dp, va[ks], gdesc(Ot + cb * kRows * 64 + kin, 16, 1024),
                                      ks > 0);
            }
        };
        auto dk_add = [&](const T *Qt) {                                  /* dK += dS^T Q */
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++)
                wgmma_rs<D, T, 1>(dk, da[kk], gdesc(Qt + kk * 16 * 64, kRows * 64 * 2, 1024), 1);
        };
        /* dS^T of tile it from dP^T (waited for) and the V role's P^T */
        auto ds = [&](int it, const TileVis &v) {
            const int pbuf = it & 1;
            mbar_wait(&pready[pbuf], (uint32_t)((it >> 1) & 1));
            uint32_t pv[kRows / 16][4];
            const uint4 *pr = Pb + pbuf * Ly::kPb + tid;
#pragma unroll
            for (int kk = 0; kk < kRows / 16; kk++) {
                const uint4 q = pr[kk * 128];
                pv[kk][0] = q.x, pv[kk][1] = q.y, pv[kk][2] = q.z, pv[kk][3] = q.w;
            }
            each(v, [&](int n, int e, int i, float4 r, bool vis) {
                const float2 pp = unpack2<T>(pv[n >> 1][2 * (n & 1) + i]);
                float &x = dp[n][2 * i + e];
                x = vis ? (e ? pp.y : pp.x) * (x - r.y) : 0.0f;
            });
            if (it + 2 < ntiles) mbar_arrive(&pfree[pbuf]);   /* the V role waits for it */
        };
        if (ntiles > 0) {
            acquire(0);
            TileVis v = tile_vis(0);
            wg_reg_fence(dp);
            wg_fence();
            vdo(otile(0));
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(dp);
            ds(0, v);
            pack_frags<T>(da, dp);
            for (int it = 1; it < ntiles; it++) {
                acquire(it);
                v = tile_vis(it);
                wg_reg_fence(dp);
                wg_reg_fence(da);
                wg_fence();
                vdo(otile(it));
                wg_commit();
                dk_add(qtile(it - 1));
                wg_commit();
                wg_wait<1>();
                wg_reg_fence(dp);
                ds(it, v);
                wg_wait<0>();
                wg_reg_fence(dk);
                wg_reg_fence(da);
                release(it - 1);
                pack_frags<T>(da, dp);
            }
            wg_reg_fence(da);
            wg_fence();
            dk_add(qtile(ntiles - 1));
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(dk);
        }
        const float scale = (float)p.scale;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (warp * 16 + gq + 8 * i >= nk) continue;
            const int64_t key = kfirst + 8 * i;
            float *dkd = cond ? w.dkb + (((int64_t)b * p.m + key) * p.Hkv + h) * D
                              : w.dk + (((int64_t)b * p.L + key) * p.Hkv + h) * D;
#pragma unroll
            for (int n = 0; n < D / 8; n++)
                *(float2 *)(dkd + n * 8 + 2 * tq) =
                    make_float2(dk[n][2 * i] * scale, dk[n][2 * i + 1] * scale);
        }
    }
#endif
}

inline int64_t nblocks1(const lca_params *p) {
    return (p->m + kKeys1 - 1) / kKeys1 + (p->L + kKeys1 - 1) / kKeys1;
}

/* variant 1; as launch, and launch (variant 0) where its grid or shared memory does not fit */
template <typename T, int D>
int launch_split(const lca_params *p, const BwdWork *w, cudaStream_t stream) {
    if (nblocks1(p) * p->B * p->Hkv > 2147483647) return launch<T, D>(p, w, stream);
    Maps tm;
    memset(&tm, 0, sizeof tm);
    const int64_t hg = p->H / p->Hkv;
    bool ok = make_map<T>(&tm.k, p->k, D, p->L, p->Hkv, p->B, kKeys1) &&
              make_map<T>(&tm.v, p->v, kDV, p->L, p->Hkv, p->B, kKeys1) &&
              make_rows_map<T>(&tm.q, p->q, D, hg, p->Hkv, p->L, p->B) &&
              make_rows_map<T>(&tm.dout, p->dout, kDV, hg, p->Hkv, p->L, p->B);
    if (ok && p->m > 0)
        ok = make_map<T>(&tm.kbar, p->kbar, D, p->m, p->Hkv, p->B, kKeys1) &&
             make_map<T>(&tm.vbar, p->vbar, kDV, p->m, p->Hkv, p->B, kKeys1);
    else if (ok) {                                       /* no condensed rows: never read */
        tm.kbar = tm.k;
        tm.vbar = tm.v;
    }
    if (!ok) return LCA_BWD_NOT_HANDLED;
    auto kernel = lca_bwd_dkdv_split_kernel<T, D>;
    const size_t smem = Layout1<D>::kBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess) {
        cudaGetLastError();
        return launch<T, D>(p, w, stream);
    }
    kernel<<<(unsigned)(nblocks1(p) * p->B * p->Hkv), kThreads, smem, stream>>>(*p, *w, tm);
    return LCA_OK;
}

}  // namespace dkdv90
}  // namespace lca

/* Whether the wgmma dk/dv kernel covers this call: bf16/fp16, (D, Dv) = (192, 128) or
 * (128, 128), separate v, hg dividing 64, 16-byte aligned rows, 32-bit positions, a compute
 * 9.0 device with the shared memory. */
extern "C" int lca_cuda_bwd_dkdv_wgmma_supported(const lca_params *p, int device) {
    using namespace lca::dkdv90;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!((p->D == 192 || p->D == 128) && p->Dv == kDV) || p->v_in_k) return 0;
    const int64_t hg = p->H / p->Hkv;
    if (kRows % hg || p->L * hg >= 2147483647 || p->m >= 2147483647 || p->w >= 2147483647 ||
        p->g >= 2147483647)
        return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->dout};
    if (!lca::rows_aligned16(vs)) return 0;
    if (nblocks(p) * p->B * p->Hkv > 2147483647) return 0;         /* grid.x */
    const size_t need = p->D == 192 ? Layout<192>::kBytes : Layout<128>::kBytes;
    return lca::device_fits(device, need, true);
}

extern "C" int lca_cuda_bwd_dkdv_wgmma(const lca_params *p, const lca::BwdWork *w, void *stream) {
    using namespace lca::dkdv90;
    cudaStream_t s = (cudaStream_t)stream;
    const bool bf = p->dtype == LCA_BF16;
    /* LCA_DKDV90_VARIANT=1: variant 1, the role split (it falls back to the kernel above where
       its grid or shared memory does not fit); anything else the kernel above */
    const char *env = getenv("LCA_DKDV90_VARIANT");
    if (env && env[0] == '1' && env[1] == 0) {
        if (p->D == 192)
            return bf ? launch_split<__nv_bfloat16, 192>(p, w, s) : launch_split<__half, 192>(p, w, s);
        return bf ? launch_split<__nv_bfloat16, 128>(p, w, s) : launch_split<__half, 128>(p, w, s);
    }
    if (p->D == 192) return bf ? launch<__nv_bfloat16, 192>(p, w, s) : launch<__half, 192>(p, w, s);
    return bf ? launch<__nv_bfloat16, 128>(p, w, s) : launch<__half, 128>(p, w, s);
}
