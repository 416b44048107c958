/* attend_bwd.cu — SPEC §5 backward on the GPU: the entry point and the portable (CUDA-core)
 * kernels.  The math mirrors the CPU engine's lca_cpu_attention_bwd (csrc/cpu/attn.inc).
 *
 * Order of work, all on the caller's stream, each step a kernel (no device-wide sync):
 *   1. recompute the condensation (condense.cu) into the workspace: kbar, vbar in the input
 *      dtype (bit-identical to what the forward attended), alpha and anchor;
 *   2. delta = rowsum(dO o O) per (b, t, head), float32;
 *   3. dq of the attention: per query row, the visible condensed entries then the exact keys,
 *      P = exp(tau q.k + bias - lse), dP = dO.v, dS = P (dP - delta), dq = tau sum dS k;
 *   4. dk, dv of the exact tokens and dkbar, dvbar of the condensed entries: per key, over the
 *      query rows that see it (exact token s: t in [s, (s/g + 1) g + w - 2]; entry j: t >=
 *      (j + 1) g + w - 1), dv = sum P dO, dk = tau sum dS q;
 *   5. the condensation backward, one block per group: dkbar, dvbar -> dalpha -> the scores ->
 *      the per-group gradient of qbar and the scores' gradient, into the workspace;
 *   6. the float32 sums converted to the input dtype into the caller's dq, dk, dv, adding on
 *      the way the group's terms: dq through qbar, dk through the scores, the pooling (alpha
 *      dkbar, alpha dvbar) and the anchor copy (kbar[d_pool:] = k_anchor[d_pool:]).
 * Steps 3 and 4 run on tensor cores for the shapes attend_bwd_mma.cu covers (on a compute 9.0
 * device by the wgmma kernels of attend_bwd_dq_sm90a.cu and attend_bwd_dkdv_sm90a.cu for
 * 192/128 and 128/128).  There, for the whole backward with groups of 16 or more, the folds
 * reorder them: step 4's condensed entries, step 5, step 4's exact tokens writing the final dk,
 * dv, then step 3 writing the final dq — step 6 inside their epilogues, the same float
 * operations in the same order, so the same bits (LCA_CUDA_DISABLE=dkdv_fold / dq_fold keep
 * the float32 route; _C.cuda_last_bwd_folded() says which ran).  Every
 * output element is written by exactly one thread, sums run in a fixed order: the result is
 * bit-for-bit deterministic (no atomics).  Accumulation in float32. */
#include <algorithm>

#include "bwd.cuh"
#include "mma.cuh"

namespace lca {

constexpr int kBwdWarps = 4;

__device__ __forceinline__ float lse_at(const lca_params &p, int64_t b, int64_t hq, int64_t t) {
    return ((const float *)p.lse.p)[b * p.lse.sb + hq * p.lse.st + t];
}

/* 2. delta[b, hq, t] = dO . O, one warp per row (any width, any alignment) */
template <typename T>
__global__ void __launch_bounds__(32 * kBwdWarps) bwd_delta_kernel(lca_params p, float *delta) {
    const int lane = threadIdx.x & 31;
    const int64_t rowid = (int64_t)blockIdx.x * kBwdWarps + (threadIdx.x >> 5);
    if (rowid >= p.B * p.L * p.H) return;
    const int64_t hq = rowid % p.H, t = (rowid / p.H) % p.L, b = rowid / (p.H * p.L);
    const T *o = row<const T>(p.out, b, t, hq), *d = row<const T>(p.dout, b, t, hq);
    float acc = 0;
    for (int64_t c = lane; c < p.Dv; c += 32) acc += to_f(o[c]) * to_f(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) delta[(b * p.H + hq) * p.L + t] = acc;
}

/* The same with 16-byte loads, for Dv a multiple of 16 bytes and 16-byte aligned rows of out
 * and dout (delta_shape checks): a group of G lanes a row (G = 8, 16, 32), lane l of the group
 * taking the 16-byte chunks l, l + G, ... (NI of them) of both rows, R rows a group at once, all
 * loads issued before the sums; the rows in delta's order (t fastest: a warp's stores are
 * contiguous).  Each lane sums its elements in order with fma, the group then xor-reduces:
 * a fixed order, deterministic. */
template <typename T, int G, int NI>
__global__ void __launch_bounds__(256) bwd_delta_vec_kernel(lca_params p, float *delta) {
    constexpr int E = 16 / sizeof(T), S = 32 / G;      /* elements a chunk, groups a warp */
    constexpr int R = NI >= 4 ? 1 : 4 / NI;            /* R NI chunk pairs in flight a lane */
    const int lane = threadIdx.x & 31, gl = lane % G;
    const int64_t L = p.L, H = p.H, rows = p.B * H * L, nch = p.Dv / E;
    const int64_t r0 = ((int64_t)blockIdx.x * 8 + (threadIdx.x >> 5)) * (S * R);
    if (r0 >= rows) return;                            /* whole warps: the shuffles below */
    /* row r = (b H + hq) L + t of this lane's k-th slot is r0 + k S + lane / G: (b, hq, t) of
       r0 by division once a warp, then stepped */
    int64_t t = r0 % L, hq = r0 / L % H, b = r0 / (L * H);
    auto step = [&](int a) {
        for (t += a; t >= L; t -= L)
            if (++hq == H) hq = 0, b++;
    };
    step(lane / G);
    uint4 uo[R][NI], ud[R][NI];                        /* a slot past the end reads row 0, a */
#pragma unroll                                         /* chunk past the row's end chunk 0 */
    for (int k = 0; k < R; k++) {
        const bool live = b < p.B;
        const T *o = row<const T>(p.out, live ? b : 0, live ? t : 0, live ? hq : 0);
        const T *d = row<const T>(p.dout, live ? b : 0, live ? t : 0, live ? hq : 0);
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int64_t c = gl + i * G < nch ? gl + i * G : 0;
            uo[k][i] = *(const uint4 *)(o + c * E);
            ud[k][i] = *(const uint4 *)(d + c * E);
        }
        if (k + 1 < R) step(S);
    }
#pragma unroll
    for (int k = 0; k < R; k++) {
        float acc = 0;
#pragma unroll
        for (int i = 0; i < NI; i++) {                 /* a chunk past the end: dropped */
            const T *xo = (const T *)&uo[k][i], *xd = (const T *)&ud[k][i];
            float a = acc;
#pragma unroll
            for (int y = 0; y < E; y++) a = fmaf(to_f(xo[y]), to_f(xd[y]), a);
            acc = gl + i * G < nch ? a : acc;
        }
#pragma unroll
        for (int x = G / 2; x > 0; x >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, x);
        const int64_t r = r0 + k * S + lane / G;
        if (gl == 0 && r < rows) delta[r] = acc;
    }
}

