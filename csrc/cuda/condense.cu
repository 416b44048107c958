/* condense.cu — SPEC §2 / §4 condensation on the GPU: one block per (group, kv head, batch),
 * or, for bf16/fp16 with widths in multiples of 8 up to 768, one warp (see the warp kernel).
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

/* The same condensation, one warp per (group, kv head, batch) and 16-byte loads: lane l owns
 * columns 8l .. 8l+7 of each 256-column chunk (KC <= 3 chunks cover D and Dv, <= 768).  The summary query
 * stays in registers, each score is a warp sum, and every lane keeps the g scores (g <= 32) to
 * take the softmax and the anchor itself: no shared memory, no block barrier.  For 2-byte
 * types with D, Dv, d_score multiples of 8 and 16-byte aligned rows (kWarpCondense checks);
 * the block kernel above serves the rest.  LCA_CUDA_DISABLE=cond_warp selects that one.
 * GM: g rounded up to 16 or 32, the scores' registers; with GM = 16 and one column chunk (the
 * usual g = 16, D <= 256) 80 registers, so 3 blocks (24 warps) an SM keep more rows in flight:
 * at 128K, SPEC §9 shape, 0.70 ms (3.07 TB/s) against 1.05-1.15 ms with 32 scores (112
 * registers, 2 blocks an SM; H200, 11-30). */
constexpr int kCondWarps = 8;

template <typename T> __device__ __forceinline__ void load8(const T *src, float (&x)[8]) {
    const uint4 u = *(const uint4 *)src;
    const T *e = (const T *)&u;
#pragma unroll
    for (int i = 0; i < 8; i++) x[i] = to_f(e[i]);
}
template <typename T> __device__ __forceinline__ void store8(T *dst, const float (&x)[8]) {
    uint4 u;
    T *e = (T *)&u;
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = from_f<T>(x[i]);
    *(uint4 *)dst = u;
}

