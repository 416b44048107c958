"""lca — Latent-Condensed Attention (arXiv 2604.12452) for MLA and GQA layers.

The public API of SPEC §7: defaults, validation, dispatch.  The math lives in the C engine
(lca._C, csrc/); the float64 executable spec in lca.reference.

Shapes (a leading batch dim B is optional, on every input or on none):
    MLA: q (B, L, H, Dc+Dr), latent (B, L, Dc), kpos (B, L, Dr)      -> out (B, L, H, Dc)
    GQA: q (B, L, H, D),     k (B, L, Hkv, D),  v (B, L, Hkv, Dv)     -> out (B, L, H, Dv)
    MLA prefill, non-absorbed (lca.mla_prefill): q (B, L, H, Dn+Dr), latent, kpos as above,
         w_uk (H, Dc, Dn), w_uv (H, Dc, Dv)                           -> out (B, L, H, Dv)
    lse (B, H, L): float32, or float64 for float64 inputs.
NumPy float32 and float64 arrays run on the CPU engine, multi-threaded, GIL released.
PyTorch and CuPy CUDA arrays (float32, float16, bfloat16) run on the CUDA engine, zero-copy, on
the caller's current stream, and come back as the caller's arrays (lse and alpha in float32).
Arrays of other libraries that export DLPack or __cuda_array_interface__ (JAX, Numba, ...) are
taken without a copy too and come back through their own namespace (__array_namespace__);
an exporter without one (a Numba device array) gets the engine's arrays back (NumPy on the CPU,
torch or CuPy on a CUDA device).
PyTorch autograd and torch.compile: lca.torch (imported only on request; `import lca` never
imports torch).
"""
import functools
import math

import numpy as np

from . import _C, _cuda
from ._arrays import (as_array, check_dim, check_rank, choice_param, float_param, for_engine,
                      int_param, same_dtype, window_param)

__all__ = ["attention", "attention_backward", "gqa_attention", "gqa_attention_backward",
           "condense", "gqa_condense", "attend", "gqa_attend", "attend_backward",
           "gqa_attend_backward", "condense_backward", "gqa_condense_backward", "num_condensed",
           "cache_entries", "mla_prefill", "LatentCache", "GQACache", "HAS_CUDA"]
__version__ = "0.1.0"

HAS_CUDA = _cuda.device_count() > 0      # built with the CUDA engine and a device is visible


# ---------------------------------------------------------------------------------------------
# results in the caller's array type: torch CPU tensors run on the C engine through NumPy views
# of their memory, and the results come back as torch tensors over the same buffers (no copies).
# Arrays of any other library that export DLPack or __cuda_array_interface__ (JAX, Numba, ...)
# are adopted without a copy — on the CPU as NumPy views, on a CUDA device as torch tensors (or
# CuPy arrays where torch lacks CUDA) — and the results come back through the caller's
# namespace (its __array_namespace__().from_dlpack), or as the engine's arrays where it has none.

_ENGINE_TYPES = ("numpy", "torch", "cupy")
_DL_CUDA = (2, 13)                            # DLPack's kDLCUDA, kDLCUDAManaged
_DL_KNOWN = (1, 3) + _DL_CUDA                 # and kDLCPU, kDLCUDAHost (CPU-readable)


def _is_torch_cpu(a):
    return type(a).__module__.split(".")[0] == "torch" and getattr(a, "is_cuda", True) is False


def _is_foreign(a):
    """An array of a library the engines do not take directly, exporting DLPack or CAI."""
    if isinstance(a, (np.ndarray, int, float, str, bool, type(None))):
        return False
    if type(a).__module__.split(".")[0] in _ENGINE_TYPES:
        return False
    return hasattr(a, "__dlpack__") or hasattr(a, "__cuda_array_interface__")


def _foreign_in(a):
    """a, or an element of a tuple / list a, is a foreign array."""
    return _is_foreign(a) or (isinstance(a, (tuple, list)) and any(map(_is_foreign, a)))


def _adopt(a, name):
    """A foreign array as an array the engines take, sharing its memory."""
    try:
        dev = int(a.__dlpack_device__()[0]) if hasattr(a, "__dlpack_device__") else None
    except Exception as e:  # noqa: BLE001 - a broken exporter is the caller's type error
        raise TypeError(f"{name}: {type(a).__name__}.__dlpack_device__ failed ({e})") from None
    if dev not in (None,) + _DL_KNOWN:
        raise TypeError(f"{name}: an array on DLPack device type {dev}; lca runs on the CPU and "
                        "on CUDA devices")
    on_cuda = hasattr(a, "__cuda_array_interface__") or dev in _DL_CUDA
    try:
        if not on_cuda:
            return np.from_dlpack(a)
        try:
            import torch
            if torch.cuda.is_available():          # (a CPU-only torch: try CuPy)
                return torch.from_dlpack(a) if hasattr(a, "__dlpack__") else torch.as_tensor(a)
        except ImportError:
            pass
        try:
            import cupy
            return cupy.from_dlpack(a) if hasattr(a, "__dlpack__") else cupy.asarray(a)
        except ImportError:
            raise NotImplementedError(
                f"{name}: a CUDA array of {type(a).__module__}: lca's CUDA engine allocates "
                "its results through PyTorch or CuPy, and neither (with CUDA) is installed") \
                from None
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a dtype DLPack cannot carry to NumPy
        raise TypeError(f"{name}: {type(a).__name__} could not be read without a copy "
                        f"through DLPack or __cuda_array_interface__ ({e})") from None


