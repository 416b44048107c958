/* attend_mla_sm90a.cu — the absorbed MLA forward (D = 576, Dv = 512, v = k[..., :512]) on
 * Hopper's warpgroup tensor-core instructions (wgmma, sm_90a only: setup.py compiles the
 * *_sm90a.cu files for that target alone; attend_fwd.cu routes here only on a compute 9.0
 * device).  Same tiling and softmax as attend_mla.cu (64 rows x 64 keys, 8 warps), with the two
 * warpgroups taking the two halves: warpgroup `half` computes S for keys 32*half .. +31 as 36
 * wgmma m64n32k16 (Q and K straight from shared memory, no ldmatrix through registers) and
 * O[:, 256*half .. +255] += P V as 4 wgmma m64n256k16 (P from shared memory, V = the key tile
 * read N-major).  The m64nN accumulator fragment of warp w of a warpgroup is the mma.sync
 * m16n8 fragment of rows 16w .. 16w+15, so the softmax code is attend_mla.cu's.
 *
 * Shared memory: every tile in the canonical 128-byte-swizzled layout, 64-column blocks of
 * rows of 128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r & 7), atoms 1024-byte
 * aligned: Q 72 KB, 2 key stages of 72 KB, P 8 KB; 226 KB a block.
 *
 * Variant 1 (LCA_MLA90_VARIANT=1; 0 selects the cp.async loads above) loads the
 * key tiles by TMA instead: thread 0 issues the 9 boxes of 64 columns of block j + 1 (tensor
 * maps of k and kbar), which complete on the stage's mbarrier; no thread spends instructions
 * on copies (58.2 against 93.8 ms at 128K), and O is rescaled only when some row of the warp
 * has a new maximum.
 *
 * Variant 2, the default (LCA_MLA90_VARIANT=2), specialises the warpgroups so that S_{j+1}
 * runs under P_j V_j: see lca_attend_mla_ws_kernel below (H200, 128K, bf16, SPEC §9 shape:
 * 45.3 ms, 510 TFLOP/s, against variant 1's 57.6 ms in the same run, de28747).
 *
 * The default for this shape on a compute 9.0 device (LCA_CUDA_DISABLE=wgmma runs the mma.sync
 * kernel attend_mla.cu instead). */
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "wgmma.cuh"

namespace lca {
namespace mla90 {

constexpr int kRows = 64, kKeys = 64, kThreads = 256, kD = 576, kDV = 512;
constexpr int kTile = 64 * kD;                     /* elements of a Q or key tile */
constexpr size_t kSmem = 2 * (size_t)(3 * kTile + kRows * kKeys) + 4 * 4 * kRows + 2 * 8 + 1024;
/* variant 1 (TMA) measured on the H200 at 7c4de99: 58.2 ms at 128K (397 TFLOP/s) against
 * 93.8 ms (246) for the cp.async loads of variant 0 */
constexpr int kDefaultVariant = 2;

/* variant 1's tensor maps of k and kbar (boxes of 64 columns x 64 rows, 128-byte swizzle) */
struct MlaMaps {
    CUtensorMap k, kbar;
};

/* element offset of 16-byte chunk c (of 8 elements) of row r in a tile of `rows` rows */
__device__ __forceinline__ int sw(int rows, int r, int c) {
    return (c >> 3) * (rows * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}

__device__ __forceinline__ void pair_sync(int rg) {
    asm volatile("bar.sync %0, 64;\n" ::"r"(rg + 1));
}

/* d (+)= A B, m64n32k16, A and B from shared memory (descriptors da, db); TY the element
 * type's PTX name; TB: B transposed (N-major). */
#define LCA_WGMMA_M64N32(TY)                                                                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"                  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                          \
                 "%12, %13, %14, %15"                                                          \
                 "}, %16, %17, p, 1, 1, 0, %19;\n}\n"                                           \
                 : LCA_ACC4(0)                                                                 \
                 : "l"(da), "l"(db), "r"(1), "n"(TB))

/* the same, m64n256k16 */
#define LCA_WGMMA_M64N256(TY)                                                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                          \
                 "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "                \
                 "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                \
                 "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "                \
                 "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "                \
                 "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, "                \
                 "%84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                \
                 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "        \
                 "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, "    \
                 "%120, %121, %122, %123, %124, %125, %126, %127"                              \
                 "}, %128, %129, p, 1, 1, 0, %131;\n}\n"                                        \
                 : LCA_ACC16(0), LCA_ACC16(16)                                                 \
                 : "l"(da), "l"(db), "r"(1), "n"(TB))

