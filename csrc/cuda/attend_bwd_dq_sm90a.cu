/* attend_bwd_dq_sm90a.cu — step 3 of the backward (dq; see attend_bwd.cu) on Hopper's
 * warpgroup tensor cores (wgmma + TMA, sm_90a only: setup.py compiles the *_sm90a.cu files for
 * that target alone) for bf16/fp16 with (D, Dv) in {(192, 128), (128, 128)}.  It computes what
 * dq_kernel of attend_bwd_mma.cu computes — per query row, over the visible condensed entries
 * and exact keys,
 *     P = exp2(S tau log2e + bias - lse log2e),  dP = dO V^T,  dS = P (dP - delta),  dq = tau dS K
 * — and writes every row of w->dq (float32).  attend_bwd_mma.cu runs it in place of dq_kernel
 * on a compute 9.0 device (LCA_CUDA_DISABLE=wgmma: dq_kernel).  Not here: dk/dv.  Its FOLD
 * variant (attend_bwd.cu runs it last, after the condensation's backward) writes the final dq
 * instead, the input dtype into p.dq with the condensation's term added (step 6 for dq, the
 * same bits), each consumer warpgroup staging its groups' term rows in shared memory before its
 * main loop.  H200 at 128K: 14.4 ms against 16.5 writing float32, the 0.85 ms conversion gone
 * (the fifth session's fold read the terms from global memory between the epilogue's stores
 * and made the kernel 1.2 ms slower).
 *
 * The block is the forward's (attend_gqa_sm90a.cu, variant 28): 128 score rows of one (batch,
 * kv head) — rows R0 .. R0+127 of the flattened (position, head-in-group) space — walking the
 * same key blocks of 64 (the condensed entries [0, G(t_last)), then the exact tokens
 * [G(t_first) g, t_last]); 384 threads in three warpgroups:
 *   - warpgroup 0, the producer: one thread issues the TMA boxes of each key block's K (D/64
 *     boxes) and V (2) into a ring of kStages stages, completing on the stage's `full`
 *     mbarrier; it refills a stage once both consumers have released it on `empty`;
 *   - warpgroups 1 and 2, the consumers, 64 rows each, with their Q (64 x D) and dO (64 x 128)
 *     tiles loaded once into shared memory, and into registers as A fragments (dO always by
 *     default, Q at D = 128: see VAR).  Per key block j:
 *         S_j = Q K_j^T    (D/16 wgmma m64n64k16, K K-major from shared memory)
 *         dP_j = dO V_j^T  (8 wgmma m64n64k16, V likewise)
 *         dQ += dS_{j-1} K_{j-1}  (4 wgmma m64nDk16, dS from registers, K read N-major)
 *     are issued together; dS_j = P_j (dP_j - delta) is formed (float32, masks only on blocks
 *     that some row of the warpgroup sees in part; a masked entry is 0 by a select, never by a
 *     product) while dQ += dS_{j-1} K_{j-1} is still in the tensor cores, then packed to
 *     bf16/fp16 as the next product's A fragments.  The two consumers run unsynchronised.
 * A TMA box brings whole 64-row boxes: the rows past a key block's end (later tokens, condensed
 * rows no row of the tile sees) are zeroed before any product reads the stage, so a non-finite
 * value there cannot reach dQ as 0 x Inf.
 * The m64nN accumulator of warp w of a warpgroup is the mma.sync m16n8 fragment of its rows
 * 16w .. 16w+15 and the register A operand the m16n8k16 A fragment (wgmma.cuh), so the masks and
 * the packing are dq_kernel's.  Each dq row is summed by one thread quad in key order:
 * deterministic.
 *
 * Shared memory, every tile in the forward's 128-byte-swizzled layout (64-column blocks of
 * 64 rows of 128 bytes, 16-byte chunk c of row r at chunk c ^ (r & 7), 1 KB aligned): Q 128 x D,
 * dO 128 x 128, kStages x (K 64 x D, V 64 x 128), the mbarriers: 3 stages (201 KB) at D = 192,
 * 5 (225 KB) at D = 128.  One block per SM; row tiles run heaviest first across all heads. */
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "bwd.cuh"
#include "hopper.cuh"
#include "wgmma.cuh"

