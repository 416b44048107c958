/* condense.cu — SPEC §2 / §4 condensation on the GPU: one block per (group, kv head, batch).
 *
 * Phases, each followed by a barrier: (1) the summary query qbar (mean of the group's last n
 * queries over the kv head's hg query heads) into shared memory; (2) the g scores, one warp per
 * token; (3) softmax and anchor (first maximum) in warp 0; (4) pooling, threads over columns.
 * Accumulation in float32.  alpha is written in float32, anchor in int32.
 * Limit: D + g <= 12288 (shared memory, 48 KB); larger raises NotImplementedError upstream. */
#include "common.cuh"

namespace lca {

constexpr int kCondenseThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCondenseThreads) lca_condense_kernel(lca_params p) {
    extern __shared__ float sm[];
    float *qbar = sm, *s = sm + p.D;                   /* D floats, then g */
    __shared__ int anchor_s;
    const int64_t j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int64_t g = p.g, hg = p.H / p.Hkv, ds = p.d_score, D = p.D, Dv = p.Dv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

    /* (1) qbar over the last n tokens and the hg heads sharing kv head h */
    const float inv = 1.0f / (float)(p.n * hg);
    for (int64_t d = tid; d < ds; d += blockDim.x) {
        float acc = 0;
        for (int64_t t = j * g + g - p.n; t < j * g + g; t++)
            for (int64_t hh = h * hg; hh < (h + 1) * hg; hh++) acc += to_f(row<const T>(p.q, b, t, hh)[d]);
        qbar[d] = acc * inv;
    }
    __syncthreads();

    /* (2) s_i = tau qbar . k_i[:ds] */
    for (int64_t i = warp; i < g; i += nwarps) {
        const T *k = row<const T>(p.k, b, j * g + i, h);
        float part = 0;
        for (int64_t d = lane; d < ds; d += 32) part += qbar[d] * to_f(k[d]);
        part = warp_sum(part);
        if (lane == 0) s[i] = (float)p.scale * part;
    }
    __syncthreads();

    /* (3) softmax over the group; the anchor is the first index of the maximum */
    if (warp == 0) {
        float mx = -INFINITY;
        int arg = 0x7fffffff;
        for (int64_t i = lane; i < g; i += 32)
            if (s[i] > mx) mx = s[i], arg = (int)i;        /* per lane: first max */
        for (int o = 16; o > 0; o >>= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, mx, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (om > mx || (om == mx && oa < arg)) mx = om, arg = oa;
        }
        if (arg >= g) arg = 0;                     /* all scores NaN: any anchor, NaN out */
        float sum = 0;
        for (int64_t i = lane; i < g; i += 32) sum += s[i] = expf(s[i] - mx);
        sum = warp_sum(sum);
        for (int64_t i = lane; i < g; i += 32) s[i] /= sum;
        if (lane == 0) anchor_s = arg;
    }
    __syncthreads();

    /* (4) kbar = [sum alpha_i k_i[:d_pool]; k_anchor[d_pool:]], vbar = sum alpha_i v_i */
    const int a = anchor_s;
    T *kb = row<T>(p.kbar, b, j, h);
    for (int64_t d = tid; d < D; d += blockDim.x) {
        if (d < p.d_pool) {
            float acc = 0;
            for (int64_t i = 0; i < g; i++) acc += s[i] * to_f(row<const T>(p.k, b, j * g + i, h)[d]);
            kb[d] = from_f<T>(acc);
        } else {
            kb[d] = row<const T>(p.k, b, j * g + a, h)[d];
        }
    }
    if (!p.v_in_k) {
        T *vb = row<T>(p.vbar, b, j, h);
        for (int64_t d = tid; d < Dv; d += blockDim.x) {
            float acc = 0;
            for (int64_t i = 0; i < g; i++) acc += s[i] * to_f(row<const T>(p.v, b, j * g + i, h)[d]);
            vb[d] = from_f<T>(acc);
        }
    }
    if (p.anchor.p && tid == 0)
        ((int32_t *)p.anchor.p)[b * p.anchor.sb + j * p.anchor.st + h * p.anchor.sh] = a;
    if (p.alpha.p)
        for (int64_t i = tid; i < g; i += blockDim.x) row<float>(p.alpha, b, j, h)[i] = s[i];
}

template <typename T> struct Condense {
    static int run(const lca_params *p, cudaStream_t stream) {
        const size_t smem = sizeof(float) * (size_t)(p->D + p->g);
        const dim3 grid((unsigned)(p->L / p->g), (unsigned)p->Hkv, (unsigned)p->B);
        lca_condense_kernel<T><<<grid, kCondenseThreads, smem, stream>>>(*p);
        return LCA_OK;
    }
};

}  // namespace lca

extern "C" int lca_cuda_condense(const lca_params *p, int device, void *stream, char *err,
                                 int errlen) {
    using namespace lca;
    const int64_t m = p->g ? p->L / p->g : 0;
    if (p->B == 0 || m == 0 || p->Hkv == 0) return LCA_OK;
    if (p->D + p->g > 12288) {
        snprintf(err, (size_t)errlen, "condense on CUDA: head width + group_size = %lld exceeds "
                 "12288 (shared memory)", (long long)(p->D + p->g));
        return LCA_ERR_UNSUPPORTED;
    }
    if (m > 2147483647 || p->Hkv > 65535 || p->B > 65535) {
        snprintf(err, (size_t)errlen, "condense on CUDA: grid too large (groups %lld, kv heads "
                 "%lld, batch %lld)", (long long)m, (long long)p->Hkv, (long long)p->B);
        return LCA_ERR_UNSUPPORTED;
    }
    DeviceGuard guard(device);
    if (guard.status != cudaSuccess) return cuda_error(guard.status, "cudaSetDevice", err, errlen);
    int s = dispatch<Condense>(p->dtype, p, (cudaStream_t)stream);
    if (s != LCA_OK) {
        snprintf(err, (size_t)errlen, "condense on CUDA: unsupported dtype");
        return s;
    }
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LCA_OK : cuda_error(e, "lca_condense_kernel launch", err, errlen);
}
