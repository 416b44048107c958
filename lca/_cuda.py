"""Intake of CUDA arrays (PyTorch, CuPy) for the CUDA engine, zero-copy.

Each framework is imported only when an array of it arrives.  An array becomes a descriptor
(pointer, shape, strides in elements) for lca._C; outputs are allocated by the caller's own
framework on the caller's device, and kernels run on its current stream with no device-wide
synchronisation.  LCA_POISON_OUTPUTS=1 fills outputs with NaN before launch (the GPU tests set
it, so an element a kernel fails to write cannot pass); LCA_POISON_WORKSPACE=1 fills the
backward's scratch with 0xFF bytes (float32 NaN), so a gradient row a kernel leaves unwritten
cannot pass on stale values the caching allocator hands back.
"""
import os

from . import _C

F32, BF16, F16 = 0, 2, 3          # lca.h's lca_dtype codes


def device_count():
    return _C.cuda_device_count() if hasattr(_C, "cuda_device_count") else 0


def framework(x):
    """'torch' or 'cupy' for a CUDA array of that framework, None for anything else."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch" and getattr(x, "is_cuda", False):
        return "torch"
    if mod == "cupy":
        return "cupy"
    return None


class _Torch:
    def __init__(self, like):
        import torch
        self.torch, self.device = torch, like.device
        self.codes = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}

    def code(self, a, name):
        if a.dtype not in self.codes:
            raise TypeError(f"{name}: the CUDA engine takes float32, float16 or bfloat16, "
                            f"got {a.dtype}")
        return self.codes[a.dtype]

    def desc(self, a):
        return (a.data_ptr(), tuple(a.shape), tuple(a.stride()))

    def device_id(self, a):
        return a.device.index

    def empty(self, shape, like=None, dtype=None):
        dt = dtype if dtype is not None else like.dtype
        if os.environ.get("LCA_POISON_OUTPUTS") == "1" and dt != "int32":
            return self.torch.full(shape, float("nan"), dtype=self._dt(dt), device=self.device)
        return self.torch.empty(shape, dtype=self._dt(dt), device=self.device)

    def _dt(self, dt):
        return {"float32": self.torch.float32, "int32": self.torch.int32}.get(dt, dt)

    def stream(self):
        return self.torch.cuda.current_stream(self.device).cuda_stream

    def cat(self, parts, axis):
        return self.torch.cat(parts, dim=axis)

    def contiguous_last(self, a):
        return a if a.shape[-1] <= 1 or a.stride(-1) == 1 else a.contiguous()

    def contiguous(self, a):
        return a.contiguous()

    def workspace(self, nbytes):
        """Scratch bytes from the caching allocator, usable in stream order on this stream."""
        if os.environ.get("LCA_POISON_WORKSPACE") == "1":
            return self.torch.full((max(nbytes, 1),), 0xFF, dtype=self.torch.uint8,
                                   device=self.device)
        return self.torch.empty((max(nbytes, 1),), dtype=self.torch.uint8, device=self.device)

    def ptr(self, a):
        return a.data_ptr()

    def float32(self, a):
        return a if a.dtype == self.torch.float32 else a.float()


class _Cupy:
    def __init__(self, like):
        import cupy
        self.cp, self.device = cupy, like.device
        self.codes = {cupy.dtype("float32"): F32, cupy.dtype("float16"): F16}

    def code(self, a, name):
        if a.dtype not in self.codes:
            raise TypeError(f"{name}: the CUDA engine takes float32 or float16 CuPy arrays, "
                            f"got {a.dtype}")
        return self.codes[a.dtype]

    def desc(self, a):
        return (a.data.ptr, tuple(a.shape), tuple(s // a.itemsize for s in a.strides))

    def device_id(self, a):
        return a.device.id

    def empty(self, shape, like=None, dtype=None):
        dt = dtype if dtype is not None else like.dtype
        with self.device:
            if os.environ.get("LCA_POISON_OUTPUTS") == "1" and dt != "int32":
                return self.cp.full(shape, self.cp.nan, dtype=dt)
            return self.cp.empty(shape, dtype=dt)

    def stream(self):
        with self.device:             # CuPy's current stream is per device
            return self.cp.cuda.get_current_stream().ptr

    def cat(self, parts, axis):
        with self.device:
            return self.cp.concatenate(parts, axis=axis)

    def contiguous_last(self, a):
        ok = a.shape[-1] <= 1 or a.strides[-1] == a.itemsize
        return a if ok and all(s >= 0 for s in a.strides) else self.contiguous(a)

    def contiguous(self, a):
        with self.device:
            return self.cp.ascontiguousarray(a)

    def workspace(self, nbytes):
        with self.device:
            if os.environ.get("LCA_POISON_WORKSPACE") == "1":
                return self.cp.full((max(nbytes, 1),), 0xFF, dtype=self.cp.uint8)
            return self.cp.empty((max(nbytes, 1),), dtype=self.cp.uint8)

    def ptr(self, a):
        return a.data.ptr

    def float32(self, a):
        with self.device:
            return a if a.dtype == self.cp.float32 else a.astype(self.cp.float32)


def frontend(x):
    return _Torch(x) if framework(x) == "torch" else _Cupy(x)


def check_place(fe, q, others, names):
    """Every array of q's framework, on q's device (any dtype)."""
    for a, nm in zip(others, names):
        if framework(a) != framework(q):
            raise TypeError(f"{nm}: expected a CUDA array like q ({type(q).__name__}), got "
                            f"{type(a).__name__}")
        if fe.device_id(a) != fe.device_id(q):
            raise ValueError(f"{nm}: on device {fe.device_id(a)}, q on {fe.device_id(q)}")


def check_same(fe, q, others, names):
    """Every array on q's framework, device and dtype."""
    check_place(fe, q, others, names)
    for a, nm in zip(others, names):
        if a.dtype != q.dtype:
            raise TypeError(f"{nm}: dtype {a.dtype} differs from q's {q.dtype}")
    return fe.code(q, "q")