namespace lca {
namespace dq90 {

constexpr int kRows = 128, kKeys = 64, kDV = 128, kThreads = 384;
constexpr size_t kSmemLimit = 227 * 1024;              /* the H100/H200 opt-in limit */
constexpr float kLog2e = 1.4426950408889634f;

/* FOLD: the dqbar rows of the (at most kTermGroups) groups a consumer warpgroup's 64 rows fall
 * in, staged in shared memory before its main loop (groups of 16 or more) */
constexpr int kTermGroups = 5;

template <int D, bool FOLD = false> struct Layout {
    static constexpr int kQ = kRows * D, kO = kRows * kDV;  /* elements */
    static constexpr int kK = kKeys * D, kStage = kK + kKeys * kDV;
    static constexpr size_t kTerms = FOLD ? 16 + 2 * sizeof(float) * kTermGroups * D : 0;
    static constexpr int kStages = (int)((kSmemLimit - 1024 - 2 * (size_t)(kQ + kO) - 16 * 8 -
                                          kTerms) / (2 * (size_t)kStage));
    static constexpr size_t kBytes =
        2 * (size_t)(kQ + kO + kStages * kStage) + 2 * kStages * 8 + 1024 + kTerms;
    static constexpr size_t kTermsAt =              /* FOLD: the terms, 16-byte aligned */
        (2 * (size_t)(kQ + kO + kStages * kStage) + 2 * kStages * 8 + 15) / 16 * 16;
    static_assert(kStages >= 2 && kBytes <= kSmemLimit, "K/V ring");
};

/* k, v, kbar, vbar as 4-d tensors (columns, kv heads, rows, batch), boxes of 64 columns x 64
 * rows, 128-byte swizzle; rows past a tensor's end arrive as zeros. */
struct TmaMaps {
    CUtensorMap k, v, kbar, vbar;
};

/* G_t of SPEC §3 in 32 bits (signed: the kernel measured on the H200 divides so; bwd.cuh's
 * ncond32 is the unsigned twin) */
__device__ __forceinline__ int ncond(int t, int g, int w) {
    return t + 1 < w ? 0 : (t + 1 - w) / g;
}

/* VAR: bit 0 — Q from registers (S = Q K^T with A from registers: only K is read from shared
 * memory by each product; D = 128 only, the 192-wide accumulator leaves no room), bit 1 — dO
 * from registers likewise for dP = dO V^T.  An m64n64k16 product with both operands in shared
 * memory reads 4 KB in the 32 cycles it takes: the SM's whole shared-memory bandwidth. */
/* FOLD: the final dq in the input dtype into p.dq, the condensation's term added (see the
 * epilogue), instead of float32 into w.dq */
template <typename T, int D, int VAR, bool FOLD>
__global__ void __launch_bounds__(kThreads, 1)
    lca_bwd_dq_wgmma_kernel(lca_params p, BwdWork w, const __grid_constant__ TmaMaps tm) {
    constexpr bool kQRegs = VAR & 1, kORegs = VAR & 2;
    static_assert(!kQRegs || D == 128, "Q in registers: D = 128 only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Ly = Layout<D, FOLD>;
    constexpr int kStages = Ly::kStages;
    extern __shared__ unsigned char smem_raw[];
    /* a generic base, not smem_align1024 (see there: 17.7 ms against 14.7 at 128K); this
       kernel's generic loads lie outside its main loop (the dO fragments, the fold's terms) */
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    T *Qs = (T *)base, *Os = Qs + Ly::kQ;                   /* Q, dO of both consumers */
    T *St = Os + Ly::kO;                                    /* kStages x (K, V) */
    uint64_t *full = (uint64_t *)(St + kStages * Ly::kStage);
    uint64_t *empty = full + kStages;

    /* positions, rows and keys in 32 bits (the host checks L hg < 2^31, g and w < 2^31) */
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int hg = (int)(p.H / p.Hkv), g = (int)p.g, wn = (int)p.w, nrows = (int)p.L * hg;
    /* blockIdx.x = row tile x (batch, kv head), the (batch, kv head) fastest and the tiles of
       the last positions (the longest rows) first, as dq_kernel */
    const int ntiles = (nrows + kRows - 1) / kRows;
    const uint32_t nbh = (uint32_t)(p.B * p.Hkv), tile = blockIdx.x / nbh,
                   bh = blockIdx.x - tile * nbh;
    const int b = (int)(bh / (uint32_t)p.Hkv), h = (int)(bh - (uint32_t)b * (uint32_t)p.Hkv);
    const int R0 = (ntiles - 1 - (int)tile) * kRows;
    const int t_first = R0 / hg;
    const int t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;
    const int Gmax = ncond(t_last, g, wn);
    const int e0 = ncond(t_first, g, wn) * g;
    const int ncb = (Gmax + kKeys - 1) / kKeys;
    const int nblocks = ncb + (t_last + 1 - e0 + kKeys - 1) / kKeys;       /* >= 1 */
    auto block_start = [&](int blk) { return blk < ncb ? blk * kKeys : e0 + (blk - ncb) * kKeys; };

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbar_init(&full[s], 1);                         /* the TMA thread */
            mbar_init(&empty[s], 8);                        /* one lane of each consumer warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        /* producer: thread 0 fills stage blk % kStages with key block blk once both consumers
           have released the block kStages before; the others leave their registers */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            for (int blk = 0; blk < nblocks; blk++) {
                const int st = blk % kStages;
                if (blk >= kStages) mbar_wait(&empty[st], (uint32_t)((blk / kStages - 1) & 1));
                const bool cond = blk < ncb;
                const int key0 = block_start(blk);
                const CUtensorMap *mk = cond ? &tm.kbar : &tm.k, *mv = cond ? &tm.vbar : &tm.v;
                T *Ks = St + st * Ly::kStage, *Vs = Ks + Ly::kK;
                mbar_expect_tx(&full[st], 2u * Ly::kStage);
#pragma unroll
                for (int cb = 0; cb < D / 64; cb++)
                    tma_load(Ks + cb * kKeys * 64, mk, cb * 64, h, key0, b, &full[st]);
#pragma unroll
                for (int cb = 0; cb < kDV / 64; cb++)
                    tma_load(Vs + cb * kKeys * 64, mv, cb * 64, h, key0, b, &full[st]);
            }
        }
        return;
    }

