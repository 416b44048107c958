/* decode_sm90a.cu — the split-softmax partial of a decode step for absorbed MLA (D, Dv) in
 * {(576, 512), (288, 256)} on Hopper (compiled for sm_90a alone; decode.cu routes here on a
 * compute 9.0 device, LCA_CUDA_DISABLE=dec_bulk selects decode.cu's mma.sync kernel instead).
 *
 * What differs from decode.cu's kernel:
 *   - the key tiles (32 rows of D elements: condensed rows, then ring slots) arrive by bulk
 *     copies (cp.async.bulk, one per row, issued by the 32 lanes of warp 0) that complete on an
 *     mbarrier per stage: 32 instructions a tile instead of D / 8 16-byte copies per row, and a
 *     ring of NST stages (NST - 1 tiles in flight while one is computed, 112-150 KB a block);
 *   - 8 warps and one block per SM; a block holds 16, 32 or 64 query heads (MT = 1, 2, 4
 *     m-tiles), so at H = 128 two blocks cover the heads (launched next to each other: the
 *     second reads the tile from L2) instead of four;
 *   - one barrier per tile: S = Q K^T goes through a double-buffered shared array (written
 *     before the barrier, read after it), and the barrier also frees the stage of the previous
 *     tile, which warp 0 then refills.
 * Warp w: m-tile w % MT, column group c = w / MT of NCG = 8 / MT.  S: MT = 1 splits the
 * reduction over D into two halves (c / 4) and the key n-tiles by c % 4, summed when read;
 * MT = 2: key n-tile c; MT = 4: key n-tiles 2c, 2c + 1.  O += P V: value columns
 * [c Dv / NCG, (c + 1) Dv / NCG) of the m-tile's 16 rows.  Rows past the range's end are
 * loaded as copies of its last row (finite data) and masked to -inf in the softmax.
 * That is v3 (lca_dec_partial_bulk_kernel), the kernel for 32- and 64-head blocks.  16-head
 * blocks (H / Hkv <= 16: H = 16 MLA) run by default the warp-specialised kernel further down
 * (lca_dec_partial_ws_kernel, "ws"): a producer warp alone issues the copies, on empty/full
 * mbarriers, and two consumer groups of 4 warps take alternate tiles with their own online
 * softmax, merged at the end — no block-wide barrier in the loop.  v3 and two alternatives
 * for 16-head blocks stay selectable for benchmarks (LCA_DECODE_VARIANT, listed above
 * variant(); all tested): two tiles an iteration (KT = 2) and cp.async loads on the same
 * mbarriers (BULK = false), both measured slower than v3 on the H200 (benchmarks/NOTES.md,
 * Decode). */
#include "decode.cuh"
#include "hopper.cuh"

namespace lca {
namespace dec90 {

constexpr int kWarps = 8, kThreads = 32 * kWarps;

template <int D, int DV, int MT, int KT> struct Shape {
    static constexpr int NST = MT == 1 ? 5 : MT == 2 ? 4 : 3;   /* stages (32-key tiles) */
    static constexpr int ROWS = 16 * MT;
    static constexpr int LD = D + kDecPad;                       /* elements per shared row */
    static constexpr int NCG = kWarps / MT;                      /* warps per m-tile */
    static constexpr int KSPLIT = MT == 1 ? 2 : 1;               /* halves of D in S */
    static constexpr int NQ = 4 * KSPLIT / NCG;                  /* S n-tiles per warp, tile */
    static constexpr int KSW = D / 16 / KSPLIT;                  /* k-steps per warp */
    static constexpr int NACC = KSW % 4 == 0 ? 4 : KSW % 3 == 0 ? 3 : KSW % 2 == 0 ? 2 : 1;
    static constexpr int WCOL = DV / NCG, NTV = WCOL / 8;        /* value columns, n-tiles */
    static constexpr int SR = KT * kDecKeys + 4;                 /* floats per S row */
    static constexpr size_t kBar = 128;                          /* mbarriers */
    static constexpr size_t kQ = (size_t)ROWS * LD * 2;
    static constexpr size_t kStage = (size_t)kDecKeys * LD * 2;
    static constexpr size_t kS = (size_t)2 * KSPLIT * ROWS * SR * 4;
    static constexpr size_t kSmem = kBar + kQ + NST * kStage + kS;
    static_assert(NQ >= 1 && NTV % 2 == 0 && kQ % 16 == 0 && kStage % 16 == 0, "shape");
    static_assert(KSW % NACC == 0 && KT < NST, "accumulators, stages");
};

/* bytes global -> shared, completing on bar (bytes and both addresses multiples of 16) */
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes,
                                         uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                 "%2, [%3];\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

/* Block: (head chunk of 16 MT query heads, split, b * Hkv + h).  KT tiles (32 keys each) an
 * iteration (one barrier, one softmax update); BULK: tiles by bulk copies issued by warp 0, else
 * by 16-byte cp.async from every thread (completion tracked by the same mbarriers). */
template <typename T, int D, int DV, int MT, int KT, bool BULK>
__global__ void __launch_bounds__(kThreads, 1) lca_dec_partial_bulk_kernel(DecArgs a) {
    using S_ = Shape<D, DV, MT, KT>;
    constexpr int NST = S_::NST, ROWS = S_::ROWS, LD = S_::LD, SR = S_::SR, NQ = S_::NQ;
    constexpr int KSW = S_::KSW, NACC = S_::NACC, WCOL = S_::WCOL, NTV = S_::NTV;
    extern __shared__ __align__(128) unsigned char dsm[];
    uint64_t *full = (uint64_t *)dsm;
    T *Qs = (T *)(dsm + S_::kBar);
    T *stage0 = Qs + ROWS * LD;
    float *Ss = (float *)(stage0 + NST * kDecKeys * LD);
    const lca_decode_params &p = a.p;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int mt = warp % MT, cg = warp / MT;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z / p.Hkv, h = blockIdx.z % p.Hkv;
    const int64_t r0 = (int64_t)blockIdx.x * ROWS;           /* first head of the chunk */
    const int s = blockIdx.y;
    const int64_t i0 = (int64_t)s * a.per, i1 = i0 + a.per < a.N ? i0 + a.per : a.N;
    const int ntiles = (int)((i1 - i0 + kDecKeys - 1) / kDecKeys);

    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < NST; i++) mbar_init(&full[i], BULK ? 1 : kThreads);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    /* Tile t into stage t % NST: row r of the tile is condensed row k0 + r while k0 + r < G,
     * else ring slot ring0 + r - nc (wrapped once); rows past the range's end repeat its last
     * row.  BULK: by warp 0, lane r copying row r; else every thread, 16 bytes a copy. */
    const T *kb0 = row<const T>(p.kbar, b, 0, h), *kr0 = row<const T>(p.kr, b, 0, h);
    auto issue = [&](int t) {
        const int64_t k0 = i0 + (int64_t)t * kDecKeys;
        const int nk = (int)(i1 - k0 < kDecKeys ? i1 - k0 : kDecKeys);
        const int nc = (int)(a.G - k0 <= 0 ? 0 : a.G - k0 < nk ? a.G - k0 : nk);
        const int64_t R = p.R, ring0 = (a.e0 + (k0 > a.G ? k0 - a.G : 0)) % R;
        auto src_row = [&](int r) {
            r = r < nk ? r : nk - 1;
            if (r < nc) return kb0 + (k0 + r) * p.kbar.st;
            const int64_t sl = ring0 + (r - nc);
            return kr0 + (sl >= R ? sl - R : sl) * p.kr.st;
        };
        uint64_t *bar = &full[t % NST];
        T *dst = stage0 + (t % NST) * kDecKeys * LD;
        if constexpr (BULK) {
            if (lane == 0) mbar_expect_tx(bar, (uint32_t)(kDecKeys * D * sizeof(T)));
            __syncwarp();
            bulk_g2s(dst + lane * LD, src_row(lane), (uint32_t)(D * sizeof(T)), bar);
        } else {
            constexpr int V = D / 8;
            for (int i = threadIdx.x; i < kDecKeys * V; i += kThreads) {
                const int r = i / V, c = (i % V) * 8;
                cp_async16(dst + r * LD + c, src_row(r) + c);
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                             smem_addr(bar))
                         : "memory");
        }
    };
    if (!BULK || warp == 0)
        for (int t = 0; t < NST && t < ntiles; t++) issue(t);