template <int TB>
__device__ __forceinline__ void wgmma_m64n32(float (&d)[4][4], uint64_t da, uint64_t db,
                                             __nv_bfloat16 *) {
    LCA_WGMMA_M64N32("bf16");
}
template <int TB>
__device__ __forceinline__ void wgmma_m64n32(float (&d)[4][4], uint64_t da, uint64_t db,
                                             __half *) {
    LCA_WGMMA_M64N32("f16");
}
template <int TB>
__device__ __forceinline__ void wgmma_m64n256(float (&d)[32][4], uint64_t da, uint64_t db,
                                              __nv_bfloat16 *) {
    LCA_WGMMA_M64N256("bf16");
}
template <int TB>
__device__ __forceinline__ void wgmma_m64n256(float (&d)[32][4], uint64_t da, uint64_t db,
                                              __half *) {
    LCA_WGMMA_M64N256("f16");
}

/* 64 rows of width kD from a strided global view into a swizzled tile (cp.async, 16 bytes a
 * thread); rows n .. 63 are zeroed.  src(r): row r's address. */
template <typename T, typename F>
__device__ __forceinline__ void load_tile(T *tile, int n, F src) {
    constexpr int V = kD / 8;
    for (int i = threadIdx.x; i < 64 * V; i += kThreads) {
        const int r = i / V, c = i % V;
        T *dst = tile + sw(64, r, c);
        if (r < n) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a),
                         "l"(src(r) + 8 * c));
        } else {
            *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
    }
}

/* O[:, 256 half ..] += P V for one key block, waited for: 4 wgmma m64n256k16, P (64 rows x
 * 64 keys) K-major from shared memory, V = the first 512 columns of the key tile Ks read
 * N-major (transposed B): LBO = the next 64 output columns (8 KB on), SBO = the next 8 keys
 * (1 KB on) */
template <typename T>
__device__ __forceinline__ void pv_product(float (&o)[kDV / 2 / 8][4], const T *Ps, const T *Ks,
                                           int half) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; kk++) {
        const uint64_t da = gdesc(Ps + kk * 16, 16, 1024);
        const uint64_t db = gdesc(Ks + (4 * half) * 64 * 64 + kk * 16 * 64, 64 * 64 * 2, 1024);
        wgmma_m64n256<1>(o, da, db, (T *)nullptr);
    }
    wg_commit();
    wg_wait<0>();
}