    /* consumer warpgroup cw: rows Rw .. Rw+63 */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const int Rw = R0 + cw * 64;
    T *Qw = Qs + cw * 64 * D, *Ow = Os + cw * 64 * kDV;
    {
        const int nq = nrows - Rw < 0 ? 0 : (nrows - Rw < 64 ? nrows - Rw : 64);
        load_tile<T, D>(Qw, nq, tid, [&](int r) {
            const int R = Rw + r;
            return row<const T>(p.q, b, R / hg, h * hg + R % hg);
        });
        load_tile<T, kDV>(Ow, nq, tid, [&](int r) {
            const int R = Rw + r;
            return row<const T>(p.dout, b, R / hg, h * hg + R % hg);
        });
        if constexpr (FOLD) {                   /* the groups' dqbar rows (see kTermGroups) */
            float *terms = (float *)(base + Ly::kTermsAt) + cw * kTermGroups * D;
            const int jw0 = Rw / hg / g, m = (int)p.m;
            for (int x = tid; x < kTermGroups * D / 4; x += 128) {
                const int sl = x / (D / 4), c = 4 * (x - sl * (D / 4)), j = jw0 + sl;
                if (j < m)
                    *(float4 *)(terms + sl * D + c) = __ldg(
                        (const float4 *)(w.dqb + (((int64_t)b * m + j) * p.Hkv + h) * D + c));
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_async_smem();
        asm volatile("bar.sync %0, 128;\n" ::"r"(cw + 1) : "memory");
    }

    /* this thread's two rows (gq and gq + 8 of its warp's 16): position, what they see, the
       log-sum-exp in log2 units and delta; a dead row (past the last) sees nothing */
    int tr[2], Gr[2];
    bool live[2];
    float lse2[2], dl[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int R = Rw + warp * 16 + gq + 8 * i;
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = ncond(tr[i], g, wn);
        const int64_t hq = h * hg + (live[i] ? R % hg : 0);
        lse2[i] = live[i] ? ((const float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] * kLog2e
                          : 0.0f;
        dl[i] = live[i] ? w.delta[(b * p.H + hq) * p.L + tr[i]] : 0.0f;
    }
    /* what every row of the warpgroup sees (used only when all 64 rows are live) */
    const bool w_all_live = Rw + 64 <= nrows;
    const int w_first = Rw / hg, w_last = (Rw + 63) / hg;
    const int w_Gmin = ncond(w_first, g, wn), w_ehi = ncond(w_last, g, wn) * g;
    const float sl2 = (float)p.scale * kLog2e, bl2 = (float)p.rep_bias * kLog2e;

    float acc[D / 8][4];                                    /* dQ, 64 x D */
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
    float s[kKeys / 8][4], dp[kKeys / 8][4];                /* S then dS; dP */
    uint32_t pa[kKeys / 16][4];                             /* dS as A fragments */

    /* Q and dO as m16n8k16 A fragments of this warp's 16 rows (kQRegs, kORegs): 16-byte chunks
       2 ks and 2 ks + 1 of rows gq and gq + 8 */
    uint32_t qf[kQRegs ? D / 16 : 1][4], of[kORegs ? kDV / 16 : 1][4];
    auto frags = [&](auto &f, const T *tile, int nks) {
#pragma unroll
        for (int ks = 0; ks < nks; ks++) {
            const int r = warp * 16 + gq, c = ks * 2;
            f[ks][0] = *(const uint32_t *)(tile + sw(r, c) + 2 * tq);
            f[ks][1] = *(const uint32_t *)(tile + sw(r + 8, c) + 2 * tq);
            f[ks][2] = *(const uint32_t *)(tile + sw(r, c + 1) + 2 * tq);
            f[ks][3] = *(const uint32_t *)(tile + sw(r + 8, c + 1) + 2 * tq);
        }
    };
    if constexpr (kQRegs) frags(qf, Qw, D / 16);
    if constexpr (kORegs) frags(of, Ow, kDV / 16);

    /* S = Q K^T and dP = dO V^T, K and V K-major from shared memory, Q and dO from there or
       from registers */
    auto sdp = [&](int blk) {
        const T *Ks = St + (blk % kStages) * Ly::kStage, *Vs = Ks + Ly::kK;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            const int off = (ks >> 2) * 64 * 64 + (ks & 3) * 16;   /* column block, offset */
            if constexpr (kQRegs)
                wgmma_rs<64, T, 0>(s, qf[ks], gdesc(Ks + off, 16, 1024), ks > 0);
            else
                wgmma_ss<64, T>(s, gdesc(Qw + off, 16, 1024), gdesc(Ks + off, 16, 1024), ks > 0);
        }
#pragma unroll
        for (int ks = 0; ks < kDV / 16; ks++) {
            const int off = (ks >> 2) * 64 * 64 + (ks & 3) * 16;
            if constexpr (kORegs)
                wgmma_rs<64, T, 0>(dp, of[ks], gdesc(Vs + off, 16, 1024), ks > 0);
            else
                wgmma_ss<64, T>(dp, gdesc(Ow + off, 16, 1024), gdesc(Vs + off, 16, 1024), ks > 0);
        }
    };
    /* dQ += dS K: K N-major (transposed B), as the forward's P V reads V: LBO = the next 64
       output columns (64 x 128 bytes on), SBO = the next 8 keys (1 KB on) */
    auto dsk = [&](int blk) {
        const T *Ks = St + (blk % kStages) * Ly::kStage;
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++)
            wgmma_rs<D, T, 1>(acc, pa[kk], gdesc(Ks + kk * 16 * 64, kKeys * 64 * 2, 1024), 1);
    };
    /* dS = P (dP - delta) into s; masks only where some row of the warpgroup sees part of the
       block; a masked entry (and every entry of a dead row) is 0 by a select, so a non-finite
       score or dP there (Inf keys past a row's end) never leaks in */
    auto dsoft = [&](int blk) {
        const bool cond = blk < ncb;
        const int key0 = block_start(blk);
        const int kend = cond ? w_Gmin : w_first + 1;      /* all rows see [.., kend) */
        const bool fullv = w_all_live && key0 + kKeys <= kend && (cond || key0 >= w_ehi);
        const float bias = cond ? bl2 : 0.0f;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const float off = bias - lse2[i];
            if (fullv) {
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float pr = ex2(fmaf(s[n][2 * i + e], sl2, off));
                        s[n][2 * i + e] = pr * (dp[n][2 * i + e] - dl[i]);
                    }
            } else {
                const int lo = cond ? 0 : Gr[i] * g, hi = cond ? Gr[i] : tr[i] + 1;
                auto clamp = [&](int x) { return x < 0 ? 0 : x > kKeys ? kKeys : x; };
                const int lo_r = clamp(lo - key0), hi_r = live[i] ? clamp(hi - key0) : 0;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int rel = n * 8 + 2 * tq + e;
                        const float pr = ex2(fmaf(s[n][2 * i + e], sl2, off));
                        const float ds = pr * (dp[n][2 * i + e] - dl[i]);
                        s[n][2 * i + e] = rel >= lo_r && rel < hi_r ? ds : 0.0f;
                    }
            }
        }
    };
    auto pack = [&]() {
        acc_to_a<T>(pa, s);
    };
    auto wait_full = [&](int blk) {
        mbar_wait(&full[blk % kStages], (uint32_t)((blk / kStages) & 1));
        /* zero the K and V rows past the block's end (the box brings later tokens, or condensed
           rows no row of the tile sees, possibly non-finite): the two consumers zero half each
           and meet at named barrier 5 before either's products read the stage (the block's
           size is the same for both) */
        const bool cond = blk < ncb;
        const int key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = kend - key0 < kKeys ? kend - key0 : kKeys;
        if (nk < kKeys) {
            T *Ks = St + (blk % kStages) * Ly::kStage, *Vs = Ks + Ly::kK;
            constexpr int kC = D / 8, kCV = kDV / 8;       /* 16-byte chunks a row */
            for (int i = nk * kC + cw * 128 + tid; i < kKeys * kC; i += 256) {
                const int r = i / kC, c = i % kC;
                *(uint4 *)(Ks + sw(r, c)) = make_uint4(0, 0, 0, 0);
            }
            for (int i = nk * kCV + cw * 128 + tid; i < kKeys * kCV; i += 256) {
                const int r = i / kCV, c = i % kCV;
                *(uint4 *)(Vs + sw(r, c)) = make_uint4(0, 0, 0, 0);
            }
            fence_async_smem();
            asm volatile("bar.sync 5, 256;\n" ::: "memory");
        }
    };
    auto release = [&](int blk) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[blk % kStages]);
    };

    wait_full(0);
    wg_reg_fence(s);
    wg_reg_fence(dp);
    wg_fence();
    sdp(0);
    wg_commit();
    wg_wait<0>();
    wg_reg_fence(s);
    wg_reg_fence(dp);
    dsoft(0);
    pack();
    for (int blk = 1; blk < nblocks; blk++) {
        wait_full(blk);
        wg_reg_fence(acc);
        wg_reg_fence(pa);
        wg_reg_fence(s);
        wg_reg_fence(dp);
        wg_fence();
        sdp(blk);                                           /* S_blk, dP_blk */
        wg_commit();
        dsk(blk - 1);                                       /* dQ += dS_{blk-1} K_{blk-1} */
        wg_commit();
        wg_wait<1>();                                       /* S_blk, dP_blk ready */
        wg_reg_fence(s);
        wg_reg_fence(dp);
        dsoft(blk);
        wg_wait<0>();                                       /* the dQ product done */
        wg_reg_fence(acc);
        wg_reg_fence(pa);
        release(blk - 1);
        pack();
    }
    wg_reg_fence(acc);
    wg_reg_fence(pa);
    wg_fence();
    dsk(nblocks - 1);
    wg_commit();
    wg_wait<0>();
    wg_reg_fence(acc);
    release(nblocks - 1);

    /* dq = tau dS K, each row's quad writing 8 consecutive floats an 8-column tile */
    const float scale = (float)p.scale;
    if constexpr (FOLD) {
        /* what bwd_finish_vec_kernel MODE 0 makes of the float32 row: from_f(tau acc + term),
           the term (the group's dqbar, staged above) on the groups' last n rows, columns <
           d_score, else 0 — the product rounded first (no fma), then the sum, as there: the
           same bits */
        const float *terms = (const float *)(base + Ly::kTermsAt) + cw * kTermGroups * D;
        const int jw0 = Rw / hg / g, m = (int)p.m, nsum = (int)p.n, ds = (int)p.d_score;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (!live[i]) continue;
            const int R = Rw + warp * 16 + gq + 8 * i, t = tr[i], j = t / g, ii = t - j * g;
            const int64_t hq = h * hg + R % hg;
            const bool on = j < m && ii >= g - nsum;
            const float *tv = terms + (j - jw0) * D;     /* read only where on */
            T *dst = row<T>(p.dq, b, t, hq);
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                const int c = n * 8 + 2 * tq;
                const float2 u = on ? *(const float2 *)(tv + c) : make_float2(0.0f, 0.0f);
                const float x0 = __fadd_rn(__fmul_rn(acc[n][2 * i], scale), c < ds ? u.x : 0.0f);
                const float x1 =
                    __fadd_rn(__fmul_rn(acc[n][2 * i + 1], scale), c + 1 < ds ? u.y : 0.0f);
                *(uint32_t *)(dst + c) = pack2<T>(x0, x1);
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!live[i]) continue;
        const int R = Rw + warp * 16 + gq + 8 * i;
        const int64_t hq = h * hg + R % hg;
        float *dst = w.dq + (((int64_t)b * p.L + tr[i]) * p.H + hq) * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(float2 *)(dst + n * 8 + 2 * tq) =
                make_float2(acc[n][2 * i] * scale, acc[n][2 * i + 1] * scale);
    }
