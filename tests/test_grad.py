"""Backward (SPEC §5) against central finite differences of the forward kernels, in float64.

loss = sum(dout * out).  Tiny shapes: every input element is perturbed.  Slightly bigger
shapes: random directions.  Then float32 backward against float64 backward, the shapes and
dtypes of the gradients, and the structure of the kpos gradient (anchors and scores only).
"""
import numpy as np
import pytest

import lca
from conftest import assert_rel, gqa_inputs, mla_inputs, rel_err

EPS = 1e-5
FD_TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# helpers

def _mla_fwd(kw):
    return lambda q, c, r: lca.attention(q, c, r, **kw)


def _gqa_fwd(kw):
    return lambda q, k, v: lca.gqa_attention(q, k, v, **kw)


def _anchors(kind, args, kw):
    ck = {k: v for k, v in kw.items() if k in ("group_size", "n_summary", "softmax_scale",
                                               "score", "key_mode")}
    return (lca.condense if kind == "mla" else lca.gqa_condense)(*args, **ck)[2]


def analytic(kind, args, dout, kw):
    if kind == "mla":
        out, lse = lca.attention(*args, return_lse=True, **kw)
        grads = lca.attention_backward(dout, *args, out, lse, **kw)
    else:
        out, lse = lca.gqa_attention(*args, return_lse=True, **kw)
        grads = lca.gqa_attention_backward(dout, *args, out, lse, **kw)
    assert len(grads) == 3
    for g, a in zip(grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype
        assert np.all(np.isfinite(g))
    return grads


def _loss(fwd, args, dout):
    return float(np.sum(dout * fwd(*args)))


def _check_no_anchor_flip(kind, args, kw, base):
    a = _anchors(kind, args, kw)
    assert np.array_equal(a, base), "an anchor flipped inside the FD step: pick another seed"


def _check_anchor_margin(kind, args, kw, margin=1e-4):
    """One element moved by EPS cannot flip an anchor whose top two weights are this far
    apart: the elementwise sweep then differentiates a fixed anchor choice."""
    ck = {k: v for k, v in kw.items() if k in ("group_size", "n_summary", "softmax_scale",
                                               "score", "key_mode")}
    alpha = (lca.condense if kind == "mla" else lca.gqa_condense)(*args, **ck)[3]
    if alpha.size and alpha.shape[-1] > 1:
        top2 = np.sort(alpha, axis=-1)[..., -2:]
        assert np.all(top2[..., 1] - top2[..., 0] > margin * top2[..., 1]), \
            "near-tied anchor: finite differences would straddle it; pick another seed"


def fd_full(kind, args, dout, kw):
    """Central differences of every element of every input."""
    fwd = _mla_fwd(kw) if kind == "mla" else _gqa_fwd(kw)
    _check_anchor_margin(kind, args, kw)
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            x0 = a[idx]
            a[idx] = x0 + EPS
            lp = _loss(fwd, args, dout)
            a[idx] = x0 - EPS
            lm = _loss(fwd, args, dout)
            a[idx] = x0
            g[idx] = (lp - lm) / (2 * EPS)
        grads.append(g)
    return grads


def fd_directions(kind, args, dout, kw, grads, ndir=4, rng=None):
    """Directional derivatives along random directions, one argument at a time:
    returns (finite-difference values, analytic values), one row per argument."""
    fwd = _mla_fwd(kw) if kind == "mla" else _gqa_fwd(kw)
    base = _anchors(kind, args, kw)
    fd = np.zeros((len(args), ndir))
    an = np.zeros((len(args), ndir))
    for i, (a, g) in enumerate(zip(args, grads)):
        for d in range(ndir):
            u = rng.standard_normal(a.shape)
            u /= max(np.linalg.norm(u), 1e-300)
            x0 = a.copy()
            a += EPS * u
            _check_no_anchor_flip(kind, args, kw, base)
            lp = _loss(fwd, args, dout)
            a[...] = x0 - EPS * u
            _check_no_anchor_flip(kind, args, kw, base)
            lm = _loss(fwd, args, dout)
            a[...] = x0
            fd[i, d] = (lp - lm) / (2 * EPS)
            an[i, d] = float(np.sum(g * u))
    return fd, an


# ---------------------------------------------------------------------------------------------
# MLA

MLA_TINY = [
    pytest.param(1, 9, 2, 3, 2, dict(group_size=2, window=3), id="g2-w3"),
    pytest.param(1, 10, 2, 3, 2, dict(group_size=3, window=2, score="latent", rep_bias=0.5,
                                      n_summary=1), id="latent-bias-n1"),
    pytest.param(2, 8, 1, 3, 0, dict(group_size=2, window=0), id="Dr0-B2-w0"),
    pytest.param(1, 11, 3, 2, 2, dict(group_size=4, window=0, n_summary=2, rep_bias=-0.4),
                 id="n<g-w0"),
    pytest.param(1, 6, 2, 3, 2, dict(group_size=1, window=0, n_summary=1), id="g1-w0"),
    pytest.param(1, 7, 2, 3, 2, dict(), id="defaults-exact"),
    pytest.param(1, 23, 2, 3, 2, dict(group_size=4, window=6, rep_bias=0.3, n_summary=3),
                 id="L23-g4-w6"),
    pytest.param(1, 23, 2, 3, 2, dict(group_size=4, window=6, score="latent",
                                      softmax_scale=0.8), id="L23-g4-w6-latent"),
]


@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", MLA_TINY)
def test_mla_backward_full_fd(rng, B, L, H, Dc, Dr, kw):
    args = mla_inputs(rng, B, L, H, Dc, Dr)
    dout = rng.standard_normal((B, L, H, Dc))
    grads = analytic("mla", args, dout, kw)
    fds = fd_full("mla", list(args), dout, kw)
    for name, g, f in zip(("dq", "dlatent", "dkpos"), grads, fds):
        e = rel_err(g, f)
        assert e <= FD_TOL, f"{name}: relative error {e:.2e} against finite differences"


MLA_DIR = [
    pytest.param(1, 23, 3, 6, 3, dict(group_size=4, window=6), id="L23-g4-w6-full"),
    pytest.param(1, 23, 3, 6, 3, dict(group_size=4, window=6, score="latent", rep_bias=0.7,
                                      n_summary=2), id="L23-g4-w6-latent-bias-n2"),
    pytest.param(2, 40, 2, 16, 8, dict(group_size=5, window=7, n_summary=3, rep_bias=1.1),
                 id="B2-L40-g5-w7"),
    pytest.param(1, 37, 4, 12, 0, dict(group_size=6, window=0, score="latent"), id="Dr0-w0"),
    pytest.param(1, 50, 2, 64, 16, dict(group_size=8, window=12, rep_bias=np.log(8)),
                 id="Dc64-Dr16"),
    pytest.param(1, 150, 2, 6, 3, dict(group_size=2, window=70), id="L150-multiblock"),
    pytest.param(1, 12, 130, 3, 2, dict(group_size=3, window=2), id="H130"),
]


@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", MLA_DIR)
def test_mla_backward_directional_fd(rng, B, L, H, Dc, Dr, kw):
    args = list(mla_inputs(rng, B, L, H, Dc, Dr))
    dout = rng.standard_normal((B, L, H, Dc))
    grads = analytic("mla", args, dout, kw)
    fd, an = fd_directions("mla", args, dout, kw, grads, rng=rng)
    for i, name in enumerate(("dq", "dlatent", "dkpos")):
        if Dr == 0 and name == "dkpos":
            assert grads[2].size == 0
            continue
        e = rel_err(an[i], fd[i])
        assert e <= FD_TOL, f"{name}: relative error {e:.2e} against finite differences"


def test_mla_backward_unbatched(rng):
    kw = dict(group_size=3, window=4, n_summary=2, rep_bias=0.2)
    q, c, r = mla_inputs(rng, 1, 14, 2, 4, 2, batched=False)
    dout = rng.standard_normal((14, 2, 4))
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    dq, dc, dr = lca.attention_backward(dout, q, c, r, out, lse, **kw)
    assert dq.shape == q.shape and dc.shape == c.shape and dr.shape == r.shape
    bq, bc, br = lca.attention_backward(dout[None], q[None], c[None], r[None], out[None],
                                        lse[None], **kw)
    for a, b in ((dq, bq), (dc, bc), (dr, br)):
        assert_rel(a, b[0], 1e-15)
    fd, an = fd_directions("mla", [q, c, r], dout, kw, (dq, dc, dr), rng=rng)
    assert_rel(an, fd, FD_TOL)


# ---------------------------------------------------------------------------------------------
# GQA

GQA_TINY = [
    pytest.param(1, 9, 4, 2, 3, 2, dict(group_size=2, window=3), id="anchor"),
    pytest.param(1, 9, 4, 2, 3, 2, dict(group_size=2, window=3, key_mode="pool",
                                        rep_bias=0.6), id="pool-bias"),
    pytest.param(2, 8, 2, 2, 2, 3, dict(group_size=3, window=0, n_summary=1), id="mha-w0-n1"),
    pytest.param(1, 11, 2, 1, 3, 2, dict(group_size=4, window=2, n_summary=2,
                                         key_mode="pool"), id="mqa-pool-n<g"),
    pytest.param(1, 23, 2, 1, 2, 2, dict(group_size=4, window=6), id="L23-g4-w6-anchor"),
    pytest.param(1, 23, 2, 1, 2, 2, dict(group_size=4, window=6, key_mode="pool",
                                         rep_bias=-0.5), id="L23-g4-w6-pool"),
]


@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", GQA_TINY)
def test_gqa_backward_full_fd(rng, B, L, H, Hkv, D, Dv, kw):
    args = gqa_inputs(rng, B, L, H, Hkv, D, Dv)
    dout = rng.standard_normal((B, L, H, Dv))
    grads = analytic("gqa", args, dout, kw)
    fds = fd_full("gqa", list(args), dout, kw)
    for name, g, f in zip(("dq", "dk", "dv"), grads, fds):
        e = rel_err(g, f)
        assert e <= FD_TOL, f"{name}: relative error {e:.2e} against finite differences"


GQA_DIR = [
    pytest.param(1, 23, 4, 2, 5, 4, dict(group_size=4, window=6), id="L23-anchor"),
    pytest.param(1, 23, 4, 2, 5, 4, dict(group_size=4, window=6, key_mode="pool",
                                         rep_bias=0.9, n_summary=3), id="L23-pool"),
    pytest.param(2, 31, 8, 1, 6, 7, dict(group_size=5, window=4, softmax_scale=0.6),
                 id="H8-Hkv1"),
    pytest.param(1, 40, 3, 3, 8, 8, dict(group_size=7, window=0, key_mode="pool"),
                 id="mha-pool-w0"),
    pytest.param(1, 140, 4, 1, 4, 4, dict(group_size=3, window=70, key_mode="pool"),
                 id="L140-multiblock"),
    pytest.param(1, 12, 136, 1, 3, 2, dict(group_size=3, window=2), id="H136-Hkv1"),
]


@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", GQA_DIR)
def test_gqa_backward_directional_fd(rng, B, L, H, Hkv, D, Dv, kw):
    args = list(gqa_inputs(rng, B, L, H, Hkv, D, Dv))
    dout = rng.standard_normal((B, L, H, Dv))
    grads = analytic("gqa", args, dout, kw)
    fd, an = fd_directions("gqa", args, dout, kw, grads, rng=rng)
    for i, name in enumerate(("dq", "dk", "dv")):
        e = rel_err(an[i], fd[i])
        assert e <= FD_TOL, f"{name}: relative error {e:.2e} against finite differences"


def test_gqa_backward_unbatched(rng):
    kw = dict(group_size=3, window=4, key_mode="pool")
    q, k, v = gqa_inputs(rng, 1, 13, 4, 2, 3, 5, batched=False)
    dout = rng.standard_normal((13, 4, 5))
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    grads = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    bgrads = lca.gqa_attention_backward(dout[None], q[None], k[None], v[None], out[None],
                                        lse[None], **kw)
    for a, b, x in zip(grads, bgrads, (q, k, v)):
        assert a.shape == x.shape
        assert_rel(a, b[0], 1e-15)


# ---------------------------------------------------------------------------------------------
# precision, structure

@pytest.mark.parametrize("kind,shape,kw", [
    ("mla", (2, 33, 3, 16, 8), dict(group_size=4, window=6, rep_bias=0.5, n_summary=3)),
    ("mla", (1, 40, 2, 12, 4), dict(group_size=5, window=0, score="latent")),
    ("gqa", (1, 33, 4, 2, 8, 6), dict(group_size=4, window=6)),
    ("gqa", (2, 29, 6, 3, 5, 7), dict(group_size=3, window=5, key_mode="pool", rep_bias=0.3)),
])
def test_backward_float32_close_to_float64(rng, kind, shape, kw):
    if kind == "mla":
        args = mla_inputs(rng, *shape)
        dout = rng.standard_normal(shape[:3] + (shape[3],))
    else:
        args = gqa_inputs(rng, *shape)
        dout = rng.standard_normal(shape[:3] + (shape[5],))
    args = [a.astype(np.float32).astype(np.float64) for a in args]
    dout = dout.astype(np.float32).astype(np.float64)
    g64 = analytic(kind, args, dout, kw)
    args32 = [a.astype(np.float32) for a in args]
    g32 = analytic(kind, args32, dout.astype(np.float32), kw)
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        assert_rel(a, b, 1e-4)


def test_zero_dout_gives_zero_gradients(rng):
    kw = dict(group_size=4, window=5)
    args = mla_inputs(rng, 1, 19, 2, 4, 3)
    dout = np.zeros((1, 19, 2, 4))
    for g in analytic("mla", args, dout, kw):
        np.testing.assert_array_equal(g, 0.0)
    args = gqa_inputs(rng, 1, 19, 4, 2, 4, 3)
    dout = np.zeros((1, 19, 4, 3))
    for g in analytic("gqa", args, dout, dict(kw, key_mode="pool")):
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("B", [1, 2])
def test_kpos_gradient_only_through_anchors_and_scores(rng, B):
    """SPEC §5: with score='latent', r enters only as the anchor's copy and as an exact key.

    dout is zero at every query t < T0, so only queries t >= T0 carry gradient; for them every
    group j < G_{T0} is condensed (G_t grows with t).  A token of such a group is then neither
    an exact key for a query with gradient nor (unless it is the anchor) a condensed key:
    its dkpos is exactly zero.  With score='full', r also enters the scores: nonzero."""
    L, H, Dc, Dr, g, w = 30, 2, 5, 3, 4, 6
    T0 = 18
    G0 = (T0 - w + 1) // g                          # 3 groups: tokens 0..11
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr)
    dout = rng.standard_normal((B, L, H, Dc))
    dout[:, :T0] = 0
    for score in ("latent", "full"):
        kw = dict(group_size=g, window=w, score=score, rep_bias=0.2)
        dq, dc, dr = analytic("mla", (q, c, r), dout, kw)
        anchor = lca.condense(q, c, r, group_size=g, score=score)[2]
        is_anchor = np.zeros((B, L), bool)
        for b in range(B):
            for j in range(G0):
                is_anchor[b, j * g + anchor[b, j]] = True
        old = np.zeros((B, L), bool)
        old[:, :G0 * g] = True
        if score == "latent":
            np.testing.assert_array_equal(dr[old & ~is_anchor], 0.0)
        else:
            assert np.all(np.abs(dr[old & ~is_anchor]).sum(-1) > 0)
        assert np.all(np.abs(dr[is_anchor]).sum(-1) > 0)
        assert np.all(np.abs(dc[old]).sum(-1) > 0)       # latents are pooled: all get some
        # and the exact gradient agrees with finite differences along random directions
        fd, an = fd_directions("mla", [q, c, r], dout, kw, (dq, dc, dr), ndir=2, rng=rng)
        assert_rel(an, fd, FD_TOL)


