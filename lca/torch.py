"""lca.torch — PyTorch autograd for LCA, opaque to torch.compile.

    import lca.torch
    out = lca.torch.attention(q, latent, kpos, group_size=16, window=1024)     # MLA, absorbed
    out = lca.torch.gqa_attention(q, k, v, key_mode="anchor")                   # GQA / MHA
    out = lca.torch.mla_prefill(q, latent, kpos, w_uk, w_uv)                    # MLA, non-absorbed
    out = lca.torch.gqa_attend(q, k, v, kbar, vbar)    # given condensed entries (your own §2)
    out.sum().backward()

Same shapes and keywords as the lca functions of the same names (SPEC §7), return_lse included;
lse is returned for saving and inspection and is not differentiable (SPEC §5: it is marked
non-differentiable, so a loss that reaches only lse raises torch's usual "does not require grad").

Each is a torch.library.custom_op (namespace "lca") with a fake (meta) implementation and a
registered autograd formula, so torch.compile(fullgraph=True) keeps it as one opaque node:
    torch.ops.lca.attention / attention_backward / gqa_attention / gqa_attention_backward /
    attend / attend_backward / gqa_attend / gqa_attend_backward / mla_prefill /
    mla_prefill_backward
No copies on the way to the engine: CPU tensors (float32, float64) reach the C engine as NumPy
views of their memory (strided views included; the engine copies only a view it cannot read,
as it does for NumPy) and results come back through torch.from_numpy; CUDA tensors (float32,
bfloat16, float16) go through lca's CUDA intake on the current stream.  Backward calls
lca.attention_backward / lca.gqa_attention_backward (and so on), on whichever engine the
tensors live.  attention and gqa_attention also save the forward's condensation (their ops'
last four outputs, not differentiable: entries, anchor, alpha, as lca.condense /
lca.gqa_condense return them) and hand it to the backward (condensed=), which then does not
recompute it.

lse dtype: the input dtype on the CPU, float32 on CUDA (as lca returns it).

mla_prefill's backward runs the non-absorbed steps backwards (lca::mla_prefill_backward, one
opaque op): the summary queries, the condensed entries and the up-projected keys and values are
recomputed by the forward's own code (lca/_prefill.py _parts: the same anchors; saving the
up-projected k, v would hold ~9x the bytes of the latent and kpos at the DeepSeek shape, and
recomputing them is two products), lca.gqa_attend_backward over them gives dq, dk, dv and the
condensed entries' dkbar, dvbar (H kv heads of 192/128 at the DeepSeek shape: the tensor-core
kernels on the GPU), torch products take dk, dv, dkbar, dvbar back through W_UK, W_UV (and
the positional part, shared by the heads, as a sum over heads) to the latent space, and
lca.condense_backward gives the latent-space condensation's share, whose summary-query gradient
goes back through W_UK and the mean over the group's last queries.  The out and lse of the
forward are saved for it.  The gradient equals the one through the absorbed identity
out = attention(q_abs, c, r) @ W_UV (the backward before this one, kept as
_mla_prefill_grad_absorbed for the tests) to rounding.

This module imports torch; `import lca` alone never does.
"""
import math
from typing import Optional

import numpy as np
import torch

import lca as _lca
from . import _prefill
from ._arrays import choice_param, float_param, int_param