def _to_caller(out, convert):
    if isinstance(out, tuple):
        return tuple(_to_caller(o, convert) for o in out)
    return out if out is None or isinstance(out, (int, float)) else convert(out)


def _caller_type(fn):
    """fn taking and returning the caller's array types: torch CPU tensors back from NumPy
    results; foreign arrays (DLPack / CAI exporters) adopted on the way in and returned through
    their namespace on the way out."""
    sig = None

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        nonlocal sig
        if any(map(_foreign_in, args)) or any(map(_foreign_in, kw.values())):
            import inspect
            sig = sig or inspect.signature(fn)
            bound = sig.bind(*args, **kw)
            # the caller's array type: its first foreign array argument (a 0-d one passed as a
            # scalar keyword, e.g. group_size, does not decide it)
            like = next((a for a in bound.arguments.values()
                         if _is_foreign(a) and getattr(a, "ndim", None) != 0), None)
            for nm, a in bound.arguments.items():
                if _is_foreign(a):
                    bound.arguments[nm] = _adopt(a, nm)
                elif isinstance(a, (tuple, list)):      # condensed=(kbar, vbar, anchor, alpha)
                    bound.arguments[nm] = tuple(_adopt(x, f"{nm}[{i}]") if _is_foreign(x)
                                                else x for i, x in enumerate(a))
            out = fn(*bound.args, **bound.kwargs)
            ns = getattr(like, "__array_namespace__", None)
            return out if ns is None else _to_caller(out, ns().from_dlpack)
        out = fn(*args, **kw)
        if any(_is_torch_cpu(a) for a in args) or any(_is_torch_cpu(a) for a in kw.values()):
            import torch
            return _to_caller(out, lambda o: torch.from_numpy(o) if isinstance(o, np.ndarray)
                              else o)
        return out
    return wrapper


# ---------------------------------------------------------------------------------------------
# intake: validated, batched (B, L, heads, width) arrays for the engine

def _intake(arrays, names):
    """(fe, code, arrays): fe the CUDA frontend of a CUDA q (None for the CPU engine), code its
    dtype code; CPU inputs become NumPy arrays of one float dtype."""
    if _cuda.framework(arrays[0]):
        fe = _cuda.frontend(arrays[0])
        return fe, _cuda.check_same(fe, arrays[0], arrays[1:], names[1:]), list(arrays)
    for a, nm in zip(arrays[1:], names[1:]):
        if _cuda.framework(a):
            raise TypeError(f"{nm}: a CUDA array, but {names[0]} is not; pass all inputs on "
                            "one device")
    arrays = [as_array(a, nm) for a, nm in zip(arrays, names)]
    same_dtype(arrays, names)
    return None, None, arrays


def _mla_inputs(q, latent, kpos):
    """Validate MLA inputs; return (batched, fe, code, q, k, v) in GQA form: k = [c; r] with
    one kv head, v = its first Dc columns (a view)."""
    fe, code, (q, c, r) = _intake([q, latent, kpos], ["q", "latent", "kpos"])
    batched = q.ndim == 4
    if q.ndim not in (3, 4):
        raise ValueError(f"q: expected shape (B, L, H, Dc+Dr) or (L, H, Dc+Dr), got {q.shape}")
    check_rank([c, r], ["latent", "kpos"], [2, 2], batched)
    if not batched:
        q, c, r = q[None], c[None], r[None]
    B, L, H, Dq = q.shape
    for a, nm in ((c, "latent"), (r, "kpos")):
        check_dim(nm, a.shape, 0, "batch", B, "q's batch")
        check_dim(nm, a.shape, 1, "length", L, "q's length")
    Dc, Dr = c.shape[2], r.shape[2]
    if H < 1:
        raise ValueError(f"q: needs at least one head, got shape {q.shape}")
    if Dc < 1:
        raise ValueError(f"latent: width Dc must be >= 1, got shape {c.shape}")
    if Dq != Dc + Dr:
        raise ValueError(f"q: last dim must be Dc+Dr = {Dc}+{Dr} = {Dc + Dr} (latent and "
                         f"kpos widths), got {Dq}")
    if fe:
        k = fe.cat([c[:, :, None], r[:, :, None]], axis=3)
        return batched, fe, code, fe.contiguous_last(q), k, k[..., :Dc]
    k = np.empty((B, L, 1, Dc + Dr), q.dtype)
    k[:, :, 0, :Dc] = c
    k[:, :, 0, Dc:] = r
    return batched, None, None, for_engine(q), k, k[..., :Dc]