/* Host: the vector kernel's lanes a row and chunks a lane for this call (G = 0: the
 * warp-per-row kernel runs) */
template <typename T> inline void delta_shape(const lca_params *p, int &G, int &NI) {
    constexpr int64_t E = 16 / sizeof(T);
    G = NI = 0;
    if (p->Dv % E) return;
    for (const lca_view *v : {&p->out, &p->dout})
        if ((uintptr_t)v->p % 16 || v->sb % E || v->st % E || v->sh % E) return;
    const int64_t nch = p->Dv / E;                     /* at most 1024 / 4 */
    G = nch <= 8 ? 8 : nch <= 16 ? 16 : 32;
    NI = nch <= 32 ? 1 : nch <= 64 ? 2 : nch <= 128 ? 4 : 8;
}

template <typename T> void launch_delta(const lca_params *p, float *delta, cudaStream_t stream) {
    const int64_t rows = p->B * p->L * p->H;
    int G, NI;
    delta_shape<T>(p, G, NI);
    if (G == 0) {
        bwd_delta_kernel<T><<<(unsigned)((rows + kBwdWarps - 1) / kBwdWarps), 32 * kBwdWarps, 0,
                              stream>>>(*p, delta);
        return;
    }
    const int64_t per = 8 * (32 / G) * (NI >= 4 ? 1 : 4 / NI);     /* rows a block */
    const unsigned blocks = (unsigned)((rows + per - 1) / per);
    if (G == 8) bwd_delta_vec_kernel<T, 8, 1><<<blocks, 256, 0, stream>>>(*p, delta);
    else if (G == 16) bwd_delta_vec_kernel<T, 16, 1><<<blocks, 256, 0, stream>>>(*p, delta);
    else if (NI == 1) bwd_delta_vec_kernel<T, 32, 1><<<blocks, 256, 0, stream>>>(*p, delta);
    else if (NI == 2) bwd_delta_vec_kernel<T, 32, 2><<<blocks, 256, 0, stream>>>(*p, delta);
    else if (NI == 4) bwd_delta_vec_kernel<T, 32, 4><<<blocks, 256, 0, stream>>>(*p, delta);
    else bwd_delta_vec_kernel<T, 32, 8><<<blocks, 256, 0, stream>>>(*p, delta);
}

/* 3. dq, one warp per query row (b, t, hq); lane l holds columns l, l + 32, ... */
template <typename T, int C>
__global__ void __launch_bounds__(32 * kBwdWarps) bwd_dq_simt_kernel(lca_params p, BwdWork w) {
    const int lane = threadIdx.x & 31;
    const int64_t rowid = (int64_t)blockIdx.x * kBwdWarps + (threadIdx.x >> 5);
    if (rowid >= p.L * p.H) return;
    const int64_t b = blockIdx.y, t = rowid / p.H, hq = rowid % p.H, h = hq / (p.H / p.Hkv);
    const int D = (int)p.D, Dv = (int)p.Dv;
    const float scale = (float)p.scale;
    float q[C], dO[C], acc[C];
    const T *qr = row<const T>(p.q, b, t, hq), *dr = row<const T>(p.dout, b, t, hq);
#pragma unroll
    for (int c = 0; c < C; c++) {
        q[c] = lane + 32 * c < D ? scale * to_f(qr[lane + 32 * c]) : 0.0f;
        dO[c] = lane + 32 * c < Dv ? to_f(dr[lane + 32 * c]) : 0.0f;
        acc[c] = 0;
    }
    const float lse = lse_at(p, b, hq, t), dl = w.delta[(b * p.H + hq) * p.L + t];
    auto visit = [&](const T *k, const T *v, float bias) {
        float sp = 0, dp = 0;
#pragma unroll
        for (int c = 0; c < C; c++) {
            if (lane + 32 * c < D) sp += q[c] * to_f(k[lane + 32 * c]);
            if (lane + 32 * c < Dv) dp += dO[c] * to_f(v[lane + 32 * c]);
        }
        sp = warp_sum(sp) + bias;
        dp = warp_sum(dp);
        const float ds = expf(sp - lse) * (dp - dl);
#pragma unroll
        for (int c = 0; c < C; c++)
            if (lane + 32 * c < D) acc[c] += ds * to_f(k[lane + 32 * c]);
    };
    const int64_t G = num_condensed(t, p.g, p.w);
    for (int64_t j = 0; j < G; j++)
        visit(row<const T>(p.kbar, b, j, h), row<const T>(p.vbar, b, j, h), (float)p.rep_bias);
    for (int64_t s = G * p.g; s <= t; s++)
        visit(row<const T>(p.k, b, s, h), row<const T>(p.v, b, s, h), 0.0f);
    float *dst = w.dq + ((b * p.L + t) * p.H + hq) * D;
#pragma unroll
    for (int c = 0; c < C; c++)
        if (lane + 32 * c < D) dst[lane + 32 * c] = scale * acc[c];
}

/* 4. dk, dv of one key, one warp per key: keys [0, m) are the condensed entries, [m, m + L) the
 * exact tokens.  Loops over the query rows that see the key, in order. */
template <typename T, int C>
__global__ void __launch_bounds__(32 * kBwdWarps) bwd_dkdv_simt_kernel(lca_params p, BwdWork w) {
    const int lane = threadIdx.x & 31;
    const int64_t key = (int64_t)blockIdx.x * kBwdWarps + (threadIdx.x >> 5);
    const int64_t m = p.m, L = p.L, g = p.g, H = p.H, Hkv = p.Hkv, hg = H / Hkv;
    if (key >= m + L) return;
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const bool cond = key < m;
    const int64_t idx = cond ? key : key - m;
    const int D = (int)p.D, Dv = (int)p.Dv;
    const float scale = (float)p.scale, bias = cond ? (float)p.rep_bias : 0.0f;
    const T *kr = cond ? row<const T>(p.kbar, b, idx, h) : row<const T>(p.k, b, idx, h);
    const T *vr = cond ? row<const T>(p.vbar, b, idx, h) : row<const T>(p.v, b, idx, h);
    float kk[C], vv[C], dk[C], dv[C];
#pragma unroll
    for (int c = 0; c < C; c++) {
        kk[c] = lane + 32 * c < D ? to_f(kr[lane + 32 * c]) : 0.0f;
        vv[c] = lane + 32 * c < Dv ? to_f(vr[lane + 32 * c]) : 0.0f;
        dk[c] = dv[c] = 0;
    }
    int64_t t0, t1;                                   /* the rows that see this key */
    if (cond) {
        t0 = (idx + 1) * g + p.w - 1, t1 = L - 1;
    } else {
        t0 = idx, t1 = (idx / g + 1) * g + p.w - 2;
        if (t1 > L - 1) t1 = L - 1;
    }
    for (int64_t t = t0; t <= t1; t++)
        for (int64_t hq = h * hg; hq < (h + 1) * hg; hq++) {
            const T *qr = row<const T>(p.q, b, t, hq), *dr = row<const T>(p.dout, b, t, hq);
            float qv[C], dO[C], sp = 0, dp = 0;
#pragma unroll
            for (int c = 0; c < C; c++) {
                qv[c] = lane + 32 * c < D ? to_f(qr[lane + 32 * c]) : 0.0f;
                dO[c] = lane + 32 * c < Dv ? to_f(dr[lane + 32 * c]) : 0.0f;
                sp += qv[c] * kk[c];
                dp += dO[c] * vv[c];
            }
            sp = scale * warp_sum(sp) + bias;
            dp = warp_sum(dp);
            const float pr = expf(sp - lse_at(p, b, hq, t));
            const float ds = pr * (dp - w.delta[(b * H + hq) * L + t]);
#pragma unroll
            for (int c = 0; c < C; c++) {
                dv[c] += pr * dO[c];
                dk[c] += ds * qv[c];
            }
        }
    float *dkd = cond ? w.dkb + ((b * m + idx) * Hkv + h) * D : w.dk + ((b * L + idx) * Hkv + h) * D;
    float *dvd = cond ? w.dvb + ((b * m + idx) * Hkv + h) * w.ldv
                      : w.dv + ((b * L + idx) * Hkv + h) * w.ldv;
#pragma unroll
    for (int c = 0; c < C; c++) {
        const int d = lane + 32 * c;
        if (p.v_in_k) {                                /* v = k[:Dv]: one gradient row */
            if (d < D) dkd[d] = scale * dk[c] + (d < Dv ? dv[c] : 0.0f);
        } else {
            if (d < D) dkd[d] = scale * dk[c];
            if (d < Dv) dvd[d] = dv[c];
        }
    }
}

