/* attend_wgmma_sm90a.cu — SPEC §3 attention forward on Hopper's warpgroup tensor cores
 * (wgmma.mma_async, sm_90a only; this file is compiled for sm_90a alone and chosen at run time
 * on compute capability 9.0), bf16/fp16, (D, Dv) in {(64, 64), (128, 128), (192, 128)}.
 *
 * The tiling is attend_mma.cu's: a block (one warpgroup, 128 threads) owns 64 score rows of one
 * (batch, kv head) in the flattened (position, head-in-group) space; keys come in blocks of 64,
 * condensed entries first, then exact tokens, each row masked to its SPEC §3 ranges only on the
 * key blocks it sees in part.  What changes is the matrix unit: S = Q K^T is one m64n64 wgmma
 * chain over D/16 steps with Q as register fragments and K read from shared memory through a
 * descriptor; O += P V is an m64nDv chain over the 4 16-key steps with P re-packed in registers
 * and V from shared memory (MN-major).  K/V tiles are stored in the no-swizzle core-matrix
 * layout (8 rows x 16 bytes contiguous per core matrix) by cp.async, double-buffered.
 * Not yet: TMA, warp specialisation (producer warp, two consumer warpgroups in ping-pong),
 * swizzled layouts. */
#include "mma.cuh"

namespace lca {
namespace wg {

constexpr int kRows = 64, kKeys = 64, kThreads = 128, kQPad = 8;

template <typename T, int N> struct Wgmma;
template <> struct Wgmma<__nv_bfloat16, 64> {
    template <int TRANS_B>
    static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc,
                                               int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
    }
};

template <> struct Wgmma<__half, 64> {
    template <int TRANS_B>
    static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc,
                                               int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
    }
};

template <> struct Wgmma<__nv_bfloat16, 128> {
    template <int TRANS_B>
    static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc,
                                               int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
    }
};

template <> struct Wgmma<__half, 128> {
    template <int TRANS_B>
    static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc,
                                               int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
    }
};

/* Shared-memory matrix descriptor, no swizzle: start, leading (K-direction) and stride
 * (M/N-direction) byte offsets between core matrices. */