template <typename T, bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    lca_attend_mla_wgmma_kernel(lca_params p, const __grid_constant__ MlaMaps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kNT = kDV / 2 / 8;                      /* 32 n-tiles of 8 output columns */
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = smem_align1024(smem_raw);
    T *Qs = (T *)base;
    T *Kst = Qs + kTile;                                  /* two stages */
    T *Ps = Kst + 2 * kTile;                              /* 64 x 64, one 64-column block */
    float *xmax = (float *)(Ps + kRows * kKeys);          /* [2][kRows] */
    float *xsum = xmax + 2 * kRows;                       /* [2][kRows] */
    uint64_t *full = (uint64_t *)(xsum + 2 * kRows);      /* [2]: key stage landed (kTma) */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int rg = warp & 3, half = warp >> 2;            /* half = warpgroup */
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z, h = blockIdx.y;
    const int64_t nrows = p.L * hg;
    const int64_t R0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * kRows;   /* heaviest first */
    const int64_t t_first = R0 / hg;
    const int64_t t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;

    if (kTma && threadIdx.x == 0) {
        mbar_init(&full[0], 1);
        mbar_init(&full[1], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    load_tile<T>(Qs, (int)(nrows - R0 < kRows ? nrows - R0 : kRows), [&](int r) {
        const int64_t R = R0 + r;
        return row<const T>(p.q, b, R / hg, h * hg + R % hg);
    });
    cp_async_commit();

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
        if constexpr (kTma) {                 /* thread 0: 9 boxes on the stage's mbarrier */
            if (threadIdx.x == 0) {
                uint64_t *bar = &full[blk & 1];
                T *dst = Kst + (blk & 1) * kTile;
                const CUtensorMap *map = cond ? &tm.kbar : &tm.k;
                const int key0 = (int)block_start(blk);
                mbar_expect_tx(bar, 2u * kTile);
#pragma unroll
                for (int cb = 0; cb < kD / 64; cb++)
                    tma_load(dst + cb * 64 * 64, map, cb * 64, (int)h, key0, (int)b, bar);
            }
            return;
        }
        const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
        const lca_view &kv = cond ? p.kbar : p.k;
        load_tile<T>(Kst + (blk & 1) * kTile, nk,
                     [&](int r) { return row<const T>(kv, b, key0 + r, h); });
        cp_async_commit();
    };
    if (kTma) __syncthreads();                           /* the mbarriers initialised */
    issue(0);

    for (int64_t blk = 0; blk < nblocks; blk++) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk);
        if constexpr (kTma) {
            if (blk + 1 < nblocks) issue(blk + 1);    /* its stage freed by the last barrier */
            if (blk == 0) {                           /* Q, by cp.async from every thread */
                cp_async_wait<0>();
                fence_async_smem();
                __syncthreads();
            }
            mbar_wait(&full[blk & 1], (uint32_t)((blk >> 1) & 1));
            /* the box's keys past the block's end (later tokens, condensed rows no row of the
               tile sees) zeroed, as the cp.async loads leave them: a non-finite value there
               must not reach P V as 0 x Inf */
            const int64_t kend = cond ? Gmax : t_last + 1;
            const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
            if (nk < kKeys) {                              /* the same for the whole block */
                T *Ks = Kst + (blk & 1) * kTile;
                constexpr int V = kD / 8;
                for (int i = nk * V + threadIdx.x; i < kKeys * V; i += kThreads)
                    *(uint4 *)(Ks + sw(64, i / V, i % V)) = make_uint4(0, 0, 0, 0);
                fence_async_smem();
                __syncthreads();
            }
        } else {
            if (blk + 1 < nblocks) {
                issue(blk + 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_async_smem();
            __syncthreads();
        }
        const T *Ks = Kst + (blk & 1) * kTile;

        /* S = Q K^T for keys 32*half .. +31: 36 x m64n32k16, K-major A and B */
        float s[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < kD / 16; ks++) {
            const int cb = ks >> 2, kin = (ks & 3) * 16;  /* 64-column block, offset in it */
            const uint64_t da = gdesc(Qs + cb * 64 * 64 + kin, 16, 1024);
            const uint64_t db = gdesc(Ks + cb * 64 * 64 + half * 32 * 64 + kin, 16, 1024);
            wgmma_m64n32<0>(s, da, db, (T *)nullptr);
        }
        wg_commit();
        wg_wait<0>();

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

        float base_m[2], corr[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const float mnew = fmaxf(m[i], fmaxf(bmax[i], xmax[(1 - half) * kRows + lr[i]]));
            base_m[i] = mnew == -INFINITY ? 0.0f : mnew;
            corr[i] = __expf(m[i] - base_m[i]);
            m[i] = mnew;
            l[i] *= corr[i];
        }
        /* kTma: O rescaled only when some row of the warp has a new maximum (warp-uniform) */
        if (!kTma || __any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int n = 0; n < kNT; n++) o[n][2 * i] *= corr[i], o[n][2 * i + 1] *= corr[i];
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
#pragma unroll
            for (int n = 0; n < 4; n++) {
                const float p0 = __expf(s[n][2 * i] - base_m[i]);
                const float p1 = __expf(s[n][2 * i + 1] - base_m[i]);
                l[i] += p0 + p1;
                const int kc = half * 32 + n * 8 + 2 * tq;          /* key column in P */
                *(uint32_t *)(Ps + sw(kRows, lr[i], kc >> 3) + (kc & 7)) = pack2<T>(p0, p1);
            }
        }
        fence_async_smem();
        __syncthreads();                                  /* P complete: all 64 rows */

        pv_product<T>(o, Ps, Ks, half);                   /* O[:, 256*half ..] += P V */
        __syncthreads();                                  /* stage and P may be refilled */
    }

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
        T *dst = row<T>(p.out, b, tr[i], hq) + half * (kDV / 2);
        const float inv = 1.0f / lt;
#pragma unroll
        for (int n = 0; n < kNT; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (half == 0 && tq == 0)
            ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] = m[i] + logf(lt);
    }
#endif
}