/* 5. the condensation backward of group j of kv head h (SPEC §2/§4 backwards), one block: the
 * per-group terms only — qbar, dscore = tau alpha (dalpha - alpha . dalpha) with dalpha_i =
 * dkbar[:d_pool] . k_i[:d_pool] + dvbar . v_i, and dqbar / (n hg) = sum_i dscore_i k_i[:d_score]
 * / (n hg) — into the workspace; step 6 adds them (and the pooling and anchor terms) to the
 * group's rows as it converts dq, dk, dv, so no float32 gradient is read and written twice.
 * Shared memory: qbar (D floats), dalpha (g), dscore (g). */
constexpr int kCondBwdThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCondBwdThreads) bwd_condense_kernel(lca_params p, BwdWork w) {
    extern __shared__ float sm[];
    const int64_t j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int64_t g = p.g, Hkv = p.Hkv, hg = p.H / Hkv, m = p.m;
    const int64_t D = p.D, Dv = p.Dv, ds = p.d_score, dpool = p.d_pool;
    float *qbar = sm, *dal = sm + D, *dsc = dal + g;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int64_t e = (b * m + j) * Hkv + h;               /* this entry's index */
    const float *alpha = w.alpha + e * g, *dkb = w.dkb + e * D, *dvb = w.dvb + e * w.ldv;
    const float scale = (float)p.scale, inv = 1.0f / (float)(p.n * hg);

    for (int64_t d = tid; d < ds; d += blockDim.x) {        /* qbar, as the forward */
        float acc = 0;                                      /* rows (t, hh), t-major */
        const int nq = (int)(p.n * hg);
#pragma unroll 4
        for (int k = 0; k < nq; k++) {
            const int kt = hg == 1 ? k : k / (int)hg;
            acc += to_f(row<const T>(p.q, b, j * g + g - p.n + kt, h * hg + (k - kt * (int)hg))[d]);
        }
        qbar[d] = acc * inv;
        w.qbar[e * D + d] = acc * inv;
    }
    for (int64_t i = warp; i < g; i += nwarps) {            /* dalpha_i */
        const T *k = row<const T>(p.k, b, j * g + i, h);
        float part = 0;
        for (int64_t d = lane; d < dpool; d += 32) part += dkb[d] * to_f(k[d]);
        if (!p.v_in_k) {
            const T *v = row<const T>(p.v, b, j * g + i, h);
            for (int64_t d = lane; d < Dv; d += 32) part += dvb[d] * to_f(v[d]);
        }
        part = warp_sum(part);
        if (lane == 0) dal[i] = part;
    }
    __syncthreads();
    if (warp == 0) {                                        /* softmax backward */
        float adot = 0;
        for (int64_t i = lane; i < g; i += 32) adot += alpha[i] * dal[i];
        adot = warp_sum(adot);
        for (int64_t i = lane; i < g; i += 32) {
            dsc[i] = scale * alpha[i] * (dal[i] - adot);
            w.dsc[e * g + i] = dsc[i];
        }
    }
    __syncthreads();
    for (int64_t d = tid; d < ds; d += blockDim.x) {        /* dqbar: loads only, pipelined */
        float dqbar = 0;
#pragma unroll 4
        for (int64_t i = 0; i < g; i++) dqbar += dsc[i] * to_f(row<const T>(p.k, b, j * g + i, h)[d]);
        w.dqb[e * D + d] = dqbar * inv;
    }
}

/* The same per-group terms, one warp per (group, kv head, batch) and 16-byte loads, as the
 * forward's lca_condense_warp_kernel (condense.cu): lane l owns columns 8l .. 8l+7 of each
 * 256-column chunk (KC chunks), the summary query and this entry's dkbar, dvbar stay in
 * registers, every lane keeps the g values of dalpha; no shared memory, no block barrier.  For
 * 2-byte types with D, Dv, d_score multiples of 8, g <= 32, 16-byte aligned rows
 * (cond_bwd_warp_chunks checks); LCA_CUDA_DISABLE=cond_warp keeps the block kernel.  GM as
 * the forward's: 3 blocks an SM at GM = 16 and one chunk (80 registers, a few spilled), 0.65
 * ms at 128K against 0.75-0.78. */
template <typename T> __device__ __forceinline__ void ld8(const T *src, float (&x)[8]) {
    const uint4 u = *(const uint4 *)src;
    const T *e = (const T *)&u;
#pragma unroll
    for (int i = 0; i < 8; i++) x[i] = to_f(e[i]);
}