    /* Q: the chunk's heads (rows past hg are zero), unscaled; tau is applied to S */
    for (int i = threadIdx.x; i < ROWS * (D / 8); i += kThreads) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < hg) {
            const T *src = row<const T>(p.q, b, 0, h * hg + r0 + r) + c;
            if (((uintptr_t)src & 15) == 0) {
                v = *(const uint4 *)src;
            } else {
                T tmp[8];
#pragma unroll
                for (int e = 0; e < 8; e++) tmp[e] = src[e];
                v = *(uint4 *)tmp;
            }
        }
        *(uint4 *)(Qs + r * LD + c) = v;
    }
    __syncthreads();

    float o[NTV][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < NTV; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale = (float)p.scale, bias = (float)p.rep_bias;
    const T *Qw = Qs + mt * 16 * LD;
    const int kh = MT == 1 ? cg / 4 : 0;                     /* this warp's half of D */
    const int nq0 = MT == 1 ? cg % 4 : cg * NQ;              /* its first S n-tile */
    /* MT = 1: the warp's Q fragments (KSW k-steps) stay in registers for the whole range,
     * instead of an ldmatrix per k-step and tile */
    constexpr bool QREG = MT == 1;
    uint32_t qf[QREG ? KSW : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int k = 0; k < KSW; k++)
            ldmatrix_x4(qf[k], Qw + (lane & 15) * LD + (kh * KSW + k) * 16 + (lane >> 4) * 8);
    }

    const int nit = (ntiles + KT - 1) / KT;
    for (int it = 0; it < nit; it++) {
        const int u0 = it * KT;                              /* first tile of the iteration */
        const int64_t k0 = i0 + (int64_t)u0 * kDecKeys;
        float *Sw = Ss + ((it & 1) * S_::KSPLIT + kh) * ROWS * SR + mt * 16 * SR;

        /* S partial: rows of m-tile mt, keys of n-tiles nq0 .. nq0 + NQ - 1 of each tile,
         * k-steps of half kh */
#pragma unroll
        for (int j = 0; j < KT; j++) {
            if (KT > 1 && u0 + j >= ntiles) break;
            mbar_wait(&full[(u0 + j) % NST], (uint32_t)(((u0 + j) / NST) & 1));
            const T *Ks = stage0 + ((u0 + j) % NST) * kDecKeys * LD;
            float acc[NQ][NACC][4];
#pragma unroll
            for (int jj = 0; jj < NQ; jj++)
#pragma unroll
                for (int u = 0; u < NACC; u++)
                    acc[jj][u][0] = acc[jj][u][1] = acc[jj][u][2] = acc[jj][u][3] = 0;
#pragma unroll
            for (int k2 = 0; k2 < KSW; k2 += NACC)
#pragma unroll
                for (int u = 0; u < NACC; u++) {
                    const int ks = kh * KSW + k2 + u;
                    uint32_t af[4];
                    if constexpr (QREG) {
#pragma unroll
                        for (int e = 0; e < 4; e++) af[e] = qf[k2 + u][e];
                    } else {
                        ldmatrix_x4(af, Qw + (lane & 15) * LD + ks * 16 + (lane >> 4) * 8);
                    }
#pragma unroll
                    for (int jj = 0; jj < NQ; jj++) {
                        const T *kb = Ks + ((nq0 + jj) * 8 + gq) * LD + ks * 16 + 2 * tq;
                        mma16816<T>(acc[jj][u], af, *(const uint32_t *)kb,
                                    *(const uint32_t *)(kb + 8));
                    }
                }
#pragma unroll
            for (int jj = 0; jj < NQ; jj++) {
                float sc[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    sc[e] = acc[jj][0][e];
#pragma unroll
                    for (int u = 1; u < NACC; u++) sc[e] += acc[jj][u][e];
                }
                const int col = j * kDecKeys + (nq0 + jj) * 8 + 2 * tq;
                *(float2 *)(Sw + gq * SR + col) = make_float2(sc[0], sc[1]);
                *(float2 *)(Sw + (gq + 8) * SR + col) = make_float2(sc[2], sc[3]);
            }
        }
        __syncthreads();          /* S complete; every warp is done with iteration it - 1 */
        if (it >= 1 && (!BULK || warp == 0))
#pragma unroll
            for (int j = 0; j < KT; j++)
                if (u0 - KT + j + NST < ntiles) issue(u0 - KT + j + NST);

        /* online softmax over the iteration's keys (every warp of the m-tile computes the same
         * numbers) and P as A fragments: x[i][kk][e], row gq + 8 i, key 16 kk + {2tq, 2tq+1,
         * 2tq+8, 2tq+9}[e] */
        const float *Sr = Ss + (it & 1) * S_::KSPLIT * ROWS * SR + mt * 16 * SR;
        float x[2][2 * KT][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float bmax = -INFINITY;
#pragma unroll
            for (int kk = 0; kk < 2 * KT; kk++)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {
                    const int key = 16 * kk + 2 * tq + 8 * (e >> 1);
                    float2 v2 = *(const float2 *)(Sr + (gq + 8 * i) * SR + key);
                    if (S_::KSPLIT == 2) {
                        const float2 w2 = *(const float2 *)(Sr + ROWS * SR + (gq + 8 * i) * SR + key);
                        v2.x += w2.x, v2.y += w2.y;
                    }
                    const int64_t gi = k0 + key;
                    float v0 = v2.x * scale + (gi < a.G ? bias : 0.0f);
                    float v1 = v2.y * scale + (gi + 1 < a.G ? bias : 0.0f);
                    v0 = gi < i1 ? v0 : -INFINITY;
                    v1 = gi + 1 < i1 ? v1 : -INFINITY;
                    x[i][kk][e] = v0, x[i][kk][e + 1] = v1;
                    bmax = fmaxf(bmax, fmaxf(v0, v1));
                }
            dec_softmax_update(x[i], bmax, m[i], l[i], o, i);
        }

        /* O[:, this warp's columns] += P V (V: the first DV columns of the key tiles) */
#pragma unroll
        for (int j = 0; j < KT; j++) {
            if (KT > 1 && u0 + j >= ntiles) break;
            const T *Vs = stage0 + ((u0 + j) % NST) * kDecKeys * LD;
#pragma unroll
            for (int k1 = 0; k1 < 2; k1++) {
                const int kk = 2 * j + k1;
                const uint32_t af[4] = {pack2<T>(x[0][kk][0], x[0][kk][1]),
                                        pack2<T>(x[1][kk][0], x[1][kk][1]),
                                        pack2<T>(x[0][kk][2], x[0][kk][3]),
                                        pack2<T>(x[1][kk][2], x[1][kk][3])};
#pragma unroll
                for (int n = 0; n < NTV; n += 2) {
                    uint32_t bf[4];
                    const int r = k1 * 16 + (lane & 15), c = cg * WCOL + n * 8 + (lane >> 4) * 8;
                    ldmatrix_x4_trans(bf, Vs + r * LD + c);
                    mma16816<T>(o[n], af, bf[0], bf[1]);
                    mma16816<T>(o[n + 1], af, bf[2], bf[3]);
                }
            }
        }
    }

    /* the unnormalised partial row, its max and sum */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        const int64_t hr = r0 + mt * 16 + gq + 8 * i;
        if (hr >= hg) continue;
        float *dst = partial(a, b, h * hg + hr, s);
