"""LCA (SPEC §2-§4) written in plain PyTorch, vectorised with explicit masks: O(L^2) memory, so
for small sizes only.  Run in bf16/fp16 it is the "same computation done in plain PyTorch at that
precision" against which SPEC §8 bounds the CUDA kernels' error; run in float64 it is a second
reference.  Imported by the GPU tests only (torch is needed)."""
import numpy as np
import torch


def gqa_lca(q, k, v, *, group_size=16, window=1024, n_summary=None, softmax_scale=None,
            key_mode="anchor", rep_bias=0.0, d_score=None, d_pool=None):
    """q (B, L, H, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv) -> (out (B, L, H, Dv), lse (B, H, L)).
    d_score / d_pool override the score and pooled key columns (used for MLA)."""
    kbar, vbar = gqa_condense_lca(q, k, v, group_size=group_size, n_summary=n_summary,
                                  softmax_scale=softmax_scale, key_mode=key_mode,
                                  d_score=d_score, d_pool=d_pool)
    return gqa_attend_lca(q, k, v, kbar, vbar, group_size=group_size, window=window,
                          softmax_scale=softmax_scale, rep_bias=rep_bias)


def gqa_condense_lca(q, k, v, *, group_size=16, n_summary=None, softmax_scale=None,
                     key_mode="anchor", d_score=None, d_pool=None):
    """The condensation (SPEC §2 / §4) alone: (kbar (B, m, Hkv, D), vbar (B, m, Hkv, Dv))."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    g, hg = group_size, H // Hkv
    n = n_summary or g
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    ds = D if d_score is None else d_score
    dp = (D if key_mode == "pool" else 0) if d_pool is None else d_pool
    m = L // g
    qg = q[:, :m * g].reshape(B, m, g, Hkv, hg, D)[:, :, g - n:].mean(dim=(2, 4))
    kg = k[:, :m * g].reshape(B, m, g, Hkv, D)
    vg = v[:, :m * g].reshape(B, m, g, Hkv, Dv)
    s = scale * torch.einsum("bmhd,bmghd->bmhg", qg[..., :ds], kg[..., :ds])
    alpha = torch.softmax(s, dim=-1)
    anchor = alpha.argmax(dim=-1)                                           # (B, m, Hkv)
    vbar = torch.einsum("bmhg,bmghd->bmhd", alpha, vg)
    k_anchor = torch.gather(kg, 2, anchor[:, :, None, :, None].expand(B, m, 1, Hkv, D))[:, :, 0]
    kbar = torch.cat([torch.einsum("bmhg,bmghd->bmhd", alpha, kg[..., :dp]), k_anchor[..., dp:]],
                     dim=-1)
    return kbar, vbar


def gqa_attend_lca(q, k, v, kbar, vbar, *, group_size=16, window=1024, softmax_scale=None,
                   rep_bias=0.0):
    """SPEC §3 over the given condensed entries kbar (B, m, Hkv, D), vbar (B, m, Hkv, Dv), any
    m >= the last query's G_t -> (out (B, L, H, Dv), lse (B, H, L))."""
    B, L, H, D = q.shape
    g, hg, m = group_size, H // k.shape[2], kbar.shape[1]
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    # attention over [condensed; exact] with the SPEC §3 visibility
    keys = torch.cat([kbar, k], dim=1).repeat_interleave(hg, dim=2)           # (B, m+L, H, D)
    vals = torch.cat([vbar, v], dim=1).repeat_interleave(hg, dim=2)
    t = torch.arange(L, device=q.device)
    G = torch.clamp(torch.div(t - window + 1, g, rounding_mode="floor"), min=0)
    j = torch.arange(m, device=q.device)
    cond = j[None, :] < G[:, None]
    exact = (t[None, :] >= (G * g)[:, None]) & (t[None, :] <= t[:, None])
    visible = torch.cat([cond, exact], dim=1)                                # (L, m+L)
    logits = scale * torch.einsum("bthd,bshd->bhts", q, keys)
    logits[..., :m] += rep_bias
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits.float(), dim=-1)
    out = torch.einsum("bhts,bshd->bthd", torch.softmax(logits, dim=-1), vals)
    return out, lse