template <typename T, int KC, int GM>
__global__ void __launch_bounds__(256, GM > 16 ? 1 : KC == 1 ? 3 : 2)
    bwd_condense_warp_kernel(lca_params p, BwdWork w, int heads_first) {
    const int lane = threadIdx.x & 31;
    const int64_t m = p.m, Hkv = p.Hkv;
    const int64_t item = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (item >= m * Hkv * p.B) return;
    int64_t j, h, b;
    cond_item(item, m, Hkv, heads_first, &j, &h, &b);
    const int64_t g = p.g, hg = p.H / Hkv, ds = p.d_score, dpool = p.d_pool, D = p.D, Dv = p.Dv;
    const int64_t t0 = j * g, e = (b * m + j) * Hkv + h;   /* this entry's index */
    const float scale = (float)p.scale, inv = 1.0f / (float)(p.n * hg);

    /* qbar, as the forward (rows (t, hh) t-major, 8 loads in flight), kept and written out */
    float qb[KC][8];
    const int nq = (int)(p.n * hg);
#pragma unroll
    for (int k = 0; k < KC; k++)
#pragma unroll
        for (int x = 0; x < 8; x++) qb[k][x] = 0;
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
                for (int y = 0; y < 8; y++) qb[k][y] += to_f(x[y]);
            }
        }
    }
    /* this entry's gradients, dkbar masked to the pooled columns */
    float dk[KC][8], dv[KC][8];
#pragma unroll
    for (int k = 0; k < KC; k++) {
        const int64_t c = 256 * k + 8 * lane;
#pragma unroll
        for (int y = 0; y < 8; y++) {
            qb[k][y] *= inv;
            dk[k][y] = c + y < dpool ? w.dkb[e * D + c + y] : 0.0f;
            dv[k][y] = !p.v_in_k && c + y < Dv ? w.dvb[e * w.ldv + c + y] : 0.0f;
        }
        if (c < ds) {
            float *qd = w.qbar + e * D + c;
            *(float4 *)qd = make_float4(qb[k][0], qb[k][1], qb[k][2], qb[k][3]);
            *(float4 *)(qd + 4) = make_float4(qb[k][4], qb[k][5], qb[k][6], qb[k][7]);
        }
    }

    /* dalpha_i = dkbar[:d_pool] . k_i[:d_pool] + dvbar . v_i, 8 rows at a time */
    float dal[GM];
#pragma unroll
    for (int i0 = 0; i0 < GM; i0 += 8) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (i0 < g) {
#pragma unroll
            for (int k = 0; k < KC; k++) {
                const int64_t c = 256 * k + 8 * lane;
                if (c < dpool) {
                    uint4 u[8];
#pragma unroll
                    for (int r = 0; r < 8; r++)
                        u[r] = i0 + r < g
                                   ? *(const uint4 *)(row<const T>(p.k, b, t0 + i0 + r, h) + c)
                                   : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int r = 0; r < 8; r++) {
                        const T *x = (const T *)&u[r];
#pragma unroll
                        for (int y = 0; y < 8; y++) part[r] = fmaf(dk[k][y], to_f(x[y]), part[r]);
                    }
                }
                if (!p.v_in_k && c < Dv) {
                    uint4 u[8];
#pragma unroll
                    for (int r = 0; r < 8; r++)
                        u[r] = i0 + r < g
                                   ? *(const uint4 *)(row<const T>(p.v, b, t0 + i0 + r, h) + c)
                                   : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int r = 0; r < 8; r++) {
                        const T *x = (const T *)&u[r];
#pragma unroll
                        for (int y = 0; y < 8; y++) part[r] = fmaf(dv[k][y], to_f(x[y]), part[r]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 8; r++) dal[i0 + r] = i0 + r < g ? warp_sum(part[r]) : 0.0f;
    }

    /* softmax backward: dscore_i = tau alpha_i (dalpha_i - alpha . dalpha); lane i writes i */
    const float amine = lane < g ? w.alpha[e * g + lane] : 0.0f;
    float adot = 0;
#pragma unroll
    for (int i = 0; i < GM; i++) adot = fmaf(__shfl_sync(0xffffffffu, amine, i), dal[i], adot);
    float dsc[GM], mine = 0;
#pragma unroll
    for (int i = 0; i < GM; i++) {
        dsc[i] = scale * __shfl_sync(0xffffffffu, amine, i) * (dal[i] - adot);
        if (i == lane) mine = dsc[i];
    }
    if (lane < g) w.dsc[e * g + lane] = mine;

    /* dqbar / (n hg) = sum_i dscore_i k_i[:d_score] / (n hg) */
#pragma unroll
    for (int k = 0; k < KC; k++) {
        const int64_t c = 256 * k + 8 * lane;
        if (c >= ds) continue;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
        for (int i0 = 0; i0 < GM; i0 += 8) {
            if (i0 >= g) break;
            uint4 u[8];
#pragma unroll
            for (int r = 0; r < 8; r++)
                u[r] = i0 + r < g ? *(const uint4 *)(row<const T>(p.k, b, t0 + i0 + r, h) + c)
                                  : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                const T *x = (const T *)&u[r];
#pragma unroll
                for (int y = 0; y < 8; y++) acc[y] = fmaf(dsc[i0 + r], to_f(x[y]), acc[y]);
            }
        }
        float *dd = w.dqb + e * D + c;
        *(float4 *)dd = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
        *(float4 *)(dd + 4) = make_float4(acc[4] * inv, acc[5] * inv, acc[6] * inv, acc[7] * inv);
    }
}

/* Host: the warp kernel's column chunks for this call (0: the block kernel runs) */
inline int cond_bwd_warp_chunks(const lca_params *p) {
    if ((p->dtype != LCA_BF16 && p->dtype != LCA_F16) || p->g > 32 || kernel_disabled("cond_warp"))
        return 0;
    const int64_t Dv = p->v_in_k ? 8 : p->Dv;
    if (p->D % 8 || Dv % 8 || p->d_score % 8 || p->D > 768 || Dv > 768) return 0;
    const lca_view *vs[] = {&p->q, &p->k, &p->v};
    if (!rows_aligned16(vs)) return 0;
    if ((p->m * p->Hkv * p->B + 7) / 8 >= 2147483647) return 0;             /* grid */
    const int64_t w = p->D > Dv ? p->D : Dv;
    return (int)((w + 255) / 256);
}

/* 6. a contiguous float32 (B, L, Hn, W) gradient into a strided view in the input dtype, one
 * block per position (b, t), a warp per head row, lanes over the columns, with the
 * condensation's terms for the rows of the groups (t < m g):  MODE 0 (dq): + dqbar / (n hg) on
 * the group's last n rows, columns < d_score;  MODE 1 (dk): + alpha_i dkbar (columns < d_pool;
 * the anchor copies dkbar above) + dscore_i qbar (columns < d_score);  MODE 2 (dv): + alpha_i
 * dvbar.  With p.m = 0 no row has a term: a plain conversion. */
constexpr int kConvWarps = 8;

