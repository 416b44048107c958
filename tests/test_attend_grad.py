"""lca.attend_backward / lca.gqa_attend_backward: the gradient of attend with the condensed
entries as inputs of their own (SPEC §3 over given entries; no condensation), for research code
that supplies its own condensation.

Against central finite differences of lca.attend / lca.gqa_attend in float64, every input
element perturbed (tiny shapes, more condensed rows given than the last query sees, so the
unseen rows must get exactly zero); the exact-causal case against gqa_attention_backward; float32
against float64; the errors.  The CUDA engine's versions: tests/test_cuda_attend_grad.py."""
import numpy as np
import pytest

import lca
from conftest import gqa_inputs, mla_inputs, rel_err

EPS = 1e-6


def fd_check(fwd, args, dout, grads, tol=1e-7):
    """Central differences of sum(dout * fwd(*args)) for every element of every arg."""
    for i, (a, g) in enumerate(zip(args, grads)):
        assert g.shape == a.shape and g.dtype == a.dtype
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            keep = a[idx]
            a[idx] = keep + EPS
            up = float(np.sum(dout * fwd(*args)))
            a[idx] = keep - EPS
            down = float(np.sum(dout * fwd(*args)))
            a[idx] = keep
            num[idx] = (up - down) / (2 * EPS)
        err = np.abs(num - g).max() / max(np.abs(num).max(), 1e-300)
        assert err <= tol, f"argument {i}: finite-difference error {err:.2e}"


@pytest.mark.parametrize("case", [  # B, L, H, Hkv, D, Dv, g, w, extra rows, rep_bias
    (2, 23, 4, 2, 5, 3, 4, 6, 2, 0.0),
    (1, 19, 3, 1, 4, 6, 2, 0, 0, 0.4),        # window 0: condensed entries only (and the group)
    (1, 17, 2, 2, 3, 3, 16, 3, 1, 0.0),       # one group: one condensed row, seen late
])
def test_gqa_attend_backward_finite_differences(case, rng):
    B, L, H, Hkv, D, Dv, g, w, extra, bias = case
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv)
    m = lca.num_condensed(L - 1, g, w) + extra
    kbar = rng.standard_normal((B, m, Hkv, D))
    vbar = rng.standard_normal((B, m, Hkv, Dv))
    kw = dict(group_size=g, window=w, rep_bias=bias, softmax_scale=0.7)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    grads = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    assert len(grads) == 5
    fd_check(lambda *a: lca.gqa_attend(*a, **kw), [q, k, v, kbar, vbar], dout, grads)
    unseen = lca.num_condensed(L - 1, g, w)
    assert not grads[3][:, unseen:].any() and not grads[4][:, unseen:].any()


def test_attend_backward_finite_differences(rng):
    B, L, H, Dc, Dr, g, w = 2, 21, 3, 6, 2, 4, 5
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr)
    m = lca.num_condensed(L - 1, g, w) + 1
    cb, rb = rng.standard_normal((B, m, Dc)), rng.standard_normal((B, m, Dr))
    kw = dict(group_size=g, window=w, rep_bias=-0.3)
    out, lse = lca.attend(q, c, r, cb, rb, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    grads = lca.attend_backward(dout, q, c, r, cb, rb, out, lse, **kw)
    assert len(grads) == 5
    fd_check(lambda *a: lca.attend(*a, **kw), [q, c, r, cb, rb], dout, grads)


def test_unbatched_inputs(rng):
    q, c, r = mla_inputs(rng, 1, 30, 2, 8, 4, batched=False)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=4)
    kw = dict(group_size=4, window=8)
    out, lse = lca.attend(q, c, r, cb, rb, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    got = lca.attend_backward(dout, q, c, r, cb, rb, out, lse, **kw)
    want = lca.attend_backward(dout[None], q[None], c[None], r[None], cb[None], rb[None],
                               out[None], lse[None], **kw)
    for a, b in zip(got, want):
        assert np.array_equal(a, b[0])


def test_exact_causal_matches_attention_backward(rng):
    """window >= L: no condensed entry is seen, so the gradients are exact causal attention's
    (gqa_attention_backward's, whose condensation then plays no part) and dkbar = dvbar = 0."""
    q, k, v = gqa_inputs(rng, 2, 40, 4, 2, 16, 8)
    kw = dict(group_size=8, window=10**6)
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, group_size=8)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv, dkb, dvb = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    want = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    for a, b in zip((dq, dk, dv), want):
        assert rel_err(a, b) <= 1e-12
    assert not dkb.any() and not dvb.any()


def test_float32_against_float64(rng):
    q, k, v = gqa_inputs(rng, 1, 300, 8, 2, 32, 16)
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, group_size=8)
    kw = dict(group_size=8, window=50)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    want = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    f = [a.astype(np.float32) for a in (dout, q, k, v, kbar, vbar, out, lse)]
    got = lca.gqa_attend_backward(*f, **kw)
    for a, b in zip(got, want):
        assert a.dtype == np.float32 and rel_err(a, b) <= 1e-5


def test_errors_name_the_argument(rng):
    q, k, v = gqa_inputs(rng, 1, 30, 4, 2, 8, 8)
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, group_size=4)
    kw = dict(group_size=4, window=6)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    with pytest.raises(ValueError, match="kbar"):
        lca.gqa_attend_backward(out, q, k, v, kbar[:, :2], vbar[:, :2], out, lse, **kw)
    with pytest.raises(ValueError, match="dout"):
        lca.gqa_attend_backward(out[:, :29], q, k, v, kbar, vbar, out, lse, **kw)
    with pytest.raises(ValueError, match="lse"):
        lca.gqa_attend_backward(out, q, k, v, kbar, vbar, out, lse[..., :29], **kw)
    with pytest.raises(TypeError, match="vbar"):
        lca.gqa_attend_backward(out, q, k, v, kbar, vbar.astype(np.float32), out, lse, **kw)


