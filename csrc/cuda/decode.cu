/* decode.cu — one decode step of the condensed cache on the GPU (SPEC §6; lca.h:
 * lca_decode_params; the CPU twin is csrc/cpu/decode.inc).
 *
 * A step is a short sequence of launches on the caller's stream, decided on the host from T
 * alone (no device synchronisation, no host round trip):
 *   1. append:     the new key (and value) into ring slot T % R; the new query, summed over the
 *                  query heads of each kv head, into its group's float32 running sum (only for
 *                  the last n tokens of a group);
 *   2. condense:   any group the query at T needs that is not condensed yet (window 0 only);
 *   3. partial:    flash-decoding: the visible entries (condensed rows [0, G_T), then the ring's
 *                  exact tokens [G_T g, T]) are cut into nsplit contiguous ranges; each block
 *                  runs one online softmax over its range for its heads and writes the
 *                  unnormalised output row, its max and its sum (float32) to the workspace;
 *   4. combine:    out = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s;
 *   5. condense:   the group that leaves the window for the next query, from its stored sum.
 *
 * The partial kernel for bf16/fp16, absorbed MLA (D, Dv) in {(576, 512), (288, 256)} and GQA
 * D = Dv in {256, 128, 64}, runs on tensor cores (mma.sync m16n8k16): the query heads of one kv
 * head are the M dimension (16 per m-tile, MT m-tiles per block), so every key tile is read
 * from memory once for all of them; tiles of 32 keys stream through shared memory with a
 * cp.async double buffer.  S = Q K^T is split over the warps by key columns and exchanged
 * through shared memory; O += P V is split over the warps by value columns (V by
 * ldmatrix.trans; for MLA V is the first Dv columns of the key tile).  Every other shape and
 * float32 use a CUDA-core path (one warp per query head and split).  Accumulation in float32.
 * On a compute 9.0 device the absorbed-MLA shapes go instead to decode_sm90a.cu (key tiles by
 * bulk copies on mbarriers, 16/32/64 heads a block, one block per SM, splits chosen to fill the
 * SMs once; 16-head blocks warp-specialised, LCA_DECODE_VARIANT picks among its variants);
 * LCA_CUDA_DISABLE=dec_bulk keeps them here.  _C.cuda_last_decode_kernel() names
 * the partial kernel the last step ran ("bulk", "mma", "simt"). */
#include <type_traits>

#include "decode.cuh"

namespace lca {

template <typename T>
__device__ __forceinline__ const T *key_row(const DecArgs &a, int64_t b, int64_t h, int64_t i) {
    return i < a.G ? row<const T>(a.p.kbar, b, i, h)
                   : row<const T>(a.p.kr, b, (a.e0 + i - a.G) % a.p.R, h);
}
template <typename T>
__device__ __forceinline__ const T *val_row(const DecArgs &a, int64_t b, int64_t h, int64_t i) {
    return i < a.G ? row<const T>(a.p.vbar, b, i, h)
                   : row<const T>(a.p.vr, b, (a.e0 + i - a.G) % a.p.R, h);
}

/* ---------------------------------------------------------------------------------------------
 * 1. append + summary sum: a grid of (column chunks, sequence), one key / value / sum element a
 *    thread (the sum over the kv head's query heads added in head order, as the CPU step does) */
constexpr int kDecAppendThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kDecAppendThreads) lca_dec_append_kernel(lca_decode_params p) {
    const int64_t b = blockIdx.y, slot = p.T % p.R;
    const int64_t i = (int64_t)blockIdx.x * kDecAppendThreads + threadIdx.x;
    const int64_t nk = p.Hkv * p.D, nv = p.v_in_k ? 0 : p.Hkv * p.Dv;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    /* the Hopper partial kernel, a programmatic dependent of this one, may start now: it
       waits for this grid (griddepcontrol.wait) before it reads the ring */
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    if (i < nk) {
        const int64_t h = i / p.D, d = i - h * p.D;
        dec_append_key<T>(p, b, h, d);
    } else if (i < nk + nv) {
        const int64_t h = (i - nk) / p.Dv, d = (i - nk) - h * p.Dv;
        row<T>(p.vr, b, slot, h)[d] = row<const T>(p.v, b, 0, h)[d];
    }
}

