"""MLA prefill in the non-absorbed form (SPEC §4): condense in latent space, up-project, attend
per head.

What a DeepSeek-V2 layer holds, per token t and head h:
    q[t, h]  = [q_nope (Dn) ; q_rope (Dr)]       per-head query, width Dn+Dr (192 = 128+64)
    latent c  (Dc)                                 the cached KV latent (512)
    kpos  r  (Dr)                                  the RoPE-rotated key, shared by all heads (64)
    W_UK (H, Dc, Dn), W_UV (H, Dc, Dv)             up-projections: k_nope[h] = c W_UK[h],
                                                   v[h] = c W_UV[h]
The absorbed form (lca.attention) runs the same layer with q_abs[t, h] = [W_UK[h] q_nope ;
q_rope] (width Dc+Dr) against [c; r] and gives out_lat[t, h] (width Dc); the layer's output is
out_lat[t, h] W_UV[h].  This function computes exactly that, for ~3.4x fewer attention FLOPs at
the DeepSeek shape, in three steps:

1. Condense in latent space (SPEC §2): the summary query of group j is the absorbed one,
       q̄_j = mean over the last n tokens and all H heads of [W_UK[h] q_nope[t,h] ; q_rope[t,h]]
           = [ (1/H) Σ_h W_UK[h] mean_t q_nope[t,h] ; mean_{t,h} q_rope[t,h] ]   (width Dc+Dr)
   (the second line is the one computed: the mean first, then one (H·Dn) x Dc product per group,
   so the H·L·Dc absorbed queries are never formed).  lca.condense then pools the latents with
   α_j = softmax(τ q̄_j·[c; r]) ("full") or softmax(τ q̄_j[:Dc]·c) ("latent") and copies the
   anchor's r: (c̄_j, r̄_j), shared by all heads.
2. Up-project per head: k[t,h] = [c_t W_UK[h] ; r_t], v[t,h] = c_t W_UV[h], and the same for
   the condensed entries: k̄[j,h] = [c̄_j W_UK[h] ; r̄_j], v̄[j,h] = c̄_j W_UV[h].
3. lca.gqa_attend(q, k, v, k̄, v̄) with H kv heads (MHA), SPEC §3 visibility.

Logits q[t,h]·k̄[j,h] = q_abs[t,h]·[c̄_j; r̄_j] and Σ p v = (Σ p c) W_UV[h], so the result equals
lca.attention(q_abs, c, r) up-projected by W_UV, to rounding (with the same softmax_scale: the
default here is 1/sqrt(Dn+Dr), the per-head query width, as in DeepSeek-V2; lca.attention's
default is 1/sqrt(Dc+Dr)).

Arrays: NumPy (the CPU engine), or PyTorch / CuPy CUDA arrays (the CUDA engine); the products
run in the caller's own framework (NumPy, torch or CuPy matmul).  Gradients: lca.torch.mla_prefill.
"""
import numpy as np

from ._arrays import check_dim, check_rank, choice_param


def _matmul_heads(x, w, fe):
    """x (..., Dc) @ w (H, Dc, E) -> (..., H, E): one product with w laid out (Dc, H*E)."""
    H, Dc, E = w.shape
    wt = w.permute(1, 0, 2) if _is_torch(fe) else w.transpose(1, 0, 2)
    return (x @ wt.reshape(Dc, H * E)).reshape(x.shape[:-1] + (H, E))


def _matmul_heads_t(x, w, fe):
    """Σ_h x[..., h, :] @ w[h]ᵀ: x (..., H, Dn), w (H, Dc, Dn) -> (..., Dc), one product."""
    H, Dc, Dn = w.shape
    wt = w.permute(0, 2, 1) if _is_torch(fe) else w.transpose(0, 2, 1)
    return x.reshape(x.shape[:-2] + (H * Dn,)) @ wt.reshape(H * Dn, Dc)


def _is_torch(fe):
    return fe is not None and hasattr(fe, "torch")


def _empty(fe, shape, like):
    return fe.empty(shape, like=like) if fe else np.empty(shape, like.dtype)


def _zeros(fe, shape, like):
    if _is_torch(fe):
        return fe.torch.zeros(shape, dtype=like.dtype, device=like.device)
    if fe:
        with fe.device:
            return fe.cp.zeros(shape, dtype=like.dtype)
    return np.zeros(shape, like.dtype)


def _wide(fe, a):
    """a in at least float32, for the small summary-query products (bf16/fp16 CUDA inputs)."""
    if _is_torch(fe):
        return a.float() if a.dtype in (fe.torch.bfloat16, fe.torch.float16) else a
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _up_project(fe, c, r, w_uk, w_uv):
    """k = [c W_UK[h] ; r] (..., H, Dn+Dr) and v = c W_UV[h] (..., H, Dv)."""
    H, _, Dn = w_uk.shape
    Dr = r.shape[-1]
    k = _empty(fe, c.shape[:-1] + (H, Dn + Dr), c)
    k[..., :Dn] = _matmul_heads(c, w_uk, fe)
    k[..., Dn:] = r[..., None, :]
    return k, _matmul_heads(c, w_uv, fe)