def test_rows_no_query_sees(rng):
    """More given rows than any query sees (a preallocated buffer): the gradients of the seen
    rows are those of the exact-size call, bit for bit, and every other row gets exact zeros
    (written, not left over: the outputs start from garbage in the binding test below)."""
    q, k, v = gqa_inputs(rng, 2, 30, 4, 2, 8, 6)
    kw = dict(group_size=4, window=6)
    seen = lca.num_condensed(29, 4, 6)
    kbar = rng.standard_normal((2, seen + 500, 2, 8))
    vbar = rng.standard_normal((2, seen + 500, 2, 6))
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    big = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    exact = lca.gqa_attend_backward(dout, q, k, v, kbar[:, :seen], vbar[:, :seen], out, lse,
                                    **kw)
    for a, b in zip(big[:3], exact[:3]):
        assert np.array_equal(a, b)
    for a, b in zip(big[3:], exact[3:]):
        assert np.array_equal(a[:, :seen], b) and not a[:, seen:].any()
    # the binding writes every row itself
    from lca import _C
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    dkb, dvb = np.full(kbar.shape, np.nan), np.full(vbar.shape, np.nan)
    _C.attend_backward(dout, q, k, v, kbar, vbar, out, lse, dq, dk, dv, dkb, dvb, 4, 6,
                       1 / np.sqrt(8), 0.0, 0)
    assert np.array_equal(dkb, big[3]) and np.array_equal(dvb, big[4])


# -- the condensation's backward alone ------------------------------------------------------------

@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
def test_gqa_backward_is_attend_backward_plus_condense_backward(key_mode, rng):
    """SPEC §5's chain, in two engine calls: gqa_attention_backward == gqa_attend_backward over
    the condensed entries + gqa_condense_backward of their gradients."""
    q, k, v = gqa_inputs(rng, 2, 77, 6, 2, 12, 10)
    ck = dict(group_size=4, n_summary=3, softmax_scale=0.4)
    kw = dict(ck, window=9, rep_bias=0.2)
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, key_mode=key_mode, **ck)
    out, lse = lca.gqa_attention(q, k, v, key_mode=key_mode, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    akw = {x: kw[x] for x in ("group_size", "window", "softmax_scale", "rep_bias")}
    dq, dk, dv, dkb, dvb = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **akw)
    cq, ckk, cv = lca.gqa_condense_backward(dkb, dvb, q, k, v, key_mode=key_mode, **ck)
    want = lca.gqa_attention_backward(dout, q, k, v, out, lse, key_mode=key_mode, **kw)
    for got, w in zip((dq + cq, dk + ckk, dv + cv), want):
        assert rel_err(got, w) <= 1e-12


def test_mla_backward_is_attend_backward_plus_condense_backward(rng):
    q, c, r = mla_inputs(rng, 1, 90, 4, 16, 8, batched=False)
    ck = dict(group_size=8, score="latent")
    kw = dict(ck, window=20)
    cb, rb, _, _ = lca.condense(q, c, r, **ck)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dc, dr, dcb, drb = lca.attend_backward(dout, q, c, r, cb, rb, out, lse, group_size=8,
                                               window=20)
    cq, cc, cr = lca.condense_backward(dcb, drb, q, c, r, **ck)
    want = lca.attention_backward(dout, q, c, r, out, lse, **kw)
    for got, w in zip((dq + cq, dc + cc, dr + cr), want):
        assert got.shape == w.shape and rel_err(got, w) <= 1e-12


def test_condense_backward_finite_differences(rng):
    """key_mode="pool": every condensed column is a smooth function of q, k, v."""
    q, k, v = gqa_inputs(rng, 1, 12, 4, 2, 3, 2)
    ck = dict(group_size=4, n_summary=2, key_mode="pool")
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, **ck)
    wk, wv = rng.standard_normal(kbar.shape), rng.standard_normal(vbar.shape)
    grads = lca.gqa_condense_backward(wk, wv, q, k, v, **ck)

    def loss_parts(*a):
        kb, vb, _, _ = lca.gqa_condense(*a, **ck)
        return np.concatenate([(wk * kb).ravel(), (wv * vb).ravel()])

    fd_check(lambda *a: loss_parts(*a), [q, k, v], np.ones(kbar.size + vbar.size), grads)


def test_condense_backward_errors(rng):
    q, c, r = mla_inputs(rng, 1, 40, 2, 8, 4)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=4)
    with pytest.raises(ValueError, match="dkpos_bar"):
        lca.condense_backward(cb, rb[:, :-1], q, c, r, group_size=4)
    with pytest.raises(TypeError, match="dlatent_bar"):
        lca.condense_backward(cb.astype(np.float32), rb, q, c, r, group_size=4)
    q, k, v = gqa_inputs(rng, 1, 40, 4, 2, 8, 6, batched=False)
    kb, vb, _, _ = lca.gqa_condense(q, k, v, group_size=4)
    with pytest.raises(ValueError, match="dvbar"):
        lca.gqa_condense_backward(kb, vb[..., :-1], q, k, v, group_size=4)
    got = lca.gqa_condense_backward(kb, vb, q, k, v, group_size=4)      # unbatched
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]
