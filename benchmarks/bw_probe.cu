// bw_probe.cu — the read-bandwidth ceiling of the decode kernel's load pattern on this GPU:
// blocks stream a contiguous share of a 675 MB buffer into shared memory (no compute), by
//   bulk:  cp.async.bulk copies of `copy` bytes (1152 = one 576-wide bf16 cache row) into a ring
//          of `stages` stages of 36,864 bytes (a 32-row tile), one producer lane a copy, the
//          stage released at once by a consumer warp (as the ws kernel, minus its arithmetic);
//   ldg:   every thread 16-byte loads, 8 in flight, summed (the classic streaming read).
// nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a benchmarks/bw_probe.cu -o /tmp/bw_probe
// /tmp/bw_probe   (prints one line per configuration: GB/s, median of 20)
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

constexpr int kTile = 36864;

__device__ __forceinline__ uint32_t sa(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void wait(uint64_t *b, uint32_t ph) {
    asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra W;\n}\n" ::"r"(sa(b)), "r"(ph) : "memory");
}

__global__ void __launch_bounds__(64, 1) bulk_kernel(const char *src, int64_t per_block,
                                                     int copy, int stages, int *sink) {
    extern __shared__ __align__(128) unsigned char sm[];
    uint64_t *full = (uint64_t *)sm, *empty = full + 16;
    unsigned char *buf = sm + 256;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(sa(&full[i])));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(sa(&empty[i])));
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const char *base = src + (int64_t)blockIdx.x * per_block;
    const int ntiles = (int)(per_block / kTile), nc = kTile / copy;
    if (warp == 0) {
        for (int t = 0; t < ntiles; t++) {
            const int st = t % stages;
            if (t >= stages) wait(&empty[st], (uint32_t)((t / stages + 1) & 1));
            if (lane == 0)
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                                 sa(&full[st])), "r"(kTile) : "memory");
            __syncwarp();
            for (int c = lane; c < nc; c += 32)
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                             "[%0], [%1], %2, [%3];\n" ::"r"(sa(buf + st * kTile + c * copy)),
                             "l"(base + (int64_t)t * kTile + c * copy), "r"(copy),
                             "r"(sa(&full[st])) : "memory");
        }
        if (ntiles) wait(&full[(ntiles - 1) % stages], (uint32_t)(((ntiles - 1) / stages) & 1));
    } else {
        int acc = 0;
        for (int t = 0; t < ntiles; t++) {
            const int st = t % stages;
            wait(&full[st], (uint32_t)((t / stages) & 1));
            acc += buf[st * kTile + lane * 4];
            __syncwarp();
            if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(
                                            sa(&empty[st])) : "memory");
        }
        if (acc == 123456789) sink[0] = acc;
    }
}

__global__ void __launch_bounds__(512) ldg_kernel(const uint4 *src, int64_t n, int *sink) {
    uint32_t acc = 0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 7 * stride < n; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < 8; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) acc ^= src[i].x;
    if (acc == 0x12345678u) sink[0] = (int)acc;
}

static float med(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main() {
    const int64_t bytes = 674800000LL / kTile / 132 * kTile * 132;   /* ~675 MB, tiles even */
    char *src;
    int *sink;
    cudaMalloc(&src, bytes + (1 << 20));
    cudaMalloc(&sink, 4);
    cudaMemset(src, 1, bytes);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    auto time = [&](auto launch) {
        std::vector<float> ts;
        for (int r = 0; r < 23; r++) {
            cudaEventRecord(a);
            launch();
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            float ms;
            cudaEventElapsedTime(&ms, a, b);
            if (r >= 3) ts.push_back(ms);
        }
        return med(ts);
    };
    cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448);
    for (int blocks : {128, 132}) {
        const int64_t per = bytes / blocks / kTile * kTile;
        for (int copy : {1152, 2304, 4608, 9216, 36864})
            for (int stages : {3, 5, 6}) {
                const size_t smem = 256 + (size_t)stages * kTile;
                float ms = time([&] {
                    bulk_kernel<<<blocks, 64, smem>>>(src, per, copy, stages, sink);
                });
                printf("bulk blocks %d copy %5d stages %d: %.4f ms %.0f GB/s\n", blocks, copy,
                       stages, ms, per * blocks / ms / 1e6);
            }
    }
    for (int blocks : {132, 264, 528, 1056}) {
        float ms = time([&] { ldg_kernel<<<blocks, 512>>>((const uint4 *)src, bytes / 16, sink); });
        printf("ldg  blocks %d x 512: %.4f ms %.0f GB/s\n", blocks, ms, bytes / ms / 1e6);
    }
    float ms = time([&] {
        cudaMemcpyAsync(src + bytes / 2, src, bytes / 2, cudaMemcpyDeviceToDevice);
    });
    printf("d2d copy of %lld bytes: %.4f ms %.0f GB/s (read + write)\n", (long long)(bytes / 2), ms,
           bytes / ms / 1e6);
    cudaError_t e = cudaDeviceSynchronize();
    printf("%s\n", cudaGetErrorString(e));
    return 0;
}
