"""Sanity checks of the float64 executable spec (lca/reference.py) itself.

These run without the C engine: the reference is loaded by path (see conftest.py), except the
last test, which checks lca's pure-Python counting helpers against the SPEC's numbers.
"""
import numpy as np
import pytest

from conftest import assert_rel, gqa_inputs, mla_inputs, ref


def brute_lse(x):
    x = np.asarray(x, np.float64)
    return np.log(np.sum(np.exp(x)))


@pytest.mark.parametrize("L,H,Dc,Dr", [(7, 2, 3, 2), (12, 1, 4, 0)])
def test_condense_g1_returns_the_tokens(rng, L, H, Dc, Dr):
    q, c, r = mla_inputs(rng, 2, L, H, Dc, Dr)
    cb, rb, anchor, alpha = ref.condense(q, c, r, group_size=1)
    assert cb.shape == (2, L, Dc) and rb.shape == (2, L, Dr)
    np.testing.assert_array_equal(cb, c)
    np.testing.assert_array_equal(rb, r)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_array_equal(alpha, 1.0)


def test_condense_by_hand(rng):
    # one group of 4, n = 2 summary queries, H = 3 heads: recompute §2 by hand
    L, H, Dc, Dr, g, n = 9, 3, 5, 2, 4, 2
    q, c, r = mla_inputs(rng, 1, L, H, Dc, Dr)
    tau = 0.37
    for score in ("full", "latent"):
        cb, rb, anchor, alpha = ref.condense(q, c, r, group_size=g, n_summary=n,
                                             softmax_scale=tau, score=score)
        assert cb.shape == (1, 2, Dc) and alpha.shape == (1, 2, g)
        for j in range(2):
            qbar = q[0, j * g + g - n: j * g + g].reshape(-1, Dc + Dr).mean(0)
            keys = np.concatenate([c[0], r[0]], 1)[j * g: j * g + g]
            d = Dc + Dr if score == "full" else Dc
            s = tau * keys[:, :d] @ qbar[:d]
            a = np.exp(s - np.log(np.sum(np.exp(s))))
            np.testing.assert_allclose(alpha[0, j], a, rtol=1e-13)
            np.testing.assert_allclose(alpha[0, j].sum(), 1.0, rtol=1e-14)
            i = int(np.argmax(a))
            assert anchor[0, j] == i
            np.testing.assert_allclose(cb[0, j], a @ c[0, j * g: j * g + g], rtol=1e-13)
            np.testing.assert_array_equal(rb[0, j], r[0, j * g + i])


def test_anchor_tie_takes_smallest_index():
    # all-zero queries: uniform weights, the anchor is the first token of the group
    q = np.zeros((1, 8, 2, 3))
    c = np.arange(24.0).reshape(1, 8, 3)
    r = np.zeros((1, 8, 0))
    _, _, anchor, alpha = ref.condense(q, c, r, group_size=4)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_allclose(alpha, 0.25, rtol=1e-15)


