"""The condensed KV cache for decoding (SPEC §6): lca.LatentCache (MLA) and lca.GQACache.

A cache holds one layer's state for a batch of B sequences that advance together:

    condensed rows   kbar (B, M, Hkv, D) [and vbar (B, M, Hkv, Dv)], M = max_len // group_size
    the exact ring   kr (B, R, Hkv, D)   [and vr (B, R, Hkv, Dv)],
                     R = min(max(window + group_size - 1, group_size), max_len) token slots:
                     the tokens not yet condensed, token t in slot t % R
    summary sums     qsum (B, S, Hkv, D): for each group still in the window, the sum of its
                     last n_summary queries over the query heads (D numbers per group and kv
                     head, never the raw queries); S = min((window + g - 2) // g + 1,
                     (max_len - 1) // g + 1) slots (1 when window = 0), group j in slot j % S

MLA in absorbed form is the one-kv-head case with keys [latent; kpos] (D = Dc + Dr) and values
the latents (vbar and vr are views of kbar[..., :Dc] and kr[..., :Dc]: nothing stored twice).

After T tokens the cache holds G = min(G_T, floor(T/g)) condensed rows and the T - G*g exact
tokens after them (SPEC §6; `entries` = G + T - G*g = lca.cache_entries(T)).  A step at position
T appends the token, adds its query to its group's sum, condenses what the query at T needs,
attends (SPEC §3 visibility with rep_bias on condensed logits), and condenses the group that
leaves the window for the next query, from its stored sum.  Everything is allocated once by
the constructor; a step allocates only its output (and, for MLA, the new key [latent; kpos]).

Where it lives (`device`, `dtype`):
    device None or "cpu"  -> NumPy arrays, the C CPU engine; dtype float32 (default) or float64
                             (anything np.dtype() accepts).
    device "cuda", "cuda:N", a torch.device or an int N  -> torch tensors on that GPU, the CUDA
                             engine on torch's current stream; dtype torch.bfloat16 (default),
                             torch.float16 or torch.float32 (or those names as strings).
    device a cupy.cuda.Device -> CuPy arrays on it; dtype float16 (default) or float32.
The summary sums are float32 on the GPU (the CUDA engine accumulates in float32), the cache
dtype on the CPU.  Inputs to prefill/step must be arrays of that library, device and dtype;
anything else raises TypeError (library, dtype) or ValueError (device, shape), naming the
argument, before the cache changes.
"""
import contextlib
import math

import numpy as np

from . import _C, _caller_type, _cuda
from ._arrays import as_array, choice_param, float_param, int_param

__all__ = ["LatentCache", "GQACache"]

_SPLIT_KEYS = 64           # fewest visible entries per split of the CUDA decode
_TARGET_BLOCKS = 264       # CUDA blocks a step aims for at most (2 per SM of an H200)