/* ---------------------------------------------------------------------------------------------
 * 2 / 5. condense group j of every (b, kv head) from its sum: condense.cu's phases with qbar
 * read from the sum and the tokens from the ring */
constexpr int kDecCondThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDecCondThreads) lca_dec_condense_kernel(lca_decode_params p,
                                                                           int64_t j) {
    extern __shared__ float sm[];
    float *qbar = sm, *s = sm + p.D;
    __shared__ int anchor_s;
    const int64_t h = blockIdx.x, b = blockIdx.y, g = p.g, hg = p.H / p.Hkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const float inv = 1.0f / (float)(p.n * hg);
    const float *qs = row<const float>(p.qsum, b, j % p.S, h);
    for (int64_t d = tid; d < p.d_score; d += blockDim.x) qbar[d] = qs[d] * inv;
    __syncthreads();
    for (int64_t i = warp; i < g; i += nwarps) {
        const T *k = row<const T>(p.kr, b, (j * g + i) % p.R, h);
        float part = 0;
        for (int64_t d = lane; d < p.d_score; d += 32) part += qbar[d] * to_f(k[d]);
        part = warp_sum(part);
        if (lane == 0) s[i] = (float)p.scale * part;
    }
    __syncthreads();
    if (warp == 0) {
        float mx = -INFINITY;
        int arg = 0x7fffffff;
        for (int64_t i = lane; i < g; i += 32)
            if (s[i] > mx) mx = s[i], arg = (int)i;
        for (int o = 16; o > 0; o >>= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, mx, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (om > mx || (om == mx && oa < arg)) mx = om, arg = oa;
        }
        if (arg >= g) arg = 0;
        float sum = 0;
        for (int64_t i = lane; i < g; i += 32) sum += s[i] = expf(s[i] - mx);
        sum = warp_sum(sum);
        for (int64_t i = lane; i < g; i += 32) s[i] /= sum;
        if (lane == 0) anchor_s = arg;
    }
    __syncthreads();
    const int a = anchor_s;
    T *kb = row<T>(p.kbar, b, j, h);
    for (int64_t d = tid; d < p.D; d += blockDim.x) {
        if (d < p.d_pool) {
            float acc = 0;
            for (int64_t i = 0; i < g; i++) acc += s[i] * to_f(row<const T>(p.kr, b, (j * g + i) % p.R, h)[d]);
            kb[d] = from_f<T>(acc);
        } else {
            kb[d] = row<const T>(p.kr, b, (j * g + a) % p.R, h)[d];
        }
    }
    if (!p.v_in_k) {
        T *vb = row<T>(p.vbar, b, j, h);
        for (int64_t d = tid; d < p.Dv; d += blockDim.x) {
            float acc = 0;
            for (int64_t i = 0; i < g; i++) acc += s[i] * to_f(row<const T>(p.vr, b, (j * g + i) % p.R, h)[d]);
            vb[d] = from_f<T>(acc);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * 3a. partial, CUDA cores: one warp per (query head, split); lane l holds columns l, l+32, ... */
constexpr int kDecSimtWarps = 4;

template <typename T, int C>
__global__ void __launch_bounds__(32 * kDecSimtWarps) lca_dec_partial_simt_kernel(DecArgs a) {
    const lca_decode_params &p = a.p;
    const int lane = threadIdx.x & 31;
    const int64_t hq = (int64_t)blockIdx.y * kDecSimtWarps + (threadIdx.x >> 5);
    const int s = blockIdx.x;
    const int64_t b = blockIdx.z;
    if (hq >= p.H) return;
    const int64_t h = hq / (p.H / p.Hkv);
    const int D = (int)p.D, Dv = (int)p.Dv;
    float q[C], o[C];
    const T *qr = row<const T>(p.q, b, 0, hq);
#pragma unroll
    for (int c = 0; c < C; c++) {
        q[c] = lane + 32 * c < D ? (float)p.scale * to_f(qr[lane + 32 * c]) : 0.0f;
        o[c] = 0;
    }
    float m = -INFINITY, l = 0;
    const int64_t i0 = (int64_t)s * a.per, i1 = i0 + a.per < a.N ? i0 + a.per : a.N;
    for (int64_t i = i0; i < i1; i++) {
        const T *k = key_row<T>(a, b, h, i), *v = val_row<T>(a, b, h, i);
        float part = 0;
#pragma unroll
        for (int c = 0; c < C; c++)
            if (lane + 32 * c < D) part += q[c] * to_f(k[lane + 32 * c]);
        const float x = warp_sum(part) + (i < a.G ? (float)p.rep_bias : 0.0f);
        const float mnew = fmaxf(m, x);
        const float corr = m == -INFINITY ? 0.0f : expf(m - mnew);
        const float pe = expf(x - mnew);
        l = l * corr + pe;
#pragma unroll
        for (int c = 0; c < C; c++)
            if (lane + 32 * c < Dv) o[c] = o[c] * corr + pe * to_f(v[lane + 32 * c]);
        m = mnew;
    }
    float *dst = partial(a, b, hq, s);
#pragma unroll
    for (int c = 0; c < C; c++)
        if (lane + 32 * c < Dv) dst[lane + 32 * c] = o[c];
    if (lane == 0) dst[Dv] = m, dst[Dv + 1] = l;
}

/* ---------------------------------------------------------------------------------------------
 * 3b. partial, tensor cores */


/* rows [0, n) of width W from src(r) into a padded tile by cp.async (16 bytes a thread);
 * rows n .. kDecKeys-1 zeroed */
template <typename T, int W, int NT, typename F>
__device__ __forceinline__ void dec_load(T *tile, int n, F src) {
    constexpr int V = W / 8;
    for (int i = threadIdx.x; i < kDecKeys * V; i += NT) {
        const int r = i / V, c = (i % V) * 8;
        T *dst = tile + r * (W + kDecPad) + c;
        if (r < n) {
            const uint32_t a = (uint32_t)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src(r) + c));
        } else {
            *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
    }
}

template <int D, int DV, int MT, bool VK>
struct DecMmaShape {
    static constexpr int kThreads = 128 * MT;
    static constexpr int kRows = 16 * MT;
    static constexpr int kStage = kDecKeys * (D + kDecPad) + (VK ? 0 : kDecKeys * (DV + kDecPad));
    static constexpr int kSRow = kDecKeys + 4;               /* floats per S row */
    template <typename T> static constexpr size_t smem() {
        return sizeof(T) * (size_t)(kRows * (D + kDecPad) + 2 * kStage) +
               sizeof(float) * (size_t)(kRows * kSRow);
    }
};

/* Block: (head chunk of 16 MT query heads, split, b * Hkv + h).  Warp w: m-tile w / 4; within
 * it, quarter wq = w % 4 computes S's key columns [8 wq, 8 wq + 8) and owns the value columns
 * [wq DV / 4, (wq + 1) DV / 4). */
template <typename T, int D, int DV, int MT, bool VK>
__global__ void __launch_bounds__(128 * MT) lca_dec_partial_mma_kernel(DecArgs a) {
    using S_ = DecMmaShape<D, DV, MT, VK>;
    constexpr int NTH = S_::kThreads, ROWS = S_::kRows, SR = S_::kSRow;
    constexpr int WCOL = DV / 4, NTV = WCOL / 8;             /* value columns, n-tiles a warp */
    extern __shared__ __align__(16) unsigned char dsm[];
    T *Qs = (T *)dsm;
    T *stage0 = Qs + ROWS * (D + kDecPad);
    float *Ss = (float *)(stage0 + 2 * S_::kStage);
    const lca_decode_params &p = a.p;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int mt = warp >> 2, wq = warp & 3;
    const int64_t hg = p.H / p.Hkv, b = blockIdx.z / p.Hkv, h = blockIdx.z % p.Hkv;
    const int64_t r0 = (int64_t)blockIdx.x * ROWS;           /* first head of the chunk */
    const int s = blockIdx.y;
    const int64_t i0 = (int64_t)s * a.per, i1 = i0 + a.per < a.N ? i0 + a.per : a.N;
    const int ntiles = (int)((i1 - i0 + kDecKeys - 1) / kDecKeys);

    /* Row r of tile t: condensed row k0 + r while k0 + r < G, else ring slot ring0 + (r - nc)
     * (wrapped once: a tile's exact rows are fewer than R).  One modulo per tile, not per row:
     * the row addresses are on the path of every 16-byte copy. */
    const T *kb0 = row<const T>(p.kbar, b, 0, h), *kr0 = row<const T>(p.kr, b, 0, h);
    const T *vb0 = row<const T>(p.vbar, b, 0, h), *vr0 = row<const T>(p.vr, b, 0, h);
    auto issue = [&](int t) {
        const int64_t k0 = i0 + (int64_t)t * kDecKeys;
        const int nk = (int)(i1 - k0 < kDecKeys ? i1 - k0 : kDecKeys);
        const int nc = (int)(a.G - k0 <= 0 ? 0 : a.G - k0 < nk ? a.G - k0 : nk);
        const int64_t R = p.R, ring0 = (a.e0 + (k0 > a.G ? k0 - a.G : 0)) % R;
        auto slot = [&](int r) {
            int64_t sl = ring0 + (r - nc);
            return sl >= R ? sl - R : sl;
        };
        T *Ks = stage0 + (t & 1) * S_::kStage;
        dec_load<T, D, NTH>(Ks, nk, [&](int r) {
            return r < nc ? kb0 + (k0 + r) * p.kbar.st : kr0 + slot(r) * p.kr.st;
        });
        if (!VK)
            dec_load<T, DV, NTH>(Ks + kDecKeys * (D + kDecPad), nk, [&](int r) {
                return r < nc ? vb0 + (k0 + r) * p.vbar.st : vr0 + slot(r) * p.vr.st;
            });
        cp_async_commit();
    };
    issue(0);

    /* Q: the chunk's heads (rows past hg are zero), unscaled; tau is applied to S */
    for (int i = threadIdx.x; i < ROWS * (D / 8); i += NTH) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < hg) {
            const T *src = row<const T>(p.q, b, 0, h * hg + r0 + r) + c;
            if (((uintptr_t)src & 15) == 0) {
                v = *(const uint4 *)src;
            } else {
                T tmp[8];
#pragma unroll
                for (int e = 0; e < 8; e++) tmp[e] = src[e];
                v = *(uint4 *)tmp;
            }
        }
        *(uint4 *)(Qs + r * (D + kDecPad) + c) = v;
    }

    float o[NTV][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
#pragma unroll
    for (int n = 0; n < NTV; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    const float scale = (float)p.scale, bias = (float)p.rep_bias;
    const T *Qw = Qs + mt * 16 * (D + kDecPad);

    for (int t = 0; t < ntiles; t++) {
        if (t + 1 < ntiles) {
            issue(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T *Ks = stage0 + (t & 1) * S_::kStage;
        const T *Vs = VK ? Ks : Ks + kDecKeys * (D + kDecPad);
        const int64_t k0 = i0 + (int64_t)t * kDecKeys;

        /* S[16 rows of m-tile mt][keys 8 wq .. 8 wq + 7] = Q K^T over D, in NACC independent
         * accumulators (a single one would chain D / 16 dependent mma) */
        constexpr int KS = D / 16, NACC = KS % 4 == 0 ? 4 : 2;
        float acc[NACC][4];
#pragma unroll
        for (int u = 0; u < NACC; u++) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0;
        const T *kb = Ks + (wq * 8 + gq) * (D + kDecPad) + 2 * tq;
#pragma unroll
        for (int k2 = 0; k2 < KS; k2 += NACC)
#pragma unroll
            for (int u = 0; u < NACC; u++) {
                const int ks = k2 + u;
                uint32_t af[4];
                ldmatrix_x4(af, Qw + (lane & 15) * (D + kDecPad) + ks * 16 + (lane >> 4) * 8);
                mma16816<T>(acc[u], af, *(const uint32_t *)(kb + ks * 16),
                        *(const uint32_t *)(kb + ks * 16 + 8));
            }
        float sc[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            sc[e] = acc[0][e];
#pragma unroll
            for (int u = 1; u < NACC; u++) sc[e] += acc[u][e];
        }
        float *Sw = Ss + mt * 16 * SR;
        Sw[gq * SR + wq * 8 + 2 * tq] = sc[0];
        Sw[gq * SR + wq * 8 + 2 * tq + 1] = sc[1];
        Sw[(gq + 8) * SR + wq * 8 + 2 * tq] = sc[2];
        Sw[(gq + 8) * SR + wq * 8 + 2 * tq + 1] = sc[3];
        __syncthreads();

        /* online softmax over the 32 keys (every warp of the m-tile computes the same numbers)
         * and P as A fragments: x[i][kk][e], row gq + 8 i, key 16 kk + {2tq, 2tq+1, 2tq+8,
         * 2tq+9}[e] */
        float x[2][2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float bmax = -INFINITY;
#pragma unroll
            for (int kk = 0; kk < 2; kk++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = 16 * kk + 2 * tq + (e & 1) + 8 * (e >> 1);
                    const int64_t gi = k0 + key;
                    float v = Sw[(gq + 8 * i) * SR + key] * scale + (gi < a.G ? bias : 0.0f);
                    v = gi < i1 ? v : -INFINITY;
                    x[i][kk][e] = v;
                    bmax = fmaxf(bmax, v);
                }
            dec_softmax_update(x[i], bmax, m[i], l[i], o, i);
        }

        /* O[:, wq's columns] += P V */
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const uint32_t af[4] = {pack2<T>(x[0][kk][0], x[0][kk][1]),
                                    pack2<T>(x[1][kk][0], x[1][kk][1]),
                                    pack2<T>(x[0][kk][2], x[0][kk][3]),
                                    pack2<T>(x[1][kk][2], x[1][kk][3])};
#pragma unroll
            for (int n = 0; n < NTV; n += 2) {
                uint32_t bf[4];
                const int r = kk * 16 + (lane & 15), c = wq * WCOL + n * 8 + (lane >> 4) * 8;
                ldmatrix_x4_trans(bf, Vs + r * (VK ? D + kDecPad : DV + kDecPad) + c);
                mma16816<T>(o[n], af, bf[0], bf[1]);
                mma16816<T>(o[n + 1], af, bf[2], bf[3]);
            }
        }
        __syncthreads();                     /* the stage and S may be overwritten */
    }

    /* the unnormalised partial row, its max and sum */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        const int64_t hr = r0 + mt * 16 + gq + 8 * i;
        if (hr >= hg) continue;
        float *dst = partial(a, b, h * hg + hr, s);
#pragma unroll
        for (int n = 0; n < NTV; n++)
            *(float2 *)(dst + wq * WCOL + n * 8 + 2 * tq) = make_float2(o[n][2 * i], o[n][2 * i + 1]);
        if (wq == 0 && tq == 0) dst[DV] = m[i], dst[DV + 1] = l[i];
    }
}

/* ---------------------------------------------------------------------------------------------
 * 4. combine the splits: one block per (query head, b) */
template <typename T>
__global__ void lca_dec_combine_kernel(DecArgs a) {
    const int64_t hq = blockIdx.x, b = blockIdx.y, Dv = a.p.Dv;
    float M = -INFINITY;
    for (int s = 0; s < a.nsplit; s++) M = fmaxf(M, partial(a, b, hq, s)[Dv]);
    float L = 0;
    for (int s = 0; s < a.nsplit; s++) {
        const float *ps = partial(a, b, hq, s);
        L += expf(ps[Dv] - M) * ps[Dv + 1];
    }
    const float inv = 1.0f / L;
    T *out = row<T>(a.p.out, b, 0, hq);
    for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) {
        float acc = 0;
        for (int s = 0; s < a.nsplit; s++) {
            const float *ps = partial(a, b, hq, s);
            acc += expf(ps[Dv] - M) * ps[d];
        }
        out[d] = from_f<T>(acc * inv);
    }
}

/* ---------------------------------------------------------------------------------------------
 * launchers */

template <typename T, int D, int DV, int MT, bool VK>
int launch_dec_mma(const DecArgs &a, cudaStream_t st) {
    using S_ = DecMmaShape<D, DV, MT, VK>;
    const size_t smem = S_::template smem<T>();
    auto kernel = lca_dec_partial_mma_kernel<T, D, DV, MT, VK>;
    /* every launch: an attribute cached per device would be lost with a context reset */
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess)
        return LCA_ERR_CUDA;
    const dim3 grid((unsigned)a.hchunks, (unsigned)a.nsplit, (unsigned)(a.p.B * a.p.Hkv));
    kernel<<<grid, S_::kThreads, smem, st>>>(a);
    return LCA_OK;
}

