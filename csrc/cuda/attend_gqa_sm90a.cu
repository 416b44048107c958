/* attend_gqa_sm90a.cu — SPEC §3 attention forward for GQA/MHA heads (D, Dv) in {(192, 128),
 * (128, 128)} — the non-absorbed MLA shape and 128-wide heads — on Hopper's warpgroup tensor
 * cores (wgmma, sm_90a only: setup.py compiles the *_sm90a.cu files for that target alone;
 * attend_fwd.cu routes here only on a compute 9.0 device; LCA_CUDA_DISABLE=wgmma selects the
 * mma.sync kernel attend_mma.cu instead).
 *
 * A block owns 128 score rows of one (batch, kv head) — rows R0 .. R0+127 of the flattened
 * (position, head-in-group) space, as in attend_mma.cu — and walks the same key blocks of 64:
 * the condensed entries [0, G(t_last)), then the exact tokens [G(t_first)*g, t_last].
 * Three warpgroups, specialised:
 *   - warpgroup 0, the producer, copies each key block's K and V tiles into a ring of kStages
 *     shared-memory stages (cp.async, 16 bytes a thread), waits for its copies one block
 *     behind, makes them visible to the tensor cores (fence.proxy.async) and signals the
 *     stage's `full` mbarrier; it refills a stage once its `empty` mbarrier says both
 *     consumers are done with it;
 *   - warpgroups 1 and 2, the consumers, own 64 rows each (their Q tile loaded once).  Per key
 *     block j: S_j = Q K_j^T as D/16 wgmma m64n64k16 (Q and K from shared memory) is issued,
 *     then O += P_{j-1} V_{j-1} as 4 wgmma m64n128k16 with P_{j-1} from registers (A operand)
 *     and V from shared memory read N-major; the online softmax of S_j (float32, base 2, masks
 *     only on key blocks that some row of the warpgroup sees in part) runs while the P V
 *     product is still in the tensor cores; then O is rescaled and P_j packed to bf16/fp16.
 *     The two consumers run unsynchronised, so one's softmax also overlaps the other's
 *     products.
 * That is variant 0 of the template parameter VAR.  The default, variant 28, replaces the
 * producer's copies by TMA: one thread of warpgroup 0 issues D/64 + 2 tensor-map boxes a key
 * block, completing on `full` by transaction count (the 128 copying threads' address
 * arithmetic was a third of the instructions the SM issued: 27.1 -> 17.0 ms at 128K); the
 * consumers also keep Q in registers and take the exponent as one FMA, and do not take turns
 * (see VAR below; LCA_GQA90_VARIANT selects one).
 * The m64nN accumulator fragment of warp w of a warpgroup is the mma.sync m16n8 fragment of
 * rows 16w .. 16w+15, and the register A fragment of m64nNk16 is the m16n8k16 A fragment, so
 * the softmax and the P packing are attend_mma.cu's.
 *
 * Shared memory: every tile in the 128-byte-swizzled layout of attend_mla_sm90a.cu (64-column
 * blocks of 128-byte rows, 16-byte chunk c of row r at chunk c ^ (r & 7), 1024-byte aligned):
 * Q 128 x D, kStages x (K 64 x D, V 64 x 128), the mbarriers: 208 KB at D = 192 (the TMA
 * boxes land in this layout by the hardware's 128-byte swizzle).  One block per SM.  Row
 * tiles run heaviest first. */
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "wgmma.cuh"

