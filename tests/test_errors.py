"""Bad input (SPEC §7): every case raises the SPEC exception with a message naming the
argument (TypeError for a type or dtype, ValueError for a shape, size or parameter), or
computes the right answer.  Never a crash, a hang or a silently wrong result.

Also: huge integers, non-contiguous / transposed / negative-stride / broadcast / misaligned
views (compared with the contiguous copy), and empty inputs (L = 0, B = 0).
"""
import re
import sys
import tracemalloc

import numpy as np
import pytest

import lca
from conftest import assert_rel, gqa_inputs, mla_inputs, ref

B, L, H, Dc, Dr = 2, 10, 2, 4, 2
GH, GHkv, GD, GDv = 4, 2, 5, 3
KW = dict(group_size=4, window=3)


def named(name):
    return rf"\b{re.escape(name)}\b"


@pytest.fixture
def mla(rng):
    return mla_inputs(rng, B, L, H, Dc, Dr)


@pytest.fixture
def gqa(rng):
    return gqa_inputs(rng, B, L, GH, GHkv, GD, GDv)


def _set(args, i, x):
    args = list(args)
    args[i] = x
    return args


# ---------------------------------------------------------------------------------------------
# array arguments: rank, shape, dtype, None

MLA_NAMES = ("q", "latent", "kpos")
GQA_NAMES = ("q", "k", "v")

MLA_SHAPE_CASES = [
    # (argument index, replacement shape, name in the message)
    (0, (B, L, H), "latent"),            # a rank-3 q is unbatched: latent has a dim too many
    (0, (L, H), "q"), (0, (1, B, L, H, Dc + Dr), "q"),
    (0, (B, L, H, Dc + Dr + 1), "q"), (0, (B, L, 0, Dc + Dr), "q"),
    (1, (L, Dc), "latent"), (1, (B, L, Dc, 1), "latent"), (1, (B + 1, L, Dc), "latent"),
    (1, (B, L + 1, Dc), "latent"), (1, (B, L - 1, Dc), "latent"),
    (2, (L, Dr), "kpos"), (2, (B, L, Dr, 1), "kpos"), (2, (B + 1, L, Dr), "kpos"),
    (2, (B, L + 1, Dr), "kpos"),
]


@pytest.mark.parametrize("i,shape,name", MLA_SHAPE_CASES)
@pytest.mark.parametrize("fn", ["attention", "condense", "attention_backward"])
def test_mla_bad_shape(mla, i, shape, name, fn):
    args = _set(mla, i, np.ones(shape))
    with pytest.raises(ValueError, match=named(name)):
        _call_mla(fn, args)


def test_mla_latent_width_zero_and_q_width(rng):
    q = np.ones((B, L, H, Dr))
    with pytest.raises(ValueError, match=named("latent")):
        lca.attention(q, np.ones((B, L, 0)), np.ones((B, L, Dr)))
    # q's width must be Dc+Dr: a q matching only Dc is rejected
    with pytest.raises(ValueError, match=named("q")):
        lca.attention(np.ones((B, L, H, Dc)), np.ones((B, L, Dc)), np.ones((B, L, Dr)))


def test_unbatched_mixed_with_batched(mla):
    q, c, r = mla
    with pytest.raises(ValueError, match=named("latent")):
        lca.attention(q[0], c, r[0])
    with pytest.raises(ValueError, match=named("kpos")):
        lca.attention(q[0], c[0], r)
    with pytest.raises(ValueError, match=named("latent")):
        lca.attention(q, c[0], r)


def _call_mla(fn, args, **kw):
    kw = {**KW, **kw}
    if fn == "attention":
        return lca.attention(*args, **kw)
    if fn == "condense":
        return lca.condense(*args, group_size=kw["group_size"])
    if fn == "attend":
        q, c, r = args
        need = 2
        return lca.attend(q, c, r, np.zeros((B, need, Dc)), np.zeros((B, need, Dr)), **kw)
    # backward with well-formed dout / out / lse
    q = np.asarray(args[0]) if args[0] is not None else None
    Bq = q.shape[0] if q is not None and q.ndim == 4 else B
    Hq = q.shape[2] if q is not None and q.ndim == 4 else H
    dout = np.ones((Bq, L, Hq, Dc))
    lse = np.zeros((Bq, Hq, L))
    return lca.attention_backward(dout, *args, dout, lse, **kw)