def _gqa_inputs(q, k, v):
    fe, code, (q, k, v) = _intake([q, k, v], ["q", "k", "v"])
    batched = q.ndim == 4
    if q.ndim not in (3, 4):
        raise ValueError(f"q: expected shape (B, L, H, D) or (L, H, D), got {q.shape}")
    check_rank([k, v], ["k", "v"], [3, 3], batched)
    if not batched:
        q, k, v = q[None], k[None], v[None]
    B, L, H, D = q.shape
    for a, nm in ((k, "k"), (v, "v")):
        check_dim(nm, a.shape, 0, "batch", B, "q's batch")
        check_dim(nm, a.shape, 1, "length", L, "q's length")
    check_dim("v", v.shape, 2, "kv heads", k.shape[2], "k's kv heads")
    check_dim("k", k.shape, 3, "head dim", D, "q's head dim")
    Hkv = k.shape[2]
    if H < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"k: query heads ({H}) must be a positive multiple of kv heads ({Hkv})")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"q, v: head dims must be >= 1, got D={D}, Dv={v.shape[3]}")
    prep = fe.contiguous_last if fe else for_engine
    return batched, fe, code, prep(q), prep(k), prep(v)


class _Cfg:
    """The LCA keywords, validated once."""

    def __init__(self, L, D, group_size=16, window=1024, n_summary=None, softmax_scale=None,
                 rep_bias=0.0):
        self.g = int_param(group_size, "group_size", 1)
        self.w = window_param(window, L)
        self.n = self.g if n_summary is None else int_param(n_summary, "n_summary", 1, self.g)
        self.scale = float_param(softmax_scale, "softmax_scale", 1.0 / math.sqrt(D))
        self.rep_bias = float_param(rep_bias, "rep_bias")
        self.m = L // self.g


def _forward_result(out, lse, condensed):
    """out, or (out[, lse][, condensed]): those of lse and condensed that are not None."""
    res = (out,) + tuple(x for x in (lse, condensed) if x is not None)
    return res if len(res) > 1 else out


def _unbatch(batched, *arrays):
    return arrays if batched else tuple(a[0] for a in arrays)


# ---------------------------------------------------------------------------------------------
# the engine calls shared by MLA and GQA

def _condense(fe, code, q, k, v, cfg, d_score, d_pool, v_in_k):
    if fe:
        return _cuda.condense(fe, code, q, k, v, v_in_k, cfg, d_score, d_pool)
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    kbar = np.empty((B, cfg.m, Hkv, D), q.dtype)
    vbar = kbar[..., :Dv] if v_in_k else np.empty((B, cfg.m, Hkv, Dv), q.dtype)
    anchor = np.empty((B, cfg.m, Hkv), np.int32)
    alpha = np.empty((B, cfg.m, Hkv, cfg.g), q.dtype)
    _C.condense(q, k, v, kbar, vbar, anchor, alpha, cfg.g, cfg.n, cfg.scale, d_score, d_pool,
                v_in_k)
    return kbar, vbar, anchor, alpha


def _attend(fe, code, q, k, v, kbar, vbar, cfg, v_in_k):
    if fe:
        return _cuda.attend(fe, code, q, k, v, kbar, vbar, cfg, v_in_k)
    B, L, H, _ = q.shape
    out = np.empty((B, L, H, v.shape[3]), q.dtype)
    lse = np.empty((B, H, L), q.dtype)
    _C.attend(q, k, v, kbar, vbar, out, lse, cfg.g, cfg.w, cfg.scale, cfg.rep_bias, v_in_k)
    return out, lse


def _check_grad_shapes(q, v, dout, out, lse):
    B, L, H, _ = q.shape
    Dv = v.shape[3]
    for a, nm in ((dout, "dout"), (out, "out")):
        if tuple(a.shape) != (B, L, H, Dv):
            raise ValueError(f"{nm}: expected shape {(B, L, H, Dv)}, got {tuple(a.shape)}")
    if tuple(lse.shape) != (B, H, L):
        raise ValueError(f"lse: expected shape {(B, H, L)} (B, H, L), got {tuple(lse.shape)}")


def _cpu_grad_inputs(q, dout, out, lse):
    """dout, out, lse as the CPU engine reads them: q's dtype, views it can read."""
    return (for_engine(dout.astype(q.dtype, copy=False)),
            for_engine(out.astype(q.dtype, copy=False)), np.require(lse, q.dtype, ["C", "A"]))


def _zero_grads(q, k, v, v_in_k):
    """Zeroed dq, dk, dv for the CPU engine to accumulate into (dv is dk's prefix with v_in_k)."""
    dk = np.zeros(k.shape, q.dtype)
    return (np.zeros_like(q, order="C"), dk,
            dk[..., :v.shape[3]] if v_in_k else np.zeros(v.shape, q.dtype))


