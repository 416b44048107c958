"""The bad-input matrix (SPEC §7): one mutation of one argument of one public function at a time,
for every public function and every argument.  test_errors.py holds the hand-picked cases; this
file is the systematic cross product.

  type     None, str, bytes, dict, set, ragged list, object array, a CUDA array (fake, so the test
           needs no GPU)
  dtype    int32, int64, uint8, float16, complex64, bool, longdouble, object, the other float
  rank     one axis more, one axis fewer
  size     every axis one longer, one shorter and 0
  layout   strided, last-dim strided, negative strides, Fortran order, read-only, zero-stride
           broadcast, misaligned, byte-swapped, nested lists
  edge     L = 0 and 1, B = 0, no batch dim, no complete group, g = 1, w = 0, w = L, H = 1
  params   zero, negative, NaN, inf, beyond int32 / int64, wrong types, for every keyword
  data     NaN and +-inf in one element of one input
  offsets  element offsets past 2**31 and 2**32 (views into a sparse, never-touched mapping)
  _C       the binding's own guards, called directly (in a subprocess, so a crash is a failure)

Every case ends in the SPEC exception with a message naming the argument (TypeError for a type
or dtype, ValueError for a shape, size or parameter, NotImplementedError, a RuntimeError, for a
CUDA array on a build without the CUDA engine), or in the right answer: the float64 reference
for the forward functions, a central finite difference for the backward ones, or the same call
on a contiguous copy for the layouts.
"""
import mmap
import os
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import lca
from conftest import TOL, check_anchors, gqa_inputs, mla_inputs, ref

B, L, G, W, N = 2, 11, 3, 4, 2               # need = num_condensed(L - 1, G, W) = 2 <= L // G
MLA_H, DC, DR = 3, 4, 2
GQA_H, HKV, D, DV = 4, 2, 5, 3

# name: (kind, positional array arguments, keywords of a valid call)
FUNCS = {
    "attention": ("mla", "q latent kpos", dict(group_size=G, window=W, n_summary=N, rep_bias=0.3,
                                               return_lse=True)),
    "condense": ("mla", "q latent kpos", dict(group_size=G, n_summary=N, score="latent")),
    "attend": ("mla", "q latent kpos latent_bar kpos_bar", dict(group_size=G, window=W,
                                                               rep_bias=0.3, return_lse=True)),
    "attention_backward": ("mla", "dout q latent kpos out lse",
                           dict(group_size=G, window=W, n_summary=N, rep_bias=0.3)),
    "gqa_attention": ("gqa", "q k v", dict(group_size=G, window=W, n_summary=N, key_mode="pool",
                                           rep_bias=-0.2, return_lse=True)),
    "gqa_condense": ("gqa", "q k v", dict(group_size=G, n_summary=N)),
    "gqa_attend": ("gqa", "q k v kbar vbar", dict(group_size=G, window=W, rep_bias=-0.2,
                                                  return_lse=True)),
    "gqa_attention_backward": ("gqa", "dout q k v out lse",
                               dict(group_size=G, window=W, n_summary=N, key_mode="pool",
                                    rep_bias=-0.2)),
}
KEYWORDS = {"attention": "group_size window n_summary softmax_scale score rep_bias",
            "condense": "group_size n_summary softmax_scale score",
            "attend": "group_size window softmax_scale rep_bias",
            "gqa_condense": "group_size n_summary softmax_scale key_mode",
            "gqa_attend": "group_size window softmax_scale rep_bias"}
KEYWORDS["attention_backward"] = KEYWORDS["attention"]
KEYWORDS["gqa_attention"] = KEYWORDS["gqa_attention_backward"] = \
    "group_size window n_summary softmax_scale key_mode rep_bias"
MAIN = ("q", "latent", "kpos", "k", "v")            # the inputs every other shape follows from
ARGS = [(fn, a) for fn, (_, names, _) in FUNCS.items() for a in names.split()]
BACKWARD = ("attention_backward", "gqa_attention_backward")
ANCHORED = {"condense": 1, "gqa_condense": 0}   # the result copied from the anchor token


def names_of(fn):
    return FUNCS[fn][1].split()


def make(fn, rng, dtype=np.float64, batched=True, **over):
    """A valid call of fn: ({argument: array} in positional order, keywords).  `over` sets
    dimensions (B L H Hkv Dc Dr D Dv) or keywords (dropped where fn does not take them)."""
    kind, names, kw = FUNCS[fn][0], names_of(fn), dict(FUNCS[fn][2])
    d = dict(B=B, L=L, H=MLA_H if kind == "mla" else GQA_H, Hkv=HKV, Dc=DC, Dr=DR, D=D, Dv=DV)
    for key, val in over.items():
        if key in d:
            d[key] = val
        elif key in KEYWORDS[fn].split():
            kw[key] = val
    if kw.get("n_summary") is not None and kw["n_summary"] > kw["group_size"]:
        kw["n_summary"] = kw["group_size"]
    b, m = (d["B"] if batched else 1), d["L"] // kw["group_size"]

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    if kind == "mla":
        q, c, r = mla_inputs(rng, b, d["L"], d["H"], d["Dc"], d["Dr"], dtype)
        arr = dict(q=q, latent=c, kpos=r, latent_bar=randn(b, m, d["Dc"]),
                   kpos_bar=randn(b, m, d["Dr"]))
        fwd, main = lca.attention, (q, c, r)
    else:
        q, k, v = gqa_inputs(rng, b, d["L"], d["H"], d["Hkv"], d["D"], d["Dv"], dtype)
        arr = dict(q=q, k=k, v=v, kbar=randn(b, m, d["Hkv"], d["D"]),
                   vbar=randn(b, m, d["Hkv"], d["Dv"]))
        fwd, main = lca.gqa_attention, (q, k, v)
    if "dout" in names:
        arr["out"], arr["lse"] = fwd(*main, return_lse=True, **kw)
        arr["dout"] = randn(*arr["out"].shape)
    if not batched:
        arr = {nm: a[0] for nm, a in arr.items()}
    return {nm: arr[nm] for nm in names}, kw