def condense(fe, code, q, k, v, vbar_in_kbar, cfg, d_score, d_pool):
    """Condensation into freshly allocated kbar, vbar, anchor, alpha (alpha float32)."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    kbar = fe.empty((B, cfg.m, Hkv, D), like=q)
    vbar = kbar[..., :Dv] if vbar_in_kbar else fe.empty((B, cfg.m, Hkv, Dv), like=q)
    anchor = fe.empty((B, cfg.m, Hkv), dtype="int32")
    alpha = fe.empty((B, cfg.m, Hkv, cfg.g), dtype="float32")
    _C.cuda_condense(code, fe.desc(q), fe.desc(k), fe.desc(v), fe.desc(kbar), fe.desc(vbar),
                     fe.desc(anchor), fe.desc(alpha), cfg.g, cfg.n, cfg.scale, d_score, d_pool,
                     int(vbar_in_kbar), fe.device_id(q), fe.stream())
    return kbar, vbar, anchor, alpha


def attend(fe, code, q, k, v, kbar, vbar, cfg, v_in_k):
    B, L, H, _ = q.shape
    out = fe.empty((B, L, H, v.shape[3]), like=q)
    lse = fe.empty((B, H, L), dtype="float32")
    _C.cuda_attend(code, fe.desc(q), fe.desc(k), fe.desc(v), fe.desc(kbar), fe.desc(vbar),
                   fe.desc(out), fe.desc(lse), cfg.g, cfg.w, cfg.scale, cfg.rep_bias,
                   int(v_in_k), fe.device_id(q), fe.stream())
    return out, lse


def check_grad_inputs(fe, q, dout, out, lse):
    """dout and out: like q (framework, device, dtype); lse: same framework and device, any
    float dtype (the kernels read it in float32)."""
    check_same(fe, q, [dout, out], ["dout", "out"])
    check_place(fe, q, [lse], ["lse"])
    if lse.dtype not in fe.codes:
        raise TypeError(f"lse: expected float32, float16 or bfloat16, got {lse.dtype}")
    return fe.contiguous_last(dout), fe.contiguous_last(out), fe.contiguous_last(fe.float32(lse))


def _grads_and_workspace(fe, code, q, k, v, cfg, v_in_k, m=0):
    """dq, dk, dv in q's dtype (with v_in_k dv is dk's prefix view) and the backward's scratch
    (m: the rows of given condensed entries, for attend_backward)."""
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    dq = fe.empty((B, L, H, D), like=q)
    dk = fe.empty((B, L, Hkv, D), like=q)
    dv = dk[..., :Dv] if v_in_k else fe.empty((B, L, Hkv, Dv), like=q)
    nbytes = _C.cuda_backward_workspace(code, B, L, H, Hkv, D, Dv, cfg.g, int(v_in_k), m)
    return dq, dk, dv, (fe.workspace(nbytes), nbytes)


def backward(fe, code, dout, q, k, v, out, lse, cfg, d_score, d_pool, v_in_k, handed=None):
    """SPEC §5 gradients (dq, dk, dv) in q's dtype; with v_in_k dv is dk's prefix view.
    handed: the forward's (kbar, vbar, anchor int32, alpha float32), or None to recompute."""
    dq, dk, dv, (ws, nbytes) = _grads_and_workspace(fe, code, q, k, v, cfg, v_in_k)
    extra = () if handed is None else (tuple(fe.desc(a) for a in handed),)
    _C.cuda_backward(code, fe.desc(dout), fe.desc(q), fe.desc(k), fe.desc(v), fe.desc(out),
                     fe.desc(lse), fe.desc(dq), fe.desc(dk), fe.desc(dv), (fe.ptr(ws), nbytes),
                     cfg.g, cfg.w, cfg.n, cfg.scale, cfg.rep_bias, d_score, d_pool,
                     int(v_in_k), fe.device_id(q), fe.stream(), *extra)
    return dq, dk, dv