#endif
}

inline int64_t tiles(const lca_params *p) {
    return (p->L * (p->H / p->Hkv) + kRows - 1) / kRows;
}

template <typename T, int D, int VAR, bool FOLD>
int launch(const lca_params *p, const BwdWork *w, cudaStream_t stream) {
    /* condensed rows past the last one any query sees arrive as zeros (a caller's kbar may
       hold more rows, never initialised) */
    const int64_t mc = std::min(p->m, lca_num_condensed(p->L - 1, p->g, p->w));
    TmaMaps tm;
    memset(&tm, 0, sizeof tm);
    bool ok = make_map<T>(&tm.k, p->k, D, p->L, p->Hkv, p->B, kKeys) &&
              make_map<T>(&tm.v, p->v, kDV, p->L, p->Hkv, p->B, kKeys);
    if (ok && mc > 0) {
        ok = make_map<T>(&tm.kbar, p->kbar, D, mc, p->Hkv, p->B, kKeys) &&
             make_map<T>(&tm.vbar, p->vbar, kDV, mc, p->Hkv, p->B, kKeys);
    } else if (ok) {                                   /* no condensed rows: never read */
        tm.kbar = tm.k;
        tm.vbar = tm.v;
    }
    if (!ok) return LCA_BWD_NOT_HANDLED;               /* the caller runs dq_kernel */
    auto kernel = lca_bwd_dq_wgmma_kernel<T, D, VAR, FOLD>;
    const size_t smem = Layout<D, FOLD>::kBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    kernel<<<(unsigned)(tiles(p) * p->B * p->Hkv), kThreads, smem, stream>>>(*p, *w, tm);
    return LCA_OK;
}

}  // namespace dq90
}  // namespace lca