#pragma unroll
        for (int n = 0; n < NTV; n++)
            *(float2 *)(dst + cg * WCOL + n * 8 + 2 * tq) = make_float2(o[n][2 * i], o[n][2 * i + 1]);
        if (cg == 0 && tq == 0) dst[DV] = m[i], dst[DV + 1] = l[i];
    }
}

template <int D, int DV, int MT, int KT = 1> constexpr size_t smem() {
    return Shape<D, DV, MT, KT>::kSmem;
}

template <typename T, int D, int DV, int MT, int KT, bool BULK>
int launch(const DecArgs &a, cudaStream_t st) {
    auto kernel = lca_dec_partial_bulk_kernel<T, D, DV, MT, KT, BULK>;
    constexpr size_t sm = smem<D, DV, MT, KT>();
    /* every launch: an attribute cached per device would be lost with a context reset */
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    const dim3 grid((unsigned)a.hchunks, (unsigned)a.nsplit, (unsigned)(a.p.B * a.p.Hkv));
    kernel<<<grid, kThreads, sm, st>>>(a);
    return LCA_OK;
}

/* ---------------------------------------------------------------------------------------------
 * "ws" (v4): warp-specialised 16-head blocks.  Three warpgroups: the producer (warp 0 issues
 * every copy; setmaxnreg gives its registers to the others) and two consumer groups (4 warps
 * each, up to 232 registers a thread: the Q fragments stay in registers).  The producer
 * streams tile t into stage t % NST as soon as the stage is free (an `empty` mbarrier per
 * stage, 4 arrivals: one per warp of the group that read it), so NST - 2 tiles are in flight
 * while each group computes one, and no copy waits for a block-wide barrier.
 * Group gi takes tiles gi, gi + 2, ... with its own online softmax (m, l, O): the two groups
 * never wait for each other inside the loop (one named barrier a tile within a group, for S),
 * so one group's S = Q K^T runs beside the other's softmax and P V.  At the end group 1 hands
 * its (m, l, O) to group 0 through shared memory and group 0 writes the merged partial.
 * Warp wi of a group: S over keys [16 (wi & 1), + 16) and half wi >> 1 of D (its Q fragments in
 * registers for the whole range; the two halves are summed when S is read); O += P V over value
 * columns [wi Dv / 4, (wi + 1) Dv / 4). */
