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
 * Variant 1, the default (LCA_MLA90_VARIANT=0 selects the cp.async loads above), loads the
 * key tiles by TMA instead: thread 0 issues the 9 boxes of 64 columns of block j + 1 (tensor
 * maps of k and kbar), which complete on the stage's mbarrier; no thread spends instructions
 * on copies (58.2 against 93.8 ms at 128K), and O is rescaled only when some row of the warp
 * has a new maximum.
 *
 * Variant 2 (LCA_MLA90_VARIANT=2; NOT RUN on a GPU yet) specialises the warpgroups so that
 * S_{j+1} runs under P_j V_j: see lca_attend_mla_ws_kernel below.
 *
 * The default for this shape on a compute 9.0 device (LCA_CUDA_DISABLE=wgmma runs the mma.sync
 * kernel attend_mla.cu instead). */
#include <stdlib.h>
#include <string.h>

#include "wgmma.cuh"

namespace lca {
namespace mla90 {

constexpr int kRows = 64, kKeys = 64, kThreads = 256, kD = 576, kDV = 512;
constexpr int kTile = 64 * kD;                     /* elements of a Q or key tile */
constexpr size_t kSmem = 2 * (size_t)(3 * kTile + kRows * kKeys) + 4 * 4 * kRows + 2 * 8 + 1024;
/* variant 1 (TMA) measured on the H200 at 7c4de99: 58.2 ms at 128K (397 TFLOP/s) against
 * 93.8 ms (246) for the cp.async loads of variant 0 */
constexpr int kDefaultVariant = 1;

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

template <typename T, bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    lca_attend_mla_wgmma_kernel(lca_params p, const __grid_constant__ MlaMaps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kNT = kDV / 2 / 8;                      /* 32 n-tiles of 8 output columns */
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
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

        /* O[:, 256*half ..] += P V: 4 x m64n256k16, P K-major, V N-major (transposed B):
           LBO = the next 64 output columns (8 KB on), SBO = the next 8 keys (1 KB on) */
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++) {
            const uint64_t da = gdesc(Ps + kk * 16, 16, 1024);
            const uint64_t db = gdesc(Ks + (4 * half) * 64 * 64 + kk * 16 * 64, 64 * 64 * 2, 1024);
            wgmma_m64n256<1>(o, da, db, (T *)nullptr);
        }
        wg_commit();
        wg_wait<0>();
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

/* Variant 2 (NOT RUN on a GPU yet; LCA_MLA90_VARIANT=2): warpgroups specialised so that the
 * scores of key block j+1 are computed while P_j V_j is in the tensor cores.  384 threads:
 *   - warpgroup 0 owns S: Q's 512 nope columns as A fragments in registers (32 k-steps x 4 =
 *     128 registers, loaded once through shared memory), its 64 rope columns in an 8 KB tile,
 *     S_j = Q K_j^T as 36 wgmma m64n64k16 (K_j from shared memory), the online softmax of all 64 keys (row maxima by quad shuffles: no exchange),
 *     then P_j (bf16/fp16) into key stage j's rope block (columns 512..575, which only S
 *     reads, so free once S_j is done) and each row's O factor exp2(m_old - m_new), and
 *     signals `pfull`;
 *   - warpgroups 1 and 2 own O[:, 256 h .. +255] (128 registers): per block they wait for
 *     `pfull`, rescale O by the factors when some row's maximum moved, issue O += P_j V_j as
 *     4 wgmma m64n256k16 (P from the rope block, V = the key tile read N-major), wait for it
 *     and release the stage on `empty`;
 *   - key tiles arrive by TMA into 3 stages of 72 KB (216 KB: no Q tile in shared memory), K_0
 *     and K_1 issued at the start, K_2 once warpgroup 0 has its Q fragments (Q is staged in
 *     stage 2), K_{j+3} by thread 0 of warpgroup 1 once both O warpgroups released block j.
 * Registers: setmaxnreg 192 for warpgroup 0, 160 for the two others (192 + 2 x 160 = 512).
 * Shared memory: 3 key stages (216 KB), Q's rope tile (8 KB), the factors and barriers. */
constexpr int kWsThreads = 384, kWsStages = 3;
constexpr int kQNope = kDV / 16;                        /* Q's k-steps held in registers */
constexpr size_t kWsSmem = 2 * (size_t)(kWsStages * kTile + kRows * 64) +
                           4 * (size_t)(kWsStages * kRows + kRows) + 3 * kWsStages * 8 + 1024;

template <typename T>
__global__ void __launch_bounds__(kWsThreads, 1)
    lca_attend_mla_ws_kernel(lca_params p, const __grid_constant__ MlaMaps tm) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kNT = kDV / 2 / 8;                      /* 32 n-tiles of 8 output columns */
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    T *Kst = (T *)base;                                   /* kWsStages key tiles */
    T *Qr = Kst + kWsStages * kTile;                      /* Q's rope columns, 64 x 64 */
    float *fac = (float *)(Qr + kRows * 64);              /* [stage][row]: O factors */
    float *lsum = fac + kWsStages * kRows;                /* [row]: final row sums */
    uint64_t *kfull = (uint64_t *)(lsum + kRows), *pfull = kfull + kWsStages;
    uint64_t *empty = pfull + kWsStages;

    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z, h = blockIdx.y;
    const int64_t nrows = p.L * hg;
    const int64_t R0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * kRows;   /* heaviest first */
    const int64_t t_first = R0 / hg;
    const int64_t t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;
    const int64_t Gmax = num_condensed(t_last, p.g, p.w);
    const int64_t e0 = num_condensed(t_first, p.g, p.w) * p.g;
    const int64_t ncond_blocks = (Gmax + kKeys - 1) / kKeys;
    const int64_t nblocks = ncond_blocks + (t_last + 1 - e0 + kKeys - 1) / kKeys;  /* >= 1 */
    auto block_start = [&](int64_t blk) {
        return blk < ncond_blocks ? blk * kKeys : e0 + (blk - ncond_blocks) * kKeys;
    };
    auto issue = [&](int64_t blk) {                       /* one thread: the 9 boxes of blk */
        const int st = (int)(blk % kWsStages);
        const CUtensorMap *map = blk < ncond_blocks ? &tm.kbar : &tm.k;
        const int key0 = (int)block_start(blk);
        mbar_expect_tx(&kfull[st], 2u * kTile);
#pragma unroll
        for (int cb = 0; cb < kD / 64; cb++)
            tma_load(Kst + st * kTile + cb * 64 * 64, map, cb * 64, (int)h, key0, (int)b,
                     &kfull[st]);
    };