__all__ = ["attention", "gqa_attention", "attend", "gqa_attend", "mla_prefill"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# tensors <-> the engine

def _np(t, name):
    """A NumPy view of a CPU tensor's memory (no copy), or a TypeError naming it."""
    if t.device.type != "cpu":
        raise TypeError(f"{name}: on {t.device}, but q is on the CPU; pass all inputs on one "
                        "device")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: the CPU engine takes float32 or float64, got {t.dtype}")
    return t.detach().resolve_neg().numpy()


def _engine(q, tensors, names, ints=()):
    """The tensors as the engine takes them: NumPy views on the CPU, the tensors on CUDA
    (ints: the positions of integer tensors, e.g. a condensation's anchor indices)."""
    if q.device.type == "cpu":
        return [t.detach().numpy() if i in ints else _np(t, nm)
                for i, (t, nm) in enumerate(zip(tensors, names))]
    return [t.detach() for t in tensors]


def _torch(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _results(xs):
    """The engine's results as tensors, contiguous and sharing no memory, as the fake kernels
    declare them and as custom ops must return them.  The CPU engine's results already are
    (separate C-ordered arrays, wrapped without a copy); a CUDA result that is a strided view,
    or a second view of one buffer (as a backward may return dlatent and dkpos), is copied --
    the only copies here."""
    out, seen = [], set()
    for x in map(_torch, xs):
        ptr = x.untyped_storage().data_ptr()
        if not x.is_contiguous() or (ptr in seen and x.numel()):
            x = x.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out.append(x)
    return tuple(out)


def _lse_dtype(q):
    return q.dtype if q.device.type == "cpu" else torch.float32


def _lse_shape(q):
    return tuple(q.shape[:-3]) + (q.shape[-2], q.shape[-3])      # (B, H, L) or (H, L)


def _empty(shape, like, dtype=None):
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _check_tensors(tensors, names):
    for t, nm in zip(tensors, names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")


def _keywords(group_size, window, n_summary, softmax_scale, rep_bias):
    """The keywords checked once in Python (the op schema takes int / float / None)."""
    g = int_param(group_size, "group_size", 1)
    w = int_param(window, "window", 0, 2**63 - 1)
    n = None if n_summary is None else int_param(n_summary, "n_summary", 1, g)
    scale = None if softmax_scale is None else float_param(softmax_scale, "softmax_scale")
    return g, w, n, scale, float_param(rep_bias, "rep_bias")


# ---------------------------------------------------------------------------------------------
# MLA, absorbed: SPEC §2 + §3

def _condensed_fake(q, g, tail, widths):
    """The fake condensation outputs: entries (..., L // g, *tail, width) for each width,
    anchor (..., L // g, *tail) int32, alpha (..., L // g, *tail, g) (float32 on CUDA)."""
    lead = tuple(q.shape[:-3]) + (q.shape[-3] // g,) + tuple(tail)
    return tuple(_empty(lead + (w,), q) for w in widths) + (
        _empty(lead, q, torch.int32), _empty(lead + (g,), q, _lse_dtype(q)))


@torch.library.custom_op("lca::attention", mutates_args=())
def _attention(q: Tensor, latent: Tensor, kpos: Tensor, group_size: int, window: int,
               n_summary: Optional[int], softmax_scale: Optional[float], score: str,
               rep_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _engine(q, [q, latent, kpos], ["q", "latent", "kpos"])
    out, lse, cond = _lca.attention(*a, group_size=group_size, window=window,
                                    n_summary=n_summary, softmax_scale=softmax_scale,
                                    score=score, rep_bias=rep_bias, return_lse=True,
                                    return_condensed=True)
    return _results((out, lse) + tuple(cond))


@_attention.register_fake
def _(q, latent, kpos, group_size, window, n_summary, softmax_scale, score, rep_bias):
    return (_empty(tuple(q.shape[:-1]) + (latent.shape[-1],), q),
            _empty(_lse_shape(q), q, _lse_dtype(q))) + _condensed_fake(
                q, group_size, (), (latent.shape[-1], kpos.shape[-1]))


@torch.library.custom_op("lca::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, q: Tensor, latent: Tensor, kpos: Tensor, out: Tensor,
                        lse: Tensor, latent_bar: Tensor, kpos_bar: Tensor, anchor: Tensor,
                        alpha: Tensor, group_size: int, window: int, n_summary: Optional[int],
                        softmax_scale: Optional[float], score: str,
                        rep_bias: float) -> tuple[Tensor, Tensor, Tensor]:
    a = _engine(q, [dout, q, latent, kpos, out, lse],
                ["dout", "q", "latent", "kpos", "out", "lse"])
    cond = _engine(q, [latent_bar, kpos_bar, anchor, alpha], ["latent_bar", "kpos_bar",
                                                               "anchor", "alpha"], ints=(2,))
    grads = _lca.attention_backward(*a, group_size=group_size, window=window,
                                    n_summary=n_summary, softmax_scale=softmax_scale,
                                    score=score, rep_bias=rep_bias, condensed=cond)
    return _results(grads)


@_attention_backward.register_fake
def _(dout, q, latent, kpos, out, lse, latent_bar, kpos_bar, anchor, alpha, group_size, window,
      n_summary, softmax_scale, score, rep_bias):
    return _empty(q.shape, q), _empty(latent.shape, latent), _empty(kpos.shape, kpos)


def _attention_setup(ctx, inputs, output):
    """Saved: the three inputs, out, lse and the forward's condensation (four tensors, not
    differentiable: the backward takes them instead of recomputing the condensation)."""
    q, latent, kpos = inputs[:3]
    ctx.kw = inputs[3:]
    ctx.save_for_backward(q, latent, kpos, *output)
    ctx.mark_non_differentiable(*output[1:])


def _grad_through(backward_op):
    """The autograd formula of an op saved by _attention_setup or _given_setup: its backward
    op on the saved tensors and keywords; no gradient for the keywords, nor from the outputs
    past out (lse and the condensation are not differentiable)."""
    def grad(ctx, dout, *not_differentiable):
        return tuple(backward_op(dout, *ctx.saved_tensors, *ctx.kw)) + (None,) * len(ctx.kw)
    return grad


_attention.register_autograd(_grad_through(_attention_backward), setup_context=_attention_setup)


def attention(q, latent, kpos, *, group_size=16, window=1024, n_summary=None,
              softmax_scale=None, score="full", rep_bias=0.0, return_lse=False):
    """lca.attention with autograd: q (B, L, H, Dc+Dr), latent (B, L, Dc), kpos (B, L, Dr)
    -> out (B, L, H, Dc) [, lse (B, H, L), not differentiable].  Gradients reach q, latent
    and kpos through lca.attention_backward (SPEC §5)."""
    _check_tensors([q, latent, kpos], ["q", "latent", "kpos"])
    kw = _keywords(group_size, window, n_summary, softmax_scale, rep_bias)
    out, lse = _attention(q, latent, kpos, *kw[:4], choice_param(score, "score",
                                                                 ("full", "latent")), kw[4])[:2]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# GQA / MHA: SPEC §4

@torch.library.custom_op("lca::gqa_attention", mutates_args=())
def _gqa_attention(q: Tensor, k: Tensor, v: Tensor, group_size: int, window: int,
                   n_summary: Optional[int], softmax_scale: Optional[float], key_mode: str,
                   rep_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _engine(q, [q, k, v], ["q", "k", "v"])
    out, lse, cond = _lca.gqa_attention(*a, group_size=group_size, window=window,
                                        n_summary=n_summary, softmax_scale=softmax_scale,
                                        key_mode=key_mode, rep_bias=rep_bias, return_lse=True,
                                        return_condensed=True)
    return _results((out, lse) + tuple(cond))


@_gqa_attention.register_fake
def _(q, k, v, group_size, window, n_summary, softmax_scale, key_mode, rep_bias):
    return (_empty(tuple(q.shape[:-1]) + (v.shape[-1],), q),
            _empty(_lse_shape(q), q, _lse_dtype(q))) + _condensed_fake(
                q, group_size, (k.shape[-2],), (k.shape[-1], v.shape[-1]))


@torch.library.custom_op("lca::gqa_attention_backward", mutates_args=())
def _gqa_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, kbar: Tensor, vbar: Tensor, anchor: Tensor,
                            alpha: Tensor, group_size: int, window: int,
                            n_summary: Optional[int], softmax_scale: Optional[float],
                            key_mode: str, rep_bias: float) -> tuple[Tensor, Tensor, Tensor]:
    a = _engine(q, [dout, q, k, v, out, lse], ["dout", "q", "k", "v", "out", "lse"])
    cond = _engine(q, [kbar, vbar, anchor, alpha], ["kbar", "vbar", "anchor", "alpha"],
                   ints=(2,))
    grads = _lca.gqa_attention_backward(*a, group_size=group_size, window=window,
                                        n_summary=n_summary, softmax_scale=softmax_scale,
                                        key_mode=key_mode, rep_bias=rep_bias, condensed=cond)
    return _results(grads)


@_gqa_attention_backward.register_fake
def _(dout, q, k, v, out, lse, kbar, vbar, anchor, alpha, group_size, window, n_summary,
      softmax_scale, key_mode, rep_bias):
    return _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)


_gqa_attention.register_autograd(_grad_through(_gqa_attention_backward),
                                 setup_context=_attention_setup)


def gqa_attention(q, k, v, *, group_size=16, window=1024, n_summary=None, softmax_scale=None,
                  key_mode="anchor", rep_bias=0.0, return_lse=False):
    """lca.gqa_attention with autograd: q (B, L, H, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv)
    -> out (B, L, H, Dv) [, lse (B, H, L), not differentiable]."""
    _check_tensors([q, k, v], ["q", "k", "v"])
    kw = _keywords(group_size, window, n_summary, softmax_scale, rep_bias)
    out, lse = _gqa_attention(q, k, v, *kw[:4], choice_param(key_mode, "key_mode",
                                                             ("anchor", "pool")), kw[4])[:2]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# SPEC §3 over given condensed entries (lca.attend / lca.gqa_attend): gradients reach the
# entries too, so research code can train its own condensation (backward on either engine;
# its CUDA path, lca_cuda_attend_bwd, is not yet run on a GPU)

def _given_setup(ctx, inputs, output):
    ctx.kw = inputs[5:]
    ctx.save_for_backward(*inputs[:5], *output)
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("lca::gqa_attend", mutates_args=())
def _gqa_attend(q: Tensor, k: Tensor, v: Tensor, kbar: Tensor, vbar: Tensor, group_size: int,
                window: int, softmax_scale: Optional[float],
                rep_bias: float) -> tuple[Tensor, Tensor]:
    a = _engine(q, [q, k, v, kbar, vbar], ["q", "k", "v", "kbar", "vbar"])
    out, lse = _lca.gqa_attend(*a, group_size=group_size, window=window,
                               softmax_scale=softmax_scale, rep_bias=rep_bias, return_lse=True)
    return _results((out, lse))


@_gqa_attend.register_fake
def _(q, k, v, kbar, vbar, group_size, window, softmax_scale, rep_bias):
    return (_empty(tuple(q.shape[:-1]) + (v.shape[-1],), q),
            _empty(_lse_shape(q), q, _lse_dtype(q)))


@torch.library.custom_op("lca::gqa_attend_backward", mutates_args=())
def _gqa_attend_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, kbar: Tensor,
                         vbar: Tensor, out: Tensor, lse: Tensor, group_size: int, window: int,
                         softmax_scale: Optional[float],
                         rep_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _engine(q, [dout, q, k, v, kbar, vbar, out, lse],
                ["dout", "q", "k", "v", "kbar", "vbar", "out", "lse"])
    return _results(_lca.gqa_attend_backward(*a, group_size=group_size, window=window,
                                             softmax_scale=softmax_scale, rep_bias=rep_bias))


@_gqa_attend_backward.register_fake
def _(dout, q, k, v, kbar, vbar, out, lse, group_size, window, softmax_scale, rep_bias):
    return tuple(_empty(t.shape, t) for t in (q, k, v, kbar, vbar))


_gqa_attend.register_autograd(_grad_through(_gqa_attend_backward), setup_context=_given_setup)


def gqa_attend(q, k, v, kbar, vbar, *, group_size=16, window=1024, softmax_scale=None,
               rep_bias=0.0, return_lse=False):
    """lca.gqa_attend with autograd: the attention of q over the given condensed entries kbar
    (B, m, Hkv, D), vbar (B, m, Hkv, Dv) and the exact tokens; gradients reach q, k, v, kbar
    and vbar (lca.gqa_attend_backward, on either engine)."""
    _check_tensors([q, k, v, kbar, vbar], ["q", "k", "v", "kbar", "vbar"])
    g, w, _, scale, bias = _keywords(group_size, window, None, softmax_scale, rep_bias)
    out, lse = _gqa_attend(q, k, v, kbar, vbar, g, w, scale, bias)
    return (out, lse) if return_lse else out


@torch.library.custom_op("lca::attend", mutates_args=())
def _attend(q: Tensor, latent: Tensor, kpos: Tensor, latent_bar: Tensor, kpos_bar: Tensor,
            group_size: int, window: int, softmax_scale: Optional[float],
            rep_bias: float) -> tuple[Tensor, Tensor]:
    a = _engine(q, [q, latent, kpos, latent_bar, kpos_bar],
                ["q", "latent", "kpos", "latent_bar", "kpos_bar"])
    out, lse = _lca.attend(*a, group_size=group_size, window=window,
                           softmax_scale=softmax_scale, rep_bias=rep_bias, return_lse=True)
    return _results((out, lse))


@_attend.register_fake
def _(q, latent, kpos, latent_bar, kpos_bar, group_size, window, softmax_scale, rep_bias):
    return (_empty(tuple(q.shape[:-1]) + (latent.shape[-1],), q),
            _empty(_lse_shape(q), q, _lse_dtype(q)))


@torch.library.custom_op("lca::attend_backward", mutates_args=())
def _attend_backward(dout: Tensor, q: Tensor, latent: Tensor, kpos: Tensor, latent_bar: Tensor,
                     kpos_bar: Tensor, out: Tensor, lse: Tensor, group_size: int, window: int,
                     softmax_scale: Optional[float],
                     rep_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = _engine(q, [dout, q, latent, kpos, latent_bar, kpos_bar, out, lse],
                ["dout", "q", "latent", "kpos", "latent_bar", "kpos_bar", "out", "lse"])
    return _results(_lca.attend_backward(*a, group_size=group_size, window=window,
                                         softmax_scale=softmax_scale, rep_bias=rep_bias))


@_attend_backward.register_fake
def _(dout, q, latent, kpos, latent_bar, kpos_bar, out, lse, group_size, window, softmax_scale,
      rep_bias):
    return tuple(_empty(t.shape, t) for t in (q, latent, kpos, latent_bar, kpos_bar))


_attend.register_autograd(_grad_through(_attend_backward), setup_context=_given_setup)


def attend(q, latent, kpos, latent_bar, kpos_bar, *, group_size=16, window=1024,
           softmax_scale=None, rep_bias=0.0, return_lse=False):
    """lca.attend with autograd (absorbed MLA over given condensed entries latent_bar (B, m,
    Dc), kpos_bar (B, m, Dr)); gradients reach all five inputs (lca.attend_backward, on either
    engine)."""
    _check_tensors([q, latent, kpos, latent_bar, kpos_bar],
                   ["q", "latent", "kpos", "latent_bar", "kpos_bar"])
    g, w, _, scale, bias = _keywords(group_size, window, None, softmax_scale, rep_bias)
    out, lse = _attend(q, latent, kpos, latent_bar, kpos_bar, g, w, scale, bias)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# MLA prefill, non-absorbed: SPEC §4 (lca/_prefill.py)

@torch.library.custom_op("lca::mla_prefill", mutates_args=())
def _mla_prefill(q: Tensor, latent: Tensor, kpos: Tensor, w_uk: Tensor, w_uv: Tensor,
                 group_size: int, window: int, n_summary: Optional[int], softmax_scale: float,
                 score: str, rep_bias: float) -> tuple[Tensor, Tensor]:
    a = _engine(q, [q, latent, kpos, w_uk, w_uv], ["q", "latent", "kpos", "w_uk", "w_uv"])
    out, lse = _lca.mla_prefill(*a, group_size=group_size, window=window, n_summary=n_summary,
                                softmax_scale=softmax_scale, score=score, rep_bias=rep_bias,
                                return_lse=True)
    return _results((out, lse))


@_mla_prefill.register_fake
def _(q, latent, kpos, w_uk, w_uv, group_size, window, n_summary, softmax_scale, score,
      rep_bias):
    return (_empty(tuple(q.shape[:-1]) + (w_uv.shape[-1],), q),
            _empty(_lse_shape(q), q, _lse_dtype(q)))


def _mla_prefill_setup(ctx, inputs, output):
    ctx.kw = inputs[5:]
    ctx.save_for_backward(*inputs[:5], *output)
    ctx.mark_non_differentiable(output[1])


def _frontend(q):
    """What lca/_prefill.py computes with for q's engine: NumPy (None) or q's CUDA frontend."""
    return None if q.device.type == "cpu" else _lca._cuda.frontend(q)


def _engine_call(fn, q, tensors, names, **kw):
    """fn (an lca function) on the engine's view of the tensors; its results as tensors."""
    return tuple(map(_torch, fn(*_engine(q, tensors, names), **kw)))


def _heads_t(x, w):
    """Σ_h x[..., h, :] @ w[h]ᵀ: x (..., H, E) contiguous, w (H, Dc, E) -> (..., Dc), as one
    product."""
    H, Dc, E = w.shape
    return x.reshape(x.shape[:-2] + (H * E,)) @ w.permute(0, 2, 1).reshape(H * E, Dc)


def _heads_w(x, dy):
    """The gradient of w in y[..., h, :] = x @ w[h]: Σ over the leading dims of
    x[...]ᵀ dy[..., h, :]; x (..., Dc), dy (..., H, E) contiguous -> (H, Dc, E), one product."""
    Dc, (H, E) = x.shape[-1], dy.shape[-2:]
    g = x.reshape(-1, Dc).t() @ dy.reshape(-1, H * E)
    return g.reshape(Dc, H, E).permute(1, 0, 2)


@torch.library.custom_op("lca::mla_prefill_backward", mutates_args=())
def _mla_prefill_backward(dout: Tensor, q: Tensor, latent: Tensor, kpos: Tensor, w_uk: Tensor,
                          w_uv: Tensor, out: Tensor, lse: Tensor, group_size: int, window: int,
                          n_summary: Optional[int], softmax_scale: float, score: str,
                          rep_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradient of mla_prefill through its own (non-absorbed) steps, lca/_prefill.py:
    1. recompute the summary queries, the condensed entries and the up-projected keys and
       values (_prefill._parts: the forward's code, so the same anchors);
    2. lca.gqa_attend_backward over them: dq, dk, dv, dkb, dvb (H kv heads, 192/128 at the
       DeepSeek shape: the tensor-core kernels on the GPU);
    3. back through the up-projections k = [c W_UK[h] ; r], v = c W_UV[h] (and the same for the
       condensed entries): dlatent, dkpos, dW_UK, dW_UV, and dcb, drb;
    4. lca.condense_backward of dcb, drb (the latent-space condensation, one-head query qs):
       dqs and more dlatent, dkpos;
    5. back through qs = [(1/H) Σ_h W_UK[h] qm_nope ; (1/H) Σ_h qm_rope], qm the mean of the
       last n queries of the group: more dq and dW_UK.
    Products in torch (one matmul each); the small sums of the parts in float32 at least."""
    batched = q.ndim == 4
    if not batched:
        dout, q, latent, kpos, out, lse = (t[None] for t in (dout, q, latent, kpos, out, lse))
    B, L, H, Dq = q.shape
    Dc, Dn = latent.shape[-1], w_uk.shape[-1]
    g = group_size
    n = g if n_summary is None else n_summary
    m = L // g
    acc = torch.promote_types(q.dtype, torch.float32)
    # 1. the forward's intermediates, as the engine computed them
    fe = _frontend(q)
    qs, qm, cb, rb, k, v, kb, vb = (
        None if x is None else _torch(x)
        for x in _prefill._parts(fe, *_engine(q, [q, latent, kpos, w_uk, w_uv],
                                              ["q", "latent", "kpos", "w_uk", "w_uv"]),
                                 g, n, softmax_scale, score))
    # 2. the attention over the given condensed entries
    dq, dk, dv, dkb, dvb = _engine_call(
        _lca.gqa_attend_backward, q, [dout, q, k, v, kb, vb, out, lse],
        ["dout", "q", "k", "v", "kbar", "vbar", "out", "lse"], group_size=g, window=window,
        softmax_scale=softmax_scale, rep_bias=rep_bias)
    del k, v, kb, vb                  # (the recomputed keys and values: freed here)
    # 3. k_nope = c W_UK[h], k_rope = r (every head), v = c W_UV[h]; the same for cb, rb
    dkn, dkbn = dk[..., :Dn].contiguous(), dkb[..., :Dn].contiguous()   # (the one copy)
    dr = dk[..., Dn:].sum(-2, dtype=acc)
    del dk
    dc = _heads_t(dkn, w_uk).to(acc) + _heads_t(dv, w_uv)
    dw_uk = _heads_w(latent, dkn).to(acc) + _heads_w(cb, dkbn)
    dw_uv = _heads_w(latent, dv).to(acc) + _heads_w(cb, dvb)
    del dkn, dv
    if m:
        dcb = _heads_t(dkbn, w_uk).to(acc) + _heads_t(dvb, w_uv)
        drb = dkb[..., Dn:].sum(-2, dtype=acc)
        # 4. the latent-space condensation (qs, latent, kpos -> cb, rb)
        dqs, dc_s, dr_s = _engine_call(
            _lca.condense_backward, q,
            [dcb.to(q.dtype), drb.to(q.dtype), qs, latent[:, :m * g], kpos[:, :m * g]],
            ["dlatent_bar", "dkpos_bar", "qs", "latent", "kpos"], group_size=g, n_summary=1,
            softmax_scale=softmax_scale, score=score)
        dc[:, :m * g] += dc_s
        dr[:, :m * g] += dr_s
        # 5. qs[group's last row] = [(1/H) Σ_h W_UK[h] qm_nope[h] ; (1/H) Σ_h qm_rope[h]]
        dqs_c = dqs[:, g - 1::g, 0, :Dc].to(acc)                 # (B, m, Dc)
        dqs_r = dqs[:, g - 1::g, 0, Dc:].to(acc)                 # (B, m, Dr)
        dw_uk += _heads_w(dqs_c, qm[..., :Dn].to(acc)) / H
        dqm = torch.cat([torch.einsum("bjc,hcn->bjhn", dqs_c, w_uk.to(acc)),
                         dqs_r[:, :, None].expand(B, m, H, Dq - Dn)], -1) / (H * n)
        # qm = mean of q over the group's last n rows
        dq = dq.contiguous()
        dq[:, :m * g].view(B, m, g, H, Dq)[:, :, g - n:] += dqm[:, :, None]
    grads = (dq, dc.to(q.dtype), dr.to(q.dtype), dw_uk.to(w_uk.dtype), dw_uv.to(w_uv.dtype))
    if not batched:
        grads = (grads[0][0], grads[1][0], grads[2][0]) + grads[3:]
    return _results(grads)


@_mla_prefill_backward.register_fake
def _(dout, q, latent, kpos, w_uk, w_uv, out, lse, group_size, window, n_summary,
      softmax_scale, score, rep_bias):
    return tuple(_empty(t.shape, t) for t in (q, latent, kpos, w_uk, w_uv))


def _mla_prefill_grad(ctx, dout, dlse):
    return tuple(_mla_prefill_backward(dout, *ctx.saved_tensors, *ctx.kw)) + \
        (None,) * len(ctx.kw)


_mla_prefill.register_autograd(_mla_prefill_grad, setup_context=_mla_prefill_setup)


def _mla_prefill_grad_absorbed(dout, q, latent, kpos, w_uk, w_uv, kw):
    """The same gradient through the absorbed identity out[t,h] = attention(q_abs, c, r)[t,h]
    @ W_UV[h] (the backward before the non-absorbed one; kept for tests/test_mla_prefill.py to
    compare with): the absorbed forward recomputed, lca.attention_backward on the 576/512
    shape (on the GPU only the portable kernels run it), the W_UK / W_UV products by hand.
    kw: the op's keywords (group_size, window, n_summary, softmax_scale, score, rep_bias)."""
    H, Dc, Dn = w_uk.shape
    qn = q[..., :Dn]
    # forward again, absorbed: q_abs[t,h] = [W_UK[h] q_nope[t,h] ; q_rope[t,h]]
    q_abs = torch.cat([torch.einsum("...hn,hcn->...hc", qn, w_uk), q[..., Dn:]], dim=-1)
    out_lat, lse, *cond = _attention(q_abs, latent, kpos, *kw)
    # out = out_lat @ W_UV[h]  ->  dout_lat, dW_UV
    dout_lat = torch.einsum("...hv,hcv->...hc", dout, w_uv)
    dw_uv = torch.einsum("nhc,nhv->hcv", out_lat.reshape(-1, H, Dc),
                         dout.reshape(-1, H, dout.shape[-1]))
    dq_abs, dlatent, dkpos = _attention_backward(dout_lat, q_abs, latent, kpos, out_lat, lse,
                                                 *cond, *kw)
    # q_abs[..., :Dc] = W_UK[h] q_nope  ->  dq_nope, dW_UK
    dqc = dq_abs[..., :Dc]
    dq = torch.cat([torch.einsum("...hc,hcn->...hn", dqc, w_uk), dq_abs[..., Dc:]], dim=-1)
    dw_uk = torch.einsum("nhc,nhk->hck", dqc.reshape(-1, H, Dc), qn.reshape(-1, H, Dn))
    return dq, dlatent, dkpos, dw_uk, dw_uv


def mla_prefill(q, latent, kpos, w_uk, w_uv, *, group_size=16, window=1024, n_summary=None,
                softmax_scale=None, score="full", rep_bias=0.0, return_lse=False):
    """lca.mla_prefill with autograd: q (B, L, H, Dn+Dr) [q_nope ; q_rope], latent (B, L, Dc),
    kpos (B, L, Dr), w_uk (H, Dc, Dn), w_uv (H, Dc, Dv) -> out (B, L, H, Dv) [, lse (B, H, L),
    not differentiable].  softmax_scale defaults to 1/sqrt(Dn+Dr).  Gradients reach all five
    inputs, through the non-absorbed steps (see the module docstring)."""
    names = ["q", "latent", "kpos", "w_uk", "w_uv"]
    _check_tensors([q, latent, kpos, w_uk, w_uv], names)
    g, w, n, scale, bias = _keywords(group_size, window, n_summary, softmax_scale, rep_bias)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _mla_prefill(q, latent, kpos, w_uk, w_uv, g, w, n, scale,
                            choice_param(score, "score", ("full", "latent")), bias)
    return (out, lse) if return_lse else out
