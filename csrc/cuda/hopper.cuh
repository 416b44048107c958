/* hopper.cuh — what the sm_90a kernels share (attend_mla_sm90a.cu, attend_gqa_sm90a.cu,
 * decode_sm90a.cu; compiled for sm_90a alone): wgmma descriptors, fences and groups, mbarriers,
 * TMA loads and their tensor maps (host), and the accumulator operand lists of the wgmma asm. */
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "mma.cuh"

namespace lca {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* The dynamic shared memory's first 1024-byte boundary (the 128-byte swizzle's tiles need it),
 * reached by an offset from smem_raw and not by integer arithmetic on its address: pointers
 * derived from it stay known as shared-memory ones, so their loads and stores compile to
 * LDS / STS (through a uintptr_t they compile to generic LD / ST, on the long scoreboard).
 * The price can be the wgmma descriptors: ptxas may then build them in vector registers and
 * move each to a uniform one (R2UR) before its product — the dk/dv and dq kernels' did (dq:
 * 169 R2UR against 60, 17.7 ms against 14.7 at 128K).  Those two keep the generic base for
 * their descriptors and reach their other shared data through lds_* / sts_* below.  Count
 * LDS, LD.E and R2UR in the SASS (cuobjdump --dump-sass) after a change here. */
__device__ __forceinline__ unsigned char *smem_align1024(unsigned char *smem_raw) {
    return smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
}

/* Shared-memory loads and stores by a 32-bit shared address (smem_addr), for kernels whose
 * pointers are generic (see smem_align1024); volatile: never moved across an mbarrier wait */
__device__ __forceinline__ float4 lds_f4(uint32_t a) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a));
    return v;
}
__device__ __forceinline__ float2 lds_f2(uint32_t a) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(a));
    return v;
}
__device__ __forceinline__ float lds_f(uint32_t a) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
    return v;
}
__device__ __forceinline__ void sts_f4(uint32_t a, float4 v) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "f"(v.x), "f"(v.y),
                 "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ void sts_f(uint32_t a, float v) {
    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(a), "f"(v) : "memory");
}

/* element offset of 16-byte chunk c (of 8 elements) of row r in a 64-row tile in the 128-byte
 * swizzled layout (64-column blocks of 128-byte rows, chunk c ^ (r & 7) within a row) */
__device__ __forceinline__ int sw(int r, int c) {
    return (c >> 3) * (64 * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}

/* Copy n rows of width W from a strided global view into a 64-row swizzled tile with 128
 * threads (cp.async, 16 bytes a thread); rows n .. 63 are zeroed (ZFILL: by a cp.async that
 * reads nothing, else by plain stores).  src(r): row r's address. */
template <typename T, int W, bool ZFILL = false, typename F>
__device__ __forceinline__ void load_tile(T *tile, int n, int tid, F src) {
    constexpr int V = W / 8;
#pragma unroll 4
    for (int i = tid; i < 64 * V; i += 128) {
        const int r = i / V, c = i % V;
        T *dst = tile + sw(r, c);
        if (r < n) {
            cp_async16(dst, src(r) + 8 * c);
        } else if (ZFILL) {            /* 16 zero bytes by cp.async: nothing read (src-size 0) */
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 0;\n" ::"r"(a), "l"(src(0)));
        } else {
            *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
    }
}

/* wgmma shared-memory descriptor: 128-byte swizzle, byte offsets lbo and sbo */
__device__ __forceinline__ uint64_t gdesc(const void *p, uint32_t lbo, uint32_t sbo) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* generic-proxy shared-memory writes (cp.async, st.shared) made visible to wgmma reads */
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_init(uint64_t *bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
/* wait for the completion of the phase of parity `parity` */
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
    const uint32_t a = smem_addr(bar);
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(a), "r"(parity)
                     : "memory");
    } while (!done);
}

/* One box of a 4-d tensor map (coordinates innermost first) into shared memory, completing
 * on the mbarrier `bar` (its transaction count is the box's bytes, zeros past the end included). */
__device__ __forceinline__ void tma_load(void *dst, const CUtensorMap *map, int c0, int c1, int c2,
                                         int c3, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
                 : "memory");
}

/* The same for a 5-d tensor map. */
__device__ __forceinline__ void tma_load5(void *dst, const CUtensorMap *map, int c0, int c1,
                                          int c2, int c3, int c4, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(dst)),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
                 "r"(smem_addr(bar))
                 : "memory");
}

/* Host: the driver's cuTensorMapEncodeTiled, looked up once (a thread-safe static; null when
 * the driver lacks it).  cudaGetDriverEntryPointByVersion came with CUDA 12.5. */
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                               cudaEnableDefault, &q);
#else
        const cudaError_t e =
            cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
        if (e != cudaSuccess) cudaGetLastError();
        return e == cudaSuccess && q == cudaDriverEntryPointSuccess
                   ? (PFN_cuTensorMapEncodeTiled_v12000)f
                   : nullptr;
    }();
    return fn;
}

/* Host: the tensor map of view v — rows x cols of each (batch, kv head), as the 4-d tensor
 * (cols, Hkv, rows, B) — with boxes of 64 columns x box_rows rows.  False when the driver
 * refuses it (strides it cannot express): the caller then loads by cp.async. */
template <typename T>
inline bool make_map(CUtensorMap *m, const lca_view &v, int64_t cols, int64_t rows, int64_t Hkv,
                     int64_t B, int box_rows) {
    const auto enc = encode_tiled();
    if (!enc || rows < 1 || rows > 2147483647) return false;   /* 32-bit row coordinates */
    const int64_t es = (int64_t)sizeof(T);
    int64_t sh = v.sh * es, st = v.st * es, sb = v.sb * es;
    if (Hkv == 1) sh = cols * es;                        /* a dimension of one: any stride */
    if (rows == 1) st = sh * Hkv;
    if (B == 1) sb = st * rows;
    if (sh <= 0 || st <= 0 || sb <= 0) return false;
    const cuuint64_t dim[4] = {(cuuint64_t)cols, (cuuint64_t)Hkv, (cuuint64_t)rows, (cuuint64_t)B};
    const cuuint64_t stride[3] = {(cuuint64_t)sh, (cuuint64_t)st, (cuuint64_t)sb};
    const cuuint32_t box[4] = {64, 1, (cuuint32_t)box_rows, 1}, one[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dt = sizeof(T) == 2 && std::is_same<T, __half>::value
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return enc(m, dt, 4, v.p, dim, stride, box, one, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace lca

/* The accumulator operands of an m64nN wgmma: d[i][0..3] for i < N / 8 (the mma.sync m16n8
 * fragment of each 8-column tile). */
#define LCA_ACC1(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LCA_ACC4(i) LCA_ACC1(i), LCA_ACC1(i + 1), LCA_ACC1(i + 2), LCA_ACC1(i + 3)
#define LCA_ACC8(i) LCA_ACC4(i), LCA_ACC4(i + 4)
#define LCA_ACC16(i) LCA_ACC8(i), LCA_ACC8(i + 8)