/* MLA (values inside the keys): 576/512 and 288/256; GQA: 256, 128, 64 */
template <typename T, int MT>
int dec_mma_mla(const DecArgs &a, cudaStream_t st) {
    if (a.p.D == 576) return launch_dec_mma<T, 576, 512, MT, true>(a, st);
    return launch_dec_mma<T, 288, 256, MT, true>(a, st);
}
template <typename T, int MT>
int dec_mma_gqa(const DecArgs &a, cudaStream_t st) {
    if (a.p.D == 256) return launch_dec_mma<T, 256, 256, MT, false>(a, st);
    if (a.p.D == 128) return launch_dec_mma<T, 128, 128, MT, false>(a, st);
    return launch_dec_mma<T, 64, 64, MT, false>(a, st);
}

/* Shared memory the tensor-core partial needs for this shape (bf16 and fp16 alike). */
template <int MT> static size_t dec_mma_smem(int64_t D, bool vk) {
    if (vk) return D == 576 ? DecMmaShape<576, 512, MT, true>::template smem<__half>()
                            : DecMmaShape<288, 256, MT, true>::template smem<__half>();
    if (D == 256) return DecMmaShape<256, 256, MT, false>::template smem<__half>();
    if (D == 128) return DecMmaShape<128, 128, MT, false>::template smem<__half>();
    return DecMmaShape<64, 64, MT, false>::template smem<__half>();
}