def mla_prefill(q, latent, kpos, w_uk, w_uv, *, group_size=16, window=1024, n_summary=None,
                softmax_scale=None, score="full", rep_bias=0.0, return_lse=False):
    """LCA for MLA prefill in the non-absorbed form (SPEC §4): condense in latent space,
    up-project, attend per head.

    q (B, L, H, Dn+Dr)   per-head queries [q_nope ; q_rope]
    latent (B, L, Dc)    the KV latent c;   kpos (B, L, Dr)  the RoPE key r (shared by heads)
    w_uk (H, Dc, Dn)     key up-projection:   k_nope[t, h] = latent[t] @ w_uk[h]
    w_uv (H, Dc, Dv)     value up-projection: v[t, h]      = latent[t] @ w_uv[h]
    -> out (B, L, H, Dv) [, lse (B, H, L)]     (the batch dim is optional, as everywhere)

    Keywords as lca.attention; softmax_scale defaults to 1/sqrt(Dn+Dr).  Equals
    lca.attention(q_abs, latent, kpos) @ w_uv per head, q_abs = [w_uk[h] q_nope ; q_rope], with
    the summary query formed in latent space (see lca/_prefill.py).  NumPy arrays run on the CPU,
    PyTorch/CuPy CUDA arrays on the GPU; for gradients use lca.torch.mla_prefill."""
    from . import _Cfg, _intake, _unbatch, gqa_attend
    names = ["q", "latent", "kpos", "w_uk", "w_uv"]
    fe, _, (q, c, r, w_uk, w_uv) = _intake([q, latent, kpos, w_uk, w_uv], names)
    if q.ndim not in (3, 4):
        raise ValueError(f"q: expected shape (B, L, H, Dn+Dr) or (L, H, Dn+Dr), got {q.shape}")
    batched = q.ndim == 4
    check_rank([c, r], ["latent", "kpos"], [2, 2], batched)
    for w, nm, last in ((w_uk, "w_uk", "Dn"), (w_uv, "w_uv", "Dv")):
        if w.ndim != 3:
            raise ValueError(f"{nm}: expected shape (H, Dc, {last}), got {w.shape}")
    if not batched:
        q, c, r = q[None], c[None], r[None]
    B, L, H, Dq = q.shape
    Dc, Dr, Dn, Dv = c.shape[2], r.shape[2], w_uk.shape[2], w_uv.shape[2]
    for a, nm in ((c, "latent"), (r, "kpos")):
        check_dim(nm, a.shape, 0, "batch", B, "q's batch")
        check_dim(nm, a.shape, 1, "length", L, "q's length")
    for w, nm in ((w_uk, "w_uk"), (w_uv, "w_uv")):
        check_dim(nm, w.shape, 0, "heads", H, "q's heads")
        check_dim(nm, w.shape, 1, "latent width", Dc, "latent's width Dc")
    if H < 1 or Dc < 1 or Dn < 1 or Dv < 1:
        raise ValueError(f"q, latent, w_uk, w_uv: H, Dc, Dn and Dv must be >= 1, got H={H}, "
                         f"Dc={Dc}, Dn={Dn}, Dv={Dv}")
    if Dq != Dn + Dr:
        raise ValueError(f"q: last dim must be Dn+Dr = {Dn}+{Dr} = {Dn + Dr} (w_uk's and kpos' "
                         f"widths), got {Dq}")
    choice_param(score, "score", ("full", "latent"))
    cfg = _Cfg(L, Dq, group_size=group_size, window=window, n_summary=n_summary,
               softmax_scale=softmax_scale, rep_bias=rep_bias)
    _, _, _, _, k, v, kb, vb = _parts(fe, q, c, r, w_uk, w_uv, cfg.g, cfg.n, cfg.scale, score)
    # 3. the SPEC §3 attention over them, H kv heads
    out, lse = gqa_attend(q, k, v, kb, vb, group_size=cfg.g, window=window,
                          softmax_scale=cfg.scale, rep_bias=cfg.rep_bias, return_lse=True)
    out, lse = _unbatch(batched, out, lse)
    return (out, lse) if return_lse else out


def _parts(fe, q, c, r, w_uk, w_uv, g, n, scale, score):
    """Steps 1 and 2 on validated, batched inputs: (qs, qm, cb, rb, k, v, kb, vb).

    qm (B, m, H, Dn+Dr)   the mean of the last n queries of each group (float32 at least)
    qs (B, m*g, 1, Dc+Dr) the one-head query lca.condense got (the summary query at each
                          group's last row, zeros elsewhere), in q's dtype; None when m = 0
    cb, rb                the condensed entries (B, m, Dc), (B, m, Dr)
    k, v, kb, vb          the up-projected exact and condensed entries (step 2)
    lca.torch.mla_prefill's backward calls this too, so its recompute is the forward's, bit for
    bit (the same anchors)."""
    from . import condense
    B, L, H, Dq = q.shape
    Dc, Dn = c.shape[2], w_uk.shape[2]
    m = L // g
    # 1. condense in latent space: the absorbed summary query, rebuilt from the mean over the
    # last n tokens per head; it reaches lca.condense as the last token of each group of a
    # one-head query (n_summary=1), so the engine's own pooling and anchor rule apply.
    if m:
        qm = _wide(fe, q[:, :m * g].reshape(B, m, g, H, Dq)[:, :, g - n:]).sum(2) / n
        qs = _zeros(fe, (B, m * g, 1, Dc + Dq - Dn), q)
        qs[:, g - 1::g, 0, :Dc] = _matmul_heads_t(qm[..., :Dn], _wide(fe, w_uk), fe) / H
        qs[:, g - 1::g, 0, Dc:] = qm[..., Dn:].sum(2) / H
        cb, rb, _, _ = condense(qs, c[:, :m * g], r[:, :m * g], group_size=g, n_summary=1,
                                softmax_scale=scale, score=score)
    else:
        qm = qs = None
        cb, rb = c[:, :0], r[:, :0]
    # 2. up-project the exact and the condensed entries per head
    k, v = _up_project(fe, c, r, w_uk, w_uv)
    kb, vb = _up_project(fe, cb, rb, w_uk, w_uv)
    return qs, qm, cb, rb, k, v, kb, vb