constexpr int kWsThreads = 384;       /* warpgroup 0: producer; 1, 2: consumer groups 0, 1 */

template <int D, int DV, int U = 1> struct WsShape {
    static constexpr int NST = 5;                                /* stages (32-key tiles) */
    static constexpr int LD = D + kDecPad;                       /* elements per Q row */
    static constexpr int USTR = U * D + kDecPad;                 /* elements per copy unit */
    static constexpr int STG = kDecKeys / U * USTR;              /* elements per stage */
    static constexpr int KSW = D / 32;                           /* k-steps per warp (half D) */
    static constexpr int NACC = KSW % 2 == 0 ? 2 : KSW % 3 == 0 ? 3 : 1;
    static constexpr int WCOL = DV / 4, NTV = WCOL / 8;          /* value columns, n-tiles */
    static constexpr int SR = kDecKeys + 8;                      /* floats per S row */
    static constexpr size_t kBar = 128;                          /* full[NST], empty[NST] */
    static constexpr size_t kQ = (size_t)16 * LD * 2;
    static constexpr size_t kS = (size_t)2 * 2 * 2 * 16 * SR * 4;  /* group, parity, half */
    static constexpr size_t kStage = (size_t)STG * 2;
    static constexpr size_t kSmem = kBar + kQ + kS + NST * kStage;
    static constexpr size_t kMerge = (size_t)(NTV + 1) * 128 * 16;  /* group 1's state */
    static_assert(D % 32 == 0 && KSW % NACC == 0 && NTV % 2 == 0 &&
                  (U == 1 || U == 2), "shape");
    /* A tile's keys are copied U at a time (U rows consecutive in memory: one bulk copy) into
     * units of U unpadded rows, a unit every USTR elements.  Column c of S (and row c of P V's
     * k) is key key(c) of the tile, at element off(key(c)) of the stage: for U > 1 the 8 rows
     * of an ldmatrix (8 consecutive columns) are row c / (32 / U) of 8 consecutive units, whose
     * starts are 16 bytes apart modulo 128 (USTR = 8 mod 64 elements): no bank conflict. */
    static __device__ __forceinline__ int key(int c) {
        return U == 1 ? c : U * (c % (kDecKeys / U)) + c / (kDecKeys / U);
    }
    static __device__ __forceinline__ int off(int k) { return k / U * USTR + k % U * D; }
    static_assert(2 * NST * 8 <= kBar && kQ % 16 == 0 && kS % 16 == 0 && kStage % 16 == 0 &&
                  kMerge <= NST * kStage, "layout");
};

__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

/* The combine of decode.cu folded into the partial kernel, for up to kMergeSplits splits:
 * group 0 (128 threads, named barrier 4) of every split's block counts itself in on the
 * chunk's counter once its partial rows are written; the block that arrives last merges the
 * splits of its (up to) 16 heads with the combine kernel's arithmetic (same operations in the
 * same split order) and resets the counter for the next step.  A thread takes 4 columns of
 * one head at a time (of 16 / (128 / (DV / 4)) heads) and issues the loads of 4 heads at once:
 * the merge is on the step's critical path, so its L2 round trips are few (4 for 16 heads). */
constexpr int kMergeSplits = 4;

template <typename T, int DV>
__device__ __forceinline__ void merge_splits(const DecArgs &a, int64_t b, int64_t h, int64_t r0,
                                             int *last, int gt) {
    const lca_decode_params &p = a.p;
    const int64_t hg = p.H / p.Hkv;
    const int ns = a.nsplit;
    __threadfence();                                  /* this block's partial rows, to all */
    named_sync(4, 128);
    if (gt == 0) {
        unsigned *c = a.count + (b * p.Hkv + h) * a.hchunks + blockIdx.x;
        const unsigned old = atomicAdd(c, 1u);
        *last = old == (unsigned)(ns - 1);
        if (*last) *c = 0;                            /* every split has arrived */
    }
    named_sync(4, 128);
    if (!*last) return;
    __threadfence();                                  /* the other splits' rows, seen */
    constexpr int C4 = DV / 4, HS = 128 / C4;         /* float4 columns a head; heads a pass */
    static_assert(128 % C4 == 0, "columns");
    const int c = (gt % C4) * 4;
    const int nh = (int)(hg - r0 < 16 ? hg - r0 : 16);
    for (int r = gt / C4; r < nh; r += 4 * HS) {
        float4 o[4][kMergeSplits];
        float2 ml[4][kMergeSplits];
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int s = 0; s < kMergeSplits; s++)
                if (s < ns && r + u * HS < nh) {
                    const float *ps = partial(a, b, h * hg + r0 + r + u * HS, s);
                    /* rows of Dv + 2 floats: 8-byte aligned, not 16 */
                    const float2 lo = __ldcg((const float2 *)(ps + c));
                    const float2 hi = __ldcg((const float2 *)(ps + c + 2));
                    o[u][s] = make_float4(lo.x, lo.y, hi.x, hi.y);
                    ml[u][s] = __ldcg((const float2 *)(ps + DV));
                }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (r + u * HS >= nh) break;
            float M = -INFINITY;
#pragma unroll
            for (int s = 0; s < kMergeSplits; s++)
                if (s < ns) M = fmaxf(M, ml[u][s].x);
            float L = 0, w[kMergeSplits];
            float4 acc = make_float4(0, 0, 0, 0);
#pragma unroll
            for (int s = 0; s < kMergeSplits; s++)
                if (s < ns) {
                    w[s] = expf(ml[u][s].x - M);
                    L += w[s] * ml[u][s].y;
                    acc.x += w[s] * o[u][s].x, acc.y += w[s] * o[u][s].y;
                    acc.z += w[s] * o[u][s].z, acc.w += w[s] * o[u][s].w;
                }
            const float inv = 1.0f / L;
            T *dst = row<T>(p.out, b, 0, h * hg + r0 + r + u * HS) + c;
            dst[0] = from_f<T>(acc.x * inv), dst[1] = from_f<T>(acc.y * inv);
            dst[2] = from_f<T>(acc.z * inv), dst[3] = from_f<T>(acc.w * inv);
        }
    }
}