/* Whether the wgmma dq kernel covers this call: bf16/fp16, (D, Dv) = (192, 128) or (128, 128),
 * separate v, 16-byte aligned rows, the grid and row indices in range, a compute 9.0 device
 * with the shared memory. */
extern "C" int lca_cuda_bwd_dq_wgmma_supported(const lca_params *p, int device) {
    using namespace lca::dq90;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!((p->D == 192 || p->D == 128) && p->Dv == kDV) || p->v_in_k) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->dout};
    if (!lca::rows_aligned16(vs)) return 0;
    if (p->L * (p->H / p->Hkv) >= 2147483647 - kRows || p->g >= 2147483647 ||
        p->w >= 2147483647 || tiles(p) * p->B * p->Hkv > 2147483647)
        return 0;                                    /* 32-bit rows and keys; grid.x */
    const size_t need = p->D == 192 ? Layout<192>::kBytes : Layout<128>::kBytes;
    return lca::device_fits(device, need, true);
}

/* LCA_DQ90_VARIANT (a tuning knob; the kernel's VAR: 0 .. 3 at D = 128, 0 or 2 at D = 192,
 * any other value the default) overrides the default variant: dO from registers, and Q too
 * at D = 128. */
template <typename T, int D, bool FOLD>
static int launch_var(const lca_params *p, const lca::BwdWork *w, cudaStream_t s) {
    using namespace lca::dq90;
    const char *env = getenv("LCA_DQ90_VARIANT");
    const int var = env && *env ? atoi(env) : -1;
    if constexpr (D == 128) {
        switch (var) {
        case 0: return launch<T, D, 0, FOLD>(p, w, s);
        case 1: return launch<T, D, 1, FOLD>(p, w, s);
        case 2: return launch<T, D, 2, FOLD>(p, w, s);
        default: return launch<T, D, 3, FOLD>(p, w, s);
        }
    } else {
        return var == 0 ? launch<T, D, 0, FOLD>(p, w, s) : launch<T, D, 2, FOLD>(p, w, s);
    }
}