/* Whether the tensor-core partial covers the step on the current device (its shared memory
 * within the device's opt-in limit: checked before anything is launched, so a device with
 * less falls back to the CUDA-core partial instead of failing half-way through a step); its
 * m-tiles per block (1 or 2) in *mt. */
static bool dec_mma_ok(const lca_decode_params *p, int *mt) {
    if (p->dtype != LCA_BF16 && p->dtype != LCA_F16) return false;
    const int64_t D = p->D, Dv = p->Dv;
    if (p->v_in_k ? !((D == 576 && Dv == 512) || (D == 288 && Dv == 256))
                  : !((D == 256 && Dv == 256) || (D == 128 && Dv == 128) || (D == 64 && Dv == 64)))
        return false;
    const lca_view *vs[] = {&p->kbar, &p->vbar, &p->kr, &p->vr};
    if (!rows_aligned16(vs)) return false;
    const int64_t hg = p->H / p->Hkv;
    *mt = hg > 16 ? 2 : 1;
    const size_t need = *mt == 1 ? dec_mma_smem<1>(D, p->v_in_k) : dec_mma_smem<2>(D, p->v_in_k);
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return device_fits(dev, need, false);
}

/* The partial kernel the last step launched ("bulk", "mma", "simt"; "" before any). */
static const char *last_decode_kernel = "";