/* four elements from float32 into T at d (aligned to 4 elements) */
template <typename T> __device__ __forceinline__ void store4(T *d, float4 x) {
    if constexpr (sizeof(T) == 4) {
        *(float4 *)d = x;
    } else {
        uint2 u;
        T *e = (T *)&u;
        e[0] = from_f<T>(x.x), e[1] = from_f<T>(x.y), e[2] = from_f<T>(x.z), e[3] = from_f<T>(x.w);
        *(uint2 *)d = u;
    }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(32 * kConvWarps) bwd_finish_kernel(lca_params p, BwdWork w,
                                                                     const float *src, lca_view dst,
                                                                     int Hn, int W) {
    const int lane = threadIdx.x & 31;
    const uint32_t L = (uint32_t)p.L, bt = blockIdx.x, bu = bt / L, tu = bt - bu * L;
    const int64_t g = p.g, m = p.m, D = p.D, ds = p.d_score, dpool = p.d_pool, b = bu, t = tu;
    const int64_t j = m > 0 ? (int64_t)(tu / (uint32_t)g) : 0, i = t - j * g;
    const bool grp = j < m;
    for (int h = threadIdx.x >> 5; h < Hn; h += blockDim.x >> 5) {
        T *d = row<T>(dst, b, t, h);
        const float *s = src + ((int64_t)bt * Hn + h) * W;
        const int64_t e = (b * m + j) * p.Hkv + (MODE == 0 ? h / (int)(p.H / p.Hkv) : h);
        /* the condensation's term of column c (0 for a row outside the groups) */
        auto term = [&](int c) -> float {
            if (!grp) return 0.0f;
            if (MODE == 0) return i >= g - p.n && c < ds ? w.dqb[e * D + c] : 0.0f;
            if (MODE == 1) {
                const float *kb = w.dkb + e * D;
                float add = c < dpool ? w.alpha[e * g + i] * kb[c]                /* pool */
                                      : (w.anchor[e] == i ? kb[c] : 0.0f);        /* anchor */
                if (c < ds) add += w.dsc[e * g + i] * w.qbar[e * D + c];          /* scores */
                return add;
            }
            return w.alpha[e * g + i] * w.dvb[e * w.ldv + c];
        };
        if (W % 4 == 0 && (uintptr_t)d % (4 * sizeof(T)) == 0) {   /* 4 columns a lane */
            for (int c = 4 * lane; c < W; c += 128) {
                float4 x = *(const float4 *)(s + c);
                x.x += term(c), x.y += term(c + 1), x.z += term(c + 2), x.w += term(c + 3);
                store4(d + c, x);
            }
        } else {
            for (int c = lane; c < W; c += 32) d[c] = from_f<T>(s[c] + term(c));
        }
    }
}

__host__ __device__ constexpr int finish_rows(int kc) { return kc >= 4 ? 1 : 4 / kc; }

/* store4 with the pairs packed by one conversion each (the same rounding, to nearest even) and
 * one 8-byte store (__stwb: a plain store, which the compiler cannot split in two 4-byte ones,
 * as it does store4's) */
template <typename T> __device__ __forceinline__ void store4_packed(T *d, float4 x) {
    if constexpr (sizeof(T) == 4) *(float4 *)d = x;
    else __stwb((uint2 *)d, make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w)));
}

/* The same conversion with more bytes in flight, for W a multiple of 4 and the rows of dst on 4
 * elements (finish_chunks checks): a warp takes R = 4 / KC consecutive rows (b, t, h) (1 at
 * KC = 8), lane l columns 4 l + 128 k (k < KC) of each, and loads all its R KC float4 of src
 * (and of the term's vectors on the groups' rows) before any store; a row's scalars (alpha_i,
 * the anchor, dscore_i) are read once, the position is stepped, not divided, from row to row.
 * (8 float4 a lane in flight instead of 4 cost more registers than they bring: one block an
 * SM in MODE 1.)  Each element gets the same float operations as in bwd_finish_kernel —
 * written out as intrinsics so that no contraction is left to the compiler: there a product
 * added to s contracts into one fma only in MODE 2 — so the bits are the same.
 * LCA_CUDA_DISABLE=finish_vec: bwd_finish_kernel. */