def _call_gqa(fn, args, **kw):
    kw = {**KW, **kw}
    if fn == "gqa_attention":
        return lca.gqa_attention(*args, **kw)
    if fn == "gqa_condense":
        return lca.gqa_condense(*args, group_size=kw["group_size"])
    q = np.asarray(args[0]) if args[0] is not None else None
    Bq = q.shape[0] if q is not None and q.ndim == 4 else B
    Hq = q.shape[2] if q is not None and q.ndim == 4 else GH
    dout = np.ones((Bq, L, Hq, GDv))
    lse = np.zeros((Bq, Hq, L))
    return lca.gqa_attention_backward(dout, *args, dout, lse, **kw)


GQA_SHAPE_CASES = [
    # ({argument index: replacement shape}, name in the message)
    ({0: (B, L, GH)}, "k"),             # a rank-3 q is unbatched: then k has one dim too many
    ({0: (L, GH)}, "q"), ({0: (1, B, L, GH, GD)}, "q"),
    ({1: (L, GHkv, GD)}, "k"), ({1: (B + 1, L, GHkv, GD)}, "k"),
    ({1: (B, L + 1, GHkv, GD)}, "k"),
    ({1: (B, L, 3, GD)}, "k"),          # k's kv heads differ from v's
    ({1: (B, L, 3, GD), 2: (B, L, 3, GDv)}, "k"),     # 4 query heads, 3 kv heads
    ({1: (B, L, 0, GD), 2: (B, L, 0, GDv)}, "k"),     # no kv heads
    ({1: (B, L, 8, GD), 2: (B, L, 8, GDv)}, "k"),     # more kv heads than query heads
    ({1: (B, L, GHkv, GD + 1)}, "k"),   # head dim differs from q's
    ({0: (B, L, GH, 0), 1: (B, L, GHkv, 0)}, "q"),    # empty head dim
    ({2: (B, L, GHkv)}, "v"), ({2: (B + 1, L, GHkv, GDv)}, "v"),
    ({2: (B, L - 1, GHkv, GDv)}, "v"),
    ({2: (B, L, GHkv + 2, GDv)}, "v"),  # v's kv heads differ from k's
    ({2: (B, L, GHkv, 0)}, "v"),        # empty value width
]


@pytest.mark.parametrize("repl,name", GQA_SHAPE_CASES)
@pytest.mark.parametrize("fn", ["gqa_attention", "gqa_condense", "gqa_attention_backward"])
def test_gqa_bad_shape(gqa, repl, name, fn):
    args = list(gqa)
    for i, shape in repl.items():
        args[i] = np.ones(shape)
    with pytest.raises(ValueError, match=named(name)):
        _call_gqa(fn, args)


BAD_DTYPES = [np.int32, np.int64, np.float16, np.complex128, np.bool_, np.longdouble]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("fn", ["attention", "condense", "attend", "attention_backward"])
def test_mla_bad_dtype(mla, i, dtype, fn):
    args = _set(mla, i, mla[i].astype(dtype))
    with pytest.raises(TypeError, match=named(MLA_NAMES[i])):
        _call_mla(fn, args)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("fn", ["gqa_attention", "gqa_condense", "gqa_attention_backward"])
def test_gqa_bad_dtype(gqa, i, dtype, fn):
    args = _set(gqa, i, gqa[i].astype(dtype))
    with pytest.raises(TypeError, match=named(GQA_NAMES[i])):
        _call_gqa(fn, args)


@pytest.mark.parametrize("i", [1, 2])
def test_mixed_dtypes(mla, gqa, i):
    args = _set(mla, i, mla[i].astype(np.float32))
    with pytest.raises(TypeError, match=named(MLA_NAMES[i])):
        lca.attention(*args, **KW)
    with pytest.raises(TypeError, match=named(MLA_NAMES[i])):
        lca.condense(*args)
    args = _set(gqa, i, gqa[i].astype(np.float32))
    with pytest.raises(TypeError, match=named(GQA_NAMES[i])):
        lca.gqa_attention(*args, **KW)
    # a float32 q with float64 k, v names k
    args = [gqa[0].astype(np.float32), gqa[1], gqa[2]]
    with pytest.raises(TypeError, match=named("k")):
        lca.gqa_attention(*args, **KW)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_none_and_non_arrays(mla, gqa, i):
    for bad in (None, "abc", {"a": 1}, [[1.0, 2.0], [3.0]]):
        with pytest.raises(TypeError, match=named(MLA_NAMES[i])):
            lca.attention(*_set(mla, i, bad), **KW)
        with pytest.raises(TypeError, match=named(GQA_NAMES[i])):
            lca.gqa_attention(*_set(gqa, i, bad), **KW)


