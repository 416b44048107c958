"""LCA forward and backward in vectorised NumPy: the baseline bench_cpu.py times the C engine against.

This is the same math as lca.reference (SPEC §2-§5), written the way a researcher would with NumPy
alone: dtype-generic (float32 for the benchmark, float64 for the self-check), condensation
vectorised over groups, attention chunked over query blocks so that memory stays bounded (no L x L
buffers) and every heavy step is one BLAS-backed matmul.  It is a benchmark baseline and a second
implementation to cross-check against, not part of the library.

Shapes (the batch dim is required here):
    MLA: q (B, L, H, Dc+Dr), c (B, L, Dc), r (B, L, Dr)       -> out (B, L, H, Dc),  lse (B, H, L)
    GQA: q (B, L, H, D),     k (B, L, Hkv, D), v (B, L, Hkv, Dv) -> out (B, L, H, Dv), lse (B, H, L)

Internally MLA is GQA with one kv head whose key is [c; r] and whose value is c; the two variants
differ only in which key dims are pooled (d_pool) and which are copied from the anchor:
    MLA: keys [:Dc] pooled, [Dc:] anchor      GQA "anchor": all anchor      GQA "pool": all pooled
and in which key dims the summary score uses (d_score: Dc+Dr, or Dc for score="latent").

    python3 benchmarks/numpy_lca.py          runs the self-check (see self_check below)
"""
import importlib.util
import os

import numpy as np

CHUNK = 128          # query positions per attention block (128 and 256 time about the same)


# ---------------------------------------------------------------------------------------------
# condensation, SPEC §2 / §4 (vectorised over all groups at once)

def _grouped(x, g, m):
    """(B, L, ...) -> (B, m, g, ...): the complete groups."""
    return x[:, :m * g].reshape(x.shape[0], m, g, *x.shape[2:])