def _backward(fe, code, dout, q, k, v, out, lse, cfg, d_score, d_pool, v_in_k, handed=None):
    """handed: the forward's condensation (kbar, vbar, anchor, alpha) as _handed returns it,
    or None to recompute it."""
    _check_grad_shapes(q, v, dout, out, lse)
    if fe:
        return _cuda.backward(fe, code, dout, q, k, v, out, lse, cfg, d_score, d_pool, v_in_k,
                              handed)
    dout, out, lse = _cpu_grad_inputs(q, dout, out, lse)
    dq, dk, dv = _zero_grads(q, k, v, v_in_k)
    extra = () if handed is None else (tuple(handed[:2]),)   # (the CPU recomputes alpha)
    _C.backward(dout, q, k, v, out, lse, dq, dk, dv, cfg.g, cfg.w, cfg.n, cfg.scale,
                cfg.rep_bias, d_score, d_pool, v_in_k, *extra)
    return dq, dk, dv


def _handed(fe, q, batched, condensed, cfg, widths, heads, whose):
    """The forward's condensation given to a backward (condensed=): the 4-tuple of arrays that
    gqa_condense / condense return (and gqa_attention / attention with return_condensed=True),
    validated against q and returned batched, in the engine's layout: (kbar (B, m, heads,
    width0), vbar (B, m, heads, width1), anchor (B, m, heads) int32, alpha (B, m, heads, g)),
    m = L // g.  heads None: MLA's (B, m, width) entries, a kv-head axis of 1 added.  The
    backward trusts them to be that forward's, as it trusts out and lse."""
    if not isinstance(condensed, (tuple, list)) or len(condensed) != 4:
        raise TypeError("condensed: expected the 4-tuple (entries, entries, anchor, alpha) "
                        "the forward returns with return_condensed=True (or the condensation "
                        f"function returns), got {type(condensed).__name__}")
    names = [f"condensed[{i}]" for i in range(4)]
    arrays = list(condensed)
    if fe:
        _cuda.check_same(fe, q, arrays[:2], names[:2])
        _cuda.check_place(fe, q, arrays[2:], names[2:])
        if str(arrays[2].dtype) not in ("int32", "torch.int32"):
            raise TypeError(f"{names[2]} (anchor): expected int32, got {arrays[2].dtype}")
        fe.code(arrays[3], names[3])
    else:
        arrays[:2] = [as_array(a, nm) for a, nm in zip(arrays[:2], names[:2])]
        same_dtype([q] + arrays[:2], ["q"] + names[:2])
        arrays[2] = np.asarray(arrays[2])
        if arrays[2].dtype != np.int32:
            raise TypeError(f"{names[2]} (anchor): expected int32, got {arrays[2].dtype}")
        arrays[3] = as_array(arrays[3], names[3])
    mla = heads is None
    check_rank(arrays, names, [2 + (not mla)] * 2 + [1 + (not mla), 2 + (not mla)], batched)
    if not batched:
        arrays = [a[None] for a in arrays]
    if mla:
        arrays = [a[:, :, None] for a in arrays]
        heads = 1
    B, m = q.shape[0], cfg.m
    for a, nm, width, what in zip(arrays, names, list(widths) + [None, cfg.g],
                                  list(whose) + [None, "group_size"]):
        check_dim(nm, a.shape, 0, "batch", B, "q's batch")
        check_dim(nm, a.shape, 1, "entries", m, "L // group_size")
        check_dim(nm, a.shape, 2, "kv heads", heads, "k's kv heads")
        if width is not None:
            check_dim(nm, a.shape, 3, "width", width, what)
    kbar, vbar, anchor, alpha = arrays
    if mla:                     # the engine's keys [latent_bar; kpos_bar], values their prefix
        kbar = _mla_keys(fe, q, kbar[:, :, 0], vbar[:, :, 0])
        vbar = kbar[..., :widths[0]]
    if fe:
        return (fe.contiguous_last(kbar), fe.contiguous_last(vbar), fe.contiguous(anchor),
                fe.contiguous(fe.float32(alpha)))
    return for_engine(kbar), for_engine(vbar), anchor, alpha


def _attend_backward(fe, code, dout, q, k, v, kbar, vbar, out, lse, cfg, v_in_k):
    """dq, dk, dv, dkbar, dvbar of attend over the given kbar, vbar."""
    _check_grad_shapes(q, v, dout, out, lse)
    if fe:
        return _cuda.attend_backward(fe, code, dout, q, k, v, kbar, vbar, out, lse, cfg, v_in_k)
    dout, out, lse = _cpu_grad_inputs(q, dout, out, lse)
    dq, dk, dv = _zero_grads(q, k, v, v_in_k)
    dkbar = np.zeros(kbar.shape, q.dtype)
    dvbar = dkbar[..., :v.shape[3]] if v_in_k else np.zeros(vbar.shape, q.dtype)
    _C.attend_backward(dout, q, k, v, kbar, vbar, out, lse, dq, dk, dv, dkbar, dvbar,
                       cfg.g, cfg.w, cfg.scale, cfg.rep_bias, v_in_k)
    return dq, dk, dv, dkbar, dvbar


