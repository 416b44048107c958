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
 * The fold (the whole backward, groups of 16 or more, attend_bwd.cu): the condensed entries'
 * blocks run in a launch of their own (kDkdvCondensed), the condensation's backward after them,
 * then the exact tokens' blocks (kDkdvExactFold), whose epilogue adds the condensation's terms
 * and writes dk, dv in the input dtype — the conversion kernel's float operations in its order,
 * so the bits are those of the float32 route (LCA_CUDA_DISABLE=dkdv_fold), which writes float32
 * into the workspace and leaves the terms to bwd_finish_vec_kernel.  Each consumer warpgroup
 * stages its keys' terms in shared memory before its main loop.  H200 at 128K: backward 52.9
 * ms against 53.6-53.9 (the exact blocks 7.9 ms, the 1.5 ms of dk and dv conversions gone). */
#include <string.h>

#include <algorithm>

#include "bwd.cuh"
#include "wgmma.cuh"

namespace lca {
namespace dkdv90 {

constexpr int kKeys = 128, kRows = 64, kDV = 128, kThreads = 384;
constexpr float kLog2e = 1.4426950408889634f;

/* The folded epilogue's terms, staged in shared memory per consumer warpgroup before its main
 * loop (their loads behind the epilogue's stores would each wait out L2): the dkbar, qbar and
 * dvbar rows of the (at most kTermGroups) groups its 64 keys fall in, then each key's alpha,
 * dscore and anchor flag.  kTermGroups bounds the groups 64 consecutive keys span: g >= 16. */
constexpr int kTermGroups = 5;
template <int D> __host__ __device__ constexpr int term_floats() {
    return kTermGroups * (2 * D + 128) + 3 * 64;
}

template <int D> struct Layout {
    static constexpr int kStages = D == 192 ? 3 : 4;
    static constexpr int kK = kKeys * D, kV = kKeys * kDV;      /* elements */
    static constexpr int kQ = kRows * D, kO = kRows * kDV;
    static constexpr int kStage = kQ + kO;
    static constexpr size_t kInfo = (size_t)kStages * kRows * sizeof(float4);
    static constexpr size_t kBytes =
        2 * (size_t)(kK + kV + kStages * kStage) + kInfo + (2 * kStages + 1) * 8 + 1024;
    static constexpr size_t kTermsAt =                  /* the fold's terms, 16-byte aligned */
        (2 * (size_t)(kK + kV + kStages * kStage) + kInfo + (2 * kStages + 1) * 8 + 15) / 16 * 16;
    static constexpr size_t kFoldBytes = kBytes + 16 + 2 * sizeof(float) * term_floats<D>();
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

/* kFold: the exact blocks' epilogue finishes their keys' gradients itself (see launch) */
template <typename T, int D, bool kFold>
__global__ void __launch_bounds__(kThreads, 1)
    lca_bwd_dkdv_wgmma_kernel(lca_params p, BwdWork w, const __grid_constant__ Maps tm,
                              uint32_t blk0) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Ly = Layout<D>;
    constexpr int kStages = Ly::kStages;
    extern __shared__ unsigned char smem_raw[];
    /* a generic base (the wgmma descriptors stay in uniform registers: see smem_align1024);
       the row terms (info) and the fold's terms by shared addresses, through lds_* / sts_*:
       LDS / STS, not generic loads on the long scoreboard between each tile's products —
       the condensed blocks' launch 21.25 -> 19.77 ms at 128K */
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    T *Ks = (T *)base, *Vs = Ks + Ly::kK, *St = Vs + Ly::kV;   /* St: kStages x (Q, dO) */
    float4 *info = (float4 *)(St + kStages * Ly::kStage);      /* kStages x kRows */
    uint64_t *full = (uint64_t *)(info + kStages * kRows), *empty = full + kStages;
    uint64_t *kv_full = empty + kStages;
    const uint32_t info_a = smem_addr(info);

    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int hg = p.H / p.Hkv, g = (int)p.g, win = (int)p.w;
    /* blockIdx.x = key block x (batch, kv head), the (batch, kv head) fastest, the condensed
     * blocks (every row after a point sees them: the longest) first */
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), bx = blockIdx.x + blk0, kb = bx / nbh,
                   bh = bx - kb * nbh;
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
                sts_f4(info_a + (st * kRows + r) * 16, f);
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
    /* kFold: this warpgroup's terms (see kTermGroups), read while K and V land */
    const uint32_t terms_a = smem_addr(base + Ly::kTermsAt) + cw * term_floats<D>() * 4;
    constexpr int kRowF = 2 * D + kDV;                           /* dkbar | qbar | dvbar */
    const int kw0 = key0 + cw * 64;                              /* this warpgroup's first key */
    if constexpr (kFold) {
        const int g = (int)p.g, j0 = kw0 / g, m = (int)p.m;
        for (int x = tid; x < kTermGroups * kRowF / 4; x += 128) {
            const int sl = x / (kRowF / 4), c = 4 * (x - sl * (kRowF / 4)), j = j0 + sl;
            if (j >= m) continue;
            const int64_t e = ((int64_t)b * m + j) * p.Hkv + h;
            const float *src = c < D       ? w.dkb + e * D + c
                               : c < 2 * D ? w.qbar + e * D + c - D
                                           : w.dvb + e * w.ldv + c - 2 * D;
            sts_f4(terms_a + (sl * kRowF + c) * 4, __ldg((const float4 *)src));
        }
        if (tid < 64) {
            const int t = kw0 + tid, j = t / g, ii = t - j * g;
            const int64_t e = ((int64_t)b * m + j) * p.Hkv + h;
            const bool grp = t < nk + key0 && j < m;
            const uint32_t kt = terms_a + kTermGroups * kRowF * 4;
            sts_f(kt + 4 * tid, grp ? __ldg(w.alpha + e * g + ii) : 0.0f);
            sts_f(kt + 4 * (64 + tid), grp ? __ldg(w.dsc + e * g + ii) : 0.0f);
            sts_f(kt + 4 * (128 + tid), grp && __ldg(w.anchor + e) == ii ? 1.0f : 0.0f);
        }
        if (cw == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
        else asm volatile("bar.sync 3, 128;\n" ::: "memory");
    }
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
        const uint32_t inf = info_a + st * kRows * 16;
        /* f(n, e, i, row terms): element (n, e) of key i of this thread, masked to exactly 0 */
        auto each = [&](auto f) {
#pragma unroll
            for (int n = 0; n < kRows / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float4 r = lds_f4(inf + (n * 8 + 2 * tq + e) * 16);
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
    if constexpr (kFold) {
        /* an exact block after the condensation's backward: the keys' final gradients in the
           input dtype, with the condensation's terms (staged in shared memory before the main
           loop) — the same float operations, in the same order, as bwd_finish_vec_kernel's
           MODE 1 and 2 on the float32 values the plain epilogue would have stored
           (bit-identical; intrinsics: nothing left to contract) */
        const int g = (int)p.g, m = (int)p.m, j0 = kw0 / g;
        const int ds = (int)p.d_score, dpool = (int)p.d_pool;
        const uint32_t kt = terms_a + kTermGroups * kRowF * 4;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int kr = kfirst - key0 + 8 * i;
            if (kr >= nk) continue;
            const int t = key0 + kr, kl = t - kw0, j = t / g;
            const bool grp = j < m, on = lds_f(kt + 4 * (128 + kl)) != 0.0f;
            const float ra = lds_f(kt + 4 * kl), rd = lds_f(kt + 4 * (64 + kl));
            const uint32_t tv = terms_a + (j - j0) * kRowF * 4;  /* read only where grp */
            T *dkd = row<T>(p.dk, b, t, h), *dvd = row<T>(p.dv, b, t, h);
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                const int c = n * 8 + 2 * tq;
                float x[2] = {__fmul_rn(dk[n][2 * i], scale), __fmul_rn(dk[n][2 * i + 1], scale)};
                if (grp) {
                    const float2 u = lds_f2(tv + 4 * c), v = lds_f2(tv + 4 * (D + c));
                    const float uu[2] = {u.x, u.y}, vv[2] = {v.x, v.y};
#pragma unroll
                    for (int y = 0; y < 2; y++) {
                        float add = c + y < dpool ? __fmul_rn(ra, uu[y]) : (on ? uu[y] : 0.0f);
                        if (c + y < ds) add = __fmaf_rn(rd, vv[y], add);
                        x[y] = __fadd_rn(x[y], add);
                    }
                } else {
                    x[0] = __fadd_rn(x[0], 0.0f), x[1] = __fadd_rn(x[1], 0.0f);
                }
                *(uint32_t *)(dkd + c) = pack2<T>(x[0], x[1]);
            }
#pragma unroll
            for (int n = 0; n < kDV / 8; n++) {
                const int c = n * 8 + 2 * tq;
                float x[2] = {dv[n][2 * i], dv[n][2 * i + 1]};
                if (grp) {
                    const float2 u = lds_f2(tv + 4 * (2 * D + c));
                    x[0] = __fmaf_rn(ra, u.x, x[0]), x[1] = __fmaf_rn(ra, u.y, x[1]);
                } else {
                    x[0] = __fadd_rn(x[0], 0.0f), x[1] = __fadd_rn(x[1], 0.0f);
                }
                *(uint32_t *)(dvd + c) = pack2<T>(x[0], x[1]);
            }
        }
        return;
    }
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
 * runs the mma.sync kernel), or LCA_ERR_CUDA.  part: kDkdvAll every block, float32 gradients
 * into the workspace; kDkdvCondensed the condensed entries' blocks alone; kDkdvExactFold the
 * exact tokens' blocks alone, finishing their keys' dk and dv in the input dtype (the caller
 * runs the condensation's backward between the two: their epilogue reads its per-group terms). */
template <typename T, int D>
int launch(const lca_params *p, const BwdWork *w, cudaStream_t stream, int part) {
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
    auto kernel = part == kDkdvExactFold ? lca_bwd_dkdv_wgmma_kernel<T, D, true>
                                     : lca_bwd_dkdv_wgmma_kernel<T, D, false>;
    const size_t smem = part == kDkdvExactFold ? Layout<D>::kFoldBytes : Layout<D>::kBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    const int64_t nbh = p->B * p->Hkv, ncb = (p->m + kKeys - 1) / kKeys;
    const int64_t b0 = part == kDkdvExactFold ? ncb * nbh : 0;
    const int64_t nb = part == kDkdvAll ? nblocks(p) * nbh : part == kDkdvCondensed ? ncb * nbh
                                                       : nblocks(p) * nbh - b0;
    if (nb > 0) kernel<<<(unsigned)nb, kThreads, smem, stream>>>(*p, *w, tm, (uint32_t)b0);
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

/* Whether the exact blocks can finish their keys' gradients (kDkdvExactFold): dk and dv written two
 * elements at a time (4-byte aligned rows), groups of 16 or more (kTermGroups), the shared
 * memory with the terms, LCA_CUDA_DISABLE=dkdv_fold not set. */
extern "C" int lca_cuda_bwd_dkdv_wgmma_folds(const lca_params *p, int device) {
    using namespace lca::dkdv90;
    if (p->g < 16) return 0;
    const size_t need = p->D == 192 ? Layout<192>::kFoldBytes : Layout<128>::kFoldBytes;
    if (!lca::device_fits(device, need, true)) return 0;
    return lca::rows_on(p->dk, p->B, p->L, p->Hkv, 4, 2) &&
           lca::rows_on(p->dv, p->B, p->L, p->Hkv, 4, 2) && !lca::kernel_disabled("dkdv_fold");
}

extern "C" int lca_cuda_bwd_dkdv_wgmma(const lca_params *p, const lca::BwdWork *w, void *stream,
                                       int part) {
    using namespace lca::dkdv90;
    cudaStream_t s = (cudaStream_t)stream;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 192)
        return bf ? launch<__nv_bfloat16, 192>(p, w, s, part) : launch<__half, 192>(p, w, s, part);
    return bf ? launch<__nv_bfloat16, 128>(p, w, s, part) : launch<__half, 128>(p, w, s, part);
}