/* Variant 2 (the default; LCA_MLA90_VARIANT=2): warpgroups specialised so that the
 * scores of key block j+1 are computed while P_j V_j is in the tensor cores.  384 threads:
 *   - warpgroup 0 owns S: Q's nope columns 0..495 as A fragments in registers (31 k-steps x 4
 *     = 124 registers, loaded once through shared memory), columns 496..511 in a 2 KB tile
 *     (Qx, no swizzle) and its 64 rope columns in an 8 KB tile (Qr), S_j = Q K_j^T as 36 wgmma
 *     m64n64k16 (31 with A from registers, 5 from shared memory; K_j from shared memory), the
 *     online softmax of all 64 keys (row maxima by quad shuffles: no exchange), then P_j
 *     (bf16/fp16, by stmatrix) into key stage j's rope block (columns 512..575, which only S
 *     reads, so free once S_j is done) and each row's O factor exp2(m_old - m_new), and
 *     signals `pfull`;
 *   - warpgroups 1 and 2 own O[:, 256 h .. +255] (128 registers): per block they wait for
 *     `pfull`, rescale O by the factors when some row's maximum moved, issue O += P_j V_j as
 *     4 wgmma m64n256k16 (P from the rope block, V = the key tile read N-major), wait for it
 *     and release the stage on `empty`;
 *   - key tiles arrive by TMA into 3 stages of 72 KB (216 KB: no Q tile in shared memory), K_0
 *     and K_1 issued at the start, K_2 once warpgroup 0 has its Q fragments (Q is staged in
 *     stage 2), K_{j+3} by thread 0 of warpgroup 1 once both O warpgroups released block j.
 * Registers: __launch_bounds__(384, 1) gives 168 a thread, a pool of 3 x 168 = 504 that
 * setmaxnreg redistributes (the .dec calls release into it, the .inc draws from it: a sum over
 * 504 never completes the .inc, a hang): 184 for warpgroup 0, 160 for the two others
 * (184 + 2 x 160 = 504).  ptxas (CUDA 13) places a wgmma's accumulators and A fragments from
 * R24 up and keeps the top 2 registers of a setmaxnreg budget: 184 holds the 32 accumulators
 * of S and 31 k-steps of Q (R24 .. R179), not 32 (which needed 192, and the O warpgroups'
 * 128 accumulators need 160); hence Q's 32nd nope k-step from shared memory.  0 bytes spilled,
 * no wgmma serialised.  The block's scalars (32-bit: see launch_ws) live in shared memory and
 * no 64-bit division (a called subroutine) is left.
 * Shared memory: all of the 227 KB (232,448 bytes): 3 key stages, Qr, Qx, the O factors, the
 * rows' token and G offsets (2 bytes a row), the scalars, the barriers; no slack for aligning
 * the base, which must be (and is checked) 1024-byte aligned; the row sums go to Qr at the
 * end. */
constexpr int kWsThreads = 384, kWsStages = 3;
/* setmaxnreg: the warpgroups' registers, of the 3 x 168 that __launch_bounds__(384, 1) gives
   (the pool the .dec calls release and the .inc draws from: a sum above it never completes) */
constexpr int kWsRegS = 184, kWsRegO = 160;
static_assert(kWsRegS + 2 * kWsRegO <= 3 * 168, "setmaxnreg: more than the launch's registers");
constexpr int kQNope = kDV / 16 - 1;                    /* Q's k-steps held in registers */

/* stmatrix: four 8 x 8 matrices of 16-bit elements, register k holding matrix k's mma
   fragment (row lane / 4, columns 2 (lane % 4) + 0, 1), lane l giving the shared-memory
   address of row l % 8 of matrix l / 8 */
__device__ __forceinline__ void stsm_x4(uint32_t a, uint32_t r0, uint32_t r1, uint32_t r2,
                                        uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(a),
                 "r"(r0), "r"(r1), "r"(r2), "r"(r3));
}

/* the block's scalars, in shared memory: written once, re-read where needed (registers are
   what warpgroup 0 lacks) */
struct WsScalars {
    int R0, nrows, hg, g;           /* first row of the tile, rows, heads per kv head, group */
    int e0, kend_c, kend_e;         /* first exact key; condensed keys < kend_c, exact < kend_e */
    int ncond, nblocks;             /* key blocks: condensed ones first */
    float scale_l2, bias_l2;        /* scale and rep_bias, base 2 */
    int tf, Gf;                     /* the tile's first token, G of it */
    int pad;
};
/* Shared memory, every byte of the 227 KB (no slack for alignment: the dynamic shared memory
   must start 1024-byte aligned, which the kernel checks): 3 key stages, Q's rope tile (128-byte
   swizzle), Q's last nope k-step (no swizzle), the O factors, the rows' token and G offsets,
   the scalars, the barriers. */
constexpr size_t kWsSmem = 2 * (size_t)(kWsStages * kTile + kRows * 64 + kRows * 16) +
                           4 * (size_t)(kWsStages * kRows) + 2 * kRows + sizeof(WsScalars) +
                           3 * kWsStages * 8;
static_assert(kWsSmem <= 232448, "variant 2 exceeds the sm_90 per-block shared memory");

/* wgmma descriptor of a K-major tile without swizzle: 8 x 16-byte core matrices, lbo bytes
   apart along K, sbo bytes apart along M */
__device__ __forceinline__ uint64_t gdesc_noswizzle(const void *p, uint32_t lbo, uint32_t sbo) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}

/* G_t in 32 bits (t + 1 - w cannot overflow: t < L <= INT32_MAX - 64, w >= 0) */
__device__ __forceinline__ int num_condensed32(int t, int g, int w) {
    return t + 1 < w ? 0 : (t + 1 - w) / g;
}