namespace lca {
namespace gqa90 {

constexpr int kRows = 128, kDV = 128, kThreads = 384;
/* variant 28 (TMA producer, one-FMA exponent, Q in registers, no ping-pong turns) measured
 * fastest on the H200 at f84b02c: 14.97 ms at 128K against 15.60 for 29 (the same with turns)
 * and 26.90 for 7, the cp.async producer that was the default before (benchmarks/NOTES.md) */
constexpr int kDefaultVariant = 28;

/* KB keys a block; stages of the K/V ring as many as fit beside Q in 227 KB */
template <int D, int KB> struct Layout {
    static constexpr int kStages = KB == 64 ? 4 : (D == 128 ? 3 : 2);
    static constexpr int kQ = kRows * D;           /* elements */
    static constexpr int kK = KB * D;
    static constexpr int kStage = kK + KB * kDV;
    static constexpr size_t kBytes = 2 * (size_t)(kQ + kStages * kStage) + 2 * kStages * 8 + 1024;
};

/* The tensor maps of the TMA producer (VAR bit 4): k, v, kbar, vbar as 4-d tensors (columns,
 * kv heads, rows, batch), boxes of 64 columns x KB rows, 128-byte swizzle; rows past a
 * tensor's end arrive as zeros.  Unused by the other variants. */
struct TmaMaps {
    CUtensorMap k, v, kbar, vbar;
};

/* d (+)= A B, m64n64k16, A and B K-major from shared memory (descriptors da, db); acc = 0:
 * d = A B.  TY the element type's PTX name. */
#define LCA_WGMMA_M64N64_SS(TY)                                                                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
                 "%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                          \
                 : LCA_ACC8(0)                                                                 \
                 : "l"(da), "l"(db), "r"(acc))

/* the same with A from registers (the m16n8k16 A fragment of this warp's 16 rows) */
#define LCA_WGMMA_M64N64_RS(TY)                                                                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                  \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
                 "%31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                           \
                 : LCA_ACC8(0)                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc))

/* d += A B, m64n128k16, A from registers (the m16n8k16 A fragment of this warp's 16 rows),
 * B from shared memory read N-major (transposed). */
#define LCA_WGMMA_M64N128_RS(TY)                                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
                 "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
                 "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
                 "%61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                  \
                 : LCA_ACC16(0)                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

/* the same, m64n128k16 (S of a 128-key block) */
#define LCA_WGMMA_M64N128_SS(TY)                                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
                 "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
                 "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
                 "%61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                \
                 : LCA_ACC16(0)                                                                \
                 : "l"(da), "l"(db), "r"(acc))

/* m64n128k16, A from registers, B K-major from shared memory (S of a 128-key block, Q in
 * registers) */
#define LCA_WGMMA_M64N128_RS_K(TY)                                                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
                 "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
                 "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
                 "%61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                  \
                 : LCA_ACC16(0)                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc))

__device__ __forceinline__ void wgmma_qk(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                         int acc, __nv_bfloat16 *) {
    LCA_WGMMA_M64N128_RS_K("bf16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                         int acc, __half *) {
    LCA_WGMMA_M64N128_RS_K("f16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[16][4], uint64_t da, uint64_t db, int acc,
                                         __nv_bfloat16 *) {
    LCA_WGMMA_M64N128_SS("bf16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[16][4], uint64_t da, uint64_t db, int acc,
                                         __half *) {
    LCA_WGMMA_M64N128_SS("f16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[8][4], uint64_t da, uint64_t db, int acc,
                                         __nv_bfloat16 *) {
    LCA_WGMMA_M64N64_SS("bf16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[8][4], uint64_t da, uint64_t db, int acc,
                                         __half *) {
    LCA_WGMMA_M64N64_SS("f16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db,
                                         int acc, __nv_bfloat16 *) {
    LCA_WGMMA_M64N64_RS("bf16");
}
__device__ __forceinline__ void wgmma_qk(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db,
                                         int acc, __half *) {
    LCA_WGMMA_M64N64_RS("f16");
}
__device__ __forceinline__ void wgmma_pv(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                         __nv_bfloat16 *) {
    LCA_WGMMA_M64N128_RS("bf16");
}
__device__ __forceinline__ void wgmma_pv(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                         __half *) {
    LCA_WGMMA_M64N128_RS("f16");
}

/* VAR: bit 0 — the two consumers take turns issuing their products (named barriers 3 and 4),
 * so one's softmax runs under the other's wgmma; bit 1 — the producer never waits for its
 * copies: each thread's cp.async.mbarrier.arrive signals the stage when its copies land, and
 * the consumers fence the async proxy after the wait; bit 2 — Q from registers (S = Q K^T
 * with A from registers: only K is read from shared memory by each product); bit 3 — the
 * softmax's exponent as one FMA of the raw score (the row maximum taken on raw scores; needs
 * scale > 0, which the host checks) and O rescaled only when some row's maximum moved; bit 4 —
 * the producer is one thread issuing TMA copies (tensor maps `tm`, completing on `full` by
 * transaction count; bit 1 then means nothing); bit 5 — 128-key blocks (S = m64n128k16; needs
 * bit 4 and not bit 2: with Q in registers too the 192-wide kernel spills).  Each variant
 * computes the same products; bit 3 rounds the exponent's argument once instead of twice. */
template <typename T, int D, int VAR>
__global__ void __launch_bounds__(kThreads, 1)
    lca_attend_gqa_wgmma_kernel(lca_params p, const __grid_constant__ TmaMaps tm) {
    constexpr bool kPingPong = VAR & 1, kQRegs = VAR & 4, kFused = VAR & 8, kTma = VAR & 16;
    constexpr bool kNoWait = (VAR & 2) && !kTma;
    constexpr int kKeys = VAR & 32 ? 128 : 64;
    static_assert(kKeys == 64 || (kTma && !kQRegs), "128-key blocks: TMA, Q in shared memory");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Ly = Layout<D, kKeys>;
    constexpr int kStages = Ly::kStages;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base = smem_align1024(smem_raw);
    T *Qs = (T *)base;
    T *St = Qs + Ly::kQ;                                   /* kStages x (K, V) */
    uint64_t *full = (uint64_t *)(St + kStages * Ly::kStage);
    uint64_t *empty = full + kStages;

    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
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

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbar_init(&full[s], kTma ? 1 : 128);           /* the TMA thread / every producer */
            mbar_init(&empty[s], 8);                       /* one lane of each consumer warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0 && kTma) {
        /* producer, TMA: thread 0 fills stage blk % kStages with key block blk (D / 64 boxes of
           K, 2 of V) once both consumers have released the block kStages before */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            for (int64_t blk = 0; blk < nblocks; blk++) {
                const int st = (int)(blk % kStages);
                if (blk >= kStages) mbar_wait(&empty[st], (uint32_t)((blk / kStages - 1) & 1));
                const bool cond = blk < ncond_blocks;
                const int key0 = (int)block_start(blk);
                const CUtensorMap *mk = cond ? &tm.kbar : &tm.k, *mv = cond ? &tm.vbar : &tm.v;
                T *Ks = St + st * Ly::kStage, *Vs = Ks + Ly::kK;
                mbar_expect_tx(&full[st], 2u * Ly::kStage);
#pragma unroll
                for (int cb = 0; cb < D / 64; cb++)
                    tma_load(Ks + cb * kKeys * 64, mk, cb * 64, (int)h, key0, (int)b, &full[st]);
#pragma unroll
                for (int cb = 0; cb < kDV / 64; cb++)
                    tma_load(Vs + cb * kKeys * 64, mv, cb * 64, (int)h, key0, (int)b, &full[st]);
            }
        }
        return;
    }
    if (wg == 0 && !kTma) {
        /* producer: stage blk % kStages holds key block blk; its registers go to the consumers */
        if constexpr (kNoWait) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
        else asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        auto issue = [&](int64_t blk) {
            const bool cond = blk < ncond_blocks;
            const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
            const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
            const lca_view &kv = cond ? p.kbar : p.k, &vv = cond ? p.vbar : p.v;
            T *Ks = St + (int)(blk % kStages) * Ly::kStage, *Vs = Ks + Ly::kK;
            load_tile<T, D, kNoWait>(Ks, nk, tid,
                                     [&](int r) { return row<const T>(kv, b, key0 + r, h); });
            load_tile<T, kDV, kNoWait>(Vs, nk, tid,
                                       [&](int r) { return row<const T>(vv, b, key0 + r, h); });
            if (kNoWait) {                 /* arrives on `full` once this thread's copies land */
                const uint32_t a = (uint32_t)__cvta_generic_to_shared(&full[blk % kStages]);
                asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a)
                             : "memory");
            } else {
                cp_async_commit();
            }
        };
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (blk >= kStages)                            /* both consumers done with it */
                mbar_wait(&empty[blk % kStages], (uint32_t)((blk / kStages - 1) & 1));
            issue(blk);
            if (!kNoWait && blk >= 1) {                    /* the previous block has landed */
                cp_async_wait<1>();
                fence_async_smem();
                mbar_arrive(&full[(blk - 1) % kStages]);
            }
        }
        if (kNoWait) cp_async_commit();                    /* (its copies are ungrouped) */
        cp_async_wait<0>();                                /* nothing in flight at exit */
        if (!kNoWait) {
            fence_async_smem();
            mbar_arrive(&full[(nblocks - 1) % kStages]);
        }
        return;
    }

    /* consumer warpgroup cw: rows Rw .. Rw+63 */
    if constexpr (kTma) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    else if constexpr (kNoWait) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const int64_t Rw = R0 + cw * 64;
    T *Qw = Qs + cw * 64 * D;
    {
        const int64_t nq = nrows - Rw < 0 ? 0 : (nrows - Rw < 64 ? nrows - Rw : 64);
        load_tile<T, D>(Qw, (int)nq, tid, [&](int r) {
            const int64_t R = Rw + r;
            return row<const T>(p.q, b, R / hg, h * hg + R % hg);
        });
        cp_async_commit();
        cp_async_wait<0>();
        fence_async_smem();
        asm volatile("bar.sync %0, 128;\n" ::"r"(cw + 1) : "memory");
    }

    /* this thread's two rows, and what every row of the warpgroup sees */
    int64_t tr[2], Gr[2];
    bool live[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int64_t R = Rw + warp * 16 + gq + 8 * i;
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = num_condensed(tr[i], p.g, p.w);
    }
    const bool w_all_live = Rw + 64 <= nrows;
    const int64_t w_first = Rw / hg, w_last = (Rw + 63) / hg;  /* used only when all live */
    const int64_t w_Gmin = num_condensed(w_first, p.g, p.w);
    const int64_t w_ehi = num_condensed(w_last, p.g, p.w) * p.g;

    float o[kDV / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < kDV / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale_l2 = (float)p.scale * 1.4426950408889634f;      /* logits in log2 units */
    const float rep_bias_l2 = (float)p.rep_bias * 1.4426950408889634f;

    float s[kKeys / 8][4];
    uint32_t pa[kKeys / 16][4];
    float corr[2];

    /* Q as A fragments in registers (kQRegs) */
    uint32_t qf[kQRegs ? D / 16 : 1][4];
    if constexpr (kQRegs) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            const int r = warp * 16 + gq, c = ks * 2;          /* 16-byte chunks c, c + 1 */
            qf[ks][0] = *(const uint32_t *)(Qw + sw(r, c) + 2 * tq);
            qf[ks][1] = *(const uint32_t *)(Qw + sw(r + 8, c) + 2 * tq);
            qf[ks][2] = *(const uint32_t *)(Qw + sw(r, c + 1) + 2 * tq);
            qf[ks][3] = *(const uint32_t *)(Qw + sw(r + 8, c + 1) + 2 * tq);
        }
    }
    auto qk = [&](int64_t blk) {
        const T *Ks = St + (int)(blk % kStages) * Ly::kStage;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            const int cb = ks >> 2, kin = (ks & 3) * 16;  /* 64-column block, offset in it */
            if constexpr (kQRegs)
                wgmma_qk(s, qf[ks], gdesc(Ks + cb * kKeys * 64 + kin, 16, 1024), ks > 0,
                         (T *)nullptr);
            else
                wgmma_qk(s, gdesc(Qw + cb * 64 * 64 + kin, 16, 1024),
                         gdesc(Ks + cb * kKeys * 64 + kin, 16, 1024), ks > 0, (T *)nullptr);
        }
    };
    /* O += P V: V N-major (transposed B): LBO = the next 64 output columns (kKeys x 128 bytes
       on), SBO = the next 8 keys (1 KB on) */
    auto pv = [&](int64_t blk) {
        const T *Vs = St + (int)(blk % kStages) * Ly::kStage + Ly::kK;
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++)
            wgmma_pv(o, pa[kk], gdesc(Vs + kk * 16 * 64, kKeys * 64 * 2, 1024), (T *)nullptr);
    };
    /* scale (log2 domain), mask only where some row of the warpgroup sees part of the block,
       online softmax: s becomes exp2(s - m), corr the factor for O */
    auto softmax = [&](int64_t blk) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk);
        const int64_t kend = cond ? w_Gmin : w_first + 1;       /* all rows see [.., kend) */
        const bool fullv = w_all_live && key0 + kKeys <= kend && (cond || key0 >= w_ehi);
        const float bias = cond ? rep_bias_l2 : 0.0f;
        if constexpr (kFused) {
            /* the maximum of the raw scores (scale > 0), the mask from 32-bit offsets in the
               block, the exponent one FMA; four partial maxima and sums a row (short chains) */
#pragma unroll
            for (int i = 0; i < 2; i++) {
                float bm[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
                if (fullv) {
#pragma unroll
                    for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            bm[(2 * n + e) & 3] = fmaxf(bm[(2 * n + e) & 3], s[n][2 * i + e]);
                } else {
                    const int64_t lo = cond ? 0 : Gr[i] * p.g, hi = cond ? Gr[i] : tr[i] + 1;
                    auto clamp = [&](int64_t x) {
                        return (int)(x < 0 ? 0 : x > kKeys ? kKeys : x);
                    };
                    const int lo_r = clamp(lo - key0), hi_r = live[i] ? clamp(hi - key0) : 0;
#pragma unroll
                    for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int rel = n * 8 + 2 * tq + e;
                            float &x = s[n][2 * i + e];
                            x = rel >= lo_r && rel < hi_r ? x : -INFINITY;
                            bm[(2 * n + e) & 3] = fmaxf(bm[(2 * n + e) & 3], x);
                        }
                }
                float bmax = fmaxf(fmaxf(bm[0], bm[1]), fmaxf(bm[2], bm[3]));
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
                const float mnew = fmaxf(m[i], fmaf(bmax, scale_l2, bias));
                const float mb = mnew == -INFINITY ? 0.0f : mnew;  /* a row with nothing yet */
                corr[i] = ex2(m[i] - mb);
                m[i] = mnew;
                const float off = bias - mb;
                float ls[4] = {0, 0, 0, 0};
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float &x = s[n][2 * i + e];
                        x = ex2(fmaf(x, scale_l2, off));
                        ls[(2 * n + e) & 3] += x;
                    }
                l[i] = fmaf(l[i], corr[i], (ls[0] + ls[1]) + (ls[2] + ls[3]));
            }
        } else {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                float bmax = -INFINITY;
                if (fullv) {
#pragma unroll
                    for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float &x = s[n][2 * i + e];
                            x = fmaf(x, scale_l2, bias);
                            bmax = fmaxf(bmax, x);
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
                            bmax = fmaxf(bmax, x);
                        }
                }
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
                bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
                const float mnew = fmaxf(m[i], bmax);
                const float mb = mnew == -INFINITY ? 0.0f : mnew;      /* a row with nothing yet */
                corr[i] = ex2(m[i] - mb);
                m[i] = mnew;
                l[i] *= corr[i];
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float &x = s[n][2 * i + e];
                        x = ex2(x - mb);
                        l[i] += x;
                    }
            }
        }
    };
    auto rescale_pack = [&]() {
        /* kFused: only when some row of the warp has a new maximum (a warp-uniform branch) */
        if (!kFused || __any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
            for (int n = 0; n < kDV / 8; n++) {
                o[n][0] *= corr[0], o[n][1] *= corr[0];
                o[n][2] *= corr[1], o[n][3] *= corr[1];
            }
        }
        acc_to_a<T>(pa, s);
    };
    auto wait_full = [&](int64_t blk) {
        mbar_wait(&full[blk % kStages], (uint32_t)((blk / kStages) & 1));
        if (kNoWait) fence_async_smem();
        if constexpr (kTma) {
            /* A TMA box brings the keys past the block's end too (later tokens, condensed rows
               no row of the tile sees): zero their value rows, so that a non-finite value
               there cannot reach P V as 0 x Inf (the cp.async producer never loads them).
               The two consumers zero half each and meet at named barrier 5 before either's
               P V reads the stage (the block's size is the same for both). */
            const bool cond = blk < ncond_blocks;
            const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
            const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
            if (nk < kKeys) {
                T *Vs = St + (int)(blk % kStages) * Ly::kStage + Ly::kK;
                constexpr int kChunks = kDV / 8;           /* 16-byte chunks a row */
                for (int i = nk * kChunks + cw * 128 + tid; i < kKeys * kChunks; i += 256) {
                    const int r = i / kChunks, c = i % kChunks;
                    T *dst = Vs + (c >> 3) * (kKeys * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
                    *(uint4 *)dst = make_uint4(0, 0, 0, 0);
                }
                fence_async_smem();
                asm volatile("bar.sync 5, 256;\n" ::: "memory");
            }
        }
    };
    /* ping-pong: wait for this warpgroup's turn to issue, then hand the turn over */
    auto turn_wait = [&]() {
        if (kPingPong) asm volatile("bar.sync %0, 256;\n" ::"r"(3 + cw) : "memory");
    };
    auto turn_pass = [&]() {
        if (kPingPong) asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - cw) : "memory");
    };
    auto release = [&](int64_t blk) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[blk % kStages]);
    };

    if (cw == 1) turn_pass();                             /* warpgroup 0 issues first */
    wait_full(0);
    wg_reg_fence(s);
    turn_wait();
    wg_fence();
    qk(0);
    wg_commit();
    turn_pass();
    wg_wait<0>();
    wg_reg_fence(s);
    softmax(0);
    rescale_pack();
    for (int64_t blk = 1; blk < nblocks; blk++) {
        wait_full(blk);
        wg_reg_fence(o);
        wg_reg_fence(pa);
        turn_wait();
        wg_fence();
        qk(blk);                                          /* S_blk */
        wg_commit();
        pv(blk - 1);                                      /* O += P_{blk-1} V_{blk-1} */
        wg_commit();
        turn_pass();
        wg_wait<1>();                                     /* S_blk ready */
        wg_reg_fence(s);
        softmax(blk);
        wg_wait<0>();                                     /* the P V product done */
        wg_reg_fence(o);
        wg_reg_fence(pa);
        release(blk - 1);
        rescale_pack();
    }
    turn_wait();
    wg_fence();
    pv(nblocks - 1);
    wg_commit();
    if (cw == 0) turn_pass();                             /* warpgroup 1's last turn */
    wg_wait<0>();
    wg_reg_fence(o);
    release(nblocks - 1);

    /* epilogue: finish the row sums across the quad, normalise, store out and lse */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (!live[i]) continue;
        const int64_t R = Rw + warp * 16 + gq + 8 * i, hq = h * hg + R % hg;
        T *dst = row<T>(p.out, b, tr[i], hq);
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int n = 0; n < kDV / 8; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (tq == 0)
            ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] =
                (m[i] + __log2f(l[i])) * 0.6931471805599453f;
    }