def call(fn, arrays, kw):
    return getattr(lca, fn)(*arrays.values(), **kw)


def refresh(fn, arrays, kw):
    """A backward's out and lse recomputed for keywords kw (other functions: unchanged)."""
    if fn not in BACKWARD:
        return arrays
    fwd = lca.attention if fn == "attention_backward" else lca.gqa_attention
    out, lse = fwd(*[a for nm, a in arrays.items() if nm in MAIN], return_lse=True, **kw)
    return {**arrays, "out": out, "lse": lse}


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def reference(fn, arrays, kw):
    """lca.reference's answer for a forward function, in the public function's return form."""
    batched = np.asarray(arrays["q"]).ndim == 4
    args = [np.asarray(a, np.float64) for a in arrays.values()]
    if not batched:
        args = [a[None] for a in args]
    res = getattr(ref, fn)(*args, **{k: v for k, v in kw.items() if k != "return_lse"})
    if fn in ("attention", "attend", "gqa_attention", "gqa_attend") and not kw.get("return_lse"):
        res = res[:1]
    return tuple(x if batched else x[0] for x in res)


def assert_right(fn, arrays, kw, got, dtype):
    """got is the right answer: the reference's (forward functions), within SPEC §8."""
    want = reference(fn, arrays, kw)
    got = as_tuple(got)
    assert len(got) == len(want)
    tie = None
    if fn in ANCHORED:        # anchors; where the top weights tie, either may win (SPEC §8)
        tie = check_anchors(got[2], want[3], want[2])
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.shape == y.shape, f"{fn} result {i}: shape {x.shape}, expected {y.shape}"
        if x.dtype == np.int32:
            continue
        assert x.dtype == dtype, f"{fn} result {i}: dtype {x.dtype}, expected {dtype}"
        if i == ANCHORED.get(fn):                      # copied from the anchor: skip ties
            x, y = x[~tie], y[~tie]
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=f"{fn} result {i}: NaN")
        bad = ~np.isfinite(y)
        x, y = x[~bad].astype(np.float64), y[~bad]
        s = max(float(np.abs(y).max(initial=0)), 1e-300)          # no overflow in the norms
        n = np.linalg.norm(y / s)
        err = np.linalg.norm((x - y) / s) / (n if n > 0 else 1.0)
        assert err <= TOL[np.dtype(dtype)], f"{fn} result {i}: relative error {err:.2e}"


def assert_gradient(fn, arrays, kw, got, rng, eps=1e-6):
    """The backward result against central differences of the engine's (float64) forward:
    for a random direction per input, <grad, delta> == d/de sum(dout * out(x + e delta))."""
    fwd = lca.attention if fn == "attention_backward" else lca.gqa_attention
    main = [nm for nm in names_of(fn) if nm in MAIN]
    x = {nm: np.asarray(arrays[nm], np.float64) for nm in main}
    dout = np.asarray(arrays["dout"], np.float64)
    for nm, grad in zip(main, got):
        assert grad.shape == x[nm].shape, f"d{nm}: shape {grad.shape}, expected {x[nm].shape}"
        if grad.size == 0 or dout.size == 0:
            continue
        delta = rng.standard_normal(grad.shape)

        def f(sign):
            args = [x[a] + sign * eps * delta if a == nm else x[a] for a in main]
            return float(np.sum(dout * fwd(*args, **kw)))

        fd, an = (f(1) - f(-1)) / (2 * eps), float(np.sum(grad * delta))
        assert abs(fd - an) <= 1e-6 * (1 + abs(an)), f"d{nm}: <grad, delta> {an}, FD {fd}"


def assert_names(exc, fn, arg):
    """The message names the argument.  A mutation of q, latent, kpos, k or v (the inputs every
    other shape follows from) may be reported on the argument it disagrees with."""
    msg = str(getattr(exc, "value", exc))
    allowed = names_of(fn) if arg in MAIN else [arg]
    assert any(re.search(rf"(?<![\w.]){re.escape(nm)}\b", msg) for nm in allowed), \
        f"{fn}: the message for a bad {arg!r} names none of {allowed}: {msg!r}"


def mutate(fn, rng, arg, value, dtype=np.float64):
    arrays, kw = make(fn, rng, dtype)
    arrays[arg] = value(arrays[arg]) if callable(value) else value
    return arrays, kw


# ---------------------------------------------------------------------------------------------
# type and device

class FakeCudaArray:
    """An array on a CUDA device as far as the array-interface protocol goes."""

    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str,
                                         "data": (0, False), "version": 3}


class FakeTorchCuda:
    """A torch-like tensor on a CUDA device (a .device whose .type is 'cuda')."""

    def __init__(self, a):
        self.shape, self.dtype, self.device = a.shape, a.dtype, types.SimpleNamespace(type="cuda")


