/* common.cuh — what the CUDA engine's kernels share: element conversion, indexing of the
 * lca.h views, warp reductions, launch checking.  Only .cu files include CUDA headers. */
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lca.h"

namespace lca {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

/* Element (b, t, h, 0) of a view, typed. */
template <typename T>
__device__ __forceinline__ T *row(const lca_view &v, int64_t b, int64_t t, int64_t h) {
    return (T *)v.p + b * v.sb + t * v.st + h * v.sh;
}

/* G_t of SPEC §3, on the device. */
__device__ __forceinline__ int64_t num_condensed(int64_t t, int64_t g, int64_t w) {
    return t + 1 < w ? 0 : (t + 1 - w) / g;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* Run f<T>() for the params' element type; f returns an lca_status. */
template <template <typename> class F, typename... A>
int dispatch(lca_dtype dt, A... args) {
    switch (dt) {
    case LCA_F32: return F<float>::run(args...);
    case LCA_F16: return F<__half>::run(args...);
    case LCA_BF16: return F<__nv_bfloat16>::run(args...);
    default: return LCA_ERR_UNSUPPORTED;
    }
}

/* Sets the device for the duration of a launcher and restores the caller's afterwards. */
struct DeviceGuard {
    int prev = -1;
    cudaError_t status;
    explicit DeviceGuard(int dev) {
        cudaGetDevice(&prev);
        status = prev == dev ? cudaSuccess : cudaSetDevice(dev);
        /* clear the runtime's last error: ours (a failed cudaSetDevice) or one left by other
           code, so the launch check after our kernels reports only our launch */
        cudaGetLastError();
    }
    ~DeviceGuard() {
        if (prev >= 0) cudaSetDevice(prev);
    }
};

inline int cuda_error(cudaError_t e, const char *what, char *err, int errlen) {
    snprintf(err, (size_t)errlen, "%s: CUDA error %s (%s)", what, cudaGetErrorName(e),
             cudaGetErrorString(e));
    return LCA_ERR_CUDA;
}

/* Host: whether the rows of every view start on 16 bytes (2-byte elements, so strides in
 * multiples of 8), as the tensor-core kernels' 16-byte copies need. */
template <size_t N> inline bool rows_aligned16(const lca_view *const (&vs)[N]) {
    for (const lca_view *v : vs)
        if ((uintptr_t)v->p % 16 || v->sb % 8 || v->st % 8 || v->sh % 8) return false;
    return true;
}

/* Host: whether every row of v (extents B, L, Hn) starts on `bytes` bytes, for elements of
 * `esize` bytes (a stride over an extent of 1 is never used, so not checked). */
inline bool rows_on(const lca_view &v, int64_t B, int64_t L, int64_t Hn, size_t bytes,
                    size_t esize) {
    const int64_t E = (int64_t)(bytes / esize);
    return (uintptr_t)v.p % bytes == 0 && (B < 2 || v.sb % E == 0) && (L < 2 || v.st % E == 0) &&
           (Hn < 2 || v.sh % E == 0);
}

/* Host: whether `device` gives a block `need` bytes of shared memory (its opt-in limit) and,
 * with hopper, is compute capability 9.0 (what the sm_90a kernels run on).  False, with the
 * CUDA error cleared, when the attributes cannot be read. */
inline bool device_fits(int device, size_t need, bool hopper) {
    int major = 9, minor = 0, optin = 0;
    const cudaDeviceAttr cc_major = cudaDevAttrComputeCapabilityMajor,
                         cc_minor = cudaDevAttrComputeCapabilityMinor;
    if ((hopper && (cudaDeviceGetAttribute(&major, cc_major, device) != cudaSuccess ||
                    cudaDeviceGetAttribute(&minor, cc_minor, device) != cudaSuccess)) ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return major == 9 && minor == 0 && (size_t)optin >= need;
}

/* Host: launch a forward kernel over (tiles of `rows` score rows of the flattened (position,
 * head-in-group) space, kv heads, batch), with `smem` bytes of dynamic shared memory; the
 * kernel takes the params, then `extra` (the TMA kernels' tensor maps). */
template <typename Kernel, typename... Extra>
inline int launch_row_tiles(Kernel kernel, const lca_params *p, int rows, int threads, size_t smem,
                            cudaStream_t stream, const Extra &...extra) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    const int64_t nrows = p->L * (p->H / p->Hkv);
    const dim3 grid((unsigned)((nrows + rows - 1) / rows), (unsigned)p->Hkv, (unsigned)p->B);
    kernel<<<grid, threads, smem, stream>>>(*p, extra...);
    return LCA_OK;
}

/* LCA_CUDA_DISABLE names kernels to skip, so the tests reach every path on the same cases:
 * comma-separated names matched whole — "wgmma" the Hopper kernels of the forward and the
 * backward (the mma.sync kernels run instead), "mma" every tensor-core kernel, "dec_bulk" the
 * Hopper decode partial, "cond_warp" the warp-per-group condensation, "cond_heads_first" its
 * item order (below), "finish_vec" the backward's vector conversion kernel
 * (bwd_finish_vec_kernel).  Read at each call. */
inline bool kernel_disabled(const char *kernel) {
    const char *off = getenv("LCA_CUDA_DISABLE");
    const size_t n = strlen(kernel);
    for (const char *t = off; t && *t; t = strchr(t, ',') ? strchr(t, ',') + 1 : NULL)
        if (strncmp(t, kernel, n) == 0 && (t[n] == ',' || t[n] == '\0')) return true;
    return false;
}

/* The item (group j, kv head h, batch b) of a warp in the warp-per-group condensation
 * (condense.cu) and its backward (attend_bwd.cu): kv heads fastest, so that neighbouring warps
 * read the rows of the same tokens, which lie side by side in (B, L, heads, D) memory, rather
 * than rows of one head H rows apart; LCA_CUDA_DISABLE=cond_heads_first takes the groups
 * fastest (the order up to 11-30). */
inline int cond_heads_first() { return !kernel_disabled("cond_heads_first"); }

__device__ __forceinline__ void cond_item(int64_t item, int64_t m, int64_t Hkv, int heads_first,
                                          int64_t *j, int64_t *h, int64_t *b) {
    *b = item / (m * Hkv);
    const int64_t r = item - *b * m * Hkv;
    if (heads_first) *h = r % Hkv, *j = r / Hkv;
    else *j = r % m, *h = r / m;
}

}  // namespace lca

/* attend_mma.cu: the tensor-core forward and the calls it covers. */
extern "C" int lca_cuda_mma_supported(const lca_params *p);
extern "C" int lca_cuda_attend_mma(const lca_params *p, void *stream);

/* attend_mla.cu: the tensor-core forward for the absorbed MLA widths and the calls it covers. */
extern "C" int lca_cuda_mla_supported(const lca_params *p, int device);
extern "C" int lca_cuda_attend_mla(const lca_params *p, void *stream);

/* attend_mla_sm90a.cu (sm_90a only; absent when setup.py defines LCA_NO_SM90A): the wgmma
 * forward for the absorbed 576/512 shape, the default there on compute 9.0. */
extern "C" int lca_cuda_mla_wgmma_supported(const lca_params *p, int device);
extern "C" int lca_cuda_attend_mla_wgmma(const lca_params *p, void *stream);

/* attend_gqa_sm90a.cu (sm_90a only, likewise): the wgmma forward for GQA heads 192/128 (the
 * non-absorbed MLA shape) and 128/128, the default there on compute 9.0. */
extern "C" int lca_cuda_gqa_wgmma_supported(const lca_params *p, int device);
extern "C" int lca_cuda_attend_gqa_wgmma(const lca_params *p, void *stream);
