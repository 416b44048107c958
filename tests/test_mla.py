"""MLA (absorbed form) kernels against the float64 reference: SPEC §2, §3, §7, §8.

lca.attention, lca.condense and lca.attend on fresh random inputs over many shapes, odd ones
included (L not a multiple of g, L < w, w = 0, g = 1, n < g, Dr = 0, H = 1, B > 1, no batch
dim), every keyword, both float dtypes; then the exact identities the SPEC promises.
"""
import numpy as np
import pytest

import lca
from conftest import (DTYPES, assert_close, assert_rel, batch, check_anchors, mla_inputs, ref,
                      tol)

# (B, L, H, Dc, Dr, keywords); the shapes are small because the reference is plain loops
CASES = [
    pytest.param(1, 23, 2, 8, 4, dict(group_size=4, window=6), id="L23-g4-w6"),
    pytest.param(2, 10, 3, 5, 3, dict(group_size=4, window=16), id="L<w"),
    pytest.param(1, 17, 2, 6, 2, dict(group_size=4, window=0), id="w0"),
    pytest.param(1, 19, 2, 4, 2, dict(group_size=3, window=1), id="w1"),
    pytest.param(1, 9, 2, 4, 2, dict(group_size=1, window=3), id="g1"),
    pytest.param(1, 30, 2, 6, 3, dict(group_size=5, window=7, n_summary=2), id="n<g"),
    pytest.param(1, 29, 2, 6, 3, dict(group_size=7, window=3, n_summary=1), id="n1"),
    pytest.param(2, 21, 2, 7, 0, dict(group_size=3, window=5), id="Dr0"),
    pytest.param(1, 19, 1, 5, 3, dict(group_size=4, window=4), id="H1"),
    pytest.param(1, 20, 8, 4, 2, dict(group_size=4, window=5), id="H8"),
    pytest.param(3, 26, 2, 5, 2, dict(group_size=6, window=9, rep_bias=0.7), id="B3-bias"),
    pytest.param(1, 22, 3, 6, 2, dict(group_size=4, window=5, score="latent"), id="latent"),
    pytest.param(1, 22, 2, 6, 4, dict(group_size=3, window=2, softmax_scale=0.9,
                                      score="latent", rep_bias=-1.3, n_summary=2),
                 id="all-kw"),
    pytest.param(1, 3, 2, 4, 2, dict(group_size=4, window=0), id="L<g"),
    pytest.param(1, 1, 2, 4, 2, dict(group_size=1, window=0), id="L1"),
    pytest.param(1, 16, 2, 4, 2, dict(group_size=16, window=0), id="L=g"),
    pytest.param(1, 25, 2, 1, 1, dict(group_size=2, window=3), id="Dc1-Dr1"),
    pytest.param(1, 24, 2, 3, 2, dict(group_size=4, window=4, softmax_scale=2.5), id="scale"),
    pytest.param(1, 21, 2, 3, 2, dict(group_size=4, window=3, softmax_scale=-0.7), id="neg-scale"),
    pytest.param(1, 21, 2, 3, 2, dict(group_size=4, window=3, softmax_scale=0.0, rep_bias=0.5),
                 id="zero-scale"),
    pytest.param(2, 67, 4, 64, 16, dict(group_size=8, window=16, rep_bias=np.log(8)),
                 id="Dc64-Dr16"),
    pytest.param(1, 70, 2, 64, 16, dict(group_size=16, window=24, n_summary=5,
                                        score="latent"), id="Dc64-Dr16-latent"),
    pytest.param(1, 300, 2, 8, 4, dict(group_size=16, window=64), id="L300"),
    pytest.param(1, 260, 2, 4, 2, dict(group_size=2, window=4, n_summary=1),
                 id="many-condensed"),
    pytest.param(1, 20, 130, 4, 2, dict(group_size=4, window=5), id="H130"),
]


def pick(cases, *ids):
    found = [c for c in cases if c.id in ids]
    assert len(found) == len(ids)
    return found


COND_KW = ("group_size", "n_summary", "softmax_scale", "score")
ATT_KW = ("group_size", "window", "softmax_scale", "rep_bias")


def sub(kw, keys):
    return {k: v for k, v in kw.items() if k in keys}