def _condense(q, k, v, g, n, scale, d_score, d_pool):
    """kbar (B,m,Hkv,D), vbar (B,m,Hkv,Dv), anchor (B,m,Hkv), alpha (B,m,Hkv,g), qbar (B,m,Hkv,D)."""
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    m, hg = L // g, H // Hkv
    # q̄: mean of the group's last n queries over the hg query heads sharing each kv head
    qg = q[:, :m * g].reshape(B, m, g, Hkv, hg, D)
    qbar = qg[:, :, g - n:].mean(axis=(2, 4))                                   # (B,m,Hkv,D)
    kg, vg = _grouped(k, g, m), _grouped(v, g, m)                              # (B,m,g,Hkv,.)
    # s = τ q̄·k over the score dims; α = softmax over the group's g tokens
    s = np.einsum("bmgkd,bmkd->bmkg", kg[..., :d_score], qbar[..., :d_score]) * scale
    alpha = np.exp(s - s.max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    anchor = alpha.argmax(-1)                                  # first index of the maximum
    vbar = np.einsum("bmkg,bmgkd->bmkd", alpha, vg)
    kbar = np.empty((B, m, Hkv, D), q.dtype)
    kbar[..., :d_pool] = np.einsum("bmkg,bmgkd->bmkd", alpha, kg[..., :d_pool])
    a_idx = anchor[:, :, None, :, None]                                        # (B,m,1,Hkv,1)
    kbar[..., d_pool:] = np.take_along_axis(kg[..., d_pool:], a_idx, axis=2)[:, :, 0]
    return kbar, vbar, anchor, alpha, qbar


def _condense_backward(dkbar, dvbar, q, k, v, cond, g, n, scale, d_score, d_pool, dq, dk, dv):
    """Add the gradient that flows through kbar and vbar (SPEC §5) into dq, dk, dv in place."""
    kbar, vbar, anchor, alpha, qbar = cond
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    m, hg = L // g, H // Hkv
    if m == 0:
        return
    kg, vg = _grouped(k, g, m), _grouped(v, g, m)
    dkg, dvg = _grouped(dk, g, m), _grouped(dv, g, m)                         # views into dk, dv
    # vbar = Σ α v, kbar[:d_pool] = Σ α k[:d_pool]: into v, k and dα
    dvg += np.einsum("bmkg,bmkd->bmgkd", alpha, dvbar)
    dkg[..., :d_pool] += np.einsum("bmkg,bmkd->bmgkd", alpha, dkbar[..., :d_pool])
    dalpha = np.einsum("bmkd,bmgkd->bmkg", dvbar, vg)
    dalpha += np.einsum("bmkd,bmgkd->bmkg", dkbar[..., :d_pool], kg[..., :d_pool])
    # kbar[d_pool:] = k[anchor][d_pool:]: a copy, the gradient goes to the anchor token only
    bi, mi, ki = np.ix_(np.arange(B), np.arange(m), np.arange(Hkv))
    dkg[bi, mi, anchor, ki, d_pool:] += dkbar[..., d_pool:]
    # α = softmax(s): ds = α (dα - Σ α dα)
    ds = alpha * (dalpha - (alpha * dalpha).sum(-1, keepdims=True))
    # s = τ q̄·k over the score dims: into k and q̄
    dkg[..., :d_score] += np.einsum("bmkg,bmkd->bmgkd", ds, qbar[..., :d_score]) * scale
    dqbar = np.einsum("bmkg,bmgkd->bmkd", ds, kg[..., :d_score]) * scale       # (B,m,Hkv,ds)
    # q̄ = mean over the last n queries and the hg heads: spread dq̄ evenly over them
    dqg = dq[:, :m * g].reshape(B, m, g, Hkv, hg, D)
    dqg[:, :, g - n:, :, :, :d_score] += (dqbar / (n * hg))[:, :, None, :, None, :]


# ---------------------------------------------------------------------------------------------
# attention, SPEC §3, one query block at a time

def _block(t0, t1, g, w, dtype, rep_bias):
    """The visible span of query block [t0, t1): (Gmax, s0, bias (T, Gmax + t1 - s0)).

    Columns are the condensed entries [0, Gmax) then the exact tokens [s0, t1); bias is 0 (or
    rep_bias on condensed entries) where query t sees the column and -inf where it does not."""
    t = np.arange(t0, t1)
    Gt = np.maximum(0, (t - w + 1) // g)                      # condensed entries each query sees
    Gmax, s0 = int(Gt[-1]), int(Gt[0]) * g
    j = np.arange(Gmax)
    s = np.arange(s0, t1)
    vis_c = j[None, :] < Gt[:, None]
    vis_e = (s[None, :] >= Gt[:, None] * g) & (s[None, :] <= t[:, None])
    bias = np.concatenate([np.where(vis_c, dtype.type(rep_bias), dtype.type(-np.inf)),
                           np.where(vis_e, dtype.type(0), dtype.type(-np.inf))], axis=1)
    return Gmax, s0, bias.astype(dtype, copy=False)


def _heads_to_rows(x, Hkv):
    """(T, H, d) -> (Hkv, T*hg, d): one matrix of rows per kv head (row = (t, head in group))."""
    T, H, d = x.shape
    return x.reshape(T, Hkv, H // Hkv, d).transpose(1, 0, 2, 3).reshape(Hkv, -1, d)


def _rows_to_heads(x, T):
    """(Hkv, T*hg, d) -> (T, H, d), the inverse of _heads_to_rows."""
    Hkv, _, d = x.shape
    return x.reshape(Hkv, T, -1, d).transpose(1, 0, 2, 3).reshape(T, -1, d)


def _head_major(*xs):
    """(N, Hkv, d) -> contiguous (Hkv, N, d): each kv head's rows contiguous, so that every block
    below is a plain row slice that BLAS takes without a copy."""
    return [np.ascontiguousarray(x.transpose(1, 0, 2)) for x in xs]


def _block_kv(kh, vh, kbh, vbh, Gmax, s0, t1, Dv, v_in_k):
    """Keys (Hkv, N, D) and values (Hkv, N, Dv) of a block: condensed [0,Gmax) then exact [s0,t1)."""
    K = np.concatenate([kbh[:, :Gmax], kh[:, s0:t1]], axis=1)
    V = K[..., :Dv] if v_in_k else np.concatenate([vbh[:, :Gmax], vh[:, s0:t1]], axis=1)
    return K, V


def _logits(Qs, K, bias, T):
    """τ q·k + bias for a block: (Hkv, T*hg, N); Qs is the already-scaled query rows."""
    S = Qs @ K.transpose(0, 2, 1)
    Hkv, _, N = S.shape
    S.reshape(Hkv, T, -1, N)[...] += bias[None, :, None, :]
    return S


def _attend(q, k, v, kbar, vbar, g, w, scale, rep_bias, v_in_k, chunk=CHUNK):
    """out (B, L, H, Dv), lse (B, H, L)."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    out = np.empty((B, L, H, Dv), q.dtype)
    lse = np.empty((B, H, L), q.dtype)
    for b in range(B):
        kh, vh, kbh, vbh = _head_major(k[b], v[b], kbar[b], vbar[b])
        for t0 in range(0, L, chunk):
            t1 = min(L, t0 + chunk)
            T = t1 - t0
            Gmax, s0, bias = _block(t0, t1, g, w, q.dtype, rep_bias)
            K, V = _block_kv(kh, vh, kbh, vbh, Gmax, s0, t1, Dv, v_in_k)
            S = _logits(_heads_to_rows(q[b, t0:t1] * scale, Hkv), K, bias, T)
            # softmax: every query sees at least one entry, so the row max is finite
            mx = S.max(-1, keepdims=True)
            S -= mx
            np.exp(S, out=S)
            l = S.sum(-1, keepdims=True)
            O = (S @ V) / l
            out[b, t0:t1] = _rows_to_heads(O, T)
            lse[b, :, t0:t1] = _rows_to_heads(mx + np.log(l), T)[..., 0].T
    return out, lse


def _attend_backward(dout, q, k, v, kbar, vbar, out, lse, g, w, scale, rep_bias, v_in_k,
                     chunk=CHUNK):
    """Gradients of §3 attention: dq, dk, dv (exact entries) and dkbar, dvbar (condensed)."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    dq = np.empty_like(q)
    dk, dv = np.zeros(k.shape, q.dtype), np.zeros(v.shape, q.dtype)
    dkbar, dvbar = np.zeros(kbar.shape, q.dtype), np.zeros(vbar.shape, q.dtype)
    for b in range(B):
        kh, vh, kbh, vbh = _head_major(k[b], v[b], kbar[b], vbar[b])
        # gradients accumulate head-major too, (Hkv, N, .), and are transposed back at the end
        dkh, dvh = np.zeros_like(kh), np.zeros_like(vh)
        dkbh, dvbh = np.zeros_like(kbh), np.zeros_like(vbh)
        for t0 in range(0, L, chunk):
            t1 = min(L, t0 + chunk)
            T = t1 - t0
            Gmax, s0, bias = _block(t0, t1, g, w, q.dtype, rep_bias)
            K, V = _block_kv(kh, vh, kbh, vbh, Gmax, s0, t1, Dv, v_in_k)
            Qs = _heads_to_rows(q[b, t0:t1] * scale, Hkv)
            # recompute P = exp(S - lse) from the saved lse
            P = _logits(Qs, K, bias, T)
            P -= _heads_to_rows(lse[b, :, t0:t1].T[..., None], Hkv)
            np.exp(P, out=P)
            dO = _heads_to_rows(dout[b, t0:t1], Hkv)
            delta = np.einsum("hrd,hrd->hr", dO, _heads_to_rows(out[b, t0:t1], Hkv))[..., None]
            dVb = P.transpose(0, 2, 1) @ dO                                   # (Hkv, N, Dv)
            # dS = P (dP - rowsum(dO·O)), dP = dO Vᵀ
            dS = dO @ V.transpose(0, 2, 1)
            dS -= delta
            dS *= P
            del P
            dq[b, t0:t1] = _rows_to_heads(dS @ K, T) * scale
            dKb = dS.transpose(0, 2, 1) @ Qs                                  # τ already in Qs
            # scatter the block's key/value gradients: condensed then exact columns
            dkbh[:, :Gmax] += dKb[:, :Gmax]
            dkh[:, s0:t1] += dKb[:, Gmax:]
            dvbh[:, :Gmax] += dVb[:, :Gmax]
            dvh[:, s0:t1] += dVb[:, Gmax:]
        for d, dh in ((dk, dkh), (dv, dvh), (dkbar, dkbh), (dvbar, dvbh)):
            d[b] = dh.transpose(1, 0, 2)
    return dq, dk, dv, dkbar, dvbar


# ---------------------------------------------------------------------------------------------
# the public-looking entry points, mirroring lca.attention / lca.gqa_attention and their backwards

def _mla_setup(q, c, r, n, scale, score):
    Dc = c.shape[2]
    Dq = q.shape[3]
    k = np.concatenate([c, r], axis=2)[:, :, None]            # one kv head: key [c; r]
    v = c[:, :, None]                                          # value c
    d_score = Dq if score == "full" else Dc
    return k, v, Dc, d_score, (1.0 / np.sqrt(Dq) if scale is None else scale)


def mla_forward(q, c, r, g=16, w=1024, n=None, scale=None, score="full", rep_bias=0.0,
                chunk=CHUNK):
    """LCA for MLA in absorbed form (SPEC §2 + §3): (out (B,L,H,Dc), lse (B,H,L))."""
    k, v, Dc, d_score, scale = _mla_setup(q, c, r, n, scale, score)
    kbar, vbar, *_ = _condense(q, k, v, g, n or g, scale, d_score, Dc)
    return _attend(q, k, v, kbar, vbar, g, w, scale, rep_bias, True, chunk)


def mla_backward(dout, q, c, r, out, lse, g=16, w=1024, n=None, scale=None, score="full",
                 rep_bias=0.0, chunk=CHUNK):
    """Exact gradient of mla_forward (SPEC §5): (dq, dc, dr)."""
    k, v, Dc, d_score, scale = _mla_setup(q, c, r, n, scale, score)
    cond = _condense(q, k, v, g, n or g, scale, d_score, Dc)       # recomputed, as a kernel would
    dq, dk, dv, dkbar, dvbar = _attend_backward(dout, q, k, v, cond[0], cond[1], out, lse, g, w,
                                                scale, rep_bias, True, chunk)
    _condense_backward(dkbar, dvbar, q, k, v, cond, g, n or g, scale, d_score, Dc, dq, dk, dv)
    return dq, dk[:, :, 0, :Dc] + dv[:, :, 0], np.ascontiguousarray(dk[:, :, 0, Dc:])


def _gqa_setup(q, scale, key_mode):
    D = q.shape[3]
    d_pool = D if key_mode == "pool" else 0
    return d_pool, (1.0 / np.sqrt(D) if scale is None else scale)


def gqa_forward(q, k, v, g=16, w=1024, n=None, scale=None, key_mode="anchor", rep_bias=0.0,
                chunk=CHUNK):
    """LCA for GQA/MHA (SPEC §4): (out (B,L,H,Dv), lse (B,H,L))."""
    d_pool, scale = _gqa_setup(q, scale, key_mode)
    kbar, vbar, *_ = _condense(q, k, v, g, n or g, scale, q.shape[3], d_pool)
    return _attend(q, k, v, kbar, vbar, g, w, scale, rep_bias, False, chunk)


def gqa_backward(dout, q, k, v, out, lse, g=16, w=1024, n=None, scale=None, key_mode="anchor",
                 rep_bias=0.0, chunk=CHUNK):
    """Exact gradient of gqa_forward (SPEC §5): (dq, dk, dv)."""
    d_pool, scale = _gqa_setup(q, scale, key_mode)
    D = q.shape[3]
    cond = _condense(q, k, v, g, n or g, scale, D, d_pool)
    dq, dk, dv, dkbar, dvbar = _attend_backward(dout, q, k, v, cond[0], cond[1], out, lse, g, w,
                                                scale, rep_bias, False, chunk)
    _condense_backward(dkbar, dvbar, q, k, v, cond, g, n or g, scale, D, d_pool, dq, dk, dv)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# self-check: float64 against lca/reference.py, backward against central finite differences

def load_reference():
    """lca/reference.py loaded by path (import lca would need the built C engine)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lca", "reference.py")
    spec = importlib.util.spec_from_file_location("lca_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(got, ref):
    """Relative Frobenius error ‖got − ref‖ / ‖ref‖ (SPEC §8); inf on NaN."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (den if den else 1.0))


def _fd_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every element of x (in place)."""
    gr = np.zeros_like(x)
    flat, gflat = x.reshape(-1), gr.reshape(-1)
    for i in range(flat.size):
        x0 = flat[i]
        flat[i] = x0 + eps
        fp = f()
        flat[i] = x0 - eps
        fm = f()
        flat[i] = x0
        gflat[i] = (fp - fm) / (2 * eps)
    return gr


# (name, kind, shapes, keywords); odd shapes, the edge cases w=0, n<g, Dr=0, g=1, w>=L, B=2
CHECK_CASES = [
    ("mla base", "mla", dict(B=1, L=53, H=2, Dc=6, Dr=3), dict(g=4, w=9)),
    ("mla w=0 n<g latent bias", "mla", dict(B=2, L=53, H=3, Dc=5, Dr=2),
     dict(g=4, w=0, n=2, score="latent", rep_bias=0.7)),
    ("mla Dr=0", "mla", dict(B=1, L=37, H=2, Dc=7, Dr=0), dict(g=5, w=6, n=3)),
    ("mla g=1 w=0 n=1", "mla", dict(B=1, L=19, H=2, Dc=4, Dr=2), dict(g=1, w=0)),
    ("mla w>=L (causal)", "mla", dict(B=1, L=29, H=2, Dc=6, Dr=3), dict(g=4, w=40)),
    ("gqa anchor", "gqa", dict(B=1, L=53, H=4, Hkv=2, D=5, Dv=3), dict(g=4, w=9)),
    ("gqa pool w=0 n<g bias", "gqa", dict(B=2, L=47, H=6, Hkv=3, D=4, Dv=6),
     dict(g=3, w=0, n=2, key_mode="pool", rep_bias=-0.4)),
    ("gqa mha anchor scale", "gqa", dict(B=1, L=41, H=2, Hkv=2, D=3, Dv=2),
     dict(g=6, w=7, n=1, scale=0.9)),
]


def _inputs(kind, sh, rng, dtype=np.float64):
    B, L, H = sh["B"], sh["L"], sh["H"]
    if kind == "mla":
        shapes = [(B, L, H, sh["Dc"] + sh["Dr"]), (B, L, sh["Dc"]), (B, L, sh["Dr"])]
        dshape = (B, L, H, sh["Dc"])
    else:
        shapes = [(B, L, H, sh["D"]), (B, L, sh["Hkv"], sh["D"]), (B, L, sh["Hkv"], sh["Dv"])]
        dshape = (B, L, H, sh["Dv"])
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return xs, rng.standard_normal(dshape).astype(dtype)


def _ref_forward(ref, kind, xs, kw):
    """lca.reference with the keyword names of the public API."""
    names = dict(g="group_size", w="window", n="n_summary", scale="softmax_scale")
    rkw = {names.get(a, a): b for a, b in kw.items()}
    f = ref.attention if kind == "mla" else ref.gqa_attention
    return f(*xs, **rkw)


def self_check(verbose=True, chunk=16):
    """Forward vs lca.reference (float64), backward vs finite differences (float64), and the
    float32 run vs the float64 one.  A small chunk makes the query blocking itself get tested.
    Returns True when every check passes."""
    ref = load_reference()
    rng = np.random.default_rng(0)
    ok = True
    for name, kind, sh, kw in CHECK_CASES:
        fwd, bwd = (mla_forward, mla_backward) if kind == "mla" else (gqa_forward, gqa_backward)
        xs, dout = _inputs(kind, sh, rng)
        out, lse = fwd(*xs, **kw, chunk=chunk)
        rout, rlse = _ref_forward(ref, kind, xs, kw)
        e_fwd = max(rel_err(out, rout), rel_err(lse, rlse))
        if kw.get("w", 0) >= sh["L"]:          # w >= L: exactly causal attention (SPEC §3)
            if kind == "mla":
                kk = np.concatenate(xs[1:], axis=2)[:, :, None]
                cout, clse = ref.causal_attention(xs[0], kk, xs[1][:, :, None])
            else:
                cout, clse = ref.causal_attention(*xs)
            e_fwd = max(e_fwd, rel_err(out, cout), rel_err(lse, clse))
        grads = bwd(dout, *xs, out, lse, **kw, chunk=chunk)
        # loss = Σ dout·out; its gradient is what backward returns
        loss = lambda: float(np.sum(dout * fwd(*xs, **kw, chunk=chunk)[0]))  # noqa: E731
        e_bwd = max(rel_err(gr, _fd_grad(loss, x)) for gr, x in zip(grads, xs) if x.size)
        # float32 against float64: the dtype-generic path the benchmark uses
        x32 = [x.astype(np.float32) for x in xs]
        o32, l32 = fwd(*x32, **kw, chunk=chunk)
        g32 = bwd(dout.astype(np.float32), *x32, o32, l32, **kw, chunk=chunk)
        e32 = max([rel_err(o32, out)] + [rel_err(a, b) for a, b in zip(g32, grads) if b.size])
        dt_ok = o32.dtype == np.float32 and all(a.dtype == np.float32 for a in g32)
        good = e_fwd < 1e-12 and e_bwd < 1e-6 and e32 < 1e-4 and dt_ok
        ok &= good
        if verbose:
            print(f"  {name:26s} fwd vs reference {e_fwd:8.1e}   bwd vs finite diff {e_bwd:8.1e}"
                  f"   float32 vs float64 {e32:8.1e}   {'ok' if good else 'FAIL'}")
    return ok


if __name__ == "__main__":
    print("numpy_lca self-check (float64 vs lca/reference.py; backward vs central differences)")
    raise SystemExit(0 if self_check() else 1)