def _condense_backward(fe, code, grads, names, q, k, v, cfg, d_score, d_pool, v_in_k, batched):
    """dq, dk, dv of condense's pooled entries, given their gradients."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if fe:
        _cuda.check_same(fe, q, grads, names)
    else:
        grads = [as_array(a, nm) for a, nm in zip(grads, names)]
        same_dtype([q] + grads, ["q"] + names)
    if not batched:
        grads = [a[None] if a.ndim >= 1 else a for a in grads]
    if v_in_k:                               # MLA: grads = (dlatent_bar, dkpos_bar)
        shapes = [(B, cfg.m, Dv), (B, cfg.m, D - Dv)]
    else:
        shapes = [(B, cfg.m, Hkv, D), (B, cfg.m, Hkv, Dv)]
    for a, nm, shape in zip(grads, names, shapes):
        want = shape if batched else shape[1:]
        if tuple(a.shape) != shape:
            raise ValueError(f"{nm}: expected shape {want}, got "
                             f"{tuple(a.shape) if batched else tuple(a.shape)[1:]}")
    if fe:
        if v_in_k:                           # the engine's (B, m, 1, Dc+Dr) entry gradients
            dkbar = fe.cat([grads[0][:, :, None], grads[1][:, :, None]], axis=3)
            dvbar = dkbar[..., :Dv]
        else:
            dkbar, dvbar = (fe.contiguous_last(a) for a in grads)
        return _cuda.condense_backward(fe, code, q, k, v, dkbar, dvbar, cfg, d_score, d_pool,
                                       v_in_k)
    dkbar = np.zeros((B, cfg.m, Hkv, D), q.dtype)
    dvbar = dkbar[..., :Dv] if v_in_k else np.zeros((B, cfg.m, Hkv, Dv), q.dtype)
    if v_in_k:
        targets = [dkbar[:, :, 0, :Dv], dkbar[:, :, 0, Dv:]]
    else:
        targets = [dkbar, dvbar]
    for a, t in zip(grads, targets):
        t[...] = a
    dq, dk, dv = _zero_grads(q, k, v, v_in_k)
    _C.condense_backward(q, k, v, dkbar, dvbar, dq, dk, dv, cfg.g, cfg.n, cfg.scale, d_score,
                         d_pool, v_in_k)
    return dq, dk, dv


def _backward_inputs(fe, q, dout, out, lse, batched):
    if fe:
        dout, out, lse = _cuda.check_grad_inputs(fe, q, dout, out, lse)
    else:
        dout, out, lse = as_array(dout, "dout"), as_array(out, "out"), as_array(lse, "lse")
    check_rank([dout, out, lse], ["dout", "out", "lse"], [3, 3, 2], batched)
    if not batched:
        dout, out, lse = dout[None], out[None], lse[None]
    return dout, out, lse


# ---------------------------------------------------------------------------------------------
# MLA (absorbed form): SPEC §2, §3, §5

def _mla_cfg(q, kw):
    return _Cfg(q.shape[1], q.shape[3], **kw)


def _score_dims(score, Dc, Dq):
    return Dq if choice_param(score, "score", ("full", "latent")) == "full" else Dc


def _contig(fe, a):
    return fe.contiguous(a) if fe else np.ascontiguousarray(a)


def _given_condensed(fe, q, batched, arrays, names, widths, heads, cfg):
    """Validate user-given condensed entries for attend / gqa_attend; return them batched."""
    if fe:
        _cuda.check_same(fe, q, arrays, names)
    else:
        arrays = [as_array(a, nm) for a, nm in zip(arrays, names)]
        same_dtype([q] + arrays, ["q"] + names)
    check_rank(arrays, names, [3 - (heads is None)] * 2, batched)
    if not batched:
        arrays = [a[None] for a in arrays]
    B, L = q.shape[:2]
    need = num_condensed(L - 1, cfg.g, cfg.w) if L else 0
    for a, nm, width in zip(arrays, names, widths):
        check_dim(nm, a.shape, 0, "batch", B, "q's batch")
        if heads is not None:
            check_dim(nm, a.shape, 2, "kv heads", heads, "k's kv heads")
        check_dim(nm, a.shape, a.ndim - 1, "width", width, "the matching input's width")
        if a.shape[1] < need:
            raise ValueError(f"{nm}: has {a.shape[1]} condensed entries, the last query needs "
                             f"{need} (shape {a.shape})")
    check_dim(names[1], arrays[1].shape, 1, "entries", arrays[0].shape[1], f"{names[0]}'s entries")
    return arrays


def _mla_entries(fe, q, batched, latent_bar, kpos_bar, Dc, cfg):
    """Given MLA condensed entries, validated, as the engine's keys kbar (B, m, 1, Dc+Dr) =
    [latent_bar; kpos_bar] (the values are its first Dc columns)."""
    Dq = q.shape[3]
    cb, rb = _given_condensed(fe, q, batched, [latent_bar, kpos_bar], ["latent_bar", "kpos_bar"],
                              [Dc, Dq - Dc], None, cfg)
    return _mla_keys(fe, q, cb, rb)


def _mla_keys(fe, q, cb, rb):
    """Batched MLA entries cb (B, m, Dc), rb (B, m, Dr) as the engine's keys (B, m, 1, Dc+Dr)."""
    if fe:
        return fe.cat([cb[:, :, None], rb[:, :, None]], axis=3)
    Dc = cb.shape[2]
    kbar = np.empty((q.shape[0], cb.shape[1], 1, Dc + rb.shape[2]), q.dtype)
    kbar[:, :, 0, :Dc], kbar[:, :, 0, Dc:] = cb, rb
    return kbar