    if (threadIdx.x == 0) {
        for (int s = 0; s < kWsStages; s++) {
            mbar_init(&kfull[s], 1);                      /* the TMA thread */
            mbar_init(&pfull[s], 4);                      /* one lane of each S warp */
            mbar_init(&empty[s], 8);                      /* one lane of each O warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        issue(0);
        if (nblocks > 1) issue(1);
    }
    /* Q by every thread (cp.async), rows past the end zeroed: its nope columns staged in
       stage 2 (warpgroup 0 takes them into registers), its rope columns into Qr, where S
       reads them */
    T *Qst = Kst + 2 * kTile;
    {
        const int nq = (int)(nrows - R0 < kRows ? nrows - R0 : kRows);
        constexpr int V = kD / 8;
        for (int i = threadIdx.x; i < 64 * V; i += kWsThreads) {
            const int r = i / V, c = i % V;
            T *dst = c < kDV / 8 ? Qst + sw(64, r, c) : Qr + sw(64, r, c - kDV / 8);
            if (r < nq) {
                const int64_t R = R0 + r;
                const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a),
                             "l"(row<const T>(p.q, b, R / hg, h * hg + R % hg) + 8 * c));
            } else {
                *(uint4 *)dst = make_uint4(0, 0, 0, 0);
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_async_smem();                               /* Qr is read by wgmma */
    }
    __syncthreads();

    const float scale_l2 = (float)p.scale * 1.4426950408889634f;
    if (wg == 0) {
        /* ---- S warpgroup ---- */
        asm volatile("setmaxnreg.inc.sync.aligned.u32 192;\n" ::: "memory");
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
        if (tid == 0 && nblocks > 2) issue(2);
        __syncwarp();                                      /* converged for the wgmma */

        /* this thread's two rows: the keys they see, as 32-bit ranges (condensed [0, Gr),
           exact [Gr g, t]; empty for rows past the end) */
        int elo[2], ehi[2], chi[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int64_t R = R0 + warp * 16 + gq + 8 * i;
            const bool live = R < nrows;
            const int64_t t = live ? R / hg : t_last, G = num_condensed(t, p.g, p.w);
            elo[i] = live ? (int)(G * p.g) : 1, ehi[i] = live ? (int)(t + 1) : 0;
            chi[i] = live ? (int)G : 0;
        }
        const float bias_l2 = (float)p.rep_bias * 1.4426950408889634f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
        float s[kKeys / 8][4];
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int st = (int)(blk % kWsStages);
            const bool cond = blk < ncond_blocks;
            const int64_t key0 = block_start(blk);
            T *Ks = Kst + st * kTile;
            mbar_wait(&kfull[st], (uint32_t)((blk / kWsStages) & 1));
            /* key rows past the block's end (later tokens, condensed rows no row sees) zeroed:
               no non-finite value may reach P V as 0 x Inf */
            const int64_t kend = cond ? Gmax : t_last + 1;
            const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
            if (nk < kKeys) {
                constexpr int V = kD / 8;
                for (int i = nk * V + tid; i < kKeys * V; i += 128)
                    *(uint4 *)(Ks + sw(64, i / V, i % V)) = make_uint4(0, 0, 0, 0);
                fence_async_smem();
                asm volatile("bar.sync 1, 128;\n" ::: "memory");
            }
            wg_reg_fence(s);
            wg_fence();
#pragma unroll
            for (int ks = 0; ks < kQNope; ks++) {
                const int cb = ks >> 2, kin = (ks & 3) * 16;
                wgmma_rs<64, T, 0>(s, qf[ks], gdesc(Ks + cb * 64 * 64 + kin, 16, 1024), ks > 0);
            }
#pragma unroll
            for (int ks = kQNope; ks < kD / 16; ks++) {     /* the rope columns: Q from Qr */
                const int kin = (ks & 3) * 16;
                wgmma_ss<64, T>(s, gdesc(Qr + kin, 16, 1024),
                                gdesc(Ks + (kD / 64 - 1) * 64 * 64 + kin, 16, 1024), 1);
            }
            wg_commit();
            wg_wait<0>();
            wg_reg_fence(s);
            /* online softmax over the block's 64 keys (base 2), masks as the other variants */
            T *Ps = Ks + (kD / 64 - 1) * 64 * 64;          /* the rope block: free now */
            float corr[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int lo = (cond ? 0 : elo[i]) - (int)key0, hi = (cond ? chi[i] : ehi[i]) - (int)key0;
                const float bias = cond ? bias_l2 : 0.0f;
                float bmax = -INFINITY;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int rel = n * 8 + 2 * tq + e;        /* key - key0 */
                        float &x = s[n][2 * i + e];
                        x = rel >= lo && rel < hi ? fmaf(x, scale_l2, bias) : -INFINITY;
                        bmax = fmaxf(bmax, x);
                    }
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
                const float mnew = fmaxf(m[i], bmax);
                const float mb = mnew == -INFINITY ? 0.0f : mnew;   /* a row with nothing yet */
                corr[i] = ex2(m[i] - mb);
                m[i] = mnew;
                float ls = 0;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++) {
                    const float p0 = ex2(s[n][2 * i] - mb), p1 = ex2(s[n][2 * i + 1] - mb);
                    ls += p0 + p1;
                    const int kc = n * 8 + 2 * tq;                 /* key column in P */
                    *(uint32_t *)(Ps + sw(64, warp * 16 + gq + 8 * i, kc >> 3) + (kc & 7)) =
                        pack2<T>(p0, p1);
                }
                l[i] = fmaf(l[i], corr[i], ls);
                if (tq == 0) fac[st * kRows + warp * 16 + gq + 8 * i] = corr[i];
            }
            fence_async_smem();                            /* P is read by wgmma */
            __syncwarp();
            if (lane == 0) mbar_arrive(&pfull[st]);
        }
        /* row sums to the O warpgroups, lse out */
#pragma unroll
        for (int i = 0; i < 2; i++) {
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
            const int lr = warp * 16 + gq + 8 * i;
            const int64_t R = R0 + lr;
            if (tq == 0) lsum[lr] = l[i];
            if (R < nrows && tq == 0) {
                const int64_t hq = h * hg + R % hg;
                ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + R / hg] =
                    (m[i] + __log2f(l[i])) * 0.6931471805599453f;
            }
        }
        asm volatile("bar.sync 2, 384;\n" ::: "memory");
        return;
    }

    /* ---- O warpgroups: half = wg - 1 owns output columns 256 half .. +255 ---- */
    asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    const int half = wg - 1;
    float o[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int st = (int)(blk % kWsStages);
        T *Ks = Kst + st * kTile;
        mbar_wait(&pfull[st], (uint32_t)((blk / kWsStages) & 1));
        const int r0 = warp * 16 + gq;
        const float c0 = fac[st * kRows + r0], c1 = fac[st * kRows + r0 + 8];
        if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
            for (int n = 0; n < kNT; n++) o[n][0] *= c0, o[n][1] *= c0, o[n][2] *= c1, o[n][3] *= c1;
        }
        const T *Ps = Ks + (kD / 64 - 1) * 64 * 64;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++) {
            const uint64_t da = gdesc(Ps + kk * 16, 16, 1024);
            const uint64_t db = gdesc(Ks + (4 * half) * 64 * 64 + kk * 16 * 64, 64 * 64 * 2, 1024);
            wgmma_m64n256<1>(o, da, db, (T *)nullptr);
        }
        wg_commit();
        wg_wait<0>();        /* (an O warpgroup has nothing else to do meanwhile) */
        wg_reg_fence(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[st]);
        /* thread 0 of warpgroup 1 refills the stage with block blk + 3 once both O warpgroups
           are done with it */
        if (half == 0 && tid == 0 && blk + 3 < nblocks) {
            mbar_wait(&empty[st], (uint32_t)((blk / kWsStages) & 1));
            issue(blk + 3);
        }
        __syncwarp();                                      /* converged for the next wgmma */
    }
    asm volatile("bar.sync 2, 384;\n" ::: "memory");     /* the row sums written */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int lr = warp * 16 + gq + 8 * i;
        const int64_t R = R0 + lr;
        if (R >= nrows) continue;
        const int64_t hq = h * hg + R % hg;
        T *dst = row<T>(p.out, b, R / hg, hq) + half * (kDV / 2);
        const float inv = 1.0f / lsum[lr];
