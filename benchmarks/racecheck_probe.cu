// racecheck_probe.cu — does compute-sanitizer's racecheck order shared-memory accesses across a
// named barrier of part of the block, in the pattern of decode_sm90a.cu's ws kernel's merge?
// 384 threads: warps 0..3 lower their registers and leave (warp 0 after a delay), warps 4..11
// (two groups of 4) raise theirs; group 0 reads a shared buffer with ldmatrix, both groups meet
// at `bar.sync 1, 256`, then group 1 overwrites the buffer.  Race-free by the PTX memory model
// (bar.sync orders the participating threads' shared-memory accesses).  Modes (argv[1]):
//   0  as described      1  no setmaxnreg      3  __syncthreads() instead of the named barrier
//   2  a block of the two groups alone (256 threads: the named barrier is the whole block)
//   4  mode 0, and each reading warp's lane 0 arrives on an mbarrier after its reads (the ws
//      kernel's release of a stage; warp 0 waits for the 4 arrivals before it leaves)
//   5  mode 0 with a second read by group 0 after a barrier of each group alone, its id
//      2 + group in a register (`bar.sync %r, 128`: the ws kernel's per-group barrier)
//   6  mode 5 with the group barrier's id an immediate (a branch on the group)
// A hazard reported for mode 0 or 1 and none for modes 2 and 3 would mean racecheck does not
// model a named barrier of part of the block.  H200, 11-30: no hazard in any mode (0-6), while
// the ws kernel's merge still gets 21-23 reports (benchmarks/NOTES.md).
//   nvcc -O2 -gencode=arch=compute_90a,code=sm_90a benchmarks/racecheck_probe.cu -o /tmp/rp
//   compute-sanitizer --tool racecheck /tmp/rp 0
#include <cstdio>
#include <cstdlib>
#include <cstdint>

__global__ void __launch_bounds__(384, 1) probe(int mode, float *out) {
    __shared__ __align__(16) uint16_t buf[64 * 64];
    __shared__ __align__(8) uint64_t mbar;
    /* mode 2 runs 256 threads, its warps numbered from 4 */
    const int warp = (threadIdx.x >> 5) + (mode == 2 ? 4 : 0), lane = threadIdx.x & 31;
    const int tid = threadIdx.x + (mode == 2 ? 128 : 0);
    for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) buf[i] = (uint16_t)i;
    const uint32_t mb = (uint32_t)__cvta_generic_to_shared(&mbar);
    if (threadIdx.x == 0)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 4;\n" ::"r"(mb) : "memory");
    __syncthreads();
    if (mode == 3) {
        uint32_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
        if (warp >= 4 && warp < 8) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(buf + (lane & 15) * 64 +
                                                                  (warp - 4) * 16);
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
        }
        __syncthreads();
        if (warp >= 8)
            for (int i = threadIdx.x - 256; i < 64 * 64 / 8; i += 128)
                ((uint4 *)buf)[i] = make_uint4(i, i, i, i);
        if (warp >= 4 && warp < 8) out[threadIdx.x] = (float)(r0 + r1 + r2 + r3);
        return;
    }
    if (warp < 4) {
        if (mode == 0 || mode >= 4)
            asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (warp == 0) {
            long long t0 = clock64();
            while (clock64() - t0 < 20000) {
            }
            if (mode == 4)
                asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, "
                             "[%0], 0;\n@!p bra W;\n}\n" ::"r"(mb) : "memory");
        }
        return;
    }
    if (mode == 0 || mode >= 4)
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int gi = (warp >> 2) - 1;
    uint32_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
    if (gi == 0) {
        const uint32_t a = (uint32_t)__cvta_generic_to_shared(buf + (lane & 15) * 64 +
                                                              (warp & 3) * 16);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
    }
    if (mode == 5) {                     /* the id from the thread index: not folded */
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + (int)(threadIdx.x >> 7)) : "memory");
    } else if (mode == 6) {
        if (gi == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
        else asm volatile("bar.sync 3, 128;\n" ::: "memory");
    }
    if (gi == 0 && mode >= 5) {          /* the second read, after the group's barrier */
        const uint32_t a = (uint32_t)__cvta_generic_to_shared(buf + 16 * 64 + (lane & 15) * 64 +
                                                              (warp & 3) * 16);
        uint32_t x0, x1, x2, x3;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(x0), "=r"(x1), "=r"(x2), "=r"(x3) : "r"(a));
        r0 += x0, r1 += x1, r2 += x2, r3 += x3;
    }
    if (gi == 0) {
        __syncwarp();
        if (mode == 4 && lane == 0)
            asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mb) : "memory");
    }
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    if (gi == 1)
        for (int i = tid - 256; i < 64 * 64 / 8; i += 128)
            ((uint4 *)buf)[i] = make_uint4(i, i, i, i);
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    if (gi == 0) out[tid] = (float)(r0 + r1 + r2 + r3);
}

int main(int argc, char **argv) {
    const int mode = argc > 1 ? atoi(argv[1]) : 0;
    float *out;
    cudaMalloc(&out, 384 * sizeof(float));
    probe<<<4, mode == 2 ? 256 : 384>>>(mode, out);
    const cudaError_t e = cudaDeviceSynchronize();
    printf("mode %d: %s\n", mode, cudaGetErrorString(e));
    cudaFree(out);
    return e != cudaSuccess;
}