template <typename T, int KC, int GM>
__global__ void __launch_bounds__(32 * kCondWarps, KC == 1 && GM <= 16 ? 3 : 2)
    lca_condense_warp_kernel(lca_params p, int heads_first) {
    const int lane = threadIdx.x & 31;
    const int64_t m = p.L / p.g;
    const int64_t item = (int64_t)blockIdx.x * kCondWarps + (threadIdx.x >> 5);
    if (item >= m * p.Hkv * p.B) return;
    int64_t j, h, b;
    cond_item(item, m, p.Hkv, heads_first, &j, &h, &b);
    const int64_t g = p.g, hg = p.H / p.Hkv, ds = p.d_score, D = p.D;
    const int64_t t0 = j * g;

    /* the summary query: mean of the last n tokens' queries over the hg heads, columns < ds;
       rows (t, hh) t-major, 8 loads in flight a lane */
    float qb[KC][8];
    const float inv = 1.0f / (float)(p.n * hg);
    const int nq = (int)(p.n * hg);
#pragma unroll
    for (int k = 0; k < KC; k++)
#pragma unroll
        for (int e = 0; e < 8; e++) qb[k][e] = 0;
    for (int r0 = 0; r0 < nq; r0 += 8) {
#pragma unroll
        for (int k = 0; k < KC; k++) {
            const int64_t c = 256 * k + 8 * lane;
            if (c >= ds) continue;
            uint4 u[8];
#pragma unroll
            for (int r = 0; r < 8; r++) {
                const int kq = r0 + r, kt = hg == 1 ? kq : kq / (int)hg;
                u[r] = kq < nq ? *(const uint4 *)(row<const T>(p.q, b, t0 + g - p.n + kt,
                                                              h * hg + (kq - kt * (int)hg)) + c)
                               : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int r = 0; r < 8; r++) {
                const T *x = (const T *)&u[r];
#pragma unroll
                for (int e = 0; e < 8; e++) qb[k][e] += to_f(x[e]);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < KC; k++)
#pragma unroll
        for (int e = 0; e < 8; e++) qb[k][e] *= inv;

    /* scores s_i = scale qbar . k_i[:ds], every lane holding all g of them; 8 rows at a time */
    float s[GM];
#pragma unroll
    for (int i0 = 0; i0 < GM; i0 += 8) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (i0 < g) {
#pragma unroll
            for (int k = 0; k < KC; k++) {
                const int64_t c = 256 * k + 8 * lane;
                if (c >= ds) continue;
                uint4 u[8];
#pragma unroll
                for (int r = 0; r < 8; r++)
                    u[r] = i0 + r < g ? *(const uint4 *)(row<const T>(p.k, b, t0 + i0 + r, h) + c)
                                      : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int r = 0; r < 8; r++) {
                    const T *x = (const T *)&u[r];
#pragma unroll
                    for (int e = 0; e < 8; e++) part[r] = fmaf(qb[k][e], to_f(x[e]), part[r]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 8; r++)
            s[i0 + r] = i0 + r < g ? (float)p.scale * warp_sum(part[r]) : -INFINITY;
    }

    /* softmax over the group; the anchor is the first index of the maximum */
    float mx = -INFINITY;
    int a = -1;
#pragma unroll
    for (int i = 0; i < GM; i++)
        if (i < g && s[i] > mx) mx = s[i], a = i;
    if (a < 0) a = 0;                              /* all scores NaN: any anchor, NaN out */
    float sum = 0;
#pragma unroll
    for (int i = 0; i < GM; i++)
        if (i < g) sum += s[i] = expf(s[i] - mx);
#pragma unroll
    for (int i = 0; i < GM; i++) s[i] = i < g ? s[i] / sum : 0.0f;   /* 0 past g: pool's rows */

    /* kbar = [sum alpha_i k_i[:d_pool]; k_anchor[d_pool:]], vbar = sum alpha_i v_i */
    auto pool = [&](const lca_view &src, int64_t c, float (&acc)[8]) {   /* += sum alpha_i x_i */
#pragma unroll
        for (int i0 = 0; i0 < GM; i0 += 8) {
            if (i0 >= g) break;
            uint4 u[8];
#pragma unroll
            for (int r = 0; r < 8; r++)
                u[r] = i0 + r < g ? *(const uint4 *)(row<const T>(src, b, t0 + i0 + r, h) + c)
                                  : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                const T *x = (const T *)&u[r];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = fmaf(s[i0 + r], to_f(x[e]), acc[e]);
            }
        }
    };
    T *kb = row<T>(p.kbar, b, j, h);
#pragma unroll
    for (int k = 0; k < KC; k++) {
        const int64_t c = 256 * k + 8 * lane;
        if (c >= D) continue;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, x[8];
        if (c < p.d_pool) pool(p.k, c, acc);
        if (c + 8 > p.d_pool) {                    /* columns past d_pool copy the anchor */
            load8(row<const T>(p.k, b, t0 + a, h) + c, x);
#pragma unroll
            for (int e = 0; e < 8; e++)
                if (c + e >= p.d_pool) acc[e] = x[e];
        }
        store8(kb + c, acc);
    }
    if (!p.v_in_k) {
        T *vb = row<T>(p.vbar, b, j, h);
#pragma unroll
        for (int k = 0; k < KC; k++) {
            const int64_t c = 256 * k + 8 * lane;
            if (c >= p.Dv) continue;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            pool(p.v, c, acc);
            store8(vb + c, acc);
        }
    }
    if (p.anchor.p && lane == 0)
        ((int32_t *)p.anchor.p)[b * p.anchor.sb + j * p.anchor.st + h * p.anchor.sh] = a;
    if (p.alpha.p) {
        float mine = 0;                            /* lane i writes alpha_i */
#pragma unroll
        for (int i = 0; i < GM; i++)
            if (i == lane) mine = s[i];
        if (lane < g) row<float>(p.alpha, b, j, h)[lane] = mine;
    }
}

/* Host: whether the warp kernel covers this call, and its column chunks (0: it does not). */
inline int warp_condense_chunks(const lca_params *p) {
    if ((p->dtype != LCA_BF16 && p->dtype != LCA_F16) || p->g > 32 || kernel_disabled("cond_warp"))
        return 0;
    const int64_t Dv = p->v_in_k ? 8 : p->Dv;
    if (p->D % 8 || Dv % 8 || p->d_score % 8 || p->D > 768 || Dv > 768) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v, &p->kbar, &p->vbar};
    if (!rows_aligned16(vs)) return 0;
    if ((p->L / p->g) * p->Hkv * p->B / kCondWarps >= 2147483647) return 0;   /* grid */
    const int64_t w = p->D > Dv ? p->D : Dv;
    return (int)((w + 255) / 256);
}

template <typename T, int KC> int launch_warp(const lca_params *p, cudaStream_t stream) {
    const int64_t items = (p->L / p->g) * p->Hkv * p->B;
    const unsigned blocks = (unsigned)((items + kCondWarps - 1) / kCondWarps);
    if (p->g <= 16)      /* (fewer registers for the scores: 3 blocks an SM instead of 2) */
        lca_condense_warp_kernel<T, KC, 16>
            <<<blocks, 32 * kCondWarps, 0, stream>>>(*p, cond_heads_first());
    else
        lca_condense_warp_kernel<T, KC, 32>
            <<<blocks, 32 * kCondWarps, 0, stream>>>(*p, cond_heads_first());
    return LCA_OK;
}

template <typename T> struct Condense {
    static int run(const lca_params *p, cudaStream_t stream) {
        if constexpr (sizeof(T) == 2) {
            switch (warp_condense_chunks(p)) {
            case 1: return launch_warp<T, 1>(p, stream);
            case 2: return launch_warp<T, 2>(p, stream);
            case 3: return launch_warp<T, 3>(p, stream);
            default: break;
            }
        }
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