template <typename T, int MODE, int KC>
__global__ void __launch_bounds__(32 * kConvWarps)
    bwd_finish_vec_kernel(lca_params p, BwdWork w, const float *__restrict__ src, lca_view dst,
                          int Hn, int W) {
    constexpr int R = finish_rows(KC);
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.B * p.L * Hn;
    const int64_t r0 = ((int64_t)blockIdx.x * kConvWarps + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    const int64_t g = p.g, m = p.m, D = p.D, ds = p.d_score, dpool = p.d_pool;
    const int hg = (int)(p.H / p.Hkv);
    /* row r0's position (b, t) and head h, then stepped (B L < 2^31: 32 bits) */
    const int64_t bt0 = r0 / Hn;
    int h = (int)(r0 - bt0 * Hn);
    uint32_t t = (uint32_t)(bt0 % p.L), b = (uint32_t)(bt0 / p.L);
    float4 x[R][KC], u[R][KC], v[R][KC];              /* src, the term's vectors */
    T *d[R];
    float ra[R], rd[R];                                /* alpha_i, dscore_i */
    bool live[R], grp[R], on[R];                       /* on: MODE 0's term rows; MODE 1 anchor */
#pragma unroll
    for (int k = 0; k < R; k++) {
        live[k] = b < (uint32_t)p.B;
        const int64_t bt = live[k] ? (int64_t)b * p.L + t : 0;    /* a dead row reads row 0 */
        const int hh = live[k] ? h : 0;
        d[k] = row<T>(dst, b, t, h);
        const float *s = src + (bt * Hn + hh) * W;
#pragma unroll
        for (int q = 0; q < KC; q++) {
            const int c = 4 * lane + 128 * q;
            x[k][q] = *(const float4 *)(s + (c < W ? c : 0));
        }
        const int64_t j = m > 0 ? (int64_t)(t / (uint32_t)g) : 0, i = (int64_t)t - j * g;
        const int64_t e = ((int64_t)b * m + j) * p.Hkv + (MODE == 0 ? h / hg : h);
        grp[k] = live[k] && j < m;
        on[k] = false, ra[k] = rd[k] = 0.0f;
        if (grp[k]) {                                  /* warp-uniform */
            if (MODE == 0) on[k] = i >= g - p.n;
            if (MODE == 1) on[k] = w.anchor[e] == i;
            if (MODE != 0) ra[k] = w.alpha[e * g + i];
            if (MODE == 1) rd[k] = w.dsc[e * g + i];
            const float *a = MODE == 0 ? w.dqb + e * D : MODE == 1 ? w.dkb + e * D
                                                                   : w.dvb + e * w.ldv;
#pragma unroll
            for (int q = 0; q < KC; q++) {
                const int c = 4 * lane + 128 * q, cc = c < W ? c : 0;
                if (MODE != 0 || on[k]) u[k][q] = *(const float4 *)(a + cc);
                if (MODE == 1 && cc < ds) v[k][q] = *(const float4 *)(w.qbar + e * D + cc);
            }
        }
        if (k + 1 < R && ++h == Hn) {
            h = 0;
            if (++t == (uint32_t)p.L) t = 0, b++;
        }
    }
#pragma unroll
    for (int k = 0; k < R; k++) {
        if (!live[k]) break;
#pragma unroll
        for (int q = 0; q < KC; q++) {
            const int c = 4 * lane + 128 * q;
            if (c >= W) break;
            float *xs = (float *)&x[k][q];
            const float *us = (const float *)&u[k][q], *vs = (const float *)&v[k][q];
#pragma unroll
            for (int y = 0; y < 4; y++) {
                const int cy = c + y;
                if (!grp[k]) {
                    xs[y] = __fadd_rn(xs[y], 0.0f);
                } else if (MODE == 0) {
                    xs[y] = __fadd_rn(xs[y], on[k] && cy < ds ? us[y] : 0.0f);
                } else if (MODE == 1) {
                    float add = cy < dpool ? __fmul_rn(ra[k], us[y]) : (on[k] ? us[y] : 0.0f);
                    if (cy < ds) add = __fmaf_rn(rd[k], vs[y], add);
                    xs[y] = __fadd_rn(xs[y], add);
                } else {
                    xs[y] = __fmaf_rn(ra[k], us[y], xs[y]);
                }
            }
            store4_packed(d[k] + c, x[k][q]);
        }
    }
}

/* Host: the vector kernel's column chunks a lane for this conversion (0: bwd_finish_kernel) */
template <typename T>
inline int finish_chunks(const lca_params *p, const lca_view &dst, int64_t Hn, int64_t W) {
    if (W % 4 || W > 1024 || kernel_disabled("finish_vec")) return 0;
    if (!rows_on(dst, p->B, p->L, Hn, 4 * sizeof(T), sizeof(T))) return 0;
    const int kc = W <= 128 ? 1 : W <= 256 ? 2 : W <= 512 ? 4 : 8;
    const int64_t per = kConvWarps * finish_rows(kc);  /* rows a block */
    if ((p->B * p->L * Hn + per - 1) / per > 2147483647) return 0;
    return kc;
}

/* B L < 2^31 (the entry checks it) */
template <typename T, int MODE>
void finish(const lca_params *p, const BwdWork *w, const float *src, const lca_view &dst,
            int64_t Hn, int64_t W, cudaStream_t stream) {
    if (p->B * p->L == 0 || Hn == 0 || W == 0) return;
    const int kc = finish_chunks<T>(p, dst, Hn, W);
    if (kc == 0) {                                     /* one block per position */
        const int warps = Hn < kConvWarps ? (int)Hn : kConvWarps;
        bwd_finish_kernel<T, MODE><<<(unsigned)(p->B * p->L), 32 * warps, 0, stream>>>(
            *p, *w, src, dst, (int)Hn, (int)W);
        return;
    }
    const int64_t per = kConvWarps * finish_rows(kc);
    const unsigned blocks = (unsigned)((p->B * p->L * Hn + per - 1) / per);
    auto go = [&](auto kernel) {
        kernel<<<blocks, 32 * kConvWarps, 0, stream>>>(*p, *w, src, dst, (int)Hn, (int)W);
    };
    if (kc == 1) go(bwd_finish_vec_kernel<T, MODE, 1>);
    else if (kc == 2) go(bwd_finish_vec_kernel<T, MODE, 2>);
    else if (kc == 4) go(bwd_finish_vec_kernel<T, MODE, 4>);
    else go(bwd_finish_vec_kernel<T, MODE, 8>);
}

/* The reverse of a plain finish: a strided (B, rows, Hn, W) view in the input dtype into a
 * contiguous float32 buffer, one block per (b, row) (B rows < 2^31: the entry checks it). */
template <typename T>
__global__ void __launch_bounds__(32 * kConvWarps) bwd_load_kernel(lca_view src, float *dst,
                                                                   uint32_t rows, int Hn, int W) {
    const int lane = threadIdx.x & 31;
    const uint32_t bj = blockIdx.x, b = bj / rows, j = bj - b * rows;
    for (int h = threadIdx.x >> 5; h < Hn; h += blockDim.x >> 5) {
        const T *s = row<const T>(src, b, j, h);
        float *d = dst + ((int64_t)bj * Hn + h) * W;
        for (int c = lane; c < W; c += 32) d[c] = to_f(s[c]);
    }
}

template <typename T>
void load(const lca_params *p, const lca_view &src, float *dst, int64_t Hn, int64_t W,
          cudaStream_t stream) {
    if (p->B * p->m == 0 || Hn == 0 || W == 0) return;
    const int warps = Hn < kConvWarps ? (int)Hn : kConvWarps;
    bwd_load_kernel<T><<<(unsigned)(p->B * p->m), 32 * warps, 0, stream>>>(
        src, dst, (uint32_t)p->m, (int)Hn, (int)W);
}

template <int C, typename T>
void launch_simt(const lca_params *p, const BwdWork *w, cudaStream_t stream) {
    const dim3 gq((unsigned)((p->L * p->H + kBwdWarps - 1) / kBwdWarps), (unsigned)p->B);
    bwd_dq_simt_kernel<T, C><<<gq, 32 * kBwdWarps, 0, stream>>>(*p, *w);
    const dim3 gk((unsigned)((p->m + p->L + kBwdWarps - 1) / kBwdWarps), (unsigned)p->Hkv,
                  (unsigned)p->B);
    bwd_dkdv_simt_kernel<T, C><<<gk, 32 * kBwdWarps, 0, stream>>>(*p, *w);
}

/* What an entry computes: the whole SPEC §5 backward (lca_cuda_attention_bwd), attend's alone
 * with the condensed entries given (lca_cuda_attend_bwd: steps 2-4, no condensation terms, the
 * entries' gradients out), or the condensation's alone with their gradients given
 * (lca_cuda_condense_bwd: step 5 and the terms of step 6 on zero base gradients). */
enum Part { kWhole, kAttend, kCondense };

/* The dq kernel the last backward call launched (lca_cuda_last_bwd_dq_kernel): evidence for the
 * tests that a call took the fast path. */
static const char *last_bwd_dq_kernel = "";
static int last_bwd_folded = 0;         /* lca_cuda_last_bwd_folded */

template <typename T> struct Bwd {
    static int run(const lca_params *p, const BwdWork *w, Part part, int mma,
                   const lca_view *dkbar, const lca_view *dvbar, int device,
                   cudaStream_t stream) {
        int folded = 0;                    /* LCA_FOLD_*: what runs after step 5 (below) */
        last_bwd_folded = 0;
        if (part != kCondense && p->L > 0) {
            launch_delta<T>(p, w->delta, stream);
            if (mma) {
                const int s = lca_cuda_bwd_mma(p, w, device, stream, part == kWhole, &folded);
                if (s != LCA_OK) return s;
                last_bwd_dq_kernel = lca_cuda_bwd_mma_dq_kernel();
            } else {
                last_bwd_dq_kernel = "simt";
                const int64_t width = p->D > p->Dv ? p->D : p->Dv;
                if (width <= 128) launch_simt<4, T>(p, w, stream);
                else if (width <= 256) launch_simt<8, T>(p, w, stream);
                else if (width <= 576) launch_simt<18, T>(p, w, stream);
                else launch_simt<32, T>(p, w, stream);
            }
        }
        if (part == kAttend) {             /* the entries' gradients: B m rows as B "L" rows */
            if (p->L == 0) {               /* no query: zeros */
                const size_t n = sizeof(float) * (size_t)(p->B * p->m * p->Hkv);
                cudaError_t e = cudaMemsetAsync(w->dkb, 0, n * (size_t)p->D, stream);
                if (e == cudaSuccess && !p->v_in_k)
                    e = cudaMemsetAsync(w->dvb, 0, n * (size_t)p->Dv, stream);
                if (e != cudaSuccess) return LCA_ERR_CUDA;
            }
            lca_params pe = *p;
            pe.L = p->m, pe.m = 0;
            finish<T, 1>(&pe, w, w->dkb, *dkbar, p->Hkv, p->D, stream);
            if (!p->v_in_k) finish<T, 2>(&pe, w, w->dvb, *dvbar, p->Hkv, p->Dv, stream);
            pe = *p;                       /* and dq, dk, dv with no condensation term */
            pe.m = 0;
            finish_grads(&pe, w, stream);
            return LCA_OK;
        }
        if (part == kCondense) {           /* zero base gradients, the entries' given ones */
            const int64_t BL = p->B * p->L;
            cudaError_t e = cudaMemsetAsync(w->dq, 0, sizeof(float) * BL * p->H * p->D, stream);
            if (e == cudaSuccess)
                e = cudaMemsetAsync(w->dk, 0, sizeof(float) * BL * p->Hkv * p->D, stream);
            if (e == cudaSuccess && !p->v_in_k)
                e = cudaMemsetAsync(w->dv, 0, sizeof(float) * BL * p->Hkv * p->Dv, stream);
            if (e != cudaSuccess) return LCA_ERR_CUDA;
            load<T>(p, *dkbar, w->dkb, p->Hkv, p->D, stream);
            if (!p->v_in_k) load<T>(p, *dvbar, w->dvb, p->Hkv, p->Dv, stream);
        }
        if (p->m > 0) {
            const unsigned warps = (unsigned)((p->m * p->Hkv * p->B + 7) / 8);
            int kc = 0;                    /* the warp kernel's chunks (2-byte types only) */
            if constexpr (sizeof(T) == 2) {
                kc = cond_bwd_warp_chunks(p);
                const int hf = cond_heads_first();
                auto *kern = p->g <= 16 ? (kc == 1   ? bwd_condense_warp_kernel<T, 1, 16>
                                           : kc == 2 ? bwd_condense_warp_kernel<T, 2, 16>
                                                     : bwd_condense_warp_kernel<T, 3, 16>)
                                        : (kc == 1   ? bwd_condense_warp_kernel<T, 1, 32>
                                           : kc == 2 ? bwd_condense_warp_kernel<T, 2, 32>
                                                     : bwd_condense_warp_kernel<T, 3, 32>);
                if (kc) kern<<<warps, 256, 0, stream>>>(*p, *w, hf);
            }
            if (kc == 0) {
                const dim3 grid((unsigned)p->m, (unsigned)p->Hkv, (unsigned)p->B);
                const size_t smem = sizeof(float) * (size_t)(p->D + 2 * p->g);
                bwd_condense_kernel<T><<<grid, kCondBwdThreads, smem, stream>>>(*p, *w);
            }
        }
#ifndef LCA_NO_SM90A
        if (folded) {                      /* the exact blocks write the final dk and dv */
            int s = lca_cuda_bwd_dkdv_wgmma(p, w, stream, kDkdvExactFold);
            if (s != LCA_OK) return s == LCA_BWD_NOT_HANDLED ? LCA_ERR_CUDA : s;
            if (folded & LCA_FOLD_DQ) {    /* and the dq kernel the final dq */
                s = lca_cuda_bwd_dq_wgmma(p, w, stream, 1);
                if (s != LCA_OK) return s == LCA_BWD_NOT_HANDLED ? LCA_ERR_CUDA : s;
            } else {
                finish<T, 0>(p, w, w->dq, p->dq, p->H, p->D, stream);
            }
            last_bwd_folded = folded;
            return LCA_OK;
        }
#endif
        finish_grads(p, w, stream);
        return LCA_OK;
    }

    static void finish_grads(const lca_params *p, const BwdWork *w, cudaStream_t stream) {
        finish<T, 0>(p, w, w->dq, p->dq, p->H, p->D, stream);
        finish<T, 1>(p, w, w->dk, p->dk, p->Hkv, p->D, stream);
        if (!p->v_in_k) finish<T, 2>(p, w, w->dv, p->dv, p->Hkv, p->Dv, stream);
    }
};

/* The workspace layout: fills w from base (when base is not NULL), returns its size in bytes.
 * Every buffer starts on a 256-byte boundary.  Rows of condensed entries: L / g, or p->m when
 * more (the entries given to lca_cuda_attend_bwd). */
int64_t carve(const lca_params *p, char *base, BwdWork *w) {
    const int64_t B = p->B, L = p->L, H = p->H, Hkv = p->Hkv, D = p->D, Dv = p->Dv, g = p->g;
    const int64_t m = std::max(p->m, g > 0 ? L / g : 0), vin = p->v_in_k;
    const int64_t esz = p->dtype == LCA_F32 ? 4 : 2;
    int64_t off = 0;
    auto take = [&](int64_t bytes) {
        char *at = base ? base + off : nullptr;
        off += (bytes + 255) / 256 * 256;
        return at;
    };
    w->dq = (float *)take(4 * B * L * H * D);
    w->dk = (float *)take(4 * B * L * Hkv * D);
    w->dv = vin ? w->dk : (float *)take(4 * B * L * Hkv * Dv);
    w->dkb = (float *)take(4 * B * m * Hkv * D);
    w->dvb = vin ? w->dkb : (float *)take(4 * B * m * Hkv * Dv);
    w->delta = (float *)take(4 * B * H * L);
    w->alpha = (float *)take(4 * B * m * Hkv * g);
    w->anchor = (int32_t *)take(4 * B * m * Hkv);
    w->kbar = take(esz * B * m * Hkv * D);
    w->vbar = vin ? w->kbar : take(esz * B * m * Hkv * Dv);
    w->qbar = (float *)take(4 * B * m * Hkv * D);
    w->dqb = (float *)take(4 * B * m * Hkv * D);
    w->dsc = (float *)take(4 * B * m * Hkv * g);
    w->ldv = vin ? D : Dv;
    return off;
}

}  // namespace lca