def ref_condense_checked(q, c, r, kw, got, dtype):
    """Compare lca.condense's 4 outputs (batched) to the reference."""
    cb, rb, anchor, alpha = ref.condense(q, c, r, **sub(kw, COND_KW))
    gcb, grb, ganchor, galpha = got
    check_anchors(ganchor, alpha, anchor)
    assert_close(gcb, cb, dtype, "latent_bar")
    assert_close(galpha, alpha, dtype, "alpha")
    # kpos_bar is the anchor's kpos, exactly (an accepted tie picks the other token's kpos)
    B, m = ganchor.shape
    g = kw.get("group_size", 16)
    idx = np.arange(m)[None, :] * g + ganchor
    want_rb = np.take_along_axis(np.asarray(r), idx[:, :, None].astype(np.int64), 1)
    assert grb.shape == rb.shape
    np.testing.assert_array_equal(grb, want_rb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", CASES)
def test_attention_vs_reference(rng, B, L, H, Dc, Dr, kw, dtype):
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert out.shape == (B, L, H, Dc) and out.dtype == dtype
    assert lse.shape == (B, H, L)
    rout, rlse = ref.attention(q, c, r, **kw)
    assert_close(out, rout, dtype, "out")
    assert_close(lse, rlse, dtype, "lse")
    # without return_lse: the output alone, the same numbers
    out2 = lca.attention(q, c, r, **kw)
    assert isinstance(out2, np.ndarray)
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", CASES)
def test_condense_vs_reference(rng, B, L, H, Dc, Dr, kw, dtype):
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    kc = sub(kw, COND_KW)
    got = lca.condense(q, c, r, **kc)
    assert len(got) == 4
    g = kw["group_size"]
    m = L // g
    cb, rb, anchor, alpha = got
    assert cb.shape == (B, m, Dc) and rb.shape == (B, m, Dr)
    assert anchor.shape == (B, m) and anchor.dtype == np.int32
    assert alpha.shape == (B, m, g)
    ref_condense_checked(q, c, r, kc, got, dtype)
    if m:
        np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=10 * tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("B,L,H,Dc,Dr,g,w", [
    (1, 23, 2, 6, 3, 4, 6), (2, 19, 3, 5, 0, 3, 0), (1, 30, 1, 4, 2, 1, 7),
    (1, 9, 4, 3, 2, 2, 20)])
def test_attend_vs_reference(rng, B, L, H, Dc, Dr, g, w, extra, dtype):
    """attend over arbitrary condensed entries (research code swapping §2 for its own),
    with exactly the entries the last query needs, or more."""
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    need = ref.num_condensed(L - 1, g, min(w, L))
    cb = rng.standard_normal((B, need + extra, Dc)).astype(dtype)
    rb = rng.standard_normal((B, need + extra, Dr)).astype(dtype)
    kw = dict(group_size=g, window=w, softmax_scale=0.7, rep_bias=0.4)
    out, lse = lca.attend(q, c, r, cb, rb, return_lse=True, **kw)
    rout, rlse = ref.attend(q, c, r, cb, rb, **kw)
    assert_close(out, rout, dtype, "out")
    assert_close(lse, rlse, dtype, "lse")
    np.testing.assert_array_equal(lca.attend(q, c, r, cb, rb, **kw), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", CASES)
def test_attention_equals_attend_of_condense(rng, B, L, H, Dc, Dr, kw, dtype):
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    cb, rb, _, _ = lca.condense(q, c, r, **sub(kw, COND_KW))
    out2, lse2 = lca.attend(q, c, r, cb, rb, return_lse=True, **sub(kw, ATT_KW))
    assert_rel(out2, out, tol(dtype))
    assert_rel(lse2, lse, tol(dtype))


@pytest.mark.parametrize("window", ["L", "L+5", 1024, 10**30, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Dc,Dr,g", [(1, 23, 2, 6, 3, 4), (2, 40, 3, 5, 0, 16),
                                           (1, 12, 1, 4, 2, 1)])
def test_window_ge_L_is_causal_attention(rng, B, L, H, Dc, Dr, g, window, dtype):
    """SPEC §3: with w >= L, LCA is exact causal MLA attention (k = [c; r], v = c, one kv
    head), whatever the group size, rep_bias or score."""
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    kw = dict(group_size=g, rep_bias=1.5, score="latent", n_summary=1)
    if window is not None:
        kw["window"] = {"L": L, "L+5": L + 5}.get(window, window)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    k = np.concatenate([c, r], 2)[:, :, None]
    cout, clse = ref.causal_attention(q, k, c[:, :, None])
    assert_close(out, cout, dtype, "out")
    assert_close(lse, clse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rep_bias", [0.0, 0.8])
@pytest.mark.parametrize("L,H,Dc,Dr", [(13, 2, 4, 3), (20, 3, 5, 0)])
def test_g1_w0_every_token_its_own_group(rng, L, H, Dc, Dr, rep_bias, dtype):
    """g = 1, w = 0, n = 1: every token is condensed alone (alpha = 1, anchor 0), so the
    condensed entries are the tokens; every visible entry carries rep_bias, which cancels in
    the softmax: out is causal attention, lse is causal lse + rep_bias."""
    q, c, r = mla_inputs(rng, 1, L, H, Dc, Dr, dtype)
    kw = dict(group_size=1, window=0, n_summary=1)
    cb, rb, anchor, alpha = lca.condense(q, c, r, group_size=1, n_summary=1)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_array_equal(alpha, 1.0)
    np.testing.assert_array_equal(rb, r)
    assert_rel(cb, c, tol(dtype))
    out, lse = lca.attention(q, c, r, return_lse=True, rep_bias=rep_bias, **kw)
    k = np.concatenate([c, r], 2)[:, :, None]
    cout, clse = ref.causal_attention(q, k, c[:, :, None])
    assert_close(out, cout, dtype, "out")
    assert_close(lse, clse + rep_bias, dtype, "lse")


@pytest.mark.parametrize("t0", [0, 5, 11, 21])
@pytest.mark.parametrize("kw", [dict(group_size=4, window=6), dict(group_size=3, window=0),
                                dict(group_size=5, window=2, n_summary=2, score="latent")])
def test_causality(rng, kw, t0):
    """Changing anything at positions > t0 leaves out and lse at positions <= t0 unchanged."""
    L, H, Dc, Dr = 23, 2, 5, 3
    q, c, r = mla_inputs(rng, 2, L, H, Dc, Dr)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    q2, c2, r2 = q.copy(), c.copy(), r.copy()
    q2[:, t0 + 1:] = 3 * rng.standard_normal(q2[:, t0 + 1:].shape)
    c2[:, t0 + 1:] = 3 * rng.standard_normal(c2[:, t0 + 1:].shape)
    r2[:, t0 + 1:] = 3 * rng.standard_normal(r2[:, t0 + 1:].shape)
    out2, lse2 = lca.attention(q2, c2, r2, return_lse=True, **kw)
    assert_rel(out2[:, :t0 + 1], out[:, :t0 + 1], 1e-15)
    assert_rel(lse2[:, :, :t0 + 1], lse[:, :, :t0 + 1], 1e-15)
    assert not np.allclose(out2[:, t0 + 1:], out[:, t0 + 1:])   # the change did something


@pytest.mark.parametrize("B,L,H,Dc,Dr,kw", pick(CASES, "L23-g4-w6", "n<g", "Dr0", "all-kw",
                                               "Dc64-Dr16"))
def test_float32_close_to_float64(rng, B, L, H, Dc, Dr, kw):
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, np.float64)
    q, c, r = (a.astype(np.float32).astype(np.float64) for a in (q, c, r))
    o64, l64 = lca.attention(q, c, r, return_lse=True, **kw)
    o32, l32 = lca.attention(*(a.astype(np.float32) for a in (q, c, r)), return_lse=True, **kw)
    assert o32.dtype == np.float32
    assert_rel(o32, o64, 1e-5)
    assert_rel(l32, l64, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_equals_batched(rng, dtype):
    kw = dict(group_size=4, window=5, n_summary=3, rep_bias=0.2)
    q, c, r = mla_inputs(rng, 1, 21, 2, 5, 3, dtype, batched=False)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert out.shape == (21, 2, 5) and lse.shape == (2, 21)
    bout, blse = lca.attention(*batch(q, c, r), return_lse=True, **kw)
    np.testing.assert_array_equal(out, bout[0])
    np.testing.assert_array_equal(lse, blse[0])
    rout, rlse = ref.attention(*batch(q, c, r), **kw)
    assert_close(out, rout[0], dtype, "out")
    assert_close(lse, rlse[0], dtype, "lse")
    cb, rb, anchor, alpha = lca.condense(q, c, r, group_size=4, n_summary=3)
    assert cb.shape == (5, 5) and rb.shape == (5, 3) and anchor.shape == (5,)
    assert alpha.shape == (5, 4)
    ref_condense_checked(*batch(q, c, r), dict(group_size=4, n_summary=3),
                         batch(cb, rb, anchor, alpha), dtype)
    out2 = lca.attend(q, c, r, cb, rb, group_size=4, window=5, rep_bias=0.2)
    assert out2.shape == (21, 2, 5)
    assert_rel(out2, out, tol(dtype))


def test_batch_elements_independent(rng):
    kw = dict(group_size=3, window=4, score="latent")
    q, c, r = mla_inputs(rng, 4, 17, 2, 5, 2)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    for b in range(4):
        o, l = lca.attention(q[b:b + 1], c[b:b + 1], r[b:b + 1], return_lse=True, **kw)
        assert_rel(o, out[b:b + 1], 1e-15)
        assert_rel(l, lse[b:b + 1], 1e-15)


def test_defaults(rng):
    """Defaults: g=16, w=1024, n=g, tau=1/sqrt(Dc+Dr), score='full', rep_bias=0."""
    q, c, r = mla_inputs(rng, 1, 40, 2, 6, 3)
    out, lse = lca.attention(q, c, r, return_lse=True)
    rout, rlse = ref.attention(q, c, r)
    assert_rel(out, rout, 1e-12)
    assert_rel(lse, rlse, 1e-12)
    # defaults made explicit give the same numbers
    out2 = lca.attention(q, c, r, group_size=16, window=1024, n_summary=16,
                         softmax_scale=1 / np.sqrt(9), score="full", rep_bias=0.0)
    assert_rel(out2, out, 1e-14)
    got = lca.condense(q, c, r)
    ref_condense_checked(q, c, r, dict(group_size=16), got, np.float64)
    cb, rb, anchor, alpha = got
    assert cb.shape == (1, 2, 6) and alpha.shape == (1, 2, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_are_stable(rng, dtype):
    """Logits in the hundreds: the softmaxes must be max-shifted; no overflow, no NaN."""
    kw = dict(group_size=4, window=5, rep_bias=30.0)
    q, c, r = mla_inputs(rng, 1, 22, 2, 6, 3, dtype, scale=40.0)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    rout, rlse = ref.attention(q, c, r, **kw)
    assert np.abs(rlse).max() > 100
    assert_close(out, rout, dtype, "out", factor=10)
    assert_close(lse, rlse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_tie_anchor_is_first(rng, dtype):
    """Zero queries: every group's weights are exactly uniform; the anchor is index 0."""
    q = np.zeros((2, 14, 2, 7), dtype)
    c = rng.standard_normal((2, 14, 4)).astype(dtype)
    r = rng.standard_normal((2, 14, 3)).astype(dtype)
    cb, rb, anchor, alpha = lca.condense(q, c, r, group_size=3)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_allclose(alpha, 1 / 3, rtol=tol(dtype))
    np.testing.assert_array_equal(rb, r[:, 0:12:3])
    # and attention then averages: with w = 0, L = 12, every query sees condensed means
    out = lca.attention(q[:, :12], c[:, :12], r[:, :12], group_size=3, window=0)
    rout, _ = ref.attention(q[:, :12], c[:, :12], r[:, :12], group_size=3, window=0)
    assert_close(out, rout, dtype, "out")


def test_inputs_not_modified_and_deterministic(rng):
    kw = dict(group_size=4, window=6, n_summary=2, rep_bias=0.3)
    q, c, r = mla_inputs(rng, 2, 45, 3, 8, 4)
    saved = [a.copy() for a in (q, c, r)]
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    for a, s in zip((q, c, r), saved):
        np.testing.assert_array_equal(a, s)
    for _ in range(3):     # multi-threaded, but bit-for-bit repeatable
        o, l = lca.attention(q, c, r, return_lse=True, **kw)
        np.testing.assert_array_equal(o, out)
        np.testing.assert_array_equal(l, lse)
    assert not np.shares_memory(out, q) and not np.shares_memory(out, c)


def test_list_inputs(rng):
    """Plain nested lists are arrays too (float64)."""
    q, c, r = mla_inputs(rng, 1, 9, 2, 3, 2, batched=False)
    out = lca.attention(q.tolist(), c.tolist(), r.tolist(), group_size=2, window=3)
    rout, _ = ref.attention(*batch(q, c, r), group_size=2, window=3)
    assert_rel(out, rout[0], 1e-12)


def test_concurrent_python_threads(rng):
    """The engine releases the GIL: calls from several Python threads at once must not share
    scratch state.  Each thread's result equals the serial one."""
    from concurrent.futures import ThreadPoolExecutor
    kw = dict(group_size=4, window=9, n_summary=2)
    inputs = [mla_inputs(rng, 2, 97, 4, 16, 8) for _ in range(6)]
    serial = [lca.attention(*a, return_lse=True, **kw) for a in inputs]
    grads = [lca.attention_backward(o, *a, o, l, **kw) for a, (o, l) in zip(inputs, serial)]

    def work(i):
        a = inputs[i]
        o, l = lca.attention(*a, return_lse=True, **kw)
        return o, l, lca.attention_backward(serial[i][0], *a, *serial[i], **kw)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(work, list(range(6)) * 3))
    for n, (o, l, g) in enumerate(results):
        i = n % 6
        np.testing.assert_array_equal(o, serial[i][0])
        np.testing.assert_array_equal(l, serial[i][1])
        for x, y in zip(g, grads[i]):
            np.testing.assert_array_equal(x, y)