# ---------------------------------------------------------------------------------------------
# the forward's condensation handed to the backward (return_condensed=True, condensed=)

HANDED = [  # kind, B, L, H, Hkv (GQA) or 1, D (or Dc+Dr), Dv (or Dc), g, w, n, mode
    ("gqa", 2, 77, 4, 2, 24, 16, 8, 16, None, "anchor"),
    ("gqa", 1, 50, 3, 3, 16, 16, 4, 9, 2, "pool"),
    ("gqa", 1, 7, 2, 1, 8, 8, 8, 4, None, "pool"),          # L < g: no condensed entry
    ("mla", 2, 61, 4, 1, 24, 16, 8, 12, None, "full"),
    ("mla", 1, 45, 2, 1, 20, 16, 4, 10, 3, "latent"),
]


def _handed_case(rng, case, batched=True):
    """(forward, backward, inputs, kw) of a HANDED case, float64."""
    kind, B, L, H, Hkv, D, Dv, g, w, n, mode = case
    if kind == "gqa":
        args = gqa_inputs(rng, B, L, H, Hkv, D, Dv, batched=batched)
        kw = dict(group_size=g, window=w, n_summary=n, key_mode=mode)
        return lca.gqa_attention, lca.gqa_attention_backward, args, kw
    args = mla_inputs(rng, B, L, H, Dv, D - Dv, batched=batched)
    kw = dict(group_size=g, window=w, n_summary=n, score=mode)
    return lca.attention, lca.attention_backward, args, kw