#pragma unroll
        for (int n = 0; n < kNT; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
#endif
}

template <typename T, bool kTma> int launch(const lca_params *p, cudaStream_t stream) {
    MlaMaps tm;
    memset(&tm, 0, sizeof tm);
    if constexpr (kTma) {
        /* condensed rows past the last one any query sees arrive as zeros */
        const int64_t mc = p->m < lca_num_condensed(p->L - 1, p->g, p->w)
                               ? p->m : lca_num_condensed(p->L - 1, p->g, p->w);
        bool ok = make_map<T>(&tm.k, p->k, kD, p->L, p->Hkv, p->B, 64);
        if (ok && mc > 0)
            ok = make_map<T>(&tm.kbar, p->kbar, kD, mc, p->Hkv, p->B, 64);
        else if (ok)
            tm.kbar = tm.k;                                /* no condensed rows: never read */
        if (!ok) return launch<T, false>(p, stream);      /* strides TMA cannot express */
    }
    return launch_row_tiles(lca_attend_mla_wgmma_kernel<T, kTma>, p, kRows, kThreads, kSmem,
                            stream, tm);
}

/* variant 2: the tensor maps of variant 1, the warp-specialised kernel; strides TMA cannot
 * express run variant 0 */
template <typename T> int launch_ws(const lca_params *p, cudaStream_t stream) {
    MlaMaps tm;
    memset(&tm, 0, sizeof tm);
    const int64_t mc = p->m < lca_num_condensed(p->L - 1, p->g, p->w)
                           ? p->m : lca_num_condensed(p->L - 1, p->g, p->w);
    bool ok = make_map<T>(&tm.k, p->k, kD, p->L, p->Hkv, p->B, 64);
    if (ok && mc > 0)
        ok = make_map<T>(&tm.kbar, p->kbar, kD, mc, p->Hkv, p->B, 64);
    else if (ok)
        tm.kbar = tm.k;                                    /* no condensed rows: never read */
    if (!ok) return launch<T, false>(p, stream);
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

/* LCA_MLA90_VARIANT (a tuning knob): 0 cp.async loads, 1 TMA loads (the default). */
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