template <typename T, int D, int DV, int U = 1>
__global__ void __launch_bounds__(kWsThreads, 1) lca_dec_partial_ws_kernel(DecArgs a) {
    using S_ = WsShape<D, DV, U>;
    constexpr int NST = S_::NST, LD = S_::LD, SR = S_::SR, KSW = S_::KSW, NACC = S_::NACC;
    constexpr int WCOL = S_::WCOL, NTV = S_::NTV, USTR = S_::USTR, STG = S_::STG;
    extern __shared__ __align__(128) unsigned char dsm[];
    uint64_t *full = (uint64_t *)dsm, *empty = full + NST;
    T *Qs = (T *)(dsm + S_::kBar);
    float *Ss = (float *)(dsm + S_::kBar + S_::kQ);
    T *stage0 = (T *)(dsm + S_::kBar + S_::kQ + S_::kS);
    const lca_decode_params &p = a.p;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z / p.Hkv, h = blockIdx.z % p.Hkv;
    const int64_t r0 = (int64_t)blockIdx.x * 16;             /* first head of the chunk */
    const int s = blockIdx.y;
    const int64_t i0 = (int64_t)s * a.per, i1 = i0 + a.per < a.N ? i0 + a.per : a.N;
    const int ntiles = (int)((i1 - i0 + kDecKeys - 1) / kDecKeys);

    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < NST; i++) mbar_init(&full[i], 1), mbar_init(&empty[i], 4);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();                 /* the last block-wide barrier: the roles split here */

    if (warp < 4) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (warp != 0) {
            /* the fused append (a.append): warps 1..3 of the last split's first head chunk
               write the token's key into its ring slot and its summary sum, as
               lca_dec_append_kernel does; the producer reads the new key row from k */
            if (a.append && s == a.nsplit - 1 && blockIdx.x == 0)
                for (int64_t d = threadIdx.x - 32; d < p.D; d += 96)
                    dec_append_key<T, 2>(p, b, h, d);
            return;
        }
        /* Row r of tile t: entry k = k0 + r, condensed row k while k < G, else ring slot
         * (e0 + k - G) mod R (k - G < R, so one wrap at most); rows past the range's end repeat
         * its last row.  Lane r copies row r. */
        const T *kb0 = row<const T>(p.kbar, b, 0, h), *kr0 = row<const T>(p.kr, b, 0, h);
        const int64_t R = p.R, e0r = a.e0 % R;
        const T *knew = a.append ? row<const T>(p.k, b, 0, h) : nullptr;
        auto src_row = [&](int64_t k) {
            k = k < i1 ? k : i1 - 1;
            if (knew && k == a.N - 1) return knew;        /* the token, not yet in the ring */
            if (k < a.G) return kb0 + k * p.kbar.st;
            const int64_t sl = e0r + (k - a.G);
            return kr0 + (sl >= R ? sl - R : sl) * p.kr.st;
        };
        /* launched as a programmatic dependent of the append kernel (launch_ws; not when the
           kernel appends itself): its ring row (and any condensed row written before this
           kernel) is read only after this */
        asm volatile("griddepcontrol.wait;\n" ::: "memory");
        for (int t = 0; t < ntiles; t++) {
            const int st = t % NST;
            if (t >= NST) mbar_wait(&empty[st], (uint32_t)((t / NST + 1) & 1));
            const int64_t k0 = i0 + (int64_t)t * kDecKeys;
            T *dst = stage0 + st * STG;
            if (lane == 0) mbar_expect_tx(&full[st], (uint32_t)(kDecKeys * D * sizeof(T)));
            __syncwarp();
            if constexpr (U == 1) {
                bulk_g2s(dst + lane * USTR, src_row(k0 + lane), (uint32_t)(D * sizeof(T)),
                         &full[st]);
            } else if (lane < kDecKeys / U) {
                /* lane u: rows U u .. U u + U - 1 into unit u, in one copy when consecutive in
                   memory (no wrap of the ring, no range end, no new token inside), else one
                   copy a row */
                const T *sr[U];
                bool one = true;
#pragma unroll
                for (int j = 0; j < U; j++) {
                    sr[j] = src_row(k0 + U * lane + j);
                    one = one && sr[j] == sr[0] + j * D;
                }
                if (one) {
                    bulk_g2s(dst + lane * USTR, sr[0], (uint32_t)(U * D * sizeof(T)), &full[st]);
                } else {
#pragma unroll
                    for (int j = 0; j < U; j++)
                        bulk_g2s(dst + lane * USTR + j * D, sr[j], (uint32_t)(D * sizeof(T)),
                                 &full[st]);
                }
            }
        }
        /* stay until the last copy has landed (no copy outlives its issuing thread) */
        if (ntiles > 0) mbar_wait(&full[(ntiles - 1) % NST], (uint32_t)(((ntiles - 1) / NST) & 1));
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

    const int gi = (warp >> 2) - 1, wi = warp & 3, gt = threadIdx.x & 127;
    const int gq = lane >> 2, tq = lane & 3;
    const int kn = wi & 1, kh = wi >> 1;                     /* keys 16 kn.., half kh of D */

    /* Q: the chunk's 16 heads (rows past hg are zero), unscaled; tau is applied to S */
    for (int i = threadIdx.x - 128; i < 16 * (D / 8); i += 256) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < hg) {
            const T *src = row<const T>(p.q, b, 0, h * hg + r0 + r) + c;
            if (((uintptr_t)src & 15) == 0) {
                v = *(const uint4 *)src;
            } else {
                T tmp[8];
#pragma unroll
                for (int e = 0; e < 8; e++) tmp[e] = src[e];
                v = *(uint4 *)tmp;
            }
        }
        *(uint4 *)(Qs + r * LD + c) = v;
    }
    named_sync(1, 256);
    uint32_t qf[KSW][4];
