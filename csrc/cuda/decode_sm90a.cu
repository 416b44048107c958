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
 * Two alternatives for 16-head blocks stay selectable for benchmarks (LCA_DECODE_VARIANT; all
 * tested): two tiles an iteration (KT = 2) and cp.async loads on the same mbarriers (BULK =
 * false) — both measured slower on the H200 (benchmarks/NOTES.md, Decode). */
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
            bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
            bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
            const float mnew = fmaxf(m[i], bmax);
            const float base = mnew == -INFINITY ? 0.0f : mnew;
            const float corr = __expf(m[i] - base);
            m[i] = mnew;
            l[i] *= corr;
#pragma unroll
            for (int n = 0; n < NTV; n++) o[n][2 * i] *= corr, o[n][2 * i + 1] *= corr;
#pragma unroll
            for (int kk = 0; kk < 2 * KT; kk++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    x[i][kk][e] = __expf(x[i][kk][e] - base);
                    l[i] += x[i][kk][e];
                }
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

/* LCA_DECODE_VARIANT (benchmarks; 16-head blocks only): "kt2" two tiles an iteration, "cp"
 * cp.async instead of bulk copies, "kt2cp" both; anything else the default. */
static int variant() {
    const char *v = getenv("LCA_DECODE_VARIANT");
    if (!v) return 0;
    if (!strcmp(v, "kt2")) return 1;
    if (!strcmp(v, "cp")) return 2;
    if (!strcmp(v, "kt2cp")) return 3;
    return 0;
}

template <typename T, int D, int DV> int launch_one(const DecArgs &a, cudaStream_t st) {
    switch (variant()) {
    case 1: return launch<T, D, DV, 1, 2, true>(a, st);
    case 2: return launch<T, D, DV, 1, 1, false>(a, st);
    case 3: return launch<T, D, DV, 1, 2, false>(a, st);
    default: return launch<T, D, DV, 1, 1, true>(a, st);
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
    const int mt = hg <= 16 ? 1 : hg <= 32 ? 2 : 4;
    size_t need = p->D == 576 ? (mt == 1 ? smem<576, 512, 1>() : mt == 2 ? smem<576, 512, 2>()
                                                                        : smem<576, 512, 4>())
                              : (mt == 1 ? smem<288, 256, 1>() : mt == 2 ? smem<288, 256, 2>()
                                                                        : smem<288, 256, 4>());
    if (mt == 1) {
        const size_t kt2 = p->D == 576 ? smem<576, 512, 1, 2>() : smem<288, 256, 1, 2>();
        need = need > kt2 ? need : kt2;
    }
    if (!lca::device_fits(device, need, true)) return 0;
    return mt;
}

extern "C" int lca_cuda_dec_bulk_partial(const lca::DecArgs *a, int mt, void *stream) {
    using namespace lca::dec90;
    cudaStream_t s = (cudaStream_t)stream;
    return a->p.dtype == LCA_BF16 ? launch_mt<__nv_bfloat16>(*a, mt, s)
                                  : launch_mt<__half>(*a, mt, s);
}