template <typename T>
__global__ void __launch_bounds__(kWsThreads, 1)
    lca_attend_mla_ws_kernel(lca_params p, const __grid_constant__ MlaMaps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kNT = kDV / 2 / 8;                      /* 32 n-tiles of 8 output columns */
    /* no slack for aligning the base (kWsSmem is all of it): the base must be 1024-byte
       aligned (the swizzled tiles' atoms), as the runtime places it (at the start of the
       block's shared memory when, as here, there is no static shared memory); checked */
    extern __shared__ __align__(1024) unsigned char ws_smem[];
    if (smem_addr(ws_smem) & 1023u) __trap();
    T *Kst = (T *)ws_smem;                                /* kWsStages key tiles */
    T *Qr = Kst + kWsStages * kTile;                      /* Q's rope columns, 64 x 64 */
    T *Qx = Qr + kRows * 64;                              /* Q's columns 496..511, 64 x 16 */
    float *fac = (float *)(Qx + kRows * 16);              /* [stage][row]: O factors */
    uint8_t *rtg = (uint8_t *)(fac + kWsStages * kRows);  /* [row][2]: t - tf, G_t - Gf */
    WsScalars *sc = (WsScalars *)(rtg + 2 * kRows);
    uint64_t *kfull = (uint64_t *)(sc + 1), *pfull = kfull + kWsStages;
    uint64_t *empty = pfull + kWsStages;
    float *lsum = (float *)Qr;    /* [row]: row sums, after warpgroup 0's last read of Qr */

    /* the warpgroup by a shuffle: ptxas then knows it warp-uniform (as CUTLASS's
       canonical_warp_group_idx) */
    const int wg = __shfl_sync(0xffffffffu, (int)threadIdx.x >> 7, 0), tid = threadIdx.x & 127;
    const int lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    /* block blk's first key and whether it is condensed (from sc) */
    auto block_key0 = [&](int blk, bool &cond) {
        const int ncond = sc->ncond;
        cond = blk < ncond;
        return cond ? blk * kKeys : sc->e0 + (blk - ncond) * kKeys;
    };
    auto issue = [&](int blk, int st) {                   /* one thread: the 9 boxes of blk */
        bool cond;
        const int key0 = block_key0(blk, cond);
        const CUtensorMap *map = cond ? &tm.kbar : &tm.k;
        mbar_expect_tx(&kfull[st], 2u * kTile);
#pragma unroll
        for (int cb = 0; cb < kD / 64; cb++)
            tma_load(Kst + st * kTile + cb * 64 * 64, map, cb * 64, (int)blockIdx.y, key0,
                     (int)blockIdx.z, &kfull[st]);
    };

    /* Rows, tokens, keys and block counts in 32 bits: launch_ws runs this kernel only for
       H, g and L * H / Hkv <= 2^31 - 65 (so every row index, key index and key0 + 64 fits):
       no 64-bit division (a called subroutine, whose calls cost registers) anywhere. */
    if (threadIdx.x == 0) {
        const int hg = (int)p.H / (int)p.Hkv, nrows = (int)p.L * hg, g = (int)p.g, w = (int)p.w;
        const int R0 = (int)(gridDim.x - 1 - blockIdx.x) * kRows;       /* heaviest first */
        const int t_first = R0 / hg;
        const int t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;
        const int kend_c = num_condensed32(t_last, g, w);
        const int kend_e = t_last + 1;
        const int Gf = num_condensed32(t_first, g, w), e0 = Gf * g;
        const int ncond = (kend_c + kKeys - 1) / kKeys;
        sc->R0 = R0, sc->nrows = nrows, sc->hg = hg, sc->g = g, sc->tf = t_first, sc->Gf = Gf;
        sc->e0 = e0, sc->kend_c = kend_c, sc->kend_e = kend_e;
        sc->ncond = ncond, sc->nblocks = ncond + (kend_e - e0 + kKeys - 1) / kKeys;   /* >= 1 */
        sc->scale_l2 = (float)p.scale * 1.4426950408889634f;
        sc->bias_l2 = (float)p.rep_bias * 1.4426950408889634f;
        for (int s = 0; s < kWsStages; s++) {
            mbar_init(&kfull[s], 1);                      /* the TMA thread */
            mbar_init(&pfull[s], 4);                      /* one lane of each S warp */
            mbar_init(&empty[s], 8);                      /* one lane of each O warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        issue(0, 0);
        if (sc->nblocks > 1) issue(1, 1);
    }
    /* Q by every thread (cp.async; 6 threads a row, 12 chunks of 16 bytes each), rows past
       the end zeroed: its nope columns 0..495 staged in stage 2 (warpgroup 0 takes them into
       registers), 496..511 into Qx and its rope columns into Qr, where S reads them; the
       row's token and G_t as offsets from the tile's first (t - tf <= 63 as 64 rows span at
       most 64 tokens, and G_t - G_tf <= 64), 255 for a row past the end */
    T *Qst = Kst + 2 * kTile;
    {
        static_assert(kWsThreads == 6 * kRows && (kD / 8) % 6 == 0, "Q: 6 threads a row");
        const int r = threadIdx.x / 6, c0 = threadIdx.x % 6;
        const int hg = sc->hg, R = sc->R0 + r;
        const bool live = R < sc->nrows;
        const int t = R / hg, hq = (int)blockIdx.y * hg + (R - t * hg);
        const T *src = row<const T>(p.q, blockIdx.z, t, hq);
#pragma unroll
        for (int j = 0; j < kD / 8 / 6; j++) {
            const int c = c0 + 6 * j;
            T *dst = c < kQNope * 2 ? Qst + sw(64, r, c)
                     : c < kDV / 8  ? Qx + (r >> 3) * 128 + (c - kQNope * 2) * 64 + (r & 7) * 8
                                    : Qr + sw(64, r, c - kDV / 8);
            if (live) {
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)),
                             "l"(src + 8 * c));
            } else {
                *(uint4 *)dst = make_uint4(0, 0, 0, 0);
            }
        }
        if (c0 == 0) {
            rtg[2 * r] = live ? (uint8_t)(t - sc->tf) : 255;
            rtg[2 * r + 1] = (uint8_t)(num_condensed32(t, sc->g, (int)p.w) - sc->Gf);
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_async_smem();                               /* Qr is read by wgmma */
    }
    __syncthreads();

    if (wg == 0) {
        /* ---- S warpgroup ---- */
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWsRegS) : "memory");
        uint32_t qf[kQNope][4];