#endif
}

template <typename T, int D, int VAR> int launch(const lca_params *p, cudaStream_t stream) {
    constexpr int KB = VAR & 32 ? 128 : 64;
    TmaMaps tm;
    memset(&tm, 0, sizeof tm);
    if constexpr ((VAR & 16) != 0) {
        /* condensed rows past the last one any query sees arrive as zeros, as the cp.async
           path writes them (a caller's kbar may hold more rows, never initialised) */
        const int64_t mc = std::min(p->m, lca_num_condensed(p->L - 1, p->g, p->w));
        bool ok = make_map<T>(&tm.k, p->k, D, p->L, p->Hkv, p->B, KB) &&
                  make_map<T>(&tm.v, p->v, kDV, p->L, p->Hkv, p->B, KB);
        if (ok && mc > 0)
            ok = make_map<T>(&tm.kbar, p->kbar, D, mc, p->Hkv, p->B, KB) &&
                 make_map<T>(&tm.vbar, p->vbar, kDV, mc, p->Hkv, p->B, KB);
        else if (ok) {                                   /* no condensed rows: never read */
            tm.kbar = tm.k;
            tm.vbar = tm.v;
        }
        if (!ok) return launch<T, D, (VAR & 8) ? 15 : 7>(p, stream);   /* cp.async loads */
    }
    return launch_row_tiles(lca_attend_gqa_wgmma_kernel<T, D, VAR>, p, kRows, kThreads,
                            Layout<D, KB>::kBytes, stream, tm);
}

}  // namespace gqa90
}  // namespace lca