extern "C" const char *lca_cuda_last_bwd_dq_kernel(void) { return lca::last_bwd_dq_kernel; }
extern "C" int lca_cuda_last_bwd_folded(void) { return lca::last_bwd_folded; }

extern "C" int64_t lca_cuda_bwd_workspace(const lca_params *p) {
    lca::BwdWork w;
    return lca::carve(p, nullptr, &w);
}

namespace lca {

/* What the three entries share: the shapes the kernels cover, the workspace (carved into w),
 * and the launch, each kernel on `stream` in order; `what` starts the messages.  p->m rows of
 * condensed entries (L / g, or the given rows); for kCondense the condensation is recomputed
 * into the workspace first (step 1), as for kWhole. */
int backward(const lca_params *p0, Part part, const lca_view *dkbar, const lca_view *dvbar,
             void *workspace, int64_t workspace_bytes, int device, void *stream, char *err,
             int errlen, const char *what) {
    if (p0->B == 0 || (p0->L == 0 && (part != kAttend || p0->m == 0))) return LCA_OK;
    if (p0->D > 1024 || p0->Dv > 1024) {
        snprintf(err, (size_t)errlen, "%s: head widths D=%lld, Dv=%lld; the CUDA engine "
                 "supports up to 1024", what, (long long)p0->D, (long long)p0->Dv);
        return LCA_ERR_UNSUPPORTED;
    }
    if (part != kAttend && p0->D + 2 * p0->g > 12288) {   /* bwd_condense_kernel's smem */
        snprintf(err, (size_t)errlen, "%s: head width + 2 group_size = %lld exceeds 12288 "
                 "(shared memory)", what, (long long)(p0->D + 2 * p0->g));
        return LCA_ERR_UNSUPPORTED;
    }
    const int64_t m = p0->m;
    if ((p0->B * p0->L * p0->H + kBwdWarps - 1) / kBwdWarps > 2147483647 ||
        (m + p0->L + kBwdWarps - 1) / kBwdWarps > 2147483647 || p0->B * p0->L > 2147483647 ||
        p0->B * m > 2147483647 || m > 2147483647 || p0->B > 65535 || p0->Hkv > 65535) {
        snprintf(err, (size_t)errlen, "%s: grid too large (B = %lld, L = %lld, H = %lld, Hkv = "
                 "%lld, condensed rows %lld)", what, (long long)p0->B, (long long)p0->L,
                 (long long)p0->H, (long long)p0->Hkv, (long long)m);
        return LCA_ERR_UNSUPPORTED;
    }
    lca_params p = *p0;
    BwdWork w;
    const int64_t need = carve(&p, nullptr, &w);
    if (workspace_bytes < need || (uintptr_t)workspace % 256) {
        snprintf(err, (size_t)errlen, "%s: workspace of %lld bytes at %p; needs %lld bytes, "
                 "256-byte aligned", what, (long long)workspace_bytes, workspace,
                 (long long)need);
        return LCA_ERR_ARG;
    }
    carve(&p, (char *)workspace, &w);
    DeviceGuard guard(device);
    if (guard.status != cudaSuccess) return cuda_error(guard.status, "cudaSetDevice", err, errlen);
    cudaStream_t s = (cudaStream_t)stream;
    if (part == kWhole && p.alpha.p) {   /* 1. the forward's condensation, given (lca.h) */
        w.alpha = (float *)p.alpha.p;
        w.anchor = (int32_t *)p.anchor.p;
        if (p.v_in_k) p.vbar = p.kbar;
    } else if (part != kAttend) {  /* 1. the condensation the forward used, into the workspace */
        const int64_t D = p.D, Dv = p.Dv, Hkv = p.Hkv;
        p.kbar = lca_view{w.kbar, m * Hkv * D, Hkv * D, D};
        p.vbar = p.v_in_k ? p.kbar : lca_view{w.vbar, m * Hkv * Dv, Hkv * Dv, Dv};
        if (m > 0) {
            lca_params pc = p;
            pc.anchor = lca_view{w.anchor, m * Hkv, Hkv, 1};
            pc.alpha = lca_view{w.alpha, m * Hkv * p.g, Hkv * p.g, p.g};
            const int st = lca_cuda_condense(&pc, device, stream, err, errlen);
            if (st != LCA_OK) return st;
        }
    }
    const int mma = part != kCondense && !kernel_disabled("mma") &&
                    lca_cuda_bwd_mma_supported(&p, device);
    int st;
    switch (p.dtype) {
    case LCA_F32: st = Bwd<float>::run(&p, &w, part, mma, dkbar, dvbar, device, s); break;
    case LCA_F16: st = Bwd<__half>::run(&p, &w, part, mma, dkbar, dvbar, device, s); break;
    case LCA_BF16: st = Bwd<__nv_bfloat16>::run(&p, &w, part, mma, dkbar, dvbar, device, s); break;
    default:
        snprintf(err, (size_t)errlen, "%s: unsupported dtype", what);
        return LCA_ERR_UNSUPPORTED;
    }
    if (st != LCA_OK) {
        cudaError_t e = cudaGetLastError();        /* report it here, not at a later launch */
        snprintf(err, (size_t)errlen, "%s: kernel setup failed (%s)", what,
                 e != cudaSuccess ? cudaGetErrorString(e) : "status");
        return st;
    }
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LCA_OK : cuda_error(e, what, err, errlen);
}

}  // namespace lca