def test_big_endian_is_rejected_or_right(mla):
    q, c, r = mla
    try:
        out = lca.attention(q.astype(">f8"), c, r, **KW)
    except TypeError as e:
        assert re.search(named("q"), str(e))
    else:
        assert_rel(out, lca.attention(q, c, r, **KW), 1e-15)


# ---------------------------------------------------------------------------------------------
# keyword parameters

PARAM_CASES = [
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=-3), ValueError, "group_size"),
    (dict(group_size=2**40), ValueError, "group_size"),
    (dict(group_size=10**30), ValueError, "group_size"),
    (dict(group_size=np.int64(2**40)), ValueError, "group_size"),
    (dict(group_size=2.0), TypeError, "group_size"),
    (dict(group_size="4"), TypeError, "group_size"),
    (dict(group_size=None), TypeError, "group_size"),
    (dict(group_size=True), TypeError, "group_size"),
    (dict(window=-1), ValueError, "window"),
    (dict(window=-(10**30)), ValueError, "window"),
    (dict(window=3.0), TypeError, "window"),
    (dict(window=None), TypeError, "window"),
    (dict(n_summary=0), ValueError, "n_summary"),
    (dict(n_summary=-1), ValueError, "n_summary"),
    (dict(n_summary=5), ValueError, "n_summary"),          # group_size is 4
    (dict(n_summary=2**40), ValueError, "n_summary"),
    (dict(n_summary=10**30), ValueError, "n_summary"),
    (dict(n_summary=2.0), TypeError, "n_summary"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (dict(softmax_scale=-float("inf")), ValueError, "softmax_scale"),
    (dict(softmax_scale=np.float32("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale"),
    (dict(rep_bias=float("nan")), ValueError, "rep_bias"),
    (dict(rep_bias=float("inf")), ValueError, "rep_bias"),
    (dict(rep_bias=None), TypeError, "rep_bias"),
]


@pytest.mark.parametrize("kw,exc,name", PARAM_CASES,
                         ids=[f"{k}={v!r}"[:40] for kw, _, _ in PARAM_CASES
                              for k, v in kw.items()])
def test_bad_params(mla, gqa, kw, exc, name):
    full = {**KW, **kw}
    with pytest.raises(exc, match=named(name)):
        lca.attention(*mla, **full)
    with pytest.raises(exc, match=named(name)):
        lca.gqa_attention(*gqa, **full)
    with pytest.raises(exc, match=named(name)):
        lca.attention_backward(np.ones((B, L, H, Dc)), *mla, np.ones((B, L, H, Dc)),
                               np.zeros((B, H, L)), **full)
    if "window" not in kw and "rep_bias" not in kw:
        ck = {k: v for k, v in full.items() if k != "window"}
        with pytest.raises(exc, match=named(name)):
            lca.condense(*mla, **ck)
        with pytest.raises(exc, match=named(name)):
            lca.gqa_condense(*gqa, **ck)


@pytest.mark.parametrize("bad", ["foo", "", "FULL", None, 1])
def test_bad_score_and_key_mode(mla, gqa, bad):
    with pytest.raises(ValueError, match=named("score")):
        lca.attention(*mla, score=bad, **KW)
    with pytest.raises(ValueError, match=named("score")):
        lca.condense(*mla, score=bad)
    with pytest.raises(ValueError, match=named("key_mode")):
        lca.gqa_attention(*gqa, key_mode=bad, **KW)
    with pytest.raises(ValueError, match=named("key_mode")):
        lca.gqa_condense(*gqa, key_mode=bad)


def test_unknown_keyword_and_positional_keywords(mla):
    with pytest.raises(TypeError, match="windw"):
        lca.attention(*mla, windw=3)
    with pytest.raises(TypeError):
        lca.attention(*mla, 4)          # keywords are keyword-only


@pytest.mark.parametrize("window", [10**30, 2**40, 2**63, np.int64(2**62), L, L + 1])
def test_huge_window_is_exact_attention(mla, gqa, window):
    out, lse = lca.attention(*mla, group_size=4, window=window, return_lse=True)
    q, c, r = mla
    cout, clse = ref.causal_attention(q, np.concatenate([c, r], 2)[:, :, None], c[:, :, None])
    assert_rel(out, cout, 1e-12)
    assert_rel(lse, clse, 1e-12)
    out = lca.gqa_attention(*gqa, group_size=4, window=window)
    assert_rel(out, ref.causal_attention(*gqa)[0], 1e-12)


def test_largest_group_size_works(mla, gqa):
    """group_size = 2**31 - 1 is legal: no complete group, so w = 0 is still exact."""
    g = 2**31 - 1
    out = lca.attention(*mla, group_size=g, window=0)
    q, c, r = mla
    cout, _ = ref.causal_attention(q, np.concatenate([c, r], 2)[:, :, None], c[:, :, None])
    assert_rel(out, cout, 1e-12)
    cb, rb, anchor, alpha = lca.condense(*mla, group_size=g)
    assert cb.shape == (B, 0, Dc) and alpha.shape == (B, 0, g) and anchor.shape == (B, 0)
    out = lca.gqa_attention(*gqa, group_size=g, window=0, n_summary=g)
    assert_rel(out, ref.causal_attention(*gqa)[0], 1e-12)


def test_numpy_integer_params(mla):
    kw = dict(group_size=np.int32(4), window=np.int64(3), n_summary=np.uint8(2),
              softmax_scale=np.float32(0.5), rep_bias=np.float64(0.25))
    out = lca.attention(*mla, **kw)
    want, _ = ref.attention(*mla, group_size=4, window=3, n_summary=2, softmax_scale=0.5,
                            rep_bias=0.25)
    assert_rel(out, want, 1e-12)


# ---------------------------------------------------------------------------------------------
# attend / gqa_attend: the condensed entries

def test_attend_bad_condensed(mla):
    q, c, r = mla
    need = ref.num_condensed(L - 1, 4, 3)         # 2
    cb, rb = np.zeros((B, need, Dc)), np.zeros((B, need, Dr))
    lca.attend(q, c, r, cb, rb, **KW)            # well-formed
    cases = [
        ((np.zeros((B, need - 1, Dc)), np.zeros((B, need - 1, Dr))), ValueError, "latent_bar"),
        ((np.zeros((B, need, Dc + 1)), rb), ValueError, "latent_bar"),
        ((cb, np.zeros((B, need, Dr + 1))), ValueError, "kpos_bar"),
        ((cb, np.zeros((B, need + 1, Dr))), ValueError, "kpos_bar"),
        ((np.zeros((B + 1, need, Dc)), rb), ValueError, "latent_bar"),
        ((cb, np.zeros((B + 1, need, Dr))), ValueError, "kpos_bar"),
        ((np.zeros((need, Dc)), rb), ValueError, "latent_bar"),
        ((cb, np.zeros((1, B, need, Dr))), ValueError, "kpos_bar"),
        ((cb.astype(np.float32), rb), TypeError, "latent_bar"),
        ((cb, rb.astype(np.int64)), TypeError, "kpos_bar"),
        ((None, rb), TypeError, "latent_bar"),
        ((cb, None), TypeError, "kpos_bar"),
    ]
    for (a, b), exc, name in cases:
        with pytest.raises(exc, match=named(name)):
            lca.attend(q, c, r, a, b, **KW)


def test_gqa_attend_bad_condensed(gqa):
    q, k, v = gqa
    need = ref.num_condensed(L - 1, 4, 3)
    kb, vb = np.zeros((B, need, GHkv, GD)), np.zeros((B, need, GHkv, GDv))
    lca.gqa_attend(q, k, v, kb, vb, **KW)
    cases = [
        ((np.zeros((B, need - 1, GHkv, GD)), np.zeros((B, need - 1, GHkv, GDv))), "kbar"),
        ((np.zeros((B, need, GHkv, GD + 1)), vb), "kbar"),
        ((kb, np.zeros((B, need, GHkv, GDv + 1))), "vbar"),
        ((np.zeros((B, need, GHkv + 1, GD)), vb), "kbar"),
        ((kb, np.zeros((B, need, 1, GDv))), "vbar"),
        ((kb, np.zeros((B, need + 1, GHkv, GDv))), "vbar"),
        ((np.zeros((B + 1, need, GHkv, GD)), vb), "kbar"),
        ((kb, np.zeros((need, GHkv, GDv))), "vbar"),
    ]
    for (a, b), name in cases:
        with pytest.raises(ValueError, match=named(name)):
            lca.gqa_attend(q, k, v, a, b, **KW)
    with pytest.raises(TypeError, match=named("vbar")):
        lca.gqa_attend(q, k, v, kb, vb.astype(np.float16), **KW)
    with pytest.raises(TypeError, match=named("kbar")):
        lca.gqa_attend(q, k, v, None, vb, **KW)


# ---------------------------------------------------------------------------------------------
# backward: dout, out, lse

@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_backward_bad_dout_out_lse(mla, gqa, kind):
    if kind == "mla":
        args, Dv, Hq = mla, Dc, H
        fwd, bwd = lca.attention, lca.attention_backward
    else:
        args, Dv, Hq = gqa, GDv, GH
        fwd, bwd = lca.gqa_attention, lca.gqa_attention_backward
    out, lse = fwd(*args, return_lse=True, **KW)
    dout = np.ones_like(out)
    bwd(dout, *args, out, lse, **KW)                    # well-formed
    cases = [
        (np.ones((B, L, Hq, Dv + 1)), out, lse, ValueError, "dout"),
        (np.ones((B, L + 1, Hq, Dv)), out, lse, ValueError, "dout"),
        (np.ones((L, Hq, Dv)), out, lse, ValueError, "dout"),
        (dout, np.ones((B, L, Hq + 1, Dv)), lse, ValueError, "out"),
        (dout, out[:, :-1], lse, ValueError, "out"),
        (dout, out[0], lse, ValueError, "out"),
        (dout, out, np.zeros((B, L, Hq)), ValueError, "lse"),       # (B, L, H) not (B, H, L)
        (dout, out, lse[:, :, :-1], ValueError, "lse"),
        (dout, out, lse[0], ValueError, "lse"),
        (dout, out, lse[..., None], ValueError, "lse"),
        (None, out, lse, TypeError, "dout"),
        (dout, None, lse, TypeError, "out"),
        (dout, out, None, TypeError, "lse"),
        (dout.astype(np.int32), out, lse, TypeError, "dout"),
        (dout, out.astype(np.float16), lse, TypeError, "out"),
        (dout, out, lse.astype(np.complex64), TypeError, "lse"),
    ]
    for d, o, l, exc, name in cases:
        with pytest.raises(exc, match=named(name)):
            bwd(d, *args, o, l, **KW)


# ---------------------------------------------------------------------------------------------
# views: non-contiguous, transposed, negative strides, broadcasts, misaligned

def _views(a, rng, kind):
    """Return a view with the values of `a` but a different memory layout."""
    if kind == "strided":                     # every other element along the length axis
        big = np.empty((a.shape[0], 2 * a.shape[1]) + a.shape[2:], a.dtype)
        big[:, ::2] = a
        big[:, 1::2] = np.nan                 # any read of the gaps poisons the result
        return big[:, ::2]
    if kind == "lastdim":                     # non-unit stride in the last dim
        big = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if kind == "offset":                      # a window into wider rows
        big = np.full(a.shape[:-1] + (a.shape[-1] + 3,), np.nan, a.dtype)
        big[..., 1:1 + a.shape[-1]] = a
        return big[..., 1:1 + a.shape[-1]]
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "transposed":                  # (B, L, ...) built as a transposed array
        t = np.ascontiguousarray(np.moveaxis(a, 1, -1))
        return np.moveaxis(t, -1, 1)
    if kind == "reversed":                    # negative strides on the batch and length axes
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if kind == "misaligned":
        raw = np.zeros(a.nbytes + a.itemsize, np.uint8)
        v = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
        v[...] = a
        return v
    if kind == "readonly":
        v = a.copy()
        v.flags.writeable = False
        return v
    raise AssertionError(kind)


def same(got, want):
    """Equal up to summation-order rounding (a strided path may sum in another order); a
    read of the wrong memory (the NaN gaps, another row) is far outside this."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want)
    else:
        assert_rel(got, want, (1e-14 if want.dtype == np.float64 else 1e-6))


VIEW_KINDS = ["strided", "lastdim", "offset", "fortran", "transposed", "reversed",
              "misaligned", "readonly"]


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mla_views_compute_the_right_answer(rng, kind, dtype):
    kw = dict(group_size=3, window=4, n_summary=2, rep_bias=0.3)
    args = [a.astype(dtype) for a in mla_inputs(rng, 2, 13, 3, 5, 2)]
    out, lse = lca.attention(*args, return_lse=True, **kw)
    views = [_views(a, rng, kind) for a in args]
    for v, a in zip(views, args):
        np.testing.assert_array_equal(v, a)
    out2, lse2 = lca.attention(*views, return_lse=True, **kw)
    same(out2, out)
    same(lse2, lse)
    for x, y in zip(lca.condense(*views, group_size=3), lca.condense(*args, group_size=3)):
        same(x, y)
    cb, rb, _, _ = lca.condense(*args, group_size=3)
    akw = dict(group_size=3, window=4, rep_bias=0.3)
    same(lca.attend(*views, _views(cb, rng, kind), _views(rb, rng, kind), **akw),
         lca.attend(*args, cb, rb, **akw))
    dout = rng.standard_normal(out.shape).astype(dtype)
    g = lca.attention_backward(dout, *args, out, lse, **kw)
    g2 = lca.attention_backward(_views(dout, rng, kind), *views, _views(out, rng, kind),
                                _views(lse, rng, kind), **kw)
    for x, y in zip(g2, g):
        same(x, y)


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gqa_views_compute_the_right_answer(rng, kind, dtype):
    kw = dict(group_size=3, window=4, n_summary=2, key_mode="pool", rep_bias=-0.2)
    args = [a.astype(dtype) for a in gqa_inputs(rng, 2, 13, 4, 2, 5, 3)]
    out, lse = lca.gqa_attention(*args, return_lse=True, **kw)
    views = [_views(a, rng, kind) for a in args]
    out2, lse2 = lca.gqa_attention(*views, return_lse=True, **kw)
    same(out2, out)
    same(lse2, lse)
    ck = dict(group_size=3, n_summary=2, key_mode="pool")
    cond = lca.gqa_condense(*args, **ck)
    for x, y in zip(lca.gqa_condense(*views, **ck), cond):
        same(x, y)
    akw = dict(group_size=3, window=4, rep_bias=-0.2)
    same(lca.gqa_attend(*views, _views(cond[0], rng, kind), _views(cond[1], rng, kind), **akw),
         lca.gqa_attend(*args, cond[0], cond[1], **akw))
    dout = rng.standard_normal(out.shape).astype(dtype)
    g = lca.gqa_attention_backward(dout, *args, out, lse, **kw)
    g2 = lca.gqa_attention_backward(_views(dout, rng, kind), *views, _views(out, rng, kind),
                                    _views(lse, rng, kind), **kw)
    for x, y in zip(g2, g):
        same(x, y)


def test_sliced_views_of_shared_buffers(rng):
    """q[:, ::2], heads sliced out of a fused qkv buffer, q[::-1]: all match their copies."""
    kw = dict(group_size=4, window=5)
    qkv = rng.standard_normal((2, 26, 3, 4, 6))            # (B, 2L, {q,k,v}, heads, D)
    q, k, v = qkv[:, ::2, 0], qkv[:, ::2, 1, ::2], qkv[:, ::2, 2, 1::2]
    assert not q.flags.c_contiguous
    want = ref.gqa_attention(q, k, v, **kw)[0]
    for qq, kk, vv in ((q, k, v), (q[::-1], k[::-1], v[::-1]), (q[:, ::-1], k, v)):
        got = lca.gqa_attention(qq, kk, vv, **kw)
        same(got, lca.gqa_attention(*(np.ascontiguousarray(a) for a in (qq, kk, vv)), **kw))
    assert_rel(lca.gqa_attention(q, k, v, **kw), want, 1e-12)
    # zero strides: one kv head broadcast to all, one kpos broadcast over the batch
    kb = np.broadcast_to(k[:, :, :1], k.shape)
    got = lca.gqa_attention(q, kb, v, **kw)
    same(got, lca.gqa_attention(q, np.ascontiguousarray(kb), v, **kw))
    assert_rel(got, ref.gqa_attention(q, kb, v, **kw)[0], 1e-12)
    mq, mc, mr = mla_inputs(rng, 3, 15, 2, 4, 3)
    rb = np.broadcast_to(mr[:1], mr.shape)
    same(lca.attention(mq, mc, rb, **kw), lca.attention(mq, mc, np.ascontiguousarray(rb), **kw))
    qb = np.broadcast_to(mq[:, :, :1], mq.shape)             # zero stride on the head axis
    same(lca.attention(qb, mc, mr, **kw), lca.attention(np.ascontiguousarray(qb), mc, mr, **kw))
    same(lca.attention(mq[::-1], mc[::-1], mr[::-1], **kw), lca.attention(mq, mc, mr, **kw)[::-1])


def test_stride_not_multiple_of_itemsize(rng):
    """float64 views whose strides are not multiples of 8 bytes (e.g. over a packed record
    buffer): 12-byte element stride, or 28-byte head stride with a contiguous last dim."""
    q, k, v = gqa_inputs(rng, 1, 9, 2, 1, 3, 2)
    kw = dict(group_size=2, window=3)
    want = lca.gqa_attention(q, k, v, **kw)
    raw = np.zeros(4096, np.uint8)
    for strides in ((0, 2 * 3 * 12, 3 * 12, 12), (0, 60, 28, 8)):
        qv = np.ndarray(q.shape, np.float64, raw.data, 4, strides)
        qv[...] = q
        np.testing.assert_array_equal(qv, q)
        same(lca.gqa_attention(qv, k, v, **kw), want)


# ---------------------------------------------------------------------------------------------
# empty inputs

@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_length(batched, dtype):
    b = (2,) if batched else ()
    q, c, r = np.ones(b + (0, 3, 6), dtype), np.ones(b + (0, 4), dtype), np.ones(b + (0, 2), dtype)
    out, lse = lca.attention(q, c, r, group_size=4, window=3, return_lse=True)
    assert out.shape == b + (0, 3, 4) and lse.shape == b + (3, 0) and out.dtype == dtype
    cb, rb, anchor, alpha = lca.condense(q, c, r, group_size=4)
    assert cb.shape == b + (0, 4) and rb.shape == b + (0, 2)
    assert anchor.shape == b + (0,) and anchor.dtype == np.int32 and alpha.shape == b + (0, 4)
    assert lca.attend(q, c, r, cb, rb, group_size=4, window=3).shape == b + (0, 3, 4)
    g = lca.attention_backward(np.ones(out.shape, dtype), q, c, r, out, lse, group_size=4,
                               window=3)
    assert [x.shape for x in g] == [q.shape, c.shape, r.shape]
    q, k, v = np.ones(b + (0, 4, 5), dtype), np.ones(b + (0, 2, 5), dtype), \
        np.ones(b + (0, 2, 3), dtype)
    out, lse = lca.gqa_attention(q, k, v, group_size=4, window=3, return_lse=True)
    assert out.shape == b + (0, 4, 3) and lse.shape == b + (4, 0)
    kb, vb, anchor, alpha = lca.gqa_condense(q, k, v, group_size=4)
    assert kb.shape == b + (0, 2, 5) and vb.shape == b + (0, 2, 3)
    assert anchor.shape == b + (0, 2) and alpha.shape == b + (0, 2, 4)
    assert lca.gqa_attend(q, k, v, kb, vb, group_size=4).shape == b + (0, 4, 3)
    g = lca.gqa_attention_backward(np.ones(out.shape, dtype), q, k, v, out, lse, group_size=4)
    assert [x.shape for x in g] == [q.shape, k.shape, v.shape]


def test_empty_batch():
    q, c, r = np.ones((0, 7, 2, 6)), np.ones((0, 7, 4)), np.ones((0, 7, 2))
    out, lse = lca.attention(q, c, r, group_size=2, window=1, return_lse=True)
    assert out.shape == (0, 7, 2, 4) and lse.shape == (0, 2, 7)
    g = lca.attention_backward(out.copy(), q, c, r, out, lse, group_size=2, window=1)
    assert [x.shape for x in g] == [q.shape, c.shape, r.shape]
    q, k, v = np.ones((0, 7, 4, 5)), np.ones((0, 7, 2, 5)), np.ones((0, 7, 2, 3))
    out = lca.gqa_attention(q, k, v, group_size=2, window=1)
    assert out.shape == (0, 7, 4, 3)


def test_dr_zero_shape(rng):
    """Dr = 0: kpos has shape (B, L, 0); kpos_bar comes back (B, m, 0), dkpos (B, L, 0)."""
    q, c, r = mla_inputs(rng, 2, 11, 2, 5, 0)
    assert r.shape == (2, 11, 0)
    out, lse = lca.attention(q, c, r, group_size=3, window=2, return_lse=True)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=3)
    assert rb.shape == (2, 3, 0)
    g = lca.attention_backward(np.ones_like(out), q, c, r, out, lse, group_size=3, window=2)
    assert g[2].shape == (2, 11, 0)
    assert_rel(out, ref.attention(q, c, r, group_size=3, window=2)[0], 1e-12)


def test_backward_dout_other_float_dtype(rng):
    """A float32 dout with float64 inputs is either rejected naming dout or used as is."""
    kw = dict(group_size=3, window=4)
    args = mla_inputs(rng, 1, 12, 2, 4, 2)
    out, lse = lca.attention(*args, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    want = lca.attention_backward(dout.astype(np.float64), *args, out, lse, **kw)
    try:
        got = lca.attention_backward(dout, *args, out, lse, **kw)
    except TypeError as e:
        assert re.search(named("dout"), str(e))
    else:
        for x, y in zip(got, want):
            assert x.dtype == np.float64
            assert_rel(x, y, 1e-15)


# ---------------------------------------------------------------------------------------------
# leaks: references and memory, on success and on error paths

def _all_calls(mla, gqa):
    q, c, r = mla
    gq, gk, gv = gqa
    out, lse = lca.attention(q, c, r, return_lse=True, **KW)
    gout, glse = lca.gqa_attention(gq, gk, gv, return_lse=True, **KW)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=4)
    kb, vb, _, _ = lca.gqa_condense(gq, gk, gv, group_size=4)
    ok = [
        lambda: lca.attention(q, c, r, return_lse=True, **KW),
        lambda: lca.condense(q, c, r, group_size=4),
        lambda: lca.attend(q, c, r, cb, rb, **KW),
        lambda: lca.attention_backward(out, q, c, r, out, lse, **KW),
        lambda: lca.gqa_attention(gq, gk, gv, return_lse=True, **KW),
        lambda: lca.gqa_condense(gq, gk, gv, group_size=4, key_mode="pool"),
        lambda: lca.gqa_attend(gq, gk, gv, kb, vb, **KW),
        lambda: lca.gqa_attention_backward(gout, gq, gk, gv, gout, glse, **KW),
        lambda: lca.attention(q[:, ::-1], c.T.copy().T, r, **KW),
    ]
    bad = [
        lambda: lca.attention(q, c.astype(np.float32), r, **KW),
        lambda: lca.attention(q, c, r, group_size=0),
        lambda: lca.gqa_attention(gq, gk[:, :-1], gv, **KW),
        lambda: lca.attention_backward(out[:, 1:], q, c, r, out, lse, **KW),
        lambda: lca.gqa_attend(gq, gk, gv, kb[:, :0], vb[:, :0], **KW),
    ]
    return [q, c, r, gq, gk, gv, out, lse, gout, glse, cb, rb, kb, vb], ok, bad


def test_no_reference_leaks(mla, gqa):
    arrays, ok, bad = _all_calls(mla, gqa)
    for f in ok:
        f()
    before = [sys.getrefcount(a) for a in arrays]
    for _ in range(20):
        for f in ok:
            f()
        for f in bad:
            with pytest.raises((TypeError, ValueError)):
                f()
    after = [sys.getrefcount(a) for a in arrays]
    assert after == before


def test_no_memory_growth(rng):
    """100 rounds of every call (outputs of ~100 KB each) leave no traced memory behind."""
    mla = mla_inputs(rng, 2, 64, 4, 32, 8)
    gqa = gqa_inputs(rng, 2, 64, 4, 2, 32, 24)
    _, ok, bad = _all_calls(mla, gqa)
    tracemalloc.start()
    try:
        for _ in range(5):
            for f in ok:
                f()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            for f in ok:
                f()
            for f in bad:
                try:
                    f()
                except (TypeError, ValueError):
                    pass
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, f"{grown} bytes still held after 100 rounds"