TYPE_CASES = {
    "None": (lambda a: None, TypeError),
    "str": (lambda a: "abc", TypeError),
    "bytes": (lambda a: b"\x00" * 8, TypeError),
    "dict": (lambda a: {"q": a}, TypeError),
    "set": (lambda a: {1.0, 2.0}, TypeError),
    "ragged": (lambda a: [[1.0, 2.0], [3.0]], TypeError),
    "object": (lambda a: a.astype(object), TypeError),
    "cuda": (FakeCudaArray, (TypeError, RuntimeError)),
    "torch-cuda": (FakeTorchCuda, (TypeError, RuntimeError)),
}


@pytest.mark.parametrize("case", TYPE_CASES)
@pytest.mark.parametrize("fn,arg", ARGS)
def test_type(rng, fn, arg, case):
    value, exc = TYPE_CASES[case]
    with pytest.raises(exc) as e:
        call(fn, *mutate(fn, rng, arg, value))
    assert_names(e, fn, arg)


# ---------------------------------------------------------------------------------------------
# dtype

BAD_DTYPES = ["int32", "int64", "uint8", "float16", "complex64", "bool", "longdouble",
              "datetime64[s]"]


@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("fn,arg", ARGS)
def test_dtype(rng, fn, arg, dtype):
    if np.dtype(dtype) == np.float64:                 # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError) as e:
        call(fn, *mutate(fn, rng, arg, lambda a: np.zeros(a.shape, dtype)))
    assert_names(e, fn, arg)


@pytest.mark.parametrize("base", [np.float64, np.float32])
@pytest.mark.parametrize("fn,arg", ARGS)
def test_other_float_dtype(rng, fn, arg, base):
    """One argument in the other float dtype: a TypeError naming it, except dout, out and lse of
    a backward, which are converted to the inputs' dtype (then the answer is checked)."""
    other = np.float32 if base == np.float64 else np.float64
    arrays, kw = mutate(fn, rng, arg, lambda a: a.astype(other), base)
    if arg in ("dout", "out", "lse"):
        got = call(fn, arrays, kw)
        want = call(fn, {k: a.astype(base) for k, a in arrays.items()}, kw)
        for x, y in zip(got, want):                   # the same values after the conversion
            assert x.dtype == base
            np.testing.assert_array_equal(x, y)
        return
    with pytest.raises(TypeError) as e:
        call(fn, arrays, kw)
    assert_names(e, fn, arg)


# ---------------------------------------------------------------------------------------------
# rank and size

@pytest.mark.parametrize("how", ["more", "fewer", "scalar"])
@pytest.mark.parametrize("fn,arg", ARGS)
def test_rank(rng, fn, arg, how):
    change = {"more": lambda a: a[None], "fewer": lambda a: a[0], "scalar": lambda a: a.sum()}
    with pytest.raises(ValueError) as e:
        call(fn, *mutate(fn, rng, arg, change[how]))
    assert_names(e, fn, arg)


SIZE_CASES = [(fn, arg, axis, delta) for fn, arg in ARGS
              for axis in range({"q": 4, "k": 4, "v": 4, "dout": 4, "out": 4, "kbar": 4,
                                 "vbar": 4}.get(arg, 3))
              for delta in (1, -1, "0")]


@pytest.mark.parametrize("fn,arg,axis,delta", SIZE_CASES)
def test_size(rng, fn, arg, axis, delta):
    """One axis of one argument longer, shorter or empty: an error naming it, or (when the
    changed size is legal on its own: heads, value width, more condensed entries) the right
    answer."""
    arrays, kw = make(fn, rng)
    shape = list(arrays[arg].shape)
    shape[axis] = 0 if delta == "0" else shape[axis] + delta
    arrays[arg] = rng.standard_normal(shape)
    try:
        got = call(fn, arrays, kw)
    except ValueError as e:
        assert_names(e, fn, arg)
        return
    assert fn not in BACKWARD, f"{fn} accepted {arg} of shape {tuple(shape)}"
    assert_right(fn, arrays, kw, got, np.float64)


# ---------------------------------------------------------------------------------------------
# layouts: the same values in another memory layout give the same answer

def relayout(a, kind):
    """(view, values): a view of kind's layout, and the contiguous array of its values."""
    if kind == "broadcast":                           # zero stride along axis 1
        v = np.broadcast_to(a[:, :1], a.shape)
        return v, np.ascontiguousarray(v)
    if kind == "strided":                             # every other row of axis 1, NaN between
        big = np.full(a.shape[:1] + (2 * a.shape[1],) + a.shape[2:], np.nan, a.dtype)
        big[:, ::2] = a
        return big[:, ::2], a
    if kind == "lastdim":                             # every other element of the last axis
        big = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, a.dtype)
        big[..., ::2] = a
        return big[..., ::2], a
    if kind == "reversed":                            # negative strides on every axis
        return np.flip(np.flip(a).copy()), a
    if kind == "fortran":
        return np.asfortranarray(a), a
    if kind == "readonly":
        v = a.copy()
        v.flags.writeable = False
        return v, a
    if kind == "misaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        v = raw[1:].view(a.dtype).reshape(a.shape)
        v[...] = a
        return v, a
    if kind == "byteswapped":
        return a.astype(a.dtype.newbyteorder()), a
    if kind == "list":
        return a.tolist(), a
    raise AssertionError(kind)