def _num_condensed(t, g, w):
    return max(0, (t - w + 1) // g)


def _held(T, g, w):
    """Condensed rows the cache holds after T tokens (SPEC §6)."""
    return min(_num_condensed(T, g, w), T // g)


# ---------------------------------------------------------------------------------------------
# where the cache lives

class _NumpyStore:
    kind = "numpy"

    def __init__(self, dtype):
        try:
            dt = np.dtype(np.float32 if dtype is None else dtype)
        except TypeError:
            raise TypeError(f"dtype: expected float32 or float64 for a CPU cache, got "
                            f"{dtype!r}") from None
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype: a CPU cache holds float32 or float64, got {dt}")
        self.dtype, self.sum_dtype = dt, dt

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, self.dtype if dtype is None else dtype)

    def check(self, a, name):
        if _cuda.framework(a):
            raise TypeError(f"{name}: a CUDA array, but this cache lives on the CPU (NumPy)")
        a = as_array(a, name)
        if a.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {a.dtype}, the cache holds {self.dtype}")
        return a

    def nbytes(self, a):
        return int(a.nbytes)

    def device_str(self):
        return "cpu"

    def active(self):
        return contextlib.nullcontext()


class _CudaStore:
    def __init__(self, fe, device_id):
        self.fe, self.device_id = fe, device_id

    def check(self, a, name):
        fw = _cuda.framework(a)
        if fw != self.kind:
            raise TypeError(f"{name}: expected a {self.kind} CUDA array (the cache lives on "
                            f"{self.device_str()}), got {type(a).__name__}"
                            + ("" if fw else " on the CPU"))
        if self.fe.device_id(a) != self.device_id:
            raise ValueError(f"{name}: on CUDA device {self.fe.device_id(a)}, the cache on "
                             f"{self.device_id}")
        if a.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {a.dtype}, the cache holds {self.dtype}")
        return a

    def device_str(self):
        return f"cuda:{self.device_id}"

    def active(self):
        """Where the cache's own array updates run (torch follows the arrays' device)."""
        return contextlib.nullcontext()


class _TorchStore(_CudaStore):
    kind = "torch"

    def __init__(self, device, dtype):
        if isinstance(device, str) and not (device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"device: expected None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if not _cuda_ok():                                   # before importing torch
            raise ValueError(f"device: {device!r}, but lca has no usable CUDA engine here "
                             "(lca.HAS_CUDA is False)")
        import torch
        self.torch = torch
        try:
            dev = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {device!r} is not a device ({e})") from None
        if dev.type != "cuda":
            raise ValueError(f"device: expected None, 'cpu' or a CUDA device, got {device!r}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {dev} does not exist ({torch.cuda.device_count()} "
                             "devices)")
        names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        dt = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
        dt = torch.bfloat16 if dt is None else dt
        if dt not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"dtype: a CUDA cache holds torch.bfloat16, float16 or float32, got "
                            f"{dtype!r}")
        self.dtype, self.sum_dtype, self.device = dt, torch.float32, dev
        self.code = {torch.float32: _cuda.F32, torch.bfloat16: _cuda.BF16,
                     torch.float16: _cuda.F16}[dt]
        probe = torch.empty(0, device=dev)
        super().__init__(_cuda._Torch(probe), dev.index)

    def zeros(self, shape, dtype=None):
        return self.torch.zeros(shape, dtype=self.dtype if dtype is None else dtype,
                                device=self.device)

    def empty_out(self, shape):
        return self.fe.empty(shape, dtype=self.dtype)

    def nbytes(self, a):
        return a.numel() * a.element_size()

    def arange(self, lo, hi):
        return self.torch.arange(lo, hi, device=self.device)

    def cat_last(self, parts):
        return self.torch.cat(parts, dim=-1)


class _CupyStore(_CudaStore):
    kind = "cupy"

    def __init__(self, device, dtype):
        import cupy
        self.cp = cupy
        if not _cuda_ok():
            raise ValueError("device: a CuPy device, but lca has no usable CUDA engine here "
                             "(lca.HAS_CUDA is False)")
        try:
            dt = np.dtype(np.float16 if dtype is None else dtype)
        except TypeError:
            raise TypeError(f"dtype: a CuPy cache holds float16 or float32, got {dtype!r}") \
                from None
        if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise TypeError(f"dtype: a CuPy cache holds float16 or float32, got {dt}")
        self.dtype, self.sum_dtype, self.device = dt, np.dtype(np.float32), device
        self.code = _cuda.F16 if dt == np.float16 else _cuda.F32
        with device:
            probe = cupy.empty(0)
        super().__init__(_cuda._Cupy(probe), device.id)

    def zeros(self, shape, dtype=None):
        with self.device:
            return self.cp.zeros(shape, self.dtype if dtype is None else dtype)

    def empty_out(self, shape):
        return self.fe.empty(shape, dtype=self.dtype)

    def nbytes(self, a):
        return int(a.nbytes)

    def arange(self, lo, hi):
        with self.device:
            return self.cp.arange(lo, hi)

    def cat_last(self, parts):
        with self.device:
            return self.cp.concatenate(parts, axis=-1)

    def active(self):
        return self.device           # CuPy runs its kernels on the current device


def _cuda_ok():
    from . import HAS_CUDA
    return HAS_CUDA


def _store(device, dtype):
    if device is None or (isinstance(device, str) and device == "cpu") or \
            (type(device).__module__.split(".")[0] == "torch" and getattr(device, "type", "") == "cpu"):
        return _NumpyStore(_numpy_dtype(dtype))
    if type(device).__module__.split(".")[0] == "cupy":
        return _CupyStore(device, dtype)
    if isinstance(device, bool) or not isinstance(device, (str, int)) and \
            type(device).__module__.split(".")[0] != "torch":
        raise TypeError(f"device: expected None, 'cpu', 'cuda[:N]', an int, a torch.device or a "
                        f"cupy.cuda.Device, got {type(device).__name__}")
    if isinstance(device, int) and device < 0:
        raise ValueError(f"device: expected a CUDA device index >= 0, got {device}")
    return _TorchStore(device, dtype)


def _numpy_dtype(dtype):
    """A torch float dtype names its NumPy twin (a CPU cache holds NumPy arrays)."""
    if type(dtype).__module__.split(".")[0] == "torch":
        import torch
        return {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# the shared machinery

class _Cache:
    """State, sizes and the step engine shared by LatentCache and GQACache."""

    def _setup(self, batch, H, Hkv, D, Dv, max_len, group_size, window, n_summary,
               softmax_scale, rep_bias, d_score, d_pool, v_in_k, dtype, device):
        self.batch = int_param(batch, "batch", 1)
        self.max_len = int_param(max_len, "max_len", 1, 2**62)
        self.group_size = g = int_param(group_size, "group_size", 1)
        self.window = w = int_param(window, "window", 0, 2**62)
        self.n_summary = g if n_summary is None else int_param(n_summary, "n_summary", 1, g)
        self.softmax_scale = float_param(softmax_scale, "softmax_scale", 1.0 / math.sqrt(D))
        self.rep_bias = float_param(rep_bias, "rep_bias")
        self._store = st = _store(device, dtype)
        if st.kind == "numpy" and np.dtype(st.dtype) == np.float32:
            for x, nm in ((self.softmax_scale, "softmax_scale"), (self.rep_bias, "rep_bias")):
                if abs(x) > np.finfo(np.float32).max:
                    raise ValueError(f"{nm}: beyond the float32 range of this cache")
        self.num_heads, self.num_kv_heads, self._D, self._Dv = H, Hkv, D, Dv
        self._d_score, self._d_pool, self._v_in_k = d_score, d_pool, v_in_k
        B, L = self.batch, self.max_len
        self._M = L // g
        self._R = min(max(w + g - 1, g), L)
        self._S = min((w + g - 2) // g + 1 if w else 1, (L - 1) // g + 1)
        self._kbar = st.zeros((B, self._M, Hkv, D))
        self._vbar = self._kbar[..., :Dv] if v_in_k else st.zeros((B, self._M, Hkv, Dv))
        self._kr = st.zeros((B, self._R, Hkv, D))
        self._vr = self._kr[..., :Dv] if v_in_k else st.zeros((B, self._R, Hkv, Dv))
        self._qsum = st.zeros((B, self._S, Hkv, D), dtype=st.sum_dtype)
        self._held_arrays = [self._kbar, self._kr, self._qsum] + \
            ([] if v_in_k else [self._vbar, self._vr])
        if st.kind != "numpy":
            hg = H // Hkv
            # head chunks of decode.cu's mma.sync kernel (32 heads): they bound the workspace;
            # the Hopper kernel's blocks of up to 64 heads never want more splits than this
            hchunks = 1 if hg <= 16 else -(-hg // 32)
            most = self._M + self._R                       # visible entries never exceed it
            self._nsplit = max(1, min(_TARGET_BLOCKS // (B * Hkv * hchunks),
                                      -(-most // _SPLIT_KEYS)))
            # the split partials, then B * H arrival counters (zero: the kernel that merges
            # the splits resets them)
            self._work = st.zeros((B * H * (self._nsplit * (Dv + 2) + 1),), dtype=st.sum_dtype)
            self._held_arrays.append(self._work)
            d = st.fe.desc                                 # the state's descriptors, once
            self._state_descs = (d(self._kbar), d(self._vbar), d(self._kr), d(self._vr),
                                 d(self._qsum))
            self._work_desc = d(self._work)
        self._length = 0

    # -- reporting -----------------------------------------------------------------------------
    @property
    def length(self):
        """Tokens seen (read-only: the state is laid out for it)."""
        return self._length

    @property
    def entries(self):
        """Entries held (SPEC §6): G + (T - G*g) after T tokens, = lca.cache_entries(T)."""
        T, g = self.length, self.group_size
        G = _held(T, g, self.window)
        return G + (T - G * g)

    @property
    def nbytes(self):
        """Bytes of every array the cache holds (condensed rows, ring, sums, and on the GPU
        the split-softmax workspace), allocated once for max_len."""
        return sum(self._store.nbytes(a) for a in self._held_arrays)

    @property
    def entry_bytes(self):
        """Bytes of the entries themselves after `length` tokens (SPEC §6): entries x
        (key width [+ value width]) x itemsize x kv heads x batch."""
        item = self._itemsize()
        width = self._D + (0 if self._v_in_k else self._Dv)
        return self.entries * width * item * self.num_kv_heads * self.batch

    def _itemsize(self):
        st = self._store
        return st.dtype.itemsize if st.kind != "torch" else \
            st.torch.empty(0, dtype=st.dtype).element_size()

    @property
    def device(self):
        return self._store.device_str()

    @property
    def dtype(self):
        return self._store.dtype

    def reset(self):
        """Forget every token (no memory is freed or zeroed: the next tokens overwrite it)."""
        self._length = 0

    def __repr__(self):
        return (f"{type(self).__name__}(batch={self.batch}, length={self.length}/"
                f"{self.max_len}, entries={self.entries}, nbytes={self.nbytes}, "
                f"device={self.device}, dtype={self.dtype})")

    # -- the engine calls ----------------------------------------------------------------------
    def _check_step_room(self):
        if self.length >= self.max_len:
            raise ValueError(f"step: the cache is full ({self.length} of max_len "
                             f"{self.max_len} tokens)")

    def _run_step(self, q, k, v):
        """q (B, H, D), k (B, Hkv, D), v (B, Hkv, Dv) (v a prefix view of k for MLA), checked;
        returns out (B, H, Dv)."""
        st, B, H = self._store, self.batch, self.num_heads
        args = (self.length, self.group_size, self.window, self.n_summary, self.softmax_scale,
                self.rep_bias, self._d_score, self._d_pool, int(self._v_in_k))
        if st.kind == "numpy":
            out = np.empty((B, 1, H, self._Dv), st.dtype)
            q4, k4, v4 = q[:, None], k[:, None], v[:, None]
            _C.decode_step(q4, k4, v4, out, self._kbar, self._vbar, self._kr, self._vr,
                           self._qsum, *args)
        else:
            fe = st.fe
            out = st.empty_out((B, 1, H, self._Dv))
            d = fe.desc
            _C.cuda_decode_step(st.code, d(q[:, None]), d(k[:, None]), d(v[:, None]), d(out),
                                *self._state_descs, *args, self._work_desc, self._nsplit,
                                st.device_id, fe.stream())
        self._length += 1
        return out[:, 0]

    def _check_prefill(self, q):
        if self.length:
            raise ValueError(f"prefill: the cache already holds {self.length} tokens; "
                               "prefill fills an empty cache only (call reset() first)")
        P = q.shape[1]
        if P > self.max_len:
            raise ValueError(f"q: a prefill of {P} tokens exceeds max_len {self.max_len}")
        return P

    def _prefill_run(self, fe, code, q, k, v):
        """The prefill's condensation and attention (engine inputs, batched, P >= 1 tokens), the
        state filled from them; returns the output."""
        from . import _Cfg, _attend, _condense
        cfg = _Cfg(q.shape[1], q.shape[3], group_size=self.group_size, window=self.window,
                   n_summary=self.n_summary, softmax_scale=self.softmax_scale,
                   rep_bias=self.rep_bias)
        vin = int(self._v_in_k)
        kb, vb, _, _ = _condense(fe, code, q, k, v, cfg, self._d_score, self._d_pool, vin)
        out, _ = _attend(fe, code, q, k, v, kb, vb, cfg, vin)
        self._fill(q, k, v, kb, vb)
        return out

    def _fill(self, q, k, v, kb, vb):
        """The state after a prefill of P tokens: q (B, P, H, D), k (B, P, Hkv, D), v, and the
        prefill's condensed rows kb, vb (B, P // g, Hkv, ...)."""
        with self._store.active():
            self._fill_here(q, k, v, kb, vb)

    def _fill_here(self, q, k, v, kb, vb):
        st, P, g, n = self._store, q.shape[1], self.group_size, self.n_summary
        B, Hkv, hg, D = self.batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self._D
        G = _held(P, g, self.window)
        if G:
            self._kbar[:, :G] = kb[:, :G]
            if not self._v_in_k:
                self._vbar[:, :G] = vb[:, :G]
        if P > G * g:
            if st.kind == "numpy":
                t = np.arange(G * g, P)
            else:
                t = st.arange(G * g, P)
            self._kr[:, t % self._R] = k[:, t]
            if not self._v_in_k:
                self._vr[:, t % self._R] = v[:, t]
        for j in range(G, (P - 1) // g + 1 if P else 0):       # groups still in the window
            t0, t1 = j * g + g - n, min(j * g + g, P)
            if t1 <= t0:
                continue                                         # the steps will start it
            part = q[:, t0:t1].reshape(B, t1 - t0, Hkv, hg, D)
            if st.kind == "numpy":
                self._qsum[:, j % self._S] = part.sum(axis=(1, 3), dtype=st.sum_dtype)
            elif st.kind == "torch":
                self._qsum[:, j % self._S] = part.float().sum(dim=(1, 3))
            else:
                self._qsum[:, j % self._S] = part.astype(np.float32).sum(axis=(1, 3))
        self._length = P

    def _input(self, a, name, shape):
        a = self._store.check(a, name)
        if tuple(a.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
        return a

    def _prep(self, a):
        """A view the engine reads: last dimension contiguous, strides >= 0 (else a copy)."""
        st = self._store
        if st.kind == "numpy":
            from ._arrays import for_engine
            return for_engine(a)
        return st.fe.contiguous_last(a)


# ---------------------------------------------------------------------------------------------
# the two public caches

class LatentCache(_Cache):
    """Condensed MLA cache (SPEC §6, §7) for one layer and a batch of sequences.

    LatentCache(batch, num_heads, latent_dim, kpos_dim, max_len, *, group_size=16,
                window=1024, n_summary=None, softmax_scale=None, score="full", rep_bias=0.0,
                dtype=None, device=None)

    .prefill(q, latent, kpos) -> out   q (B, P, H, Dc+Dr), latent (B, P, Dc), kpos (B, P, Dr),
                                       P <= max_len, on an empty cache: lca.attention's output,
                                       and the cache then holds the P tokens.
    .step(q, latent, kpos) -> out      q (B, H, Dc+Dr), latent (B, Dc), kpos (B, Dr) -> (B, H, Dc):
                                       equal to lca.attention of the whole sequence at that row.
    .length (tokens seen), .entries (SPEC §6), .nbytes (bytes held), .entry_bytes, .reset().
    See the module docstring for dtype and device."""

    def __init__(self, batch, num_heads, latent_dim, kpos_dim, max_len, *, group_size=16,
                 window=1024, n_summary=None, softmax_scale=None, score="full", rep_bias=0.0,
                 dtype=None, device=None):
        H = int_param(num_heads, "num_heads", 1)
        Dc = int_param(latent_dim, "latent_dim", 1)
        Dr = int_param(kpos_dim, "kpos_dim", 0)
        self.score = choice_param(score, "score", ("full", "latent"))
        self.latent_dim, self.kpos_dim = Dc, Dr
        self._setup(batch, H, 1, Dc + Dr, Dc, max_len, group_size, window, n_summary,
                    softmax_scale, rep_bias, Dc + Dr if score == "full" else Dc, Dc, True,
                    dtype, device)

    @_caller_type
    def prefill(self, q, latent, kpos):
        from . import _mla_inputs
        B, H, Dc, Dr = self.batch, self.num_heads, self.latent_dim, self.kpos_dim
        q = self._store.check(q, "q")
        if q.ndim != 4:
            raise ValueError(f"q: expected shape (B, P, H, Dc+Dr) with B = {B}, got "
                             f"{tuple(q.shape)}")
        P = q.shape[1]
        q = self._input(q, "q", (B, P, H, Dc + Dr))
        latent = self._input(latent, "latent", (B, P, Dc))
        kpos = self._input(kpos, "kpos", (B, P, Dr))
        self._check_prefill(q)
        if P == 0:
            return self._store.zeros((B, 0, H, Dc))
        return self._prefill_run(*_mla_inputs(q, latent, kpos)[1:])

    @_caller_type
    def step(self, q, latent, kpos):
        B, H, Dc, Dr = self.batch, self.num_heads, self.latent_dim, self.kpos_dim
        q = self._input(q, "q", (B, H, Dc + Dr))
        latent = self._input(latent, "latent", (B, Dc))
        kpos = self._input(kpos, "kpos", (B, Dr))
        self._check_step_room()
        st = self._store
        if st.kind == "numpy":
            k = np.empty((B, 1, Dc + Dr), st.dtype)
            k[:, 0, :Dc], k[:, 0, Dc:] = latent, kpos
        else:
            k = st.cat_last([latent, kpos])[:, None]
        return self._run_step(self._prep(q), k, k[..., :Dc])


class GQACache(_Cache):
    """Condensed GQA/MHA cache (SPEC §4, §6, §7) for one layer and a batch of sequences.

    GQACache(batch, num_heads, num_kv_heads, head_dim, v_head_dim, max_len, *, group_size=16,
             window=1024, n_summary=None, softmax_scale=None, key_mode="anchor", rep_bias=0.0,
             dtype=None, device=None)

    .prefill(q, k, v) -> out     q (B, P, H, D), k (B, P, Hkv, D), v (B, P, Hkv, Dv):
                                 lca.gqa_attention's output; the cache then holds the P tokens.
    .step(q, k, v) -> out        q (B, H, D), k (B, Hkv, D), v (B, Hkv, Dv) -> (B, H, Dv):
                                 equal to lca.gqa_attention of the whole sequence at that row.
    See the module docstring for dtype and device."""

    def __init__(self, batch, num_heads, num_kv_heads, head_dim, v_head_dim, max_len, *,
                 group_size=16, window=1024, n_summary=None, softmax_scale=None,
                 key_mode="anchor", rep_bias=0.0, dtype=None, device=None):
        H = int_param(num_heads, "num_heads", 1)
        Hkv = int_param(num_kv_heads, "num_kv_heads", 1)
        if H % Hkv:
            raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
        D = int_param(head_dim, "head_dim", 1)
        Dv = int_param(v_head_dim, "v_head_dim", 1)
        self.key_mode = choice_param(key_mode, "key_mode", ("anchor", "pool"))
        self.head_dim, self.v_head_dim = D, Dv
        self._setup(batch, H, Hkv, D, Dv, max_len, group_size, window, n_summary,
                    softmax_scale, rep_bias, D, D if key_mode == "pool" else 0, False, dtype,
                    device)

    @_caller_type
    def prefill(self, q, k, v):
        from . import _gqa_inputs
        B, H, Hkv, D, Dv = self.batch, self.num_heads, self.num_kv_heads, self._D, self._Dv
        q = self._store.check(q, "q")
        if q.ndim != 4:
            raise ValueError(f"q: expected shape (B, P, H, D) with B = {B}, got "
                             f"{tuple(q.shape)}")
        P = q.shape[1]
        q = self._input(q, "q", (B, P, H, D))
        k = self._input(k, "k", (B, P, Hkv, D))
        v = self._input(v, "v", (B, P, Hkv, Dv))
        self._check_prefill(q)
        if P == 0:
            return self._store.zeros((B, 0, H, Dv))
        return self._prefill_run(*_gqa_inputs(q, k, v)[1:])

    @_caller_type
    def step(self, q, k, v):
        B, H, Hkv, D, Dv = self.batch, self.num_heads, self.num_kv_heads, self._D, self._Dv
        q = self._input(q, "q", (B, H, D))
        k = self._input(k, "k", (B, Hkv, D))
        v = self._input(v, "v", (B, Hkv, Dv))
        self._check_step_room()
        return self._run_step(self._prep(q), self._prep(k), self._prep(v))