def mla_attend_lca(q, latent, kpos, latent_bar, kpos_bar, **kw):
    """Absorbed MLA over given condensed entries: keys [c; r], values c."""
    k = torch.cat([latent, kpos], dim=-1)[:, :, None]
    kbar = torch.cat([latent_bar, kpos_bar], dim=-1)[:, :, None]
    return gqa_attend_lca(q, k, latent[:, :, None], kbar, latent_bar[:, :, None], **kw)


def mla_condense_lca(q, latent, kpos, *, score="full", **kw):
    """(latent_bar (B, m, Dc), kpos_bar (B, m, Dr)) of the absorbed MLA condensation."""
    Dc = latent.shape[-1]
    k = torch.cat([latent, kpos], dim=-1)[:, :, None]
    kbar, _ = gqa_condense_lca(q, k, latent[:, :, None], d_pool=Dc,
                               d_score=q.shape[-1] if score == "full" else Dc, **kw)
    return kbar[:, :, 0, :Dc], kbar[:, :, 0, Dc:]


def mla_lca(q, latent, kpos, *, score="full", **kw):
    """Absorbed MLA as GQA with one kv head: keys [c; r], values c."""
    Dc = latent.shape[-1]
    k = torch.cat([latent, kpos], dim=-1)[:, :, None]
    return gqa_lca(q, k, latent[:, :, None], d_pool=Dc,
                   d_score=q.shape[-1] if score == "full" else Dc, **kw)


def mla_prefill_lca(q, latent, kpos, w_uk, w_uv, *, group_size=16, window=1024, n_summary=None,
                    softmax_scale=None, score="full", rep_bias=0.0):
    """lca.mla_prefill's non-absorbed steps (lca/_prefill.py) in plain torch: the summary query
    in latent space (float32 at least, then rounded to q's dtype, as the library forms it), the
    condensation of [c; r] with it, the per-head up-projections, SPEC §3 over them."""
    B, L, H, Dq = q.shape
    Dc, Dr, Dn = latent.shape[-1], kpos.shape[-1], w_uk.shape[-1]
    g = group_size
    n, m = n_summary or g, L // g
    scale = softmax_scale if softmax_scale is not None else Dq ** -0.5
    wide = torch.promote_types(q.dtype, torch.float32)
    qm = q[:, :m * g].reshape(B, m, g, H, Dq)[:, :, g - n:].to(wide).mean(2)
    qs = (torch.cat([torch.einsum("bmhn,hcn->bmc", qm[..., :Dn], w_uk.to(wide)),
                     qm[..., Dn:].sum(2)], -1) / H).to(q.dtype)          # (B, m, Dc+Dr)
    kg = torch.cat([latent, kpos], -1)[:, :m * g].reshape(B, m, g, Dc + Dr)
    ds = Dc + Dr if score == "full" else Dc
    alpha = torch.softmax(scale * torch.einsum("bmd,bmgd->bmg", qs[..., :ds], kg[..., :ds]), -1)
    anchor = alpha.argmax(-1)
    cb = torch.einsum("bmg,bmgd->bmd", alpha, kg[..., :Dc])
    rb = torch.gather(kg[..., Dc:], 2, anchor[:, :, None, None].expand(B, m, 1, Dr))[:, :, 0]

    def up(c, r):
        k = torch.cat([torch.einsum("blc,hcn->blhn", c, w_uk),
                       r[:, :, None].expand(-1, -1, H, -1)], -1)
        return k, torch.einsum("blc,hcv->blhv", c, w_uv)
    return gqa_attend_lca(q, *up(latent, kpos), *up(cb, rb), group_size=g, window=window,
                          softmax_scale=scale, rep_bias=rep_bias)


