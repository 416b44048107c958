/* attend_fwd.cu — SPEC §3 attention forward on the GPU: the entry point and its routing, and
 * the portable kernel.  bf16/fp16 calls go to the tensor cores: absorbed MLA 576/512 on a
 * compute 9.0 device to attend_mla_sm90a.cu (wgmma), GQA 192/128 and 128/128 there to
 * attend_gqa_sm90a.cu (wgmma), the other absorbed widths and GQA 256/256
 * to attend_mla.cu, the 64/128/192-wide heads to attend_mma.cu (both mma.sync).  Everything
 * else takes the portable kernel (CUDA cores, any NVIDIA GPU from sm_80): one warp per query
 * row (b, t, head), walking its visible entries — the condensed ones, then the exact window — in
 * one online softmax.  Lane l holds columns l, l+32, ... of the query and of the output
 * accumulator; each entry costs one warp-wide dot product.  float32 accumulation; lse in
 * float32.  It is the correctness path, not the fast one: it reads every visible key once per
 * query head and uses no tensor cores.  Limit: D, Dv <= 1024. */
#include "common.cuh"

namespace lca {

constexpr int kAttendWarps = 4;

/* One visible entry: logit, online-softmax update of (m, l, o). */
template <typename T, int C>
__device__ __forceinline__ void visit(const float (&q)[C], float (&o)[C], float &m, float &l,
                                      const T *k, const T *v, float bias, int D, int Dv,
                                      int lane) {
    float part = 0;
#pragma unroll
    for (int c = 0; c < C; c++)
        if (lane + 32 * c < D) part += q[c] * to_f(k[lane + 32 * c]);
    const float s = warp_sum(part) + bias;
    const float mnew = fmaxf(m, s);
    const float corr = m == -INFINITY ? 0.0f : expf(m - mnew);
    const float pe = expf(s - mnew);
    l = l * corr + pe;
#pragma unroll
    for (int c = 0; c < C; c++)
        if (lane + 32 * c < Dv) o[c] = o[c] * corr + pe * to_f(v[lane + 32 * c]);
    m = mnew;
}

template <typename T, int C>
__global__ void __launch_bounds__(32 * kAttendWarps) lca_attend_simt_kernel(lca_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t rowid = (int64_t)blockIdx.x * kAttendWarps + (threadIdx.x >> 5);
    if (rowid >= p.L * p.H) return;
    const int64_t b = blockIdx.y, t = rowid / p.H, hq = rowid % p.H, h = hq / (p.H / p.Hkv);
    const int D = (int)p.D, Dv = (int)p.Dv;
    float q[C], o[C];
    const T *qr = row<const T>(p.q, b, t, hq);
#pragma unroll
    for (int c = 0; c < C; c++) {
        q[c] = lane + 32 * c < D ? (float)p.scale * to_f(qr[lane + 32 * c]) : 0.0f;
        o[c] = 0;
    }
    float m = -INFINITY, l = 0;
    const int64_t G = num_condensed(t, p.g, p.w);
    for (int64_t j = 0; j < G; j++)
        visit<T, C>(q, o, m, l, row<const T>(p.kbar, b, j, h), row<const T>(p.vbar, b, j, h),
                    (float)p.rep_bias, D, Dv, lane);
    for (int64_t s = G * p.g; s <= t; s++)
        visit<T, C>(q, o, m, l, row<const T>(p.k, b, s, h), row<const T>(p.v, b, s, h), 0.0f, D,
                    Dv, lane);
    T *out = row<T>(p.out, b, t, hq);
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < C; c++)
        if (lane + 32 * c < Dv) out[lane + 32 * c] = from_f<T>(o[c] * inv);
    if (lane == 0) ((float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + t] = m + logf(l);
}

template <typename T> struct AttendFwd {
    static int run(const lca_params *p, cudaStream_t stream) {
        const int64_t width = p->D > p->Dv ? p->D : p->Dv;
        const dim3 grid((unsigned)((p->L * p->H + kAttendWarps - 1) / kAttendWarps),
                        (unsigned)p->B);
        const int threads = 32 * kAttendWarps;
        if (width <= 128) lca_attend_simt_kernel<T, 4><<<grid, threads, 0, stream>>>(*p);
        else if (width <= 256) lca_attend_simt_kernel<T, 8><<<grid, threads, 0, stream>>>(*p);
        else if (width <= 576) lca_attend_simt_kernel<T, 18><<<grid, threads, 0, stream>>>(*p);
        else lca_attend_simt_kernel<T, 32><<<grid, threads, 0, stream>>>(*p);
        return LCA_OK;
    }
};

}  // namespace lca