@_caller_type
def condense(q, latent, kpos, *, group_size=16, n_summary=None, softmax_scale=None,
             score="full"):
    """SPEC §2 condensation of every complete group.

    Returns (latent_bar (B, m, Dc), kpos_bar (B, m, Dr), anchor (B, m) int32, alpha (B, m, g)),
    m = L // group_size; alpha in the input dtype (float32 on CUDA)."""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, n_summary=n_summary,
                           softmax_scale=softmax_scale))
    Dc = v.shape[3]
    kbar, _, anchor, alpha = _condense(fe, code, q, k, v, cfg,
                                       _score_dims(score, Dc, q.shape[3]), Dc, 1)
    return _unbatch(batched, *_mla_condensed(fe, kbar, anchor, alpha, Dc))


def _mla_condensed(fe, kbar, anchor, alpha, Dc):
    """The engine's MLA condensation (kbar (B, m, 1, Dc+Dr), anchor, alpha with a kv-head axis
    of 1) as condense() returns it: latent_bar, kpos_bar, anchor, alpha."""
    return (_contig(fe, kbar[:, :, 0, :Dc]), _contig(fe, kbar[:, :, 0, Dc:]), anchor[:, :, 0],
            alpha[:, :, 0])


@_caller_type
def condense_backward(dlatent_bar, dkpos_bar, q, latent, kpos, *, group_size=16, n_summary=None,
                      softmax_scale=None, score="full"):
    """Gradient of condense()'s pooled entries alone: given dlatent_bar (B, m, Dc) and
    dkpos_bar (B, m, Dr), (dq, dlatent, dkpos) through the pooling weights, the anchor copy and
    the summary queries (anchor and alpha are not differentiated).  attention_backward is
    attend_backward plus this."""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, n_summary=n_summary,
                           softmax_scale=softmax_scale))
    Dq, Dc = q.shape[3], v.shape[3]
    dq, dk, _ = _condense_backward(fe, code, [dlatent_bar, dkpos_bar],
                                   ["dlatent_bar", "dkpos_bar"], q, k, v, cfg,
                                   _score_dims(score, Dc, Dq), Dc, 1, batched)
    return _unbatch(batched, dq, _contig(fe, dk[:, :, 0, :Dc]), _contig(fe, dk[:, :, 0, Dc:]))


@_caller_type
def attend(q, latent, kpos, latent_bar, kpos_bar, *, group_size=16, window=1024,
           softmax_scale=None, rep_bias=0.0, return_lse=False):
    """SPEC §3 attention over given condensed entries (latent_bar (B, m, Dc), kpos_bar (B, m, Dr),
    m >= the G_t of the last query) and the exact tokens.  attention == attend(condense(...))."""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, window=window, softmax_scale=softmax_scale,
                           rep_bias=rep_bias))
    Dc = v.shape[3]
    kbar = _mla_entries(fe, q, batched, latent_bar, kpos_bar, Dc, cfg)
    out, lse = _unbatch(batched, *_attend(fe, code, q, k, v, kbar, kbar[..., :Dc], cfg, 1))
    return (out, lse) if return_lse else out


@_caller_type
def attend_backward(dout, q, latent, kpos, latent_bar, kpos_bar, out, lse, *, group_size=16,
                    window=1024, softmax_scale=None, rep_bias=0.0):
    """Gradient of attend() with the condensed entries as inputs of their own (no condensation
    to differentiate through): (dq, dlatent, dkpos, dlatent_bar, dkpos_bar).  out and lse are
    attend()'s.  For research code that supplies its own condensation.  (CUDA arrays: not
    yet run on a GPU.)"""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, window=window, softmax_scale=softmax_scale,
                           rep_bias=rep_bias))
    Dc = v.shape[3]
    kbar = _mla_entries(fe, q, batched, latent_bar, kpos_bar, Dc, cfg)
    dout, out, lse = _backward_inputs(fe, q, dout, out, lse, batched)
    dq, dk, _, dkb, _ = _attend_backward(fe, code, dout, q, k, v, kbar, kbar[..., :Dc], out,
                                         lse, cfg, 1)
    return _unbatch(batched, dq, _contig(fe, dk[:, :, 0, :Dc]), _contig(fe, dk[:, :, 0, Dc:]),
                    _contig(fe, dkb[:, :, 0, :Dc]), _contig(fe, dkb[:, :, 0, Dc:]))