# helpers of the GPU tests

def hopper():
    """Whether the current CUDA device is compute 9.0, where the sm_90a (wgmma) kernels run."""
    return torch.cuda.get_device_capability() == (9, 0)


def rel(a, b):
    """Relative Frobenius error ||a - b|| / ||b|| in float64 (SPEC §8)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def to_np(x):
    return x.detach().double().cpu().numpy()


def check_forward(out, lse, ref, naive, dtype):
    """SPEC §8 for a bf16/fp16 forward: every element written (the outputs were NaN-poisoned),
    and out and lse within twice the error of the same computation in plain torch (naive: its
    (out, lse)) against the float64 CPU engine's ref = (out, lse); floors 1e-3 and 1e-4."""
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all(), "unwritten elements"
    (ref_out, ref_lse), (naive_out, naive_lse) = ref, naive
    err, bound = rel(to_np(out), ref_out), 2 * rel(to_np(naive_out), ref_out)
    assert err <= max(bound, 1e-3), f"out: {dtype} error {err:.2e} > 2x naive {bound:.2e}"
    lerr, lbound = rel(to_np(lse), ref_lse), 2 * rel(to_np(naive_lse), ref_lse)
    assert lerr <= max(lbound, 1e-4), f"lse: error {lerr:.2e} > 2x naive {lbound:.2e}"


def rand(gen, shape, dtype):
    """Standard normal on the GPU, drawn in float32 and rounded to dtype (a name)."""
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cuda").to(
        getattr(torch, dtype))


def check_grads(got, ref, naive, dtype, names, what):
    """SPEC §8 for gradients: got, naive device tensors, ref float64 NumPy arrays; float32 within
    1e-5 relative, bf16 / fp16 within twice the error of naive (the same gradients by plain
    PyTorch at that precision).  Returns the errors."""
    errs = {}
    for g, r, nv, nm in zip(got, ref, naive if naive is not None else [None] * len(got), names):
        assert isinstance(g, torch.Tensor) and g.dtype == getattr(torch, dtype), nm
        assert tuple(g.shape) == r.shape, f"{nm}: shape {tuple(g.shape)} != {r.shape}"
        assert torch.isfinite(g.float()).all(), f"{what} {nm}: non-finite (unwritten) elements"
        err = rel(to_np(g), r)
        if dtype == "float32":
            assert err <= 1e-5, f"{what} {nm}: float32 error {err:.2e}"
            errs[nm] = (err, None)
        else:
            bound = 2 * rel(to_np(nv), r)
            assert err <= bound, f"{what} {nm}: {dtype} error {err:.2e} > 2x plain torch {bound:.2e}"
            errs[nm] = (err, bound / 2)
    print(what, dtype, {k: f"{e:.2e}" + (f" (torch {b:.2e})" if b is not None else "")
                        for k, (e, b) in errs.items()})
    return errs


def naive_grads(fn, args, dout, kw):
    """Gradients of fn(*args, **kw)'s leading outputs, given dout (one tensor, or one per output),
    with respect to every arg, by torch autograd (zeros for an arg the outputs do not use)."""
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    douts = tuple(dout) if isinstance(dout, (tuple, list)) else (dout,)
    res = fn(*leaves, **kw)
    torch.autograd.backward(tuple(res[:len(douts)]), douts)
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


def run_captured(fn):
    """fn() captured in a CUDA graph, its results poisoned with NaN, then the graph replayed; returns
    fn's results.  torch.cuda.graph captures on a stream of its own in global mode, so a kernel
    launched on any other stream fails the capture (legacy default stream) or is not recorded
    (its results stay NaN), and a device-wide synchronisation or host round trip fails it: the
    results are right only if every launch went to the caller's current stream."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = fn()
    for t in (res if isinstance(res, (tuple, list)) else (res,)):
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return res