__device__ __forceinline__ uint64_t desc(const void *p, uint32_t lbo, uint32_t sbo) {
    const uint64_t a = (uint32_t)__cvta_generic_to_shared(p);
    return ((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
/* keep the compiler from moving accumulator accesses across the asynchronous matrix ops */
template <int N> __device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}

/* Element offset of row r, 8-column chunk c8 in a W-wide core-matrix tile. */
template <int W> __device__ __forceinline__ int core_off(int r, int c8) {
    return ((r >> 3) * (W / 8) + c8) * 64 + (r & 7) * 8;
}

/* cp.async n rows of width W into a core-matrix tile; rows n .. kKeys-1 zeroed. */
template <typename T, int W, typename F>
__device__ __forceinline__ void load_core_tile(T *tile, int n, F src) {
    constexpr int V = W / 8;
    for (int i = threadIdx.x; i < kKeys * V; i += kThreads) {
        const int r = i / V, c8 = i % V;
        T *dst = tile + core_off<W>(r, c8);
        if (r < n) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src(r) + c8 * 8));
        } else {
            *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
    }
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(kThreads) lca_attend_wgmma_kernel(lca_params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(128) unsigned char smem_raw[];
    constexpr int kStage = kKeys * D + kKeys * DV;              /* K then V, core-matrix tiles */
    T *KV = (T *)smem_raw, *Qs = KV + 2 * kStage;               /* Q: padded rows */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z, h = blockIdx.y;
    /* the last row tiles see the most condensed entries: launch them first (less tail) */
    const int64_t R0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * kRows, nrows = p.L * hg;
    const int64_t t_first = R0 / hg;
    const int64_t t_last = (R0 + kRows - 1 < nrows ? R0 + kRows - 1 : nrows - 1) / hg;

    for (int i = threadIdx.x; i < kRows * (D / 8); i += kThreads) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        const int64_t R = R0 + r;
        *(uint4 *)(Qs + r * (D + kQPad) + c) =
            R < nrows ? *(const uint4 *)(row<const T>(p.q, b, R / hg, h * hg + R % hg) + c)
                      : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const T *base = Qs + (warp * 16 + gq) * (D + kQPad) + ks * 16 + 2 * tq;
        qf[ks][0] = *(const uint32_t *)base;
        qf[ks][1] = *(const uint32_t *)(base + 8 * (D + kQPad));
        qf[ks][2] = *(const uint32_t *)(base + 8);
        qf[ks][3] = *(const uint32_t *)(base + 8 * (D + kQPad) + 8);
    }

    int64_t tr[2], Gr[2];
    bool live[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int64_t R = R0 + warp * 16 + gq + 8 * i;
        live[i] = R < nrows;
        tr[i] = live[i] ? R / hg : t_last;
        Gr[i] = num_condensed(tr[i], p.g, p.w);
    }
    float o[DV / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < DV / 2; n++) o[n] = 0;
    const float scale_l2 = (float)p.scale * 1.4426950408889634f;
    const float rep_bias_l2 = (float)p.rep_bias * 1.4426950408889634f;
    const int64_t Gmax = num_condensed(t_last, p.g, p.w);
    const int64_t Gmin = num_condensed(t_first, p.g, p.w);
    const int64_t e_hi = Gmax * p.g;
    const bool all_live = R0 + kRows <= nrows;
    const int64_t e0 = Gmin * p.g;
    const int64_t ncond_blocks = (Gmax + kKeys - 1) / kKeys;
    const int64_t nblocks = ncond_blocks + (t_last + 1 - e0 + kKeys - 1) / kKeys;

    auto block_start = [&](int64_t blk) {
        return blk < ncond_blocks ? blk * kKeys : e0 + (blk - ncond_blocks) * kKeys;
    };
    auto issue = [&](int64_t blk) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk), kend = cond ? Gmax : t_last + 1;
        const int nk = (int)(kend - key0 < kKeys ? kend - key0 : kKeys);
        T *Ks = KV + (blk & 1) * kStage, *Vs = Ks + kKeys * D;
        const lca_view &kv = cond ? p.kbar : p.k, &vv = cond ? p.vbar : p.v;
        load_core_tile<T, D>(Ks, nk, [&](int r) { return row<const T>(kv, b, key0 + r, h); });
        load_core_tile<T, DV>(Vs, nk, [&](int r) { return row<const T>(vv, b, key0 + r, h); });
        cp_async_commit();
    };
    if (nblocks > 0) issue(0);

    for (int64_t blk = 0; blk < nblocks; blk++) {
        const bool cond = blk < ncond_blocks;
        const int64_t key0 = block_start(blk);
        if (blk + 1 < nblocks) {
            issue(blk + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        /* the tile was written through the generic proxy; wgmma reads through the async one */
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const T *Ks = KV + (blk & 1) * kStage, *Vs = Ks + kKeys * D;

        /* S = Q K^T: K is the K-major B operand (core matrices: 128 B apart along d,
         * 16*D bytes apart along keys) */
        float s[32];
        fence();
        pin(s);
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++)
            Wgmma<T, 64>::template run<0>(s, qf[ks], desc(Ks + ks * 128, 128, 16 * D), ks > 0);
        commit();
        wait_all();
        pin(s);

        const int64_t kend = cond ? Gmin : t_first + 1;
        const bool full = all_live && key0 + kKeys <= kend && (cond || key0 >= e_hi);
        const float bias = cond ? rep_bias_l2 : 0.0f;
        float bmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (full) {
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float &x = s[4 * n + 2 * i + e];
                        x = fmaf(x, scale_l2, bias);
                        bmax[i] = fmaxf(bmax[i], x);
                    }
            } else {
                const int64_t lo = cond ? 0 : Gr[i] * p.g, hi = cond ? Gr[i] : tr[i] + 1;
#pragma unroll
                for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int64_t key = key0 + n * 8 + 2 * tq + e;
                        float &x = s[4 * n + 2 * i + e];
                        x = (live[i] && key >= lo && key < hi) ? fmaf(x, scale_l2, bias)
                                                               : -INFINITY;
                        bmax[i] = fmaxf(bmax[i], x);
                    }
            }
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 1));
            bmax[i] = fmaxf(bmax[i], __shfl_xor_sync(0xffffffffu, bmax[i], 2));
            const float mnew = fmaxf(m[i], bmax[i]);
            const float base = mnew == -INFINITY ? 0.0f : mnew;
            const float corr = ex2(m[i] - base);
            m[i] = mnew;
            l[i] *= corr;