#pragma unroll
        for (int ks = 0; ks < kQNope; ks++) {
            const int r = warp * 16 + gq, c = ks * 2;      /* 16-byte chunks c, c + 1 */
            qf[ks][0] = *(const uint32_t *)(Qst + sw(64, r, c) + 2 * tq);
            qf[ks][1] = *(const uint32_t *)(Qst + sw(64, r + 8, c) + 2 * tq);
            qf[ks][2] = *(const uint32_t *)(Qst + sw(64, r, c + 1) + 2 * tq);
            qf[ks][3] = *(const uint32_t *)(Qst + sw(64, r + 8, c + 1) + 2 * tq);
        }
        asm volatile("bar.sync 1, 128;\n" ::: "memory");  /* every Q fragment read */
        if (tid == 0 && sc->nblocks > 2) issue(2, 2);
        __syncwarp();                                      /* converged for the wgmma */

        /* P by stmatrix, 8 rows x 32 columns (4 8-column tiles n = 4 j + k) an instruction:
           lane l gives row r = 16 warp + 8 i + l % 8 of tile 4 j + l / 8, whose 16-byte chunk
           sits at chunk (4 j + l / 8) ^ (r & 7) = (l / 8 ^ l % 8) ^ 4 j of the row: byte
           offset soff ^ (64 j), + 1024 for rows + 8 (two address registers for all of P) */
        const uint32_t soff = (uint32_t)((warp * 16 + (lane & 7)) * 128 +
                                         (((lane >> 3) ^ (lane & 7)) << 4));
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
        float s[kKeys / 8][4];
        int st = 0;
        uint32_t ph = 0;                                   /* the stages' phase parity */
        for (int blk = 0; blk < sc->nblocks; blk++) {
            T *Ks = Kst + st * kTile;
            mbar_wait(&kfull[st], ph);
            /* key rows past the block's end (later tokens, condensed rows no row sees) zeroed:
               no non-finite value may reach P V as 0 x Inf */
            {
                bool cond;
                const int key0 = block_key0(blk, cond);
                const int nk = min((cond ? sc->kend_c : sc->kend_e) - key0, kKeys);
                if (nk < kKeys) {
                    constexpr int V = kD / 8;
                    for (int i = nk * V + tid; i < kKeys * V; i += 128)
                        *(uint4 *)(Ks + sw(64, i / V, i % V)) = make_uint4(0, 0, 0, 0);
                    fence_async_smem();
                    asm volatile("bar.sync 1, 128;\n" ::: "memory");
                }
            }
            wg_reg_fence(s);
            wg_fence();
#pragma unroll
            for (int ks = 0; ks < kQNope; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_rs<64, T, 0>(s, qf[ks], gdesc(Ks + cb * 64 * 64 + kin, 16, 1024), ks > 0);
            }
            /* Q's columns 496..511 from Qx (core matrices: 128 bytes along K, 256 along M) */
            wgmma_ss<64, T>(s, gdesc_noswizzle(Qx, 128, 256),
                            gdesc(Ks + (kQNope >> 2) * 64 * 64 + (kQNope & 3) * 16, 16, 1024),
                            1);
#pragma unroll
            for (int ks = kDV / 16; ks < kD / 16; ks++) {   /* the rope columns: Q from Qr */
                const int kin = (ks & 3) * 16;
                wgmma_ss<64, T>(s, gdesc(Qr + kin, 16, 1024),
                                gdesc(Ks + (kD / 64 - 1) * 64 * 64 + kin, 16, 1024), 1);
            }
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(s);
            /* online softmax over the block's 64 keys (base 2), masks as the other variants;
               P over S in place, then to the rope block (free now: only S reads it) */
            bool cond;
            const int key0 = block_key0(blk, cond);
            const float scale_l2 = sc->scale_l2, bias = cond ? sc->bias_l2 : 0.0f;
            const uint32_t pa = smem_addr(Ks + (kD / 64 - 1) * 64 * 64);
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int r = warp * 16 + gq + 8 * i;
                /* key - key0 - 2 tq = 8 n + e must lie in [lo, hi): condensed [0, chi), exact
                   [chi g, ehi), chi = G_t, ehi = t + 1 (a row past the end: nothing) */
                const int off = key0 + 2 * tq;
                const uint32_t tg = *(const uint16_t *)(rtg + 2 * r);
                const bool live = (tg & 255) != 255;
                const int chi = live ? sc->Gf + (int)(tg >> 8) : 0;
                const int ehi = live ? sc->tf + 1 + (int)(tg & 255) : 0;
                const int lo = (cond ? 0 : chi * sc->g) - off;
                const int hi = (cond ? chi : ehi) - off;
                float bmax = -INFINITY;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float &x = s[n][2 * i + e];
                        x = n * 8 + e >= lo && n * 8 + e < hi ? fmaf(x, scale_l2, bias) : -INFINITY;
                        bmax = fmaxf(bmax, x);
                    }
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
                const float mnew = fmaxf(m[i], bmax);
                const float mb = mnew == -INFINITY ? 0.0f : mnew;   /* a row with nothing yet */
                const float corr = ex2(m[i] - mb);
                m[i] = mnew;
                float ls = 0;
                uint32_t pk[kKeys / 8];
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++) {
                    const float p0 = ex2(s[n][2 * i] - mb), p1 = ex2(s[n][2 * i + 1] - mb);
                    ls += p0 + p1;
                    pk[n] = pack2<T>(p0, p1);
                }