extern "C" int lca_cuda_attention_bwd(const lca_params *p0, void *workspace,
                                      int64_t workspace_bytes, int device, void *stream,
                                      char *err, int errlen) {
    lca_params p = *p0;
    p.m = p.L / p.g;
    return lca::backward(&p, lca::kWhole, nullptr, nullptr, workspace, workspace_bytes, device,
                         stream, err, errlen, "attention backward on CUDA");
}

extern "C" int lca_cuda_attend_bwd(const lca_params *p, const lca_view *dkbar,
                                   const lca_view *dvbar, void *workspace,
                                   int64_t workspace_bytes, int device, void *stream, char *err,
                                   int errlen) {
    return lca::backward(p, lca::kAttend, dkbar, dvbar, workspace, workspace_bytes, device,
                         stream, err, errlen, "attend backward on CUDA");
}

extern "C" int lca_cuda_condense_bwd(const lca_params *p0, const lca_view *dkbar,
                                     const lca_view *dvbar, void *workspace,
                                     int64_t workspace_bytes, int device, void *stream, char *err,
                                     int errlen) {
    lca_params p = *p0;
    p.m = p.L / p.g;
    return lca::backward(&p, lca::kCondense, dkbar, dvbar, workspace, workspace_bytes, device,
                         stream, err, errlen, "condensation backward on CUDA");
}