LAYOUTS = ["broadcast", "strided", "lastdim", "reversed", "fortran", "readonly", "misaligned",
           "byteswapped", "list"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("fn,arg", ARGS)
def test_layout(rng, fn, arg, kind, dtype):
    arrays, kw = make(fn, rng, dtype)
    view, values = relayout(arrays[arg], kind)
    try:
        got = as_tuple(call(fn, {**arrays, arg: view}, kw))
    except TypeError as e:             # another dtype: byte-swapped, or lists (float64)
        assert kind == "byteswapped" or (kind == "list" and dtype == np.float32), e
        assert re.search(rf"\b{arg}\b", str(e)), e
        return
    want = as_tuple(call(fn, {**arrays, arg: values}, kw))
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.dtype == np.int32:
            np.testing.assert_array_equal(x, y)
        else:
            assert np.all(np.isfinite(x)), f"{fn}: non-finite values with a {kind} {arg}"
            np.testing.assert_allclose(x, y, rtol=0, atol=(1e-13 if dtype == np.float64 else
                                                           2e-6) * max(1.0, np.abs(y).max()))


# ---------------------------------------------------------------------------------------------
# edge shapes: empty, length 1, no complete group, ...

EDGES = {
    "L0": dict(L=0), "L1": dict(L=1), "L1-g1-w0": dict(L=1, group_size=1, window=0),
    "B0": dict(B=0), "unbatched": dict(batched=False), "no-group": dict(group_size=16),
    "L=g": dict(L=3, window=0), "g1-w0": dict(group_size=1, window=0, n_summary=1),
    "w0": dict(window=0), "w=L": dict(window=L), "H1": dict(H=1, Hkv=1), "MHA": dict(H=2, Hkv=2),
    "widths1": dict(Dc=1, Dr=1, D=1, Dv=1), "Dr0": dict(Dr=0), "n=g": dict(n_summary=G),
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("fn", FUNCS)
def test_edge_shapes(rng, fn, edge):
    arrays, kw = make(fn, rng, **EDGES[edge])
    got = call(fn, arrays, kw)
    if fn in BACKWARD:
        assert_gradient(fn, arrays, kw, got, rng)
    else:
        assert_right(fn, arrays, kw, got, np.float64)


# ---------------------------------------------------------------------------------------------
# keyword parameters, for every function that takes them

NAN, INF = float("nan"), float("inf")
OK = "ok"
# (keyword, value, outcome, the value it must be equivalent to (None: check the answer))
PARAMS = [
    ("group_size", 0, ValueError, None), ("group_size", -1, ValueError, None),
    ("group_size", 2**31, ValueError, None), ("group_size", 2**32 + G, ValueError, None),
    ("group_size", 2**63, ValueError, None), ("group_size", 2**64 + G, ValueError, None),
    ("group_size", -(2**63) - 1, ValueError, None), ("group_size", 3.0, TypeError, None),
    ("group_size", "3", TypeError, None), ("group_size", None, TypeError, None),
    ("group_size", True, TypeError, None), ("group_size", NAN, TypeError, None),
    ("group_size", np.float64(3), TypeError, None), ("group_size", [3], TypeError, None),
    ("group_size", 3 + 0j, TypeError, None), ("group_size", np.int8(G), OK, G),
    ("group_size", np.uint64(G), OK, G), ("group_size", np.array(G), OK, G),
    ("window", -1, ValueError, None), ("window", -(2**70), ValueError, None),
    ("window", 4.0, TypeError, None), ("window", None, TypeError, None),
    ("window", True, TypeError, None), ("window", "4", TypeError, None),
    ("window", INF, TypeError, None), ("window", 0, OK, None), ("window", 1, OK, None),
    ("window", 2**31 - 1, OK, L), ("window", 2**31, OK, L), ("window", 2**32 + 1, OK, L),
    ("window", 2**63 - 1, OK, L), ("window", 2**64, OK, L), ("window", 10**30, OK, L),
    ("window", np.int64(2**62), OK, L), ("window", np.uint64(2**64 - 1), OK, L),
    ("n_summary", 0, ValueError, None), ("n_summary", -1, ValueError, None),
    ("n_summary", G + 1, ValueError, None), ("n_summary", 2**31, ValueError, None),
    ("n_summary", 2**64 + 1, ValueError, None), ("n_summary", 2.0, TypeError, None),
    ("n_summary", True, TypeError, None), ("n_summary", "2", TypeError, None),
    ("n_summary", None, OK, G), ("n_summary", np.int16(N), OK, N), ("n_summary", 1, OK, None),
    ("softmax_scale", NAN, ValueError, None), ("softmax_scale", INF, ValueError, None),
    ("softmax_scale", -INF, ValueError, None), ("softmax_scale", np.float32(NAN), ValueError,
                                                None),
    ("softmax_scale", 10**400, ValueError, None), ("softmax_scale", -(10**309), ValueError,
                                                      None),
    ("softmax_scale", "0.5", TypeError, None), ("softmax_scale", [0.5], TypeError, None),
    ("softmax_scale", 1j, TypeError, None), ("softmax_scale", True, TypeError, None),
    ("softmax_scale", 0.0, OK, None), ("softmax_scale", -0.7, OK, None),
    ("softmax_scale", 1e-300, OK, None), ("softmax_scale", 2, OK, 2.0),
    ("softmax_scale", np.float16(0.5), OK, 0.5),
    ("rep_bias", NAN, ValueError, None), ("rep_bias", INF, ValueError, None),
    ("rep_bias", -INF, ValueError, None), ("rep_bias", None, TypeError, None),
    ("rep_bias", "0", TypeError, None), ("rep_bias", 10**400, ValueError, None),
    ("rep_bias", 0, OK, 0.0), ("rep_bias", -5.5, OK, None),
    ("rep_bias", np.float32(1.25), OK, 1.25),
    ("score", "foo", ValueError, None), ("score", "", ValueError, None),
    ("score", "FULL", ValueError, None), ("score", None, ValueError, None),
    ("score", 1, ValueError, None), ("score", b"full", ValueError, None),
    ("score", "full", OK, None), ("score", np.str_("latent"), OK, "latent"),
    ("key_mode", "foo", ValueError, None), ("key_mode", "", ValueError, None),
    ("key_mode", None, ValueError, None), ("key_mode", 0, ValueError, None),
    ("key_mode", "anchor", OK, None), ("key_mode", np.str_("pool"), OK, "pool"),
]
PARAM_CASES = [pytest.param(fn, kw, val, out, eq, id=f"{fn}-{kw}={val!r}"[:60])
               for kw, val, out, eq in PARAMS for fn in FUNCS if kw in KEYWORDS[fn].split()]


@pytest.mark.parametrize("fn,key,value,outcome,equiv", PARAM_CASES)
def test_param(rng, fn, key, value, outcome, equiv):
    arrays, kw = make(fn, rng)
    if outcome is not OK:
        with pytest.raises(outcome, match=rf"\b{key}\b"):
            call(fn, arrays, {**kw, key: value})
        return
    kw2 = {**kw, key: value}
    arrays = refresh(fn, arrays, kw2)
    got = call(fn, arrays, kw2)
    if equiv is not None:                          # exactly the same call as with `equiv`
        kw3 = {**kw, key: equiv}
        for x, y in zip(as_tuple(got), as_tuple(call(fn, refresh(fn, arrays, kw3), kw3))):
            np.testing.assert_array_equal(x, y)
    elif fn in BACKWARD:
        assert_gradient(fn, arrays, kw2, got, rng)
    else:
        assert_right(fn, arrays, kw2, got, np.float64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fn,key,value", [
    (fn, key, value) for fn in FUNCS for key, value in
    [("softmax_scale", 1e300), ("softmax_scale", -1e39), ("rep_bias", 1e300), ("rep_bias", -1e39)]
    if key in KEYWORDS[fn].split()])
def test_param_beyond_float32(rng, fn, key, value, dtype):
    """A finite parameter that float32 cannot hold: float64 inputs compute (the reference's
    answer, or NaN where the reference overflows too); float32 inputs get a ValueError naming
    the parameter, never inf in the engine and a NaN answer."""
    arrays, kw = make(fn, rng, dtype)
    kw = {**kw, key: value}
    if dtype == np.float32:
        with pytest.raises(ValueError, match=rf"\b{key}\b"):
            call(fn, arrays, kw)
        return
    got = call(fn, refresh(fn, arrays, kw), kw)
    if fn not in BACKWARD:
        assert_right(fn, arrays, kw, got, dtype)


# the counting functions

COUNT_BAD = [(0, None, TypeError), (0, "3", TypeError), (0, 2.5, TypeError), (0, NAN, TypeError),
             (0, True, TypeError), (0, -1, ValueError), (1, 0, ValueError), (1, -2, ValueError),
             (1, None, TypeError), (1, 1.0, TypeError), (2, -1, ValueError), (2, None, TypeError),
             (2, INF, TypeError), (2, "0", TypeError)]


@pytest.mark.parametrize("fn", ["num_condensed", "cache_entries"])
@pytest.mark.parametrize("pos,value,exc", COUNT_BAD)
def test_counting_bad(fn, pos, value, exc):
    args = [100, 16, 8]
    args[pos] = value
    name = ["t" if fn == "num_condensed" else "T", "group_size", "window"][pos]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        getattr(lca, fn)(*args)


@pytest.mark.parametrize("T,g,w", [(0, 1, 0), (1, 1, 0), (131072, 16, 1024), (10**30, 7, 10**20),
                                   (2**40, 2**33, 2**31), (5, 2**70, 0), (2**64, 3, 2**65),
                                   (np.int64(2**62), np.int32(16), np.uint64(1024))])
def test_counting_right(T, g, w):
    """Big integers are Python integers throughout: no overflow, the SPEC's formulas."""
    t, gi, wi = int(T), int(g), int(w)
    G = max(0, (t - wi + 1) // gi)
    assert lca.num_condensed(T, g, w) == G
    Gc = min(G, t // gi)
    assert lca.cache_entries(T, g, w) == Gc + (t - Gc * gi)
    assert lca.cache_entries(131072) == 9152                     # SPEC §6


# ---------------------------------------------------------------------------------------------
# NaN and inf in the data: IEEE propagation, no crash, never a silently finite answer

def poison_sites(fn):
    return [(a, v) for a in names_of(fn) for v in (np.nan, np.inf, -np.inf)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fn,arg,value", [(fn, a, v) for fn in FUNCS for a, v in poison_sites(fn)],
                         ids=lambda x: str(x))
def test_nonfinite_data(rng, fn, arg, value):
    arrays, kw = make(fn, rng)
    a = arrays[arg].copy()
    a[(0, a.shape[1] // 2) + (0,) * (a.ndim - 2)] = value
    arrays[arg] = a
    got = as_tuple(call(fn, arrays, kw))
    if fn in BACKWARD:
        # the poisoned value reaches the gradients (but an lse of +inf only zeroes its row's
        # probabilities, IEEE exp(-inf) = 0), and the batch row without it stays finite
        if not (arg == "lse" and value == np.inf):
            assert any(not np.all(np.isfinite(x)) for x in got), f"{fn}: all finite"
        for x in got:
            assert np.all(np.isfinite(x[1:])), f"{fn}: batch row 1 is not finite"
        return
    want = reference(fn, arrays, kw)
    for i, (x, y) in enumerate(zip(got, want)):
        if x.dtype == np.int32:
            continue
        # wherever the reference is not finite, neither is the engine (NaN never passes)
        assert np.all(~np.isfinite(x)[~np.isfinite(y)]), f"{fn} result {i}: a finite value " \
            "where the reference has NaN or inf"
        assert np.all(np.isfinite(x[1:])), f"{fn} result {i}: batch row 1 is not finite"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.xfail(strict=True, reason="known engine limitation (tests/RELIABILITY.md): a NaN or "
                   "inf in k/v (or a condensed entry) reaches earlier queries of the same tile "
                   "through 0 * NaN in the P.V product, so the NaN pattern is not causal")
@pytest.mark.parametrize("fn,arg", [("attention", "latent"), ("gqa_attention", "v"),
                                    ("gqa_attention", "k"), ("attention", "q")])
def test_nonfinite_data_stays_causal(rng, fn, arg):
    """A NaN at position s reaches only the outputs that see s (the reference's NaN pattern):
    outputs of earlier positions stay finite and unchanged."""
    arrays, kw = make(fn, rng, L=40)
    clean = call(fn, arrays, kw)[0]
    a = arrays[arg].copy()
    s = 31                               # a q here also feeds the summary query of its group
    a[0, s] = np.nan
    arrays[arg] = a
    out = call(fn, arrays, kw)[0]
    want = reference(fn, arrays, kw)[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(out[0, :s][np.isfinite(want[0, :s])],
                                  clean[0, :s][np.isfinite(want[0, :s])])


# ---------------------------------------------------------------------------------------------
# element offsets beyond 2**31 and 2**32, without allocating gigabytes: views into a large
# anonymous MAP_NORESERVE mapping, of which only the few pages the views cover are ever touched

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
SB, ST = 2**32 + 2**20, 2**30 + 2**14   # element strides: batch 1 is past 2**32, token 2 past 2**31


@pytest.fixture(scope="module")
def sparse():
    size = 1 << 37                                      # 128 GiB of address space
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
    except (OSError, ValueError, OverflowError) as e:
        pytest.skip(f"no sparse mapping of {size >> 30} GiB here: {e}")
    return mm                                           # unmapped when the process ends


def far(mm, shape, base, dtype):
    """A writable (B, 3, ...) array inside mm at element `base`: batch stride SB, second-axis
    stride ST, the rest packed.  Each (b, t) row lies on its own page."""
    flat = np.frombuffer(mm, dtype=dtype)
    rest = [int(np.prod(shape[i + 1:])) for i in range(2, len(shape))]
    strides = [x * flat.itemsize for x in [SB, ST] + rest]
    assert base + SB + (shape[1] - 1) * ST + int(np.prod(shape[2:])) <= flat.size
    return np.lib.stride_tricks.as_strided(flat[base:], shape, strides, writeable=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_offsets_beyond_int32(sparse, rng, dtype):
    """Inputs whose element offsets pass 2**31 and 2**32 give what their copies give."""
    shapes = dict(q=(2, 3, 4, 5), k=(2, 3, 2, 5), v=(2, 3, 2, 3))
    views = {nm: far(sparse, shp, 256 * i, dtype) for i, (nm, shp) in enumerate(shapes.items())}
    for a in views.values():
        a[...] = rng.standard_normal(a.shape)
    copies = {nm: np.ascontiguousarray(a) for nm, a in views.items()}
    kw = dict(group_size=1, window=1, n_summary=1)     # condensed and exact entries both
    out, lse = lca.gqa_attention(*views.values(), return_lse=True, **kw)
    want, wlse = lca.gqa_attention(*copies.values(), return_lse=True, **kw)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, wlse)
    for x, y in zip(lca.gqa_condense(*views.values(), group_size=1),
                    lca.gqa_condense(*copies.values(), group_size=1)):
        np.testing.assert_array_equal(x, y)
    dout = rng.standard_normal(out.shape).astype(dtype)
    for x, y in zip(lca.gqa_attention_backward(dout, *views.values(), out, lse, **kw),
                    lca.gqa_attention_backward(dout, *copies.values(), out, lse, **kw)):
        np.testing.assert_array_equal(x, y)
    # MLA: q far away (latent and kpos are packed into one key array by the Python layer)
    mq = far(sparse, (2, 3, 2, 6), 1024, dtype)
    mq[...] = rng.standard_normal(mq.shape)
    c, r = (rng.standard_normal((2, 3, w)).astype(dtype) for w in (4, 2))
    np.testing.assert_array_equal(lca.attention(mq, c, r, **kw),
                                  lca.attention(np.ascontiguousarray(mq), c, r, **kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_offsets_beyond_int32(sparse, rng, dtype):
    """The engine writes through the same 64-bit strides: lca._C with its outputs placed far
    (the public functions allocate their outputs themselves)."""
    from lca import _C
    q, k, v = (a.astype(dtype) for a in gqa_inputs(rng, 2, 3, 4, 2, 5, 3))
    kb, vb = np.zeros((2, 3, 2, 5), dtype), np.zeros((2, 3, 2, 3), dtype)
    place = iter(range(2048, 2048 + 256 * 20, 256))

    def pair(shape, dt=dtype):
        """(far view, zeroed contiguous twin)."""
        base = next(place) if dt != np.int32 else (1 << 34) + next(place)   # past the floats
        a = far(sparse, shape, base, dt)
        a[...] = 0
        return a, np.zeros(shape, dt)

    (out, out2), (lse, lse2) = pair((2, 3, 4, 3)), pair((2, 4, 3))   # lse: H on the ST axis
    for o, l in ((out, lse), (out2, lse2)):
        _C.attend(q, k, v, kb, vb, o, l, 1, 1, 0.5, 0.0, 0)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)
    cond = [pair(s, dt) for s, dt in (((2, 3, 2, 5), dtype), ((2, 3, 2, 3), dtype),
                                      ((2, 3, 2), np.int32), ((2, 3, 2, 1), dtype))]
    for i in (0, 1):
        _C.condense(q, k, v, *[c[i] for c in cond], 1, 1, 0.5, 5, 5, 0)
    for x, y in cond:
        np.testing.assert_array_equal(x, y)
    dout = rng.standard_normal(out2.shape).astype(dtype)
    grads = [pair(a.shape) for a in (q, k, v)]
    for i in (0, 1):
        _C.backward(dout, q, k, v, out2, lse2, *[g_[i] for g_ in grads], 1, 1, 1, 0.5, 0.0,
                    5, 5, 0)
    for x, y in grads:
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# lca._C called directly: its own guards (the engine trusts the params struct they fill)

C_MISUSE = textwrap.dedent(r'''
    import numpy as np
    from numpy.lib.stride_tricks import as_strided
    from lca import _C
    z = np.zeros
    B, L, H, Hkv, D, Dv, g, m = 1, 8, 2, 1, 4, 3, 2, 4
    q, k, v = z((B, L, H, D)), z((B, L, Hkv, D)), z((B, L, Hkv, Dv))
    kb, vb = z((B, m, Hkv, D)), z((B, m, Hkv, Dv))
    an, al = z((B, m, Hkv), np.int32), z((B, m, Hkv, g))
    out, lse = z((B, L, H, Dv)), z((B, H, L))
    dq, dk, dv = z(q.shape), z(k.shape), z(v.shape)
    ro = z((B, L, H, Dv)); ro.flags.writeable = False

    def unaligned(a, off):
        raw = np.frombuffer(bytearray(a.nbytes + off), np.uint8)[off:]
        return raw.view(a.dtype).reshape(a.shape)

    def huge(shape):                 # zero strides but the last: no memory behind it
        return as_strided(z(shape[-1]), shape, (0,) * (len(shape) - 1) + (8,), writeable=True)

    Hh = 2**40
    kk = z((B, L, 1, D)); vk = kk[..., :Dv]; kbk = z((B, m, 1, D)); vbk = kbk[..., :Dv]
    C, A, W = _C.condense, _C.attend, _C.backward
    T = (g, 1, 1.0, 0.0, 0)                       # attend's tail: g, w, scale, rep_bias, v_in_k
    CT = (g, g, 1.0, D, 0, 0)                     # condense's: g, n, scale, d_score, d_pool, v_in_k
    WT = (g, 1, g, 1.0, 0.0, D, 0, 0)             # backward's
    H0 = lambda *s: z((B, L, 0) + s)
    cases = [
        ("too few args", C, (q, k, v)),
        ("not an array", C, ([1.0], k, v, kb, vb, an, al) + CT),
        ("q int", A, (q.astype(int), k, v, kb, vb, out, lse) + T),
        ("k f32", A, (q, k.astype(np.float32), v, kb, vb, out, lse) + T),
        ("q rank 3", A, (q[0], k, v, kb, vb, out, lse) + T),
        ("H = 0", A, (H0(D), k, v, kb, vb, H0(Dv), z((B, 0, L))) + T),
        ("H = 0 condense", C, (H0(D), k, v, kb, vb, an, al) + CT),
        ("H = 0 backward", W, (H0(Dv), H0(D), k, v, H0(Dv), z((B, 0, L)), H0(D), dk, dv) + WT),
        ("Hkv = 0", A, (q, z((B, L, 0, D)), z((B, L, 0, Dv)), z((B, m, 0, D)), z((B, m, 0, Dv)),
                        out, lse) + T),
        ("H % Hkv", A, (z((B, L, 3, D)), z((B, L, 2, D)), z((B, L, 2, Dv)), z((B, m, 2, D)),
                        z((B, m, 2, Dv)), z((B, L, 3, Dv)), z((B, 3, L))) + T),
        ("D = 0", A, (z((B, L, H, 0)), z((B, L, Hkv, 0)), v, z((B, m, Hkv, 0)), vb, out, lse) + T),
        ("k length", A, (q, z((B, L + 1, Hkv, D)), v, kb, vb, out, lse) + T),
        ("v batch", A, (q, k, z((B + 1, L, Hkv, Dv)), kb, vb, out, lse) + T),
        ("kbar short", A, (q, k, v, kb[:, :1], vb[:, :1], out, lse, g, 0, 1.0, 0.0, 0)),
        ("kbar width", A, (q, k, v, z((B, m, Hkv, D + 1)), vb, out, lse) + T),
        ("out shape", A, (q, k, v, kb, vb, z((B, L, H, Dv + 1)), lse) + T),
        ("lse shape", A, (q, k, v, kb, vb, out, z((B, L, H))) + T),
        ("out read-only", A, (q, k, v, kb, vb, ro, lse) + T),
        ("out misaligned", A, (q, k, v, kb, vb, unaligned(out, 1), lse) + T),
        ("q misaligned", A, (unaligned(q, 4), k, v, kb, vb, out, lse) + T),
        ("out reversed", A, (q, k, v, kb, vb, out[:, ::-1], lse) + T),
        ("out last dim strided", A, (q, k, v, kb, vb, z((B, L, H, 2 * Dv))[..., ::2], lse) + T),
        ("lse last dim strided", A, (q, k, v, kb, vb, out, z((B, H, 2 * L))[..., ::2]) + T),
        ("anchor float", C, (q, k, v, kb, vb, an.astype(float), al) + CT),
        ("anchor int64", C, (q, k, v, kb, vb, an.astype(np.int64), al) + CT),
        ("alpha width", C, (q, k, v, kb, vb, an, z((B, m, Hkv, g + 1))) + CT),
        ("g = 0", C, (q, k, v, kb, vb, an, al, 0, 1, 1.0, D, 0, 0)),
        ("g < 0", A, (q, k, v, kb, vb, out, lse, -2, 1, 1.0, 0.0, 0)),
        ("g = 2**31", C, (q, k, v, z((B, 0, Hkv, D)), z((B, 0, Hkv, Dv)), z((B, 0, Hkv), np.int32),
                          z((B, 0, Hkv, 0)), 2**31, 1, 1.0, D, 0, 0)),
        ("g = 2**64", C, (q, k, v, kb, vb, an, al, 2**64, 1, 1.0, D, 0, 0)),
        ("n = 0", C, (q, k, v, kb, vb, an, al, g, 0, 1.0, D, 0, 0)),
        ("n > g", C, (q, k, v, kb, vb, an, al, g, g + 1, 1.0, D, 0, 0)),
        ("w < 0", A, (q, k, v, kb, vb, out, lse, g, -1, 1.0, 0.0, 0)),
        ("d_score 0", C, (q, k, v, kb, vb, an, al, g, g, 1.0, 0, 0, 0)),
        ("d_score > D", C, (q, k, v, kb, vb, an, al, g, g, 1.0, D + 1, 0, 0)),
        ("d_pool < 0", C, (q, k, v, kb, vb, an, al, g, g, 1.0, D, -1, 0)),
        ("d_pool > D", C, (q, k, v, kb, vb, an, al, g, g, 1.0, D, D + 1, 0)),
        ("scale nan", A, (q, k, v, kb, vb, out, lse, g, 1, float("nan"), 0.0, 0)),
        ("rep_bias inf", A, (q, k, v, kb, vb, out, lse, g, 1, 1.0, float("inf"), 0)),
        ("scale str", A, (q, k, v, kb, vb, out, lse, g, 1, "1", 0.0, 0)),
        ("scale 1e300, float32", A, tuple(x.astype(np.float32) for x in (q, k, v, kb, vb, out, lse))
                                    + (g, 1, 1e300, 0.0, 0)),
        ("v_in_k, v not in k", C, (q, kk, z((B, L, 1, Dv)), kbk, vbk, an, al, g, g, 1.0, D, D, 1)),
        ("v_in_k, vbar not in kbar", C, (q, kk, vk, kbk, z((B, m, 1, Dv)), an, al,
                                         g, g, 1.0, D, D, 1)),
        ("v_in_k, Dv > d_pool", C, (q, kk, vk, kbk, vbk, an, al, g, g, 1.0, D, 1, 1)),
        ("v_in_k, dv not in dk", W, (out, q, kk, vk, out, lse, dq, z(kk.shape), z((B, L, 1, Dv)),
                                     g, 1, g, 1.0, 0.0, D, D, 1)),
        ("dq read-only", W, (out, q, k, v, out, lse, np.broadcast_to(dq, dq.shape), dk, dv) + WT),
        ("dk shape", W, (out, q, k, v, out, lse, dq, z((B, L, Hkv, D + 1)), dv) + WT),
        ("dout shape", W, (z((B, L, H, Dv + 1)), q, k, v, out, lse, dq, dk, dv) + WT),
        # 2**40 heads: the engine's workspace cannot be allocated -> MemoryError, not a crash
        ("heads 2**40 attend", A, (huge((B, L, Hh, D)), k, v, kb, vb, huge((B, L, Hh, Dv)),
                                   huge((B, Hh, L))) + T),
        ("heads 2**40 backward", W, (huge((B, L, Hh, Dv)), huge((B, L, Hh, D)), k, v,
                                     huge((B, L, Hh, Dv)), huge((B, Hh, L)), huge((B, L, Hh, D)),
                                     dk, dv) + WT),
    ]
    n = 0
    for name, fn, args in cases:
        try:
            fn(*args)
        except (TypeError, ValueError, OverflowError, MemoryError) as e:
            n += 1
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"{name}: ACCEPTED", flush=True)
    print(f"raised {n} of {len(cases)}")
''')


def test_binding_guards():
    """Every misuse of lca._C raises (TypeError, ValueError, OverflowError or MemoryError);
    run in a child process so that a crash fails this test instead of ending the run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(lca.__file__))] + sys.path))
    res = subprocess.run([sys.executable, "-c", C_MISUSE], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, f"lca._C misuse crashed (rc {res.returncode}):\n" \
        f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    last = res.stdout.strip().splitlines()[-1]
    n, total = map(int, re.match(r"raised (\d+) of (\d+)", last).groups())
    assert n == total, res.stdout