#pragma unroll
    for (int k = 0; k < KSW; k++)
        ldmatrix_x4(qf[k], Qs + (lane & 15) * LD + (kh * KSW + k) * 16 + (lane >> 4) * 8);

    float o[NTV][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < NTV; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale = (float)p.scale, bias = (float)p.rep_bias;
    /* B fragments of S (K as stored, [key][d]): matrix lane >> 3 of the ldmatrix is n-tile
     * lane >> 4, columns +8 for odd matrices; P V: row (k) kk * 16 + (lane & 15) */
    const int krow = S_::off(S_::key(kn * 16 + (lane >> 4) * 8 + (lane & 7)));
    const int kcol = ((lane >> 3) & 1) * 8;
    const int vrow0 = S_::off(S_::key(lane & 15)), vrow1 = S_::off(S_::key(16 + (lane & 15)));

    for (int t = gi, j = 0; t < ntiles; t += 2, j++) {
        const int st = t % NST;
        const int64_t k0 = i0 + (int64_t)t * kDecKeys, nv = i1 - k0, nb = a.G - k0;
        const int kv = nv < kDecKeys ? (int)nv : kDecKeys;          /* keys < kv: in range */
        const int kb = nb <= 0 ? 0 : nb < kDecKeys ? (int)nb : kDecKeys;   /* < kb: condensed */
        /* The stages alternate between the groups (NST is odd), so stage st's previous phase
           (tile t - NST) was the other group's: wait for its release first.  Without it a
           group that runs NST tiles ahead of the other — its own tiles t - 4, t - 2 landed
           and consumed while tile t - NST is still in flight — asks `full` for phase t / NST
           while the barrier is still in phase t / NST - 1, whose parity is that of the phase
           before it, complete: the wait passes at once and the group reads a stage being
           written (and releases it early).  Waiting for `empty` is unambiguous: its phase
           t / NST - 2 was this group's own release. */
        if (t >= NST) mbar_wait(&empty[st], (uint32_t)((t / NST + 1) & 1));
        mbar_wait(&full[st], (uint32_t)((t / NST) & 1));
        const T *Ks = stage0 + st * STG;

        /* S partial: 16 rows x keys [16 kn, 16 kn + 16), k-steps of half kh */
        float acc[2][NACC][4];
#pragma unroll
        for (int nn = 0; nn < 2; nn++)
#pragma unroll
            for (int u = 0; u < NACC; u++)
                acc[nn][u][0] = acc[nn][u][1] = acc[nn][u][2] = acc[nn][u][3] = 0;
#pragma unroll
        for (int k2 = 0; k2 < KSW; k2 += NACC)
#pragma unroll
            for (int u = 0; u < NACC; u++) {
                uint32_t bf[4];
                ldmatrix_x4(bf, Ks + krow + (kh * KSW + k2 + u) * 16 + kcol);
                mma16816<T>(acc[0][u], qf[k2 + u], bf[0], bf[1]);
                mma16816<T>(acc[1][u], qf[k2 + u], bf[2], bf[3]);
            }
        float *Sb = Ss + (gi * 2 + (j & 1)) * 2 * 16 * SR;   /* this group's buffer j & 1 */
#pragma unroll
        for (int nn = 0; nn < 2; nn++) {
            float sc[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                sc[e] = acc[nn][0][e];
#pragma unroll
                for (int u = 1; u < NACC; u++) sc[e] += acc[nn][u][e];
            }
            float *Sw = Sb + kh * 16 * SR + kn * 16 + nn * 8 + 2 * tq;
            *(float2 *)(Sw + gq * SR) = make_float2(sc[0], sc[1]);
            *(float2 *)(Sw + (gq + 8) * SR) = make_float2(sc[2], sc[3]);
        }
        /* S complete for the group; with S double-buffered, also: every warp of the group is
         * done reading the buffer the next tile writes */
        named_sync(2 + gi, 128);

        /* online softmax (every warp of the group computes the same numbers) and P as A
         * fragments: x[i][kk][e], row gq + 8 i, key 16 kk + {2tq, 2tq+1, 2tq+8, 2tq+9}[e] */
        float x[2][2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float bmax = -INFINITY;
#pragma unroll
            for (int kk = 0; kk < 2; kk++)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {
                    const int c = 16 * kk + 2 * tq + 8 * (e >> 1);   /* column of S */
                    const int key0 = S_::key(c), key1 = S_::key(c + 1);
                    const float2 v2 = *(const float2 *)(Sb + (gq + 8 * i) * SR + c);
                    const float2 w2 = *(const float2 *)(Sb + (16 + gq + 8 * i) * SR + c);
                    float v0 = (v2.x + w2.x) * scale + (key0 < kb ? bias : 0.0f);
                    float v1 = (v2.y + w2.y) * scale + (key1 < kb ? bias : 0.0f);
                    v0 = key0 < kv ? v0 : -INFINITY;
                    v1 = key1 < kv ? v1 : -INFINITY;
                    x[i][kk][e] = v0, x[i][kk][e + 1] = v1;
                    bmax = fmaxf(bmax, fmaxf(v0, v1));
                }
            dec_softmax_update(x[i], bmax, m[i], l[i], o, i);
        }

        /* O[:, this warp's columns] += P V (V: the first DV columns of the key tile) */
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const uint32_t af[4] = {pack2<T>(x[0][kk][0], x[0][kk][1]),
                                    pack2<T>(x[1][kk][0], x[1][kk][1]),
                                    pack2<T>(x[0][kk][2], x[0][kk][3]),
                                    pack2<T>(x[1][kk][2], x[1][kk][3])};
#pragma unroll
            for (int n = 0; n < NTV; n += 2) {
                uint32_t bf[4];
                ldmatrix_x4_trans(bf, Ks + (kk ? vrow1 : vrow0) + wi * WCOL + n * 8 +
                                          (lane >> 4) * 8);
                mma16816<T>(o[n], af, bf[0], bf[1]);
                mma16816<T>(o[n + 1], af, bf[2], bf[3]);
            }
        }
        __syncwarp();                /* the warp's reads of the stage are done: free it */
        if (lane == 0) mbar_arrive(&empty[st]);
    }

    /* merge: group 1's state through the (now idle) stages into group 0 (the same lane of
     * the same warp of the group holds the same rows and columns) */
    float4 *X = (float4 *)stage0;
    named_sync(1, 256);              /* every tile consumed: no copy writes the stages */
    if (gi == 1) {
#pragma unroll
        for (int n = 0; n < NTV; n++)
            X[n * 128 + gt] = make_float4(o[n][0], o[n][1], o[n][2], o[n][3]);
        X[NTV * 128 + gt] = make_float4(m[0], m[1], l[0], l[1]);
    }
    named_sync(1, 256);
    if (gi == 1) return;
    const float4 ml = X[NTV * 128 + gt];
    float c0[2], c1[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const float m1 = i ? ml.y : ml.x, l1 = i ? ml.w : ml.z;
        const float mnew = fmaxf(m[i], m1);
        const float base = mnew == -INFINITY ? 0.0f : mnew;
        c0[i] = __expf(m[i] - base), c1[i] = __expf(m1 - base);
        m[i] = mnew;
        l[i] = l[i] * c0[i] + l1 * c1[i];
    }