/* Cut the N visible entries into about `want` splits of a multiple of kDecKeys entries each
 * (at least 64 entries a split, at most nsplit_max splits); every split is non-empty. */
static void dec_splits(DecArgs &a, int64_t want) {
    int64_t nsplit = (a.N + 63) / 64;
    if (nsplit > want) nsplit = want;
    if (nsplit > a.p.nsplit_max) nsplit = a.p.nsplit_max;
    if (nsplit < 1) nsplit = 1;
    a.per = (a.N + nsplit - 1) / nsplit;
    a.per = (a.per + kDecKeys - 1) / kDecKeys * kDecKeys;
    a.nsplit = (int)((a.N + a.per - 1) / a.per);
}

#ifndef LCA_NO_SM90A
/* Streaming multiprocessors of the current device (cached per device). */
static int dec_sm_count(int dev) {
    static int count[64];
    if (dev >= 0 && dev < 64 && count[dev]) return count[dev];
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
        cudaGetLastError();
        n = 1;
    }
    if (dev >= 0 && dev < 64) count[dev] = n;
    return n;
}
#endif

template <typename T> struct DecStep {
    static int run(const lca_decode_params *p, int device, cudaStream_t st, char *err,
                   int errlen) {
        const int64_t T_ = p->T, g = p->g, w = p->w, hg = p->H / p->Hkv;
        const int64_t c0 = lca_cache_condensed(T_, g, w), Gt = lca_num_condensed(T_, g, w);
        const int64_t c1 = lca_cache_condensed(T_ + 1, g, w);
        const size_t csmem = sizeof(float) * (size_t)(p->D + g);
        const int64_t append_n = p->Hkv * (p->D + (p->v_in_k ? 0 : p->Dv));
        /* the Hopper partial kernel this step will run (0: none), decided first: some of its
           variants append the token themselves, when no condensation must run before them */
        int bmt = 0;
        if constexpr (!std::is_same<T, float>::value) {
#ifndef LCA_NO_SM90A
            bmt = kernel_disabled("dec_bulk") || kernel_disabled("mma")
                      ? 0 : lca_cuda_dec_bulk_supported(p, device);
#endif
        }
        int fused = 0;
#ifndef LCA_NO_SM90A
        fused = bmt && c0 >= Gt ? lca_cuda_dec_bulk_appends(p, bmt) : 0;
#endif
        if (!fused)
            lca_dec_append_kernel<T><<<dim3((unsigned)((append_n + kDecAppendThreads - 1) /
                                                       kDecAppendThreads), (unsigned)p->B),
                                       kDecAppendThreads, 0, st>>>(*p);
        for (int64_t j = c0; j < Gt; j++)
            lca_dec_condense_kernel<T><<<dim3((unsigned)p->Hkv, (unsigned)p->B),
                                         kDecCondThreads, csmem, st>>>(*p, j);
        DecArgs a;
        a.p = *p;
        a.count = nullptr;
        a.append = fused;
        a.G = Gt;
        a.e0 = Gt * g;
        a.N = Gt + (T_ + 1 - a.e0);
        dec_splits(a, p->nsplit_max);
        int mt = 1;
        bool mma = false;
        if constexpr (!std::is_same<T, float>::value) {
#ifndef LCA_NO_SM90A
            if (bmt) {
                /* one block of 16 bmt heads per SM: splits enough to fill the SMs once */
                a.hchunks = (int)((hg + 16 * bmt - 1) / (16 * bmt));
                const int64_t units = p->B * p->Hkv * a.hchunks;
                int64_t want = dec_sm_count(device) / units;
                const char *force = getenv("LCA_DECODE_NSPLIT");   /* benchmarks: a sweep */
                if (force && atoi(force) > 0) want = atoi(force);
                dec_splits(a, want < 1 ? 1 : want);
                mma = true;
                last_decode_kernel = "bulk";
                const int merges = lca_cuda_dec_bulk_merges(p, bmt);
                if (merges && a.nsplit <= merges) a.count = dec_counters(*p);
                if (lca_cuda_dec_bulk_partial(&a, bmt, st) != LCA_OK) {
                    cudaError_t e = cudaGetLastError();
                    return cuda_error(e != cudaSuccess ? e : cudaErrorInvalidValue,
                                      "decode: bulk partial setup", err, errlen);
                }
            }
#endif
            if (!mma && !kernel_disabled("mma") && dec_mma_ok(p, &mt)) {
                mma = true;
                last_decode_kernel = "mma";
                a.hchunks = (int)((hg + 16 * mt - 1) / (16 * mt));
                int s;
                if (p->v_in_k)
                    s = mt == 1 ? dec_mma_mla<T, 1>(a, st) : dec_mma_mla<T, 2>(a, st);
                else
                    s = mt == 1 ? dec_mma_gqa<T, 1>(a, st) : dec_mma_gqa<T, 2>(a, st);
                if (s != LCA_OK) {
                    cudaError_t e = cudaGetLastError();
                    return cuda_error(e != cudaSuccess ? e : cudaErrorInvalidValue,
                                      "decode: tensor-core partial setup", err, errlen);
                }
            }
        }
        if (!mma) {
            last_decode_kernel = "simt";
            const int64_t width = p->D > p->Dv ? p->D : p->Dv;
            const dim3 grid((unsigned)a.nsplit, (unsigned)((p->H + kDecSimtWarps - 1) / kDecSimtWarps),
                            (unsigned)p->B);
            const int th = 32 * kDecSimtWarps;
            if (width <= 128) lca_dec_partial_simt_kernel<T, 4><<<grid, th, 0, st>>>(a);
            else if (width <= 256) lca_dec_partial_simt_kernel<T, 8><<<grid, th, 0, st>>>(a);
            else if (width <= 576) lca_dec_partial_simt_kernel<T, 18><<<grid, th, 0, st>>>(a);
            else lca_dec_partial_simt_kernel<T, 32><<<grid, th, 0, st>>>(a);
        }
        if (!a.count)
            lca_dec_combine_kernel<T><<<dim3((unsigned)p->H, (unsigned)p->B), 128, 0, st>>>(a);
        for (int64_t j = c0 > Gt ? c0 : Gt; j < c1; j++)
            lca_dec_condense_kernel<T><<<dim3((unsigned)p->Hkv, (unsigned)p->B),
                                         kDecCondThreads, csmem, st>>>(*p, j);
        return LCA_OK;
    }
};

}  // namespace lca