/* Whether the wgmma GQA kernel covers this call: bf16/fp16, (D, Dv) = (192, 128) or
 * (128, 128), 16-byte aligned rows, a compute 9.0 device with the shared memory. */
extern "C" int lca_cuda_gqa_wgmma_supported(const lca_params *p, int device) {
    using namespace lca::gqa90;
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return 0;
    if (!((p->D == 192 || p->D == 128) && p->Dv == kDV)) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar, &p->out};
    if (!lca::rows_aligned16(vs)) return 0;
    const size_t need = p->D == 192 ? std::max(Layout<192, 64>::kBytes, Layout<192, 128>::kBytes)
                                    : std::max(Layout<128, 64>::kBytes, Layout<128, 128>::kBytes);
    if (!lca::device_fits(device, need, true)) return 0;
    return (p->L * (p->H / p->Hkv) + kRows - 1) / kRows <= 2147483647 && p->Hkv <= 65535 &&
           p->B <= 65535;
}

template <int VAR> static int launch_var(const lca_params *p, cudaStream_t s) {
    using namespace lca::gqa90;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 192)
        return bf ? launch<__nv_bfloat16, 192, VAR>(p, s) : launch<__half, 192, VAR>(p, s);
    return bf ? launch<__nv_bfloat16, 128, VAR>(p, s) : launch<__half, 128, VAR>(p, s);
}