#pragma unroll
                for (int j = 0; j < kKeys / 32; j++)
                    stsm_x4(pa + (soff ^ (64 * j)) + 1024 * i, pk[4 * j], pk[4 * j + 1],
                            pk[4 * j + 2], pk[4 * j + 3]);
                l[i] = fmaf(l[i], corr, ls);
                if (tq == 0) fac[st * kRows + r] = corr;
            }
            fence_async_smem();                            /* P is read by wgmma */
            __syncwarp();
            if (lane == 0) mbar_arrive(&pfull[st]);
            if (++st == kWsStages) st = 0, ph ^= 1;
        }
        /* row sums to the O warpgroups (in Qr: every wgmma reading it is complete), lse out */
#pragma unroll
        for (int i = 0; i < 2; i++) {
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
            const int lr = warp * 16 + gq + 8 * i;
            if (tq == 0) lsum[lr] = l[i];
            const int hg = sc->hg, R = sc->R0 + lr;
            if (R < sc->nrows && tq == 0) {
                const int t = R / hg, hq = (int)blockIdx.y * hg + (R - t * hg);
                ((float *)p.lse.p)[(int64_t)blockIdx.z * p.lse.sb + hq * p.lse.st + t] =
                    (m[i] + __log2f(l[i])) * 0.6931471805599453f;
            }
        }
        asm volatile("bar.sync 2, 384;\n" ::: "memory");
        return;
    }

    /* ---- O warpgroups: half = wg - 1 owns output columns 256 half .. +255 ---- */
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWsRegO) : "memory");
    const int half = wg - 1;
    float o[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    int st = 0;
    uint32_t ph = 0;
    for (int blk = 0; blk < sc->nblocks; blk++) {
        T *Ks = Kst + st * kTile;
        mbar_wait(&pfull[st], ph);
        const int r0 = warp * 16 + gq;
        const float c0 = fac[st * kRows + r0], c1 = fac[st * kRows + r0 + 8];
        if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
            for (int n = 0; n < kNT; n++)
                o[n][0] *= c0, o[n][1] *= c0, o[n][2] *= c1, o[n][3] *= c1;
        }
        const T *Ps = Ks + (kD / 64 - 1) * 64 * 64;
        pv_product<T>(o, Ps, Ks, half);   /* waited: an O warpgroup has nothing else to do */
        wg_reg_fence(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[st]);
        /* thread 0 of warpgroup 1 refills the stage with block blk + 3 once both O warpgroups
           are done with it */
        if (half == 0 && tid == 0 && blk + kWsStages < sc->nblocks) {
            mbar_wait(&empty[st], ph);
            issue(blk + kWsStages, st);
        }
        __syncwarp();                                      /* converged for the next wgmma */
        if (++st == kWsStages) st = 0, ph ^= 1;
    }
    asm volatile("bar.sync 2, 384;\n" ::: "memory");     /* the row sums written */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int lr = warp * 16 + gq + 8 * i;
        const int hg = sc->hg, R = sc->R0 + lr;
        if (R >= sc->nrows) continue;
        const int t = R / hg, hq = (int)blockIdx.y * hg + (R - t * hg);
        T *dst = row<T>(p.out, blockIdx.z, t, hq) + half * (kDV / 2);
        const float inv = __fdividef(1.0f, lsum[lr]);  /* >= 1 (the row's maximum): no slow path */