extern "C" const char *lca_cuda_last_decode_kernel(void) { return lca::last_decode_kernel; }

extern "C" int lca_cuda_decode_step(const lca_decode_params *p, int device, void *stream,
                                    char *err, int errlen) {
    using namespace lca;
    if (p->B == 0) return LCA_OK;
    if (p->D > 1024 || p->Dv > 1024) {
        snprintf(err, (size_t)errlen, "decode on CUDA: head widths D=%lld, Dv=%lld; the CUDA "
                 "engine supports up to 1024", (long long)p->D, (long long)p->Dv);
        return LCA_ERR_UNSUPPORTED;
    }
    if (p->D + p->g > 12288) {
        snprintf(err, (size_t)errlen, "decode on CUDA: head width + group_size = %lld exceeds "
                 "12288 (shared memory of the condensation)", (long long)(p->D + p->g));
        return LCA_ERR_UNSUPPORTED;
    }
    if (p->B > 65535 || p->H > 65535 * 4 || p->Hkv > 65535 || p->B * p->Hkv > 65535 ||
        p->nsplit_max > 65535) {
        snprintf(err, (size_t)errlen, "decode on CUDA: grid too large (B %lld, H %lld, Hkv %lld)",
                 (long long)p->B, (long long)p->H, (long long)p->Hkv);
        return LCA_ERR_UNSUPPORTED;
    }
    DeviceGuard guard(device);
    if (guard.status != cudaSuccess) return cuda_error(guard.status, "cudaSetDevice", err, errlen);
    cudaStream_t st = (cudaStream_t)stream;
    int s;
    switch (p->dtype) {
    case LCA_F32: s = DecStep<float>::run(p, device, st, err, errlen); break;
    case LCA_F16: s = DecStep<__half>::run(p, device, st, err, errlen); break;
    case LCA_BF16: s = DecStep<__nv_bfloat16>::run(p, device, st, err, errlen); break;
    default:
        snprintf(err, (size_t)errlen, "decode on CUDA: unsupported dtype");
        return LCA_ERR_UNSUPPORTED;
    }
    if (s != LCA_OK) return s;
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LCA_OK : cuda_error(e, "decode step launch", err, errlen);
}