@_caller_type
def attention(q, latent, kpos, *, group_size=16, window=1024, n_summary=None,
              softmax_scale=None, score="full", rep_bias=0.0, return_lse=False,
              return_condensed=False):
    """LCA attention for MLA in absorbed form (SPEC §2 + §3).

    q (B, L, H, Dc+Dr), latent (B, L, Dc), kpos (B, L, Dr) -> out (B, L, H, Dc)
    [, lse (B, H, L)] [, condensed].  With window >= L this is exact causal MLA attention.
    condensed: the condensation attended to, as condense() returns it (latent_bar, kpos_bar,
    anchor, alpha); give it to attention_backward(condensed=) to spare recomputing it."""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, window=window, n_summary=n_summary,
                           softmax_scale=softmax_scale, rep_bias=rep_bias))
    Dc = v.shape[3]
    kbar, vbar, anchor, alpha = _condense(fe, code, q, k, v, cfg,
                                          _score_dims(score, Dc, q.shape[3]), Dc, 1)
    out, lse = _unbatch(batched, *_attend(fe, code, q, k, v, kbar, vbar, cfg, 1))
    cond = (_unbatch(batched, *_mla_condensed(fe, kbar, anchor, alpha, Dc))
            if return_condensed else None)
    return _forward_result(out, lse if return_lse else None, cond)


@_caller_type
def attention_backward(dout, q, latent, kpos, out, lse, *, group_size=16, window=1024,
                       n_summary=None, softmax_scale=None, score="full", rep_bias=0.0,
                       condensed=None):
    """Exact gradient of attention() (SPEC §5): (dq, dlatent, dkpos), through the summary
    queries, the pooling weights and the anchor copy.  out and lse are attention()'s;
    condensed, when given, its return_condensed=True result (not recomputed then)."""
    batched, fe, code, q, k, v = _mla_inputs(q, latent, kpos)
    cfg = _mla_cfg(q, dict(group_size=group_size, window=window, n_summary=n_summary,
                           softmax_scale=softmax_scale, rep_bias=rep_bias))
    dout, out, lse = _backward_inputs(fe, q, dout, out, lse, batched)
    Dc = v.shape[3]
    handed = None if condensed is None else _handed(
        fe, q, batched, condensed, cfg, (Dc, q.shape[3] - Dc), None, ("latent's width",
                                                                      "kpos's width"))
    dq, dk, _ = _backward(fe, code, dout, q, k, v, out, lse, cfg,
                          _score_dims(score, Dc, q.shape[3]), Dc, 1, handed)
    return _unbatch(batched, dq, _contig(fe, dk[:, :, 0, :Dc]), _contig(fe, dk[:, :, 0, Dc:]))


# ---------------------------------------------------------------------------------------------
# GQA / MHA: SPEC §4, §5

def _gqa_pool(key_mode, D):
    return D if choice_param(key_mode, "key_mode", ("anchor", "pool")) == "pool" else 0


@_caller_type
def gqa_condense(q, k, v, *, group_size=16, n_summary=None, softmax_scale=None,
                 key_mode="anchor"):
    """SPEC §4 condensation: (kbar (B, m, Hkv, D), vbar (B, m, Hkv, Dv), anchor (B, m, Hkv)
    int32, alpha (B, m, Hkv, g))."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    cfg = _Cfg(q.shape[1], q.shape[3], group_size=group_size, n_summary=n_summary,
               softmax_scale=softmax_scale)
    D = q.shape[3]
    return _unbatch(batched, *_condense(fe, code, q, k, v, cfg, D, _gqa_pool(key_mode, D), 0))


@_caller_type
def gqa_condense_backward(dkbar, dvbar, q, k, v, *, group_size=16, n_summary=None,
                          softmax_scale=None, key_mode="anchor"):
    """Gradient of gqa_condense()'s kbar, vbar alone: (dq, dk, dv) given dkbar (B, m, Hkv, D)
    and dvbar (B, m, Hkv, Dv).  gqa_attention_backward is gqa_attend_backward plus this."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    D = q.shape[3]
    cfg = _Cfg(q.shape[1], D, group_size=group_size, n_summary=n_summary,
               softmax_scale=softmax_scale)
    return _unbatch(batched, *_condense_backward(fe, code, [dkbar, dvbar], ["dkbar", "dvbar"], q,
                                                 k, v, cfg, D, _gqa_pool(key_mode, D), 0,
                                                 batched))