/* LCA_GQA90_VARIANT (a tuning knob; see the kernel's VAR; the switch below lists the built
 * ones, any other value runs variant 0) overrides the default.  The fused softmax (bit 3)
 * needs scale > 0 (as the kernel's float) and |rep_bias| < 2^20: otherwise the call runs
 * variant 17 (TMA) or 7. */

extern "C" int lca_cuda_attend_gqa_wgmma(const lca_params *p, void *stream) {
    cudaStream_t s = (cudaStream_t)stream;
    const char *env = getenv("LCA_GQA90_VARIANT");
    int var = env && *env ? atoi(env) : lca::gqa90::kDefaultVariant;
    /* the one-FMA exponent needs the kernel's float scale (log2 units) > 0, and a bias small
       enough that bias - max keeps the logits' resolution */
    const float scale_l2 = (float)p->scale * 1.4426950408889634f;
    if ((var & 8) && !(scale_l2 > 0 && scale_l2 < INFINITY && fabs(p->rep_bias) < 1048576.0))
        var = (var & 16) ? 17 : 7;
    switch (var) {
    case 1: return launch_var<1>(p, s);
    case 2: return launch_var<2>(p, s);
    case 3: return launch_var<3>(p, s);
    case 4: return launch_var<4>(p, s);
    case 5: return launch_var<5>(p, s);
    case 6: return launch_var<6>(p, s);
    case 7: return launch_var<7>(p, s);
    case 15: return launch_var<15>(p, s);
    case 17: return launch_var<17>(p, s);
    case 25: return launch_var<25>(p, s);
    case 29: return launch_var<29>(p, s);
    case 56: return launch_var<56>(p, s);
    case 57: return launch_var<57>(p, s);
    case 28: return launch_var<28>(p, s);
    default: return launch_var<0>(p, s);
    }
}