def attend_backward(fe, code, dout, q, k, v, kbar, vbar, out, lse, cfg, v_in_k):
    """The gradients of attend over the given kbar, vbar: (dq, dk, dv, dkbar, dvbar) in q's
    dtype; with v_in_k dv and dvbar are dk's and dkbar's prefix views."""
    m = kbar.shape[1]
    dq, dk, dv, (ws, nbytes) = _grads_and_workspace(fe, code, q, k, v, cfg, v_in_k, m)
    dkbar = fe.empty(tuple(kbar.shape), like=q)
    dvbar = dkbar[..., :v.shape[3]] if v_in_k else fe.empty(tuple(vbar.shape), like=q)
    _C.cuda_attend_backward(code, fe.desc(dout), fe.desc(q), fe.desc(k), fe.desc(v),
                            fe.desc(kbar), fe.desc(vbar), fe.desc(out), fe.desc(lse),
                            fe.desc(dq), fe.desc(dk), fe.desc(dv), fe.desc(dkbar),
                            fe.desc(dvbar), (fe.ptr(ws), nbytes), cfg.g, cfg.w, cfg.scale,
                            cfg.rep_bias, int(v_in_k), fe.device_id(q), fe.stream())
    return dq, dk, dv, dkbar, dvbar


def condense_backward(fe, code, q, k, v, dkbar, dvbar, cfg, d_score, d_pool, v_in_k):
    """The condensation's backward alone, given dkbar, dvbar (B, L // g, Hkv, D / Dv; with
    v_in_k dvbar is dkbar's prefix view): (dq, dk, dv) in q's dtype."""
    dq, dk, dv, (ws, nbytes) = _grads_and_workspace(fe, code, q, k, v, cfg, v_in_k)
    _C.cuda_condense_backward(code, fe.desc(q), fe.desc(k), fe.desc(v), fe.desc(dkbar),
                              fe.desc(dvbar), fe.desc(dq), fe.desc(dk), fe.desc(dv),
                              (fe.ptr(ws), nbytes), cfg.g, cfg.n, cfg.scale, d_score, d_pool,
                              int(v_in_k), fe.device_id(q), fe.stream())
    return dq, dk, dv
