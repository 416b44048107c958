#!/usr/bin/env python3
"""Coverage-guided fuzzer for lca's argument parsing and shape checking (atheris, libFuzzer).

Each input is a byte string that this file decodes, one byte per choice (a missing byte reads
as 0, and choice 0 is always the ordinary one, so short inputs make well-formed calls), into
one call of either

  * a public function (lca.attention ... lca.cache_entries): shapes, dtypes, batch dim,
    keywords drawn from edge values (0, -1, 2**31, 2**64, NaN, inf, 1e300, wrong types), then
    up to three mutations of the arrays (rank, one axis, dtype, layout, a non-array, NaN/inf
    in the data, read-only, misaligned, zero strides, nested lists); or
  * an entry point of the binding lca._C (condense, attend, backward) called directly with a
    well-formed argument tuple and up to three mutations (shapes, dtypes, strides, alignment,
    write protection, huge zero-stride head counts, out-of-range integers, NaN scales).

What counts as a finding (and stops the fuzzer with the input saved):
  * a crash, a sanitizer trap (the fuzz build traps on undefined behaviour) or a hang;
  * any exception but TypeError, ValueError, NotImplementedError and MemoryError (and, from
    lca._C's own argument parser, OverflowError);
  * from a public function: an error message that names no argument of the call;
  * a public forward call on finite data with moderate parameters whose answer differs from
    lca.reference, or a backward whose gradients are not finite.

Run (see .ci/fuzz.sh, which builds the instrumented extension first):
    PYTHONPATH=<build with lca/> python3 tests/fuzz/fuzz_lca.py [libFuzzer flags] CORPUS...
Replay a corpus without atheris (e.g. under AddressSanitizer):
    python3 tests/fuzz/fuzz_lca.py --replay DIR_OR_FILE...
"""
import operator
import os
import re
import sys

import numpy as np

lca = ref = None          # imported by main() / replay(), after atheris is set up

FLOATS = (np.float64, np.float32)