@pytest.mark.parametrize("case,batched", [(c, True) for c in HANDED] +
                         [(c, False) for c in HANDED if c[1] == 1],      # (one sequence)
                         ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_handed_condensation_gives_the_same_gradients(rng, case, batched):
    """return_condensed=True returns the condensation function's own result, and the backward
    given it (condensed=) returns the recomputing backward's gradients bit for bit."""
    fwd, bwd, args, kw = _handed_case(rng, case, batched)
    out, lse, cond = fwd(*args, return_lse=True, return_condensed=True, **kw)
    o2, l2 = fwd(*args, return_lse=True, **kw)
    assert np.array_equal(out, o2) and np.array_equal(lse, l2)
    only = {k: v for k, v in kw.items() if k not in ("window",)}
    own = (lca.gqa_condense if case[0] == "gqa" else lca.condense)(*args, **only)
    assert len(cond) == 4
    for a, b in zip(cond, own):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    assert fwd(*args, return_condensed=True, **kw)[0].shape == out.shape
    dout = rng.standard_normal(out.shape)
    want = bwd(dout, *args, out, lse, **kw)
    got = bwd(dout, *args, out, lse, condensed=cond, **kw)
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("case", [HANDED[0], HANDED[1], HANDED[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_handed_condensation_is_used(rng, case):
    """Handed entries that are not the recomputed ones change the gradient: it is then the
    attention backward over the handed entries plus the condensation's backward of their
    gradients, as the composition of the two public backwards computes it."""
    kind = case[0]
    fwd, bwd, args, kw = _handed_case(rng, case)
    out, lse, cond = fwd(*args, return_lse=True, return_condensed=True, **kw)
    dout = rng.standard_normal(out.shape)
    moved = (1.5 * cond[0], cond[1] - 0.25, cond[2], cond[3])
    got = bwd(dout, *args, out, lse, condensed=moved, **kw)
    plain = bwd(dout, *args, out, lse, **kw)
    assert rel_err(got[0], plain[0]) > 1e-3
    attend_kw = {k: kw[k] for k in ("group_size", "window")}
    cond_kw = {k: v for k, v in kw.items() if k != "window"}
    if kind == "gqa":
        *g1, dkb, dvb = lca.gqa_attend_backward(dout, *args, moved[0], moved[1], out, lse,
                                                **attend_kw)
        g2 = lca.gqa_condense_backward(dkb, dvb, *args, **cond_kw)
    else:
        *g1, dcb, drb = lca.attend_backward(dout, *args, moved[0], moved[1], out, lse,
                                            **attend_kw)
        g2 = lca.condense_backward(dcb, drb, *args, **cond_kw)
    for a, b, c in zip(got, g1, g2):
        assert_rel(a, b + c, 1e-13)


def test_handed_condensation_errors(rng):
    fwd, bwd, args, kw = _handed_case(rng, HANDED[0])
    out, lse, cond = fwd(*args, return_lse=True, return_condensed=True, **kw)
    dout = rng.standard_normal(out.shape)
    kbar, vbar, anchor, alpha = cond
    bad = [
        (TypeError, "4-tuple", cond[:3]),
        (TypeError, "4-tuple", kbar),
        (ValueError, r"condensed\[0\]: entries is 8", (kbar[:, :-1], vbar, anchor, alpha)),
        (ValueError, r"condensed\[1\]: width is 24 but v's head dim", (kbar, kbar, anchor, alpha)),
        (ValueError, r"condensed\[2\]: kv heads", (kbar, vbar, anchor[:, :, :1], alpha)),
        (ValueError, r"condensed\[3\]: width is 7 but group_size", (kbar, vbar, anchor,
                                                                     alpha[..., :7])),
        (ValueError, r"condensed\[3\]: expected 4 dimensions", (kbar, vbar, anchor, alpha[0])),
        (TypeError, r"condensed\[2\] \(anchor\): expected int32", (kbar, vbar,
                                                                   anchor.astype(np.int64), alpha)),
        (TypeError, r"condensed\[0\]: dtype float32", (kbar.astype(np.float32), vbar, anchor,
                                                        alpha)),
    ]
    for exc, msg, given in bad:
        with pytest.raises(exc, match=msg):
            bwd(dout, *args, out, lse, condensed=given, **kw)