#pragma unroll
            for (int n = 0; n < DV / 8; n++) o[4 * n + 2 * i] *= corr, o[4 * n + 2 * i + 1] *= corr;
#pragma unroll
            for (int n = 0; n < kKeys / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float &x = s[4 * n + 2 * i + e];
                    x = ex2(x - base);
                    l[i] += x;
                }
        }

        /* O += P V: P as register A fragments, V the MN-major B operand (core matrices
         * 128 B apart along Dv, 16*DV bytes apart along keys) */
        uint32_t pf[kKeys / 16][4];
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++) {
            pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
            pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
            pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
            pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        fence();
        pin(o);
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; kk++)
            Wgmma<T, DV>::template run<1>(o, pf[kk], desc(Vs + kk * 16 * DV, 16 * DV, 128), 1);
        commit();
        wait_all();
        pin(o);
        __syncthreads();                                  /* this stage may be refilled */
    }

#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (!live[i]) continue;
        const int64_t R = R0 + warp * 16 + gq + 8 * i, hq = h * hg + R % hg;
        T *dst = row<T>(p.out, b, tr[i], hq);
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int n = 0; n < DV / 8; n++)
            *(uint32_t *)(dst + n * 8 + 2 * tq) =
                pack2<T>(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv);
        if (tq == 0)
            ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + tr[i]] =
                (m[i] + __log2f(l[i])) * 0.6931471805599453f;
    }
#else
    __trap();                   /* built for sm_90a only; the host routes here on 9.0 alone */
#endif
}

template <typename T, int D, int DV> int launch(const lca_params *p, cudaStream_t stream) {
    const size_t smem = sizeof(T) * (size_t)(2 * (kKeys * D + kKeys * DV) + kRows * (D + kQPad));
    auto kernel = lca_attend_wgmma_kernel<T, D, DV>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    const int64_t nrows = p->L * (p->H / p->Hkv);
    const dim3 grid((unsigned)((nrows + kRows - 1) / kRows), (unsigned)p->Hkv, (unsigned)p->B);
    kernel<<<grid, kThreads, smem, stream>>>(*p);
    return LCA_OK;
}

}  // namespace wg
}  // namespace lca

/* Whether the wgmma kernel covers this call: an sm_90 device, the shapes and 16-byte rows of
 * attend_mma.cu, and LCA_CUDA_DISABLE not naming "wgmma" (tests run both tensor-core paths). */
extern "C" int lca_cuda_wgmma_supported(const lca_params *p, int device) {
    const char *off = getenv("LCA_CUDA_DISABLE");
    if (off && strstr(off, "wgmma")) return 0;
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        return 0;
    return major == 9 && minor == 0 && lca_cuda_mma_supported(p);
}

extern "C" int lca_cuda_attend_wgmma(const lca_params *p, void *stream) {
    using namespace lca::wg;
    cudaStream_t s = (cudaStream_t)stream;
    const bool bf = p->dtype == LCA_BF16;
    if (p->D == 64) return bf ? launch<__nv_bfloat16, 64, 64>(p, s) : launch<__half, 64, 64>(p, s);
    if (p->D == 128)
        return bf ? launch<__nv_bfloat16, 128, 128>(p, s) : launch<__half, 128, 128>(p, s);
    return bf ? launch<__nv_bfloat16, 192, 128>(p, s) : launch<__half, 192, 128>(p, s);
}