class Draw:
    """Choices read off the input bytes; past the end every byte is 0."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def byte(self):
        b = self.data[self.i] if self.i < len(self.data) else 0
        self.i += 1
        return b

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def chance(self, num):          # num in 256
        return self.byte() < num


INTS = [0, 1, 2, 3, -1, 7, 16, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, 2**63, -(2**63),
        2**64, 10**30, -(10**30)]
WEIRD = [None, True, 1.5, "4", b"", [], {}, float("nan"), float("inf"), 1j, np.int8(3),
         np.float64(2.0), np.uint64(2**64 - 1), np.array(3), 10**400]
SPECIAL_FLOATS = [0.0, -0.0, 1e-300, 1e300, -1e300, 3.4e38, 3.5e38, -7.5, float("nan"),
                  float("inf"), -float("inf"), 5e-324, 2, 10**400]

PUBLIC = {
    # name: (kind, array arguments, keywords)
    "attention": ("mla", "q latent kpos", "group_size window n_summary softmax_scale score "
                                          "rep_bias return_lse"),
    "condense": ("mla", "q latent kpos", "group_size n_summary softmax_scale score"),
    "attend": ("mla", "q latent kpos latent_bar kpos_bar", "group_size window softmax_scale "
                                                          "rep_bias return_lse"),
    "attention_backward": ("mla", "dout q latent kpos out lse", "group_size window n_summary "
                                                                "softmax_scale score rep_bias"),
    "gqa_attention": ("gqa", "q k v", "group_size window n_summary softmax_scale key_mode "
                                      "rep_bias return_lse"),
    "gqa_condense": ("gqa", "q k v", "group_size n_summary softmax_scale key_mode"),
    "gqa_attend": ("gqa", "q k v kbar vbar", "group_size window softmax_scale rep_bias "
                                             "return_lse"),
    "gqa_attention_backward": ("gqa", "dout q k v out lse", "group_size window n_summary "
                                                            "softmax_scale key_mode rep_bias"),
    "attend_backward": ("mla", "dout q latent kpos latent_bar kpos_bar out lse",
                        "group_size window softmax_scale rep_bias"),
    "gqa_attend_backward": ("gqa", "dout q k v kbar vbar out lse",
                            "group_size window softmax_scale rep_bias"),
    "condense_backward": ("mla", "dlatent_bar dkpos_bar q latent kpos",
                          "group_size n_summary softmax_scale score"),
    "gqa_condense_backward": ("gqa", "dkbar dvbar q k v",
                              "group_size n_summary softmax_scale key_mode"),
    "num_condensed": ("count", "", "t group_size window"),
    "cache_entries": ("count", "", "T group_size window"),
}
ALLOWED = (TypeError, ValueError, NotImplementedError, MemoryError)


# ---------------------------------------------------------------------------------------------
# mutations of one array

def mutate(d, a, rng, zero_stride_heads=False):
    """a changed by one operation that the next byte picks (no lca call in here: a mutation
    NumPy refuses, e.g. a view of an object array, leaves a as it is)."""
    try:
        return _mutate(d, a, rng, zero_stride_heads)
    except Exception:  # noqa: BLE001 - NumPy's refusal, not lca's
        return a


def _mutate(d, a, rng, zero_stride_heads):
    op = d.byte() % 17
    if not isinstance(a, np.ndarray) or a.size > 10**6:      # (a huge zero-stride view stays)
        return a
    if op == 0:
        return a[None]                                          # one axis more
    if op == 1:
        return a[0] if a.ndim and a.shape[0] else a.reshape(-1)   # one axis fewer
    if op == 2 and a.ndim:                                      # one axis longer or shorter
        ax = d.byte() % a.ndim
        shape = list(a.shape)
        shape[ax] = max(0, shape[ax] + d.pick([1, -1, -shape[ax], 5]))
        return rng.standard_normal(shape).astype(a.dtype)
    if op == 3:
        return a.astype(d.pick([np.float32, np.float64, np.float16, np.int32, np.int64,
                                np.complex64, np.bool_, object, np.longdouble, ">f8"]))
    if op == 4 and a.ndim:                                      # negative strides
        return np.flip(np.flip(a).copy())
    if op == 5:
        return np.asfortranarray(a)
    if op == 6 and a.ndim >= 2:                                 # strided, gaps poisoned
        big = np.full(a.shape[:1] + (2 * a.shape[1],) + a.shape[2:], np.nan, a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if op == 7 and a.ndim:                                      # last axis strided
        big = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if op == 8:
        v = a.copy()
        v.flags.writeable = False
        return v
    if op == 9:                                                 # misaligned
        raw = np.zeros(a.nbytes + 1, np.uint8)
        v = raw[1:].view(a.dtype).reshape(a.shape) if a.dtype.itemsize > 1 else a
        v[...] = a
        return v
    if op == 10 and a.ndim >= 2 and a.shape[1]:                 # zero stride along axis 1
        return np.broadcast_to(a[:, :1], a.shape)
    if op == 11 and a.size:                                     # NaN / inf in the data
        v = a.copy()
        flat = v.reshape(-1)
        flat[d.byte() * 7 % flat.size] = d.pick([np.nan, np.inf, -np.inf, 1e30])
        return v
    if op == 12:
        return d.pick(WEIRD)
    if op == 13 and a.ndim:
        return a.tolist()
    if op == 14 and a.ndim >= 3 and zero_stride_heads:          # 2**40 heads, no memory
        shape = list(a.shape)
        shape[2] = 2**40
        st = [0] * (a.ndim - 1) + [a.itemsize]
        return np.lib.stride_tricks.as_strided(np.zeros(a.shape[-1], a.dtype), shape, st,
                                               writeable=True)
    if op == 15 and a.ndim:                                     # a view with an offset
        big = np.full(a.shape[:-1] + (a.shape[-1] + 3,), np.nan, a.dtype)
        big[..., 1:1 + a.shape[-1]] = a
        return big[..., 1:1 + a.shape[-1]]
    return a


# ---------------------------------------------------------------------------------------------
# public functions

def draw_public(d):
    name = d.pick(list(PUBLIC))
    kind, arg_names, kw_names = PUBLIC[name]
    if kind == "count":
        args = [d.pick([100, 0, 16, 2**40, 10**30, -1]) if not d.chance(40) else d.pick(WEIRD)
                for _ in range(3)]
        return name, args, {}, {}
    rng = np.random.default_rng(d.byte())
    B, L = d.pick([2, 1, 0, 3]), d.pick([9, 1, 0, 16, 2, 5, 31, 12])
    H, Hkv = d.pick([2, 1, 4, 3, 0, 6]), d.pick([1, 2, 0, 3])
    Dc, Dr = d.pick([4, 1, 8, 0, 3]), d.pick([2, 0, 1, 5])
    D, Dv = d.pick([4, 1, 8, 0]), d.pick([3, 1, 0, 8])
    batched, dtype = d.pick([True, False]), d.pick(FLOATS)
    kw = {}
    for k in kw_names.split():
        mode = d.byte() % 8
        if mode < 4:
            continue                                            # the default
        if k in ("group_size", "window", "n_summary"):
            kw[k] = d.pick([3, 1, 2, 4, 16] if mode < 7 else INTS + WEIRD)
        elif k in ("softmax_scale", "rep_bias"):
            kw[k] = d.pick([0.5, -0.25, 1.0] if mode < 7 else SPECIAL_FLOATS + WEIRD)
        elif k == "score":
            kw[k] = d.pick(["full", "latent"] if mode < 7 else ["FULL", None, 1, ""])
        elif k == "key_mode":
            kw[k] = d.pick(["anchor", "pool"] if mode < 7 else ["x", None, 0])
        elif k == "return_lse":
            kw[k] = d.pick([True, False])
    b = B if batched else 1

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    g = kw.get("group_size", 16)
    m = L // g if isinstance(g, int) and not isinstance(g, bool) and g > 0 else 1
    if kind == "mla":
        arr = dict(q=randn(b, L, H, Dc + Dr), latent=randn(b, L, Dc), kpos=randn(b, L, Dr),
                   latent_bar=randn(b, m, Dc), kpos_bar=randn(b, m, Dr))
    else:
        arr = dict(q=randn(b, L, H, D), k=randn(b, L, Hkv, D), v=randn(b, L, Hkv, Dv),
                   kbar=randn(b, m, Hkv, D), vbar=randn(b, m, Hkv, Dv))
    arr.update({"d" + n: arr[n] for n in ("latent_bar", "kpos_bar", "kbar", "vbar") if n in arr})
    if "dout" in arg_names:
        fwd = lca.attention if kind == "mla" else lca.gqa_attention
        fkw = {k: v for k, v in kw.items() if k not in ("return_lse",)}
        main = [arr[n] for n in ("q", "latent", "kpos", "k", "v") if n in arr]
        try:
            arr["out"], arr["lse"] = fwd(*main, return_lse=True, **fkw)
        except ALLOWED:
            arr["out"], arr["lse"] = randn(b, L, H, Dv), randn(b, H, L)
        arr["dout"] = randn(*arr["out"].shape)
    if not batched:
        arr = {k: v[0] for k, v in arr.items()}
    names = arg_names.split()
    args = [arr[n] for n in names]
    clean = True
    for _ in range(d.byte() % 4):
        i = d.byte() % len(args)
        args[i] = mutate(d, args[i], rng)
        clean = False
    return name, args, kw, dict(clean=clean, names=names)


def names_in(msg, allowed):
    return any(re.search(rf"(?<![\w.]){re.escape(n)}\b", msg) for n in allowed)


def moderate(kw):
    for k in ("softmax_scale", "rep_bias"):
        v = kw.get(k)
        if v is not None and not (isinstance(v, (int, float)) and abs(v) <= 8):
            return False
    return True


def check_public(name, args, kw, info):
    fn = getattr(lca, name)
    try:
        res = fn(*args, **kw)
    except ALLOWED as e:
        allowed = PUBLIC[name][1].split() + PUBLIC[name][2].split()
        if not names_in(str(e), allowed):
            raise AssertionError(f"{name}: message names no argument: {e!r}") from e
        return
    if PUBLIC[name][0] == "count" or not info.get("clean"):
        return
    arrays = [np.asarray(a) for a in args]
    if not all(np.all(np.isfinite(a)) for a in arrays) or not moderate(kw):
        return
    res = res if isinstance(res, tuple) else (res,)
    if name.endswith("backward"):
        for x in res:
            assert np.all(np.isfinite(x)), f"{name}: non-finite gradient on finite input"
        return
    q = arrays[0]
    if q.size > 4000:
        return
    if name in ("attention", "gqa_attention"):
        # attention == attend(condense(...)) bit for bit; then the attend half against the
        # reference over the engine's own condensed entries (so that an anchor near-tie, which
        # may go either way, cannot flag a correct answer)
        mla = name == "attention"
        keys = ("group_size", "n_summary", "softmax_scale", "score" if mla else "key_mode")
        bars = (lca.condense if mla else lca.gqa_condense)(
            *args, **{k: v for k, v in kw.items() if k in keys})[:2]
        akw = {k: v for k, v in kw.items() if k in ("group_size", "window", "softmax_scale",
                                                    "rep_bias", "return_lse")}
        again = (lca.attend if mla else lca.gqa_attend)(*args, *bars, **akw)
        for x, y in zip(res, again if isinstance(again, tuple) else (again,)):
            assert np.array_equal(x, y), f"{name} differs from attend(condense(...))"
        name, kw = ("attend" if mla else "gqa_attend"), akw
        arrays = arrays + [np.asarray(b) for b in bars]
    batched = q.ndim == 4
    rargs = [a.astype(np.float64) if batched else a.astype(np.float64)[None] for a in arrays]
    rkw = {}                      # the reference wants plain Python numbers (no uint64 wrap)
    for k, v in kw.items():
        if k == "return_lse":
            continue
        if isinstance(v, (int, np.integer)) or (isinstance(v, np.ndarray) and v.ndim == 0):
            v = operator.index(v)
        elif isinstance(v, (float, np.floating)):
            v = float(v)
        rkw[k] = v
    want = getattr(ref, name)(*rargs, **rkw)
    if name.endswith("condense"):
        # the pooled halves (latent_bar / vbar) and the weights; the anchor-copied halves may
        # legitimately follow a near-tie either way
        pairs = [(res[0], want[0]) if name == "condense" else (res[1], want[1]),
                 (res[3], want[3])]
    else:
        pairs = list(zip(res, want))
    tol = 1e-9 if q.dtype == np.float64 else 2e-4
    for x, y in pairs:
        y = y if batched else y[0]
        x = np.asarray(x, np.float64)
        assert x.shape == y.shape, f"{name}: shape {x.shape}, reference {y.shape}"
        n = np.linalg.norm(y)
        err = np.linalg.norm(x - y) / (n if n > 1 else 1.0)
        assert err <= tol, f"{name}: relative error {err:.2e} against the reference"


# ---------------------------------------------------------------------------------------------
# lca._C directly

def draw_binding(d):
    which = d.pick(["attend", "condense", "backward", "attend_backward"])
    rng = np.random.default_rng(d.byte())
    dtype = d.pick(FLOATS)
    B, L, Hkv = d.pick([1, 2, 0]), d.pick([8, 1, 0, 13, 3]), d.pick([1, 2, 0])
    hg, D = d.pick([2, 1, 3, 0]), d.pick([4, 1, 6, 0])
    v_in_k = d.pick([0, 1])
    Dv = min(D, d.pick([3, 1, 4])) if v_in_k else d.pick([3, 1, 5, 0])
    H, g = Hkv * hg, d.pick([2, 1, 3, 16])
    w, n = d.pick([1, 0, 3, 100]), d.pick([g, 1, 2])
    if v_in_k:
        Hkv = 1
        H = hg
    m = L // g if g > 0 else 0
    scale, rep_bias = d.pick([0.5, 1.0, -2.0]), d.pick([0.0, 0.3])
    z = lambda *s: rng.standard_normal(s).astype(dtype)          # noqa: E731
    q, k = z(B, L, H, D), z(B, L, Hkv, D)
    v = k[..., :Dv] if v_in_k else z(B, L, Hkv, Dv)
    kbar = np.zeros((B, m, Hkv, D), dtype)
    vbar = kbar[..., :Dv] if v_in_k else np.zeros((B, m, Hkv, Dv), dtype)
    out, lse = np.zeros((B, L, H, Dv), dtype), np.zeros((B, H, L), dtype)
    d_score, d_pool = D, (D if v_in_k or d.chance(128) else 0)
    if which == "condense":
        args = [q, k, v, kbar, vbar, np.zeros((B, m, Hkv), np.int32),
                np.zeros((B, m, Hkv, g), dtype), g, n, scale, d_score, d_pool, v_in_k]
        ints = (7, 8, 10, 11, 12)
    elif which == "attend":
        args = [q, k, v, kbar, vbar, out, lse, g, w, scale, rep_bias, v_in_k]
        ints = (7, 8, 11)
    elif which == "backward":
        dk = np.zeros(k.shape, dtype)
        dv = dk[..., :Dv] if v_in_k else np.zeros(v.shape, dtype)
        args = [z(B, L, H, Dv), q, k, v, z(B, L, H, Dv), z(B, H, L), np.zeros(q.shape, dtype),
                dk, dv, g, w, n, scale, rep_bias, d_score, d_pool, v_in_k]
        ints = (9, 10, 11, 14, 15, 16)
    else:
        dk, dkb = np.zeros(k.shape, dtype), np.zeros(kbar.shape, dtype)
        dv = dk[..., :Dv] if v_in_k else np.zeros(v.shape, dtype)
        dvb = dkb[..., :Dv] if v_in_k else np.zeros(vbar.shape, dtype)
        kbar[...] = rng.standard_normal(kbar.shape)
        vbar = kbar[..., :Dv] if v_in_k else vbar + rng.standard_normal(vbar.shape)
        args = [z(B, L, H, Dv), q, k, v, kbar, vbar, z(B, L, H, Dv), z(B, H, L),
                np.zeros(q.shape, dtype), dk, dv, dkb, dvb, g, w, scale, rep_bias, v_in_k]
        ints = (13, 14, 17)
    for _ in range(d.byte() % 4):
        i = d.byte() % len(args)
        if i in ints:
            args[i] = d.pick(INTS + [None, 1.5])
        elif isinstance(args[i], float):
            args[i] = d.pick(SPECIAL_FLOATS + [None, "x"])
        else:
            args[i] = mutate(d, args[i], rng, zero_stride_heads=which != "condense")
    if d.chance(8):
        args = args[:d.byte() % len(args)]                      # too few arguments
    return which, args


def check_binding(which, args):
    try:
        getattr(lca._C, which)(*args)
    except ALLOWED + (OverflowError,):
        pass


# ---------------------------------------------------------------------------------------------

def one_input(data):
    d = Draw(data)
    if d.byte() % 2 == 0:
        name, args, kw, info = draw_public(d)
        check_public(name, args, kw, info)
    else:
        check_binding(*draw_binding(d))


def _load(instrument):
    global lca, ref
    np.seterr(all="ignore")
    import warnings
    warnings.simplefilter("ignore")
    if instrument:
        import atheris
        with atheris.instrument_imports(include=["lca"]):
            import lca as _lca
            import lca.reference as _ref
    else:
        import lca as _lca
        import lca.reference as _ref
    lca, ref = _lca, _ref


def replay(paths):
    _load(False)
    files = []
    for p in paths:
        files += sorted(os.path.join(p, f) for f in os.listdir(p)) if os.path.isdir(p) else [p]
    for f in files:
        with open(f, "rb") as fh:
            try:
                one_input(fh.read())
            except BaseException:
                print(f"replay: {f} failed", file=sys.stderr)
                raise
    print(f"replayed {len(files)} inputs through lca ({lca._C.__file__}): no finding")


def main():
    import atheris

    def first_input(data):
        # lca._C (built with coverage counters) registers them with libFuzzer as it loads, so
        # it is imported here, once atheris' libFuzzer runs, after making its symbols global
        import ctypes
        core = sys.modules.get("atheris.core_with_libfuzzer")
        if core is not None:
            ctypes.CDLL(core.__file__, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
        _load(True)
        print(f"fuzzing lca from {lca._C.__file__}", file=sys.stderr)
        target[0] = one_input
        one_input(data)

    target = [first_input]
    atheris.Setup(sys.argv, lambda data: target[0](data))
    atheris.Fuzz()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        replay(sys.argv[2:])
    else:
        main()