@_caller_type
def gqa_attend(q, k, v, kbar, vbar, *, group_size=16, window=1024, softmax_scale=None,
               rep_bias=0.0, return_lse=False):
    """SPEC §3 for GQA over given condensed entries kbar (B, m, Hkv, D), vbar (B, m, Hkv, Dv)."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    B, L, H, D = q.shape
    cfg = _Cfg(L, D, group_size=group_size, window=window, softmax_scale=softmax_scale,
               rep_bias=rep_bias)
    kb, vb = _given_condensed(fe, q, batched, [kbar, vbar], ["kbar", "vbar"], [D, v.shape[3]],
                              k.shape[2], cfg)
    prep = fe.contiguous_last if fe else for_engine
    out, lse = _unbatch(batched, *_attend(fe, code, q, k, v, prep(kb), prep(vb), cfg, 0))
    return (out, lse) if return_lse else out


@_caller_type
def gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, *, group_size=16, window=1024,
                        softmax_scale=None, rep_bias=0.0):
    """Gradient of gqa_attend() with kbar, vbar as inputs of their own: (dq, dk, dv, dkbar,
    dvbar).  out and lse are gqa_attend()'s."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    B, L, H, D = q.shape
    cfg = _Cfg(L, D, group_size=group_size, window=window, softmax_scale=softmax_scale,
               rep_bias=rep_bias)
    kb, vb = _given_condensed(fe, q, batched, [kbar, vbar], ["kbar", "vbar"], [D, v.shape[3]],
                              k.shape[2], cfg)
    dout, out, lse = _backward_inputs(fe, q, dout, out, lse, batched)
    prep = fe.contiguous_last if fe else for_engine
    return _unbatch(batched, *_attend_backward(fe, code, dout, q, k, v, prep(kb), prep(vb), out,
                                               lse, cfg, 0))


@_caller_type
def gqa_attention(q, k, v, *, group_size=16, window=1024, n_summary=None, softmax_scale=None,
                  key_mode="anchor", rep_bias=0.0, return_lse=False, return_condensed=False):
    """LCA attention for GQA/MHA (SPEC §4): q (B, L, H, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv)
    -> out (B, L, H, Dv) [, lse (B, H, L)] [, condensed].  Query head i uses kv head
    i // (H // Hkv).  condensed: the condensation attended to, as gqa_condense() returns it
    (kbar, vbar, anchor, alpha); give it to gqa_attention_backward(condensed=) to spare
    recomputing it (one 0.7 ms kernel at 128K on the H200)."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    D = q.shape[3]
    cfg = _Cfg(q.shape[1], D, group_size=group_size, window=window, n_summary=n_summary,
               softmax_scale=softmax_scale, rep_bias=rep_bias)
    cond = _condense(fe, code, q, k, v, cfg, D, _gqa_pool(key_mode, D), 0)
    out, lse = _unbatch(batched, *_attend(fe, code, q, k, v, cond[0], cond[1], cfg, 0))
    return _forward_result(out, lse if return_lse else None,
                           _unbatch(batched, *cond) if return_condensed else None)


@_caller_type
def gqa_attention_backward(dout, q, k, v, out, lse, *, group_size=16, window=1024,
                           n_summary=None, softmax_scale=None, key_mode="anchor", rep_bias=0.0,
                           condensed=None):
    """Exact gradient of gqa_attention() (SPEC §5): (dq, dk, dv).  out and lse are
    gqa_attention()'s; condensed, when given, its return_condensed=True result (the
    condensation is then not recomputed: the backward trusts it, as it trusts out and lse)."""
    batched, fe, code, q, k, v = _gqa_inputs(q, k, v)
    D = q.shape[3]
    cfg = _Cfg(q.shape[1], D, group_size=group_size, window=window, n_summary=n_summary,
               softmax_scale=softmax_scale, rep_bias=rep_bias)
    dout, out, lse = _backward_inputs(fe, q, dout, out, lse, batched)
    handed = None if condensed is None else _handed(
        fe, q, batched, condensed, cfg, (D, v.shape[3]), k.shape[2], ("k's head dim",
                                                                      "v's head dim"))
    return _unbatch(batched, *_backward(fe, code, dout, q, k, v, out, lse, cfg, D,
                                        _gqa_pool(key_mode, D), 0, handed))


# ---------------------------------------------------------------------------------------------
# counting

def num_condensed(t, group_size=16, window=1024):
    """G_t: condensed entries seen by the query at position t (SPEC §3)."""
    t, g, w = _counts(t, "t", group_size, window)
    return max(0, (t - w + 1) // g)


def cache_entries(T, group_size=16, window=1024):
    """Entries a condensed cache holds after T tokens (SPEC §6): G + (T - G*g)."""
    T, g, w = _counts(T, "T", group_size, window)
    G = min(num_condensed(T, g, w), T // g)
    return G + (T - G * g)


def _counts(t, name, group_size, window):
    """The counting functions' arguments: integers, t and window >= 0, group_size >= 1."""
    return (int_param(t, name, 0, math.inf), int_param(group_size, "group_size", 1, math.inf),
            int_param(window, "window", 0, math.inf))


from ._prefill import mla_prefill as _mla_prefill  # noqa: E402  (uses the functions above)
mla_prefill = _caller_type(_mla_prefill)
from .cache import GQACache, LatentCache  # noqa: E402  (uses the helpers above)