/* Which kernel the last lca_cuda_attend_fwd call launched ("mla_wgmma": attend_mla_sm90a.cu,
 * "gqa_wgmma": attend_gqa_sm90a.cu, "mla": attend_mla.cu on the absorbed widths, "wide": the
 * same kernel on GQA 256/256, "mma", "simt"; "" before any): evidence for the tests that a call
 * took the fast path, not a silent fallback. */
static const char *last_attend_kernel = "";

extern "C" const char *lca_cuda_last_attend_kernel(void) { return last_attend_kernel; }

/* A launcher's status s and the runtime's last error, as the entry's status: a refused launch
 * (s not LCA_OK with no CUDA error, e.g. a shared-memory attribute not set) is reported as an
 * invalid value of `what`. */
static int launched(int s, const char *what, char *err, int errlen) {
    const cudaError_t e = cudaGetLastError();
    if (s == LCA_OK && e == cudaSuccess) return LCA_OK;
    return lca::cuda_error(e != cudaSuccess ? e : cudaErrorInvalidValue, what, err, errlen);
}

extern "C" int lca_cuda_attend_fwd(const lca_params *p, int device, void *stream, char *err,
                                   int errlen) {
    using namespace lca;
    if (p->B == 0 || p->L == 0) return LCA_OK;
    if (p->D > 1024 || p->Dv > 1024) {
        snprintf(err, (size_t)errlen, "attention on CUDA: head widths D=%lld, Dv=%lld; the "
                 "CUDA engine supports up to 1024", (long long)p->D, (long long)p->Dv);
        return LCA_ERR_UNSUPPORTED;
    }
    if ((p->L * p->H + kAttendWarps - 1) / kAttendWarps > 2147483647 || p->B > 65535) {
        snprintf(err, (size_t)errlen, "attention on CUDA: grid too large (L*H = %lld, B = %lld)",
                 (long long)(p->L * p->H), (long long)p->B);
        return LCA_ERR_UNSUPPORTED;
    }
    DeviceGuard guard(device);
    if (guard.status != cudaSuccess) return cuda_error(guard.status, "cudaSetDevice", err, errlen);
#ifndef LCA_NO_SM90A
    if (!kernel_disabled("wgmma") && !kernel_disabled("mma") &&
        lca_cuda_mla_wgmma_supported(p, device)) {   /* Hopper: attend_mla_sm90a.cu */
        last_attend_kernel = "mla_wgmma";
        return launched(lca_cuda_attend_mla_wgmma(p, stream), "lca_attend_mla_wgmma_kernel launch",
                        err, errlen);
    }
    if (!kernel_disabled("wgmma") && !kernel_disabled("mma") &&
        lca_cuda_gqa_wgmma_supported(p, device)) {   /* Hopper: attend_gqa_sm90a.cu */
        last_attend_kernel = "gqa_wgmma";
        return launched(lca_cuda_attend_gqa_wgmma(p, stream), "lca_attend_gqa_wgmma_kernel launch",
                        err, errlen);
    }
#endif
    if (lca_cuda_mla_supported(p, device) && !kernel_disabled("mma")) {  /* absorbed MLA, GQA 256 */
        last_attend_kernel = p->v_in_k ? "mla" : "wide";
        return launched(lca_cuda_attend_mla(p, stream), "lca_attend_mla_kernel launch", err,
                        errlen);
    }
    if (lca_cuda_mma_supported(p) && !kernel_disabled("mma")) {   /* tensor cores: attend_mma.cu */
        last_attend_kernel = "mma";
        return launched(lca_cuda_attend_mma(p, stream), "lca_attend_mma_kernel launch", err,
                        errlen);
    }
    last_attend_kernel = "simt";
    int s = dispatch<AttendFwd>(p->dtype, p, (cudaStream_t)stream);
    if (s != LCA_OK) {
        snprintf(err, (size_t)errlen, "attention on CUDA: unsupported dtype");
        return s;
    }
    return launched(LCA_OK, "lca_attend_simt_kernel launch", err, errlen);
}

extern "C" int lca_cuda_device_count(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