template <bool FOLD>
static int launch_dtype(const lca_params *p, const lca::BwdWork *w, cudaStream_t s) {
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 192)
        return bf ? launch_var<__nv_bfloat16, 192, FOLD>(p, w, s)
                  : launch_var<__half, 192, FOLD>(p, w, s);
    return bf ? launch_var<__nv_bfloat16, 128, FOLD>(p, w, s)
              : launch_var<__half, 128, FOLD>(p, w, s);
}

/* Whether the kernel can write the final dq itself (fold): p->dq rows on 4 bytes (packed
 * pairs), groups of 16 or more (kTermGroups), the shared memory with the terms,
 * LCA_CUDA_DISABLE=dq_fold not set. */
extern "C" int lca_cuda_bwd_dq_wgmma_folds(const lca_params *p, int device) {
    using namespace lca::dq90;
    if (p->g < 16 || !lca::rows_on(p->dq, p->B, p->L, p->H, 4, 2)) return 0;
    const size_t need = p->D == 192 ? Layout<192, true>::kBytes : Layout<128, true>::kBytes;
    return lca::device_fits(device, need, true) && !lca::kernel_disabled("dq_fold");
}

/* LCA_OK once launched; LCA_BWD_NOT_HANDLED (nothing launched) when the driver cannot build the
 * tensor maps; LCA_ERR_CUDA when the kernel's shared memory cannot be set.  fold: the final dq
 * into p->dq (lca_cuda_bwd_dq_wgmma_folds; after the condensation's backward, which makes the
 * terms), else float32 into w->dq. */
extern "C" int lca_cuda_bwd_dq_wgmma(const lca_params *p, const lca::BwdWork *w, void *stream,
                                     int fold) {
    cudaStream_t s = (cudaStream_t)stream;
    return fold ? launch_dtype<true>(p, w, s) : launch_dtype<false>(p, w, s);
}