#pragma unroll
    for (int n = 0; n < NTV; n++) {
        const float4 v = X[n * 128 + gt];
        o[n][0] = o[n][0] * c0[0] + v.x * c1[0];
        o[n][1] = o[n][1] * c0[0] + v.y * c1[0];
        o[n][2] = o[n][2] * c0[1] + v.z * c1[1];
        o[n][3] = o[n][3] * c0[1] + v.w * c1[1];
    }

    /* the unnormalised partial row, its max and sum */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        const int64_t hr = r0 + gq + 8 * i;
        if (hr >= hg) continue;
        float *dst = partial(a, b, h * hg + hr, s);
#pragma unroll
        for (int n = 0; n < NTV; n++)
            *(float2 *)(dst + wi * WCOL + n * 8 + 2 * tq) =
                make_float2(o[n][2 * i], o[n][2 * i + 1]);
        if (wi == 0 && tq == 0) dst[DV] = m[i], dst[DV + 1] = l[i];
    }
    if (a.count) merge_splits<T, DV>(a, b, h, r0, (int *)Ss, gt);
}

template <typename T, int D, int DV, int U = 1>
int launch_ws(const DecArgs &a, cudaStream_t st, bool pdl = true) {
    auto kernel = lca_dec_partial_ws_kernel<T, D, DV, U>;
    constexpr size_t sm = WsShape<D, DV, U>::kSmem;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    /* a programmatic dependent launch: the blocks may start (shared memory, barriers, Q) while
       the append kernel before them runs; the producer waits for it (griddepcontrol.wait)
       before its first copy */
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)a.hchunks, (unsigned)a.nsplit, (unsigned)(a.p.B * a.p.Hkv));
    cfg.blockDim = dim3(kWsThreads);
    cfg.dynamicSmemBytes = sm;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl && !a.append ? 1 : 0;         /* no append kernel before: q is read */
    return cudaLaunchKernelEx(&cfg, kernel, a) == cudaSuccess ? LCA_OK : LCA_ERR_CUDA;
}

/* LCA_DECODE_VARIANT (benchmarks and tests; read at every step):
 *   unset or anything else  the default for 16-head blocks (H / Hkv <= 16): the warp-specialised
 *            kernel appending the token itself, two rows a copy ("wsa2" below); v3 otherwise
 *   "v3"     lca_dec_partial_bulk_kernel, one tile an iteration (the default before ws)
 *   "kt2"    v3 with two tiles an iteration         (16-head blocks)
 *   "cp"     v3 with cp.async loads                 (16-head blocks)
 *   "kt2cp"  both                                   (16-head blocks)
 * and the warp-specialised kernel in 16-head blocks for every H / Hkv (at H = 128 the 8 blocks
 * of a (b, split) read the same tiles, the first from memory, the rest mostly from L2: a
 * comparison against v3's 64-head blocks), merging its splits itself (up to kMergeSplits; else
 * the combine kernel runs):
 *   "ws"     one bulk copy a row, after the append kernel (a programmatic dependent launch of
 *            it; the default of the fourth 11-30 session)
 *   "wsc"    ws with the combine kernel and a plain launch (the ws of the 11-30 H200 runs)
 *   "wsm"    ws merging its splits, with a plain launch
 *   "wsa"    ws appending the step's token itself (no append kernel: warps 1..3 of the last
 *            split's block write the ring slot and the summary sum; the new key row is copied
 *            from k), when no condensation runs before the partial kernel; one bulk copy a row
 *            (the default of the fifth 11-30 session)
 *   "wsa2"   wsa with a tile's rows copied 2 at a time where consecutive in memory (16 bulk
 *            copies a tile instead of 32: the copy engine takes about as long for a 1,152-byte
 *            row as for two, benchmarks/bw_probe.cu), the keys permuted within a tile so that
 *            an ldmatrix's 8 rows lie in 8 units; the default.  H200 at 128K, B = 64: a step of
 *            0.180-0.182 ms against wsa's 0.210-0.212 (three processes each, 11-30 sixth
 *            session).  Before the stage-phase fix (the wait on `empty` ahead of `full` in
 *            lca_dec_partial_ws_kernel) it failed once and hung once in three runs; 4 rows a
 *            copy (ws4 / wsa4) were no faster than 2 and hung in the CUDA-graph timing then */
