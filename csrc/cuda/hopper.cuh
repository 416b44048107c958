/* hopper.cuh — what the sm_90a kernels share (attend_mla_sm90a.cu, attend_gqa_sm90a.cu,
 * decode_sm90a.cu; compiled for sm_90a alone): wgmma descriptors, fences and groups, mbarriers,
 * and the accumulator operand lists of the wgmma asm. */
#pragma once
#include "mma.cuh"

namespace lca {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
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

}  // namespace lca

/* The accumulator operands of an m64nN wgmma: d[i][0..3] for i < N / 8 (the mma.sync m16n8
 * fragment of each 8-column tile). */
#define LCA_ACC1(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LCA_ACC4(i) LCA_ACC1(i), LCA_ACC1(i + 1), LCA_ACC1(i + 2), LCA_ACC1(i + 3)
#define LCA_ACC8(i) LCA_ACC4(i), LCA_ACC4(i + 4)
#define LCA_ACC16(i) LCA_ACC8(i), LCA_ACC8(i + 8)