@pytest.mark.parametrize("L,g,w", [(13, 3, 4), (10, 4, 0), (9, 1, 0), (6, 2, 20)])
def test_lse_and_out_by_brute_force(rng, L, g, w):
    H, Dc, Dr = 2, 3, 2
    q, c, r = mla_inputs(rng, 1, L, H, Dc, Dr)
    tau, bias = 0.6, 0.3
    cb, rb, _, _ = ref.condense(q, c, r, group_size=g, softmax_scale=tau)
    out, lse = ref.attend(q, c, r, cb, rb, group_size=g, window=w, softmax_scale=tau,
                          rep_bias=bias)
    assert out.shape == (1, L, H, Dc) and lse.shape == (1, H, L)
    for t in range(L):
        G = max(0, (t - w + 1) // g)
        # condensed groups and exact tokens tile [0, t]
        assert G * g <= t + 1
        keys = [np.concatenate([cb[0, j], rb[0, j]]) for j in range(G)]
        keys += [np.concatenate([c[0, s], r[0, s]]) for s in range(G * g, t + 1)]
        vals = [cb[0, j] for j in range(G)] + [c[0, s] for s in range(G * g, t + 1)]
        for h in range(H):
            logits = np.array([tau * q[0, t, h] @ k for k in keys])
            logits[:G] += bias
            np.testing.assert_allclose(lse[0, h, t], brute_lse(logits), rtol=1e-13)
            p = np.exp(logits - brute_lse(logits))
            np.testing.assert_allclose(out[0, t, h], p @ np.array(vals), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("L,g", [(11, 3), (8, 8)])
def test_window_ge_L_is_causal_attention(rng, L, g):
    q, c, r = mla_inputs(rng, 2, L, 3, 4, 2)
    out, lse = ref.attention(q, c, r, group_size=g, window=L)
    k = np.concatenate([c, r], 2)[:, :, None]
    out2, lse2 = ref.causal_attention(q, k, c[:, :, None])
    assert_rel(out, out2, 1e-14)
    assert_rel(lse, lse2, 1e-14)


def test_causal_attention_brute_force(rng):
    q, k, v = gqa_inputs(rng, 1, 6, 4, 2, 3, 5)
    out, lse = ref.causal_attention(q, k, v, softmax_scale=0.8)
    for t in range(6):
        for h in range(4):
            logits = 0.8 * k[0, :t + 1, h // 2] @ q[0, t, h]
            assert abs(lse[0, h, t] - brute_lse(logits)) < 1e-13
            p = np.exp(logits - brute_lse(logits))
            np.testing.assert_allclose(out[0, t, h], p @ v[0, :t + 1, h // 2], rtol=1e-12)


def test_gqa_condense_pool_and_anchor(rng):
    L, H, Hkv, D, Dv, g = 8, 4, 2, 3, 2, 4
    q, k, v = gqa_inputs(rng, 1, L, H, Hkv, D, Dv)
    ka, va, anc, al = ref.gqa_condense(q, k, v, group_size=g, key_mode="anchor")
    kp, vp, anc2, al2 = ref.gqa_condense(q, k, v, group_size=g, key_mode="pool")
    np.testing.assert_array_equal(anc, anc2)
    np.testing.assert_array_equal(va, vp)
    for j in range(2):
        for h in range(Hkv):
            # the summary query averages the heads that share kv head h (i // (H/Hkv) == h)
            qbar = q[0, j * g: j * g + g, 2 * h: 2 * h + 2].reshape(-1, D).mean(0)
            s = k[0, j * g: j * g + g, h] @ qbar / np.sqrt(D)
            a = np.exp(s - brute_lse(s))
            np.testing.assert_allclose(al[0, j, h], a, rtol=1e-13)
            np.testing.assert_array_equal(ka[0, j, h], k[0, j * g + int(np.argmax(a)), h])
            np.testing.assert_allclose(kp[0, j, h], a @ k[0, j * g: j * g + g, h], rtol=1e-13)


def test_reference_causality(rng):
    L, t0 = 14, 6
    q, c, r = mla_inputs(rng, 1, L, 2, 3, 2)
    out, lse = ref.attention(q, c, r, group_size=3, window=2)
    q2, c2, r2 = q.copy(), c.copy(), r.copy()
    q2[:, t0 + 1:] += 5.0
    c2[:, t0 + 1:] -= 3.0
    r2[:, t0 + 1:] *= 7.0
    out2, lse2 = ref.attention(q2, c2, r2, group_size=3, window=2)
    np.testing.assert_array_equal(out[:, :t0 + 1], out2[:, :t0 + 1])
    np.testing.assert_array_equal(lse[:, :, :t0 + 1], lse2[:, :, :t0 + 1])
    assert not np.allclose(out[:, t0 + 1:], out2[:, t0 + 1:])


def test_num_condensed_reference():
    g, w = 16, 1024
    assert ref.num_condensed(0, g, w) == 0
    assert ref.num_condensed(w + g - 2, g, w) == 0      # the first group is not yet out
    assert ref.num_condensed(w + g - 1, g, w) == 1      # its last token is w behind
    assert ref.num_condensed(131072, g, w) == (131072 - w + 1) // g
    assert ref.num_condensed(5, 1, 0) == 6              # g=1, w=0: every token condensed


def test_cache_entries_spec_numbers():
    import lca                    # needs the built engine (lca._C is imported by lca)
    assert lca.cache_entries(131072) == 9152
    assert lca.cache_entries(131072, group_size=16, window=1024) == 9152
    assert abs(1 - 9152 / 131072 - 0.930) < 0.001          # "93.0% smaller"
    assert lca.num_condensed(131072) == ref.num_condensed(131072, 16, 1024) == 8128
    # below the window nothing is condensed
    assert lca.cache_entries(1000) == 1000
    assert lca.cache_entries(0) == 0
    # w = 0: only complete groups are condensed, G = min(G_T, floor(T / g))
    assert lca.cache_entries(10, group_size=4, window=0) == 2 + 2
    assert lca.cache_entries(8, group_size=4, window=0) == 2
    for t in range(60):
        for g, w in ((4, 6), (3, 0), (1, 0), (5, 100)):
            assert lca.num_condensed(t, g, w) == ref.num_condensed(t, g, w)