enum Variant { kDefault, kV3, kKt2, kCp, kKt2Cp, kWs, kWsc, kWsm, kWsa, kWsa2 };
static Variant variant() {
    const char *v = getenv("LCA_DECODE_VARIANT");
    if (!v) return kDefault;
    if (!strcmp(v, "v3")) return kV3;
    if (!strcmp(v, "kt2")) return kKt2;
    if (!strcmp(v, "cp")) return kCp;
    if (!strcmp(v, "kt2cp")) return kKt2Cp;
    if (!strcmp(v, "ws")) return kWs;
    if (!strcmp(v, "wsc")) return kWsc;
    if (!strcmp(v, "wsm")) return kWsm;
    if (!strcmp(v, "wsa")) return kWsa;
    if (!strcmp(v, "wsa2")) return kWsa2;
    return kDefault;
}

template <typename T, int D, int DV> int launch_one(const DecArgs &a, cudaStream_t st) {
    switch (variant()) {
    case kV3: return launch<T, D, DV, 1, 1, true>(a, st);
    case kKt2: return launch<T, D, DV, 1, 2, true>(a, st);
    case kCp: return launch<T, D, DV, 1, 1, false>(a, st);
    case kKt2Cp: return launch<T, D, DV, 1, 2, false>(a, st);
    case kWsc: return launch_ws<T, D, DV>(a, st, false);
    case kWsm: return launch_ws<T, D, DV>(a, st, false);
    case kWs:
    case kWsa: return launch_ws<T, D, DV, 1>(a, st);    /* the append: a.append (appends()) */
    default: return launch_ws<T, D, DV, 2>(a, st);      /* kDefault, kWsa2 */
    }
}

template <typename T> int launch_mt(const DecArgs &a, int mt, cudaStream_t st) {
    if (a.p.D == 576) {
        if (mt == 1) return launch_one<T, 576, 512>(a, st);
        if (mt == 2) return launch<T, 576, 512, 2, 1, true>(a, st);
        return launch<T, 576, 512, 4, 1, true>(a, st);
    }
    if (mt == 1) return launch_one<T, 288, 256>(a, st);
    if (mt == 2) return launch<T, 288, 256, 2, 1, true>(a, st);
    return launch<T, 288, 256, 4, 1, true>(a, st);
}

/* shared memory of the 16-head-block variants (the largest, so that routing does not depend
 * on the variant) */
template <int D, int DV> constexpr size_t smem_mt1() {
    constexpr size_t a = smem<D, DV, 1>(), b = smem<D, DV, 1, 2>();
    constexpr size_t c = WsShape<D, DV, 1>::kSmem, ab = a > b ? a : b;
    static_assert(WsShape<D, DV, 2>::kSmem <= c, "smem");
    return ab > c ? ab : c;
}

}  // namespace dec90
}  // namespace lca

/* The kernel covers: bf16/fp16, absorbed MLA 576/512 or 288/256 (values inside the keys),
 * 16-byte aligned rows and strides, a compute 9.0 device with the shared memory. */
extern "C" int lca_cuda_dec_bulk_supported(const lca_decode_params *p, int device) {
    using namespace lca::dec90;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!p->v_in_k || !((p->D == 576 && p->Dv == 512) || (p->D == 288 && p->Dv == 256))) return 0;
    const lca_view *vs[] = {&p->kbar, &p->kr};
    if (!lca::rows_aligned16(vs)) return 0;
    const int64_t hg = p->H / p->Hkv;
    const Variant v = variant();
    const int mt = v == kWs || v == kWsc || v == kWsm || v == kWsa || v == kWsa2 ||
                   hg <= 16 ? 1
                   : hg <= 32 ? 2 : 4;
    const size_t need =
        p->D == 576 ? (mt == 1 ? smem_mt1<576, 512>() : mt == 2 ? smem<576, 512, 2>()
                                                                : smem<576, 512, 4>())
                    : (mt == 1 ? smem_mt1<288, 256>() : mt == 2 ? smem<288, 256, 2>()
                                                                : smem<288, 256, 4>());
    if (!lca::device_fits(device, need, true)) return 0;
    return mt;
}

extern "C" int lca_cuda_dec_bulk_merges(const lca_decode_params *p, int mt) {
    using namespace lca::dec90;
    (void)p;
    const Variant v = variant();
    return mt == 1 && v != kV3 && v != kKt2 && v != kCp && v != kKt2Cp && v != kWsc
               ? kMergeSplits : 0;
}

extern "C" int lca_cuda_dec_bulk_appends(const lca_decode_params *p, int mt) {
    using namespace lca::dec90;
    const lca_view *vs[] = {&p->k};
    const Variant v = variant();
    return mt == 1 && (v == kDefault || v == kWsa || v == kWsa2) && p->v_in_k &&
           lca::rows_aligned16(vs);
}

extern "C" int lca_cuda_dec_bulk_partial(const lca::DecArgs *a, int mt, void *stream) {
    using namespace lca::dec90;
    cudaStream_t s = (cudaStream_t)stream;
    return a->p.dtype == LCA_BF16 ? launch_mt<__nv_bfloat16>(*a, mt, s)
                                  : launch_mt<__half>(*a, mt, s);
}