#pragma unroll
        for (int n = 0; n < kNT; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
#endif
}

/* Host: the tensor maps of the key tiles of variants 1 and 2 (false: strides TMA cannot
 * express).  Condensed rows past the last one any query sees arrive as zeros. */
template <typename T> bool key_maps(const lca_params *p, MlaMaps *tm) {
    memset(tm, 0, sizeof *tm);
    const int64_t mc = std::min(p->m, lca_num_condensed(p->L - 1, p->g, p->w));
    if (!make_map<T>(&tm->k, p->k, kD, p->L, p->Hkv, p->B, 64)) return false;
    if (mc == 0) {
        tm->kbar = tm->k;                                  /* no condensed rows: never read */
        return true;
    }
    return make_map<T>(&tm->kbar, p->kbar, kD, mc, p->Hkv, p->B, 64);
}

template <typename T, bool kTma> int launch(const lca_params *p, cudaStream_t stream) {
    MlaMaps tm;
    memset(&tm, 0, sizeof tm);
    if constexpr (kTma)
        if (!key_maps<T>(p, &tm)) return launch<T, false>(p, stream);
    return launch_row_tiles(lca_attend_mla_wgmma_kernel<T, kTma>, p, kRows, kThreads, kSmem,
                            stream, tm);
}

/* variant 2: the tensor maps of variant 1, the warp-specialised kernel; strides TMA cannot
 * express run variant 0, sizes past its 32-bit row and key arithmetic variant 1 */
template <typename T> int launch_ws(const lca_params *p, cudaStream_t stream) {
    const int64_t lim = 2147483647 - 65;
    if (p->H > lim || p->g > lim || p->L * (p->H / p->Hkv) > lim) return launch<T, true>(p, stream);
    MlaMaps tm;
    if (!key_maps<T>(p, &tm)) return launch<T, false>(p, stream);
    return launch_row_tiles(lca_attend_mla_ws_kernel<T>, p, kRows, kWsThreads, kWsSmem, stream,
                            tm);
}

}  // namespace mla90
}  // namespace lca

/* Whether the wgmma kernel covers this call: bf16/fp16, D = 576,
 * Dv = 512 with v = k[..., :512], 16-byte aligned rows, a compute 9.0 device with the shared
 * memory. */
extern "C" int lca_cuda_mla_wgmma_supported(const lca_params *p, int device) {
    using namespace lca::mla90;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!p->v_in_k || p->D != kD || p->Dv != kDV) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->out};
    if (!lca::rows_aligned16(vs)) return 0;
    if (!lca::device_fits(device, kSmem, true)) return 0;
    return (p->L * (p->H / p->Hkv) + kRows - 1) / kRows <= 2147483647 && p->Hkv <= 65535 &&
           p->B <= 65535;
}

/* LCA_MLA90_VARIANT (a tuning knob): 0 cp.async loads, 1 TMA loads, 2 warp-specialised (the
 * default; variant 1 where its 32-bit indices or tensor maps cannot express the call). */
extern "C" int lca_cuda_attend_mla_wgmma(const lca_params *p, void *stream) {
    using namespace lca::mla90;
    cudaStream_t s = (cudaStream_t)stream;
    const char *env = getenv("LCA_MLA90_VARIANT");
    const int var = env && *env ? atoi(env) : kDefaultVariant;
    const bool bf = p->dtype == LCA_BF16;
    if (var == 1) return bf ? launch<__nv_bfloat16, true>(p, s) : launch<__half, true>(p, s);
    if (var == 2) return bf ? launch_ws<__nv_bfloat16>(p, s) : launch_ws<__half>(p, s);
    return bf ? launch<__nv_bfloat16, false>(p, s) : launch<__half, false>(p, s);
}
