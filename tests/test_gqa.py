"""GQA / MHA kernels against the float64 reference: SPEC §3, §4, §7, §8.

lca.gqa_attention, lca.gqa_condense and lca.gqa_attend over many shapes (H/Hkv = 1, 2, 3, 8,
odd lengths, w = 0, g = 1, n < g, L < w, B > 1, no batch dim), both key modes, every keyword;
the exact identities (w >= L is causal attention, attention == attend(condense)), causality,
and the SPEC §4 statement that non-absorbed MLA is latent condensation + this attention.
"""
import numpy as np
import pytest

import lca
from conftest import (DTYPES, assert_close, assert_rel, batch, check_anchors, gqa_inputs,
                      mla_inputs, ref, tol)

# (B, L, H, Hkv, D, Dv, keywords)
CASES = [
    pytest.param(1, 23, 4, 2, 8, 6, dict(group_size=4, window=6), id="L23-g4-w6"),
    pytest.param(1, 23, 4, 2, 8, 6, dict(group_size=4, window=6, key_mode="pool"),
                 id="L23-pool"),
    pytest.param(1, 20, 8, 1, 6, 5, dict(group_size=4, window=5), id="H8-Hkv1"),
    pytest.param(2, 17, 3, 3, 5, 7, dict(group_size=3, window=4, key_mode="pool"), id="mha-B2"),
    pytest.param(1, 25, 6, 2, 4, 4, dict(group_size=5, window=0, n_summary=2), id="w0-n<g"),
    pytest.param(1, 19, 2, 1, 4, 3, dict(group_size=3, window=1), id="w1"),
    pytest.param(1, 12, 2, 1, 4, 3, dict(group_size=1, window=3, key_mode="pool"), id="g1"),
    pytest.param(2, 9, 4, 4, 3, 2, dict(group_size=4, window=30), id="L<w"),
    pytest.param(1, 3, 2, 2, 3, 2, dict(group_size=4, window=0), id="L<g"),
    pytest.param(1, 1, 2, 1, 3, 2, dict(group_size=1, window=0), id="L1"),
    pytest.param(3, 26, 4, 2, 5, 3, dict(group_size=6, window=9, rep_bias=0.7,
                                         softmax_scale=0.4), id="B3-bias-scale"),
    pytest.param(1, 22, 3, 1, 4, 6, dict(group_size=3, window=2, n_summary=1, key_mode="pool",
                                         rep_bias=-1.2), id="all-kw"),
    pytest.param(1, 27, 2, 2, 1, 1, dict(group_size=2, window=5), id="D1-Dv1"),
    pytest.param(1, 65, 8, 2, 16, 16, dict(group_size=8, window=16, rep_bias=np.log(8)),
                 id="L65-D16"),
    pytest.param(1, 200, 4, 1, 8, 8, dict(group_size=16, window=48, key_mode="pool"),
                 id="L200"),
    pytest.param(2, 150, 2, 2, 4, 4, dict(group_size=2, window=3, key_mode="pool"),
                 id="many-condensed"),
    pytest.param(1, 20, 160, 1, 4, 3, dict(group_size=4, window=5), id="H160-Hkv1"),
]


def pick(cases, *ids):
    found = [c for c in cases if c.id in ids]
    assert len(found) == len(ids)
    return found


COND_KW = ("group_size", "n_summary", "softmax_scale", "key_mode")
ATT_KW = ("group_size", "window", "softmax_scale", "rep_bias")


def sub(kw, keys):
    return {k: v for k, v in kw.items() if k in keys}


def check_condense(q, k, v, kw, got, dtype):
    kb, vb, anchor, alpha = ref.gqa_condense(q, k, v, **sub(kw, COND_KW))
    gkb, gvb, ganchor, galpha = got
    assert gkb.shape == kb.shape and gvb.shape == vb.shape and galpha.shape == alpha.shape
    check_anchors(ganchor, alpha, anchor)
    assert_close(gvb, vb, dtype, "vbar")
    assert_close(galpha, alpha, dtype, "alpha")
    if kw.get("key_mode", "anchor") == "anchor":
        B, m, Hkv = ganchor.shape
        g = kw["group_size"]
        idx = (np.arange(m)[None, :, None] * g + ganchor).astype(np.int64)
        want = np.take_along_axis(np.asarray(k), idx[..., None], 1)
        np.testing.assert_array_equal(gkb, want)
    else:
        assert_close(gkb, kb, dtype, "kbar")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", CASES)
def test_gqa_attention_vs_reference(rng, B, L, H, Hkv, D, Dv, kw, dtype):
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert out.shape == (B, L, H, Dv) and out.dtype == dtype and lse.shape == (B, H, L)
    rout, rlse = ref.gqa_attention(q, k, v, **kw)
    assert_close(out, rout, dtype, "out")
    assert_close(lse, rlse, dtype, "lse")
    np.testing.assert_array_equal(lca.gqa_attention(q, k, v, **kw), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", CASES)
def test_gqa_condense_vs_reference(rng, B, L, H, Hkv, D, Dv, kw, dtype):
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    got = lca.gqa_condense(q, k, v, **sub(kw, COND_KW))
    assert len(got) == 4
    m, g = L // kw["group_size"], kw["group_size"]
    assert got[0].shape == (B, m, Hkv, D) and got[1].shape == (B, m, Hkv, Dv)
    assert got[2].shape == (B, m, Hkv) and got[2].dtype == np.int32
    assert got[3].shape == (B, m, Hkv, g)
    check_condense(q, k, v, kw, got, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,g,w", [
    (1, 23, 4, 2, 5, 3, 4, 6), (2, 19, 3, 1, 4, 4, 3, 0), (1, 30, 2, 2, 3, 5, 1, 7),
    (1, 9, 8, 4, 3, 2, 2, 20)])
def test_gqa_attend_vs_reference(rng, B, L, H, Hkv, D, Dv, g, w, extra, dtype):
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    need = ref.num_condensed(L - 1, g, min(w, L))
    kb = rng.standard_normal((B, need + extra, Hkv, D)).astype(dtype)
    vb = rng.standard_normal((B, need + extra, Hkv, Dv)).astype(dtype)
    kw = dict(group_size=g, window=w, softmax_scale=0.8, rep_bias=-0.3)
    out, lse = lca.gqa_attend(q, k, v, kb, vb, return_lse=True, **kw)
    rout, rlse = ref.gqa_attend(q, k, v, kb, vb, **kw)
    assert_close(out, rout, dtype, "out")
    assert_close(lse, rlse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", CASES)
def test_gqa_attention_equals_attend_of_condense(rng, B, L, H, Hkv, D, Dv, kw, dtype):
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    kb, vb, _, _ = lca.gqa_condense(q, k, v, **sub(kw, COND_KW))
    out2, lse2 = lca.gqa_attend(q, k, v, kb, vb, return_lse=True, **sub(kw, ATT_KW))
    assert_rel(out2, out, tol(dtype))
    assert_rel(lse2, lse, tol(dtype))


@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
@pytest.mark.parametrize("window", ["L", 1024, 10**30])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,g", [(1, 23, 4, 2, 6, 3, 4), (2, 40, 3, 1, 5, 5, 16),
                                              (1, 12, 8, 8, 4, 2, 1)])
def test_window_ge_L_is_causal_attention(rng, B, L, H, Hkv, D, Dv, g, window, key_mode, dtype):
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    w = L if window == "L" else window
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, group_size=g, window=w,
                                 key_mode=key_mode, rep_bias=2.0, n_summary=1)
    cout, clse = ref.causal_attention(q, k, v)
    assert_close(out, cout, dtype, "out")
    assert_close(lse, clse, dtype, "lse")
    # the head convention: query head i uses kv head i // (H/Hkv), like repeat_interleave
    rep = H // Hkv
    out2 = lca.gqa_attention(q, np.repeat(k, rep, 2), np.repeat(v, rep, 2), window=w)
    assert_rel(out2, out, tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
def test_g1_w0_every_token_its_own_group(rng, key_mode, dtype):
    q, k, v = gqa_inputs(rng, 1, 15, 4, 2, 5, 3, dtype)
    kb, vb, anchor, alpha = lca.gqa_condense(q, k, v, group_size=1, n_summary=1,
                                             key_mode=key_mode)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_array_equal(alpha, 1.0)
    assert_rel(kb, k, tol(dtype))
    assert_rel(vb, v, tol(dtype))
    out, lse = lca.gqa_attention(q, k, v, group_size=1, window=0, n_summary=1,
                                 key_mode=key_mode, rep_bias=-0.6, return_lse=True)
    cout, clse = ref.causal_attention(q, k, v)
    assert_close(out, cout, dtype, "out")
    assert_close(lse, clse - 0.6, dtype, "lse")


@pytest.mark.parametrize("t0", [0, 7, 13, 22])
@pytest.mark.parametrize("kw", [dict(group_size=4, window=6),
                                dict(group_size=3, window=0, key_mode="pool", n_summary=2)])
def test_causality(rng, kw, t0):
    L = 24
    q, k, v = gqa_inputs(rng, 2, L, 4, 2, 5, 3)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, t0 + 1:] = 3 * rng.standard_normal(a[:, t0 + 1:].shape)
    out2, lse2 = lca.gqa_attention(q2, k2, v2, return_lse=True, **kw)
    assert_rel(out2[:, :t0 + 1], out[:, :t0 + 1], 1e-15)
    assert_rel(lse2[:, :, :t0 + 1], lse[:, :, :t0 + 1], 1e-15)
    if t0 < L - 1:
        assert not np.allclose(out2[:, t0 + 1:], out[:, t0 + 1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_equals_batched(rng, dtype):
    kw = dict(group_size=4, window=5, n_summary=3, key_mode="pool", rep_bias=0.1)
    q, k, v = gqa_inputs(rng, 1, 21, 4, 2, 5, 3, dtype, batched=False)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert out.shape == (21, 4, 3) and lse.shape == (4, 21)
    bout, blse = lca.gqa_attention(*batch(q, k, v), return_lse=True, **kw)
    np.testing.assert_array_equal(out, bout[0])
    np.testing.assert_array_equal(lse, blse[0])
    rout, rlse = ref.gqa_attention(*batch(q, k, v), **kw)
    assert_close(out, rout[0], dtype, "out")
    assert_close(lse, rlse[0], dtype, "lse")
    got = lca.gqa_condense(q, k, v, **sub(kw, COND_KW))
    assert got[0].shape == (5, 2, 5) and got[2].shape == (5, 2) and got[3].shape == (5, 2, 4)
    check_condense(*batch(q, k, v), kw, batch(*got), dtype)
    out2 = lca.gqa_attend(q, k, v, got[0], got[1], **sub(kw, ATT_KW))
    assert out2.shape == (21, 4, 3)
    assert_rel(out2, out, tol(dtype))


@pytest.mark.parametrize("B,L,H,Hkv,D,Dv,kw", pick(CASES, "L23-g4-w6", "mha-B2", "all-kw",
                                                  "L65-D16"))
def test_float32_close_to_float64(rng, B, L, H, Hkv, D, Dv, kw):
    args = [a.astype(np.float32) for a in gqa_inputs(rng, B, L, H, Hkv, D, Dv)]
    o32, l32 = lca.gqa_attention(*args, return_lse=True, **kw)
    o64, l64 = lca.gqa_attention(*(a.astype(np.float64) for a in args), return_lse=True, **kw)
    assert o32.dtype == np.float32
    assert_rel(o32, o64, 1e-5)
    assert_rel(l32, l64, 1e-5)


def test_defaults(rng):
    q, k, v = gqa_inputs(rng, 1, 40, 4, 2, 6, 3)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True)
    rout, rlse = ref.gqa_attention(q, k, v)
    assert_rel(out, rout, 1e-12)
    assert_rel(lse, rlse, 1e-12)
    got = lca.gqa_condense(q, k, v)
    check_condense(q, k, v, dict(group_size=16), got, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_are_stable(rng, dtype):
    kw = dict(group_size=4, window=5, rep_bias=25.0, key_mode="pool")
    q, k, v = gqa_inputs(rng, 1, 22, 4, 2, 6, 3, dtype, scale=40.0)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.gqa_attention(q, k, v, **kw)
    assert np.abs(rlse).max() > 100
    assert_close(out, rout, dtype, "out", factor=10)
    assert_close(lse, rlse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
def test_exact_tie_anchor_is_first(rng, key_mode, dtype):
    """Zero queries: every group's weights are exactly uniform; the anchor is index 0."""
    q = np.zeros((2, 14, 4, 5), dtype)
    k = rng.standard_normal((2, 14, 2, 5)).astype(dtype)
    v = rng.standard_normal((2, 14, 2, 3)).astype(dtype)
    kb, vb, anchor, alpha = lca.gqa_condense(q, k, v, group_size=3, key_mode=key_mode)
    np.testing.assert_array_equal(anchor, 0)
    np.testing.assert_allclose(alpha, 1 / 3, rtol=tol(dtype))
    if key_mode == "anchor":
        np.testing.assert_array_equal(kb, k[:, 0:12:3])
    else:
        assert_close(kb, k[:, :12].reshape(2, 4, 3, 2, 5).astype(np.float64).mean(2), dtype)
    assert_close(vb, v[:, :12].reshape(2, 4, 3, 2, 3).astype(np.float64).mean(2), dtype)


@pytest.mark.parametrize("score", ["full", "latent"])
@pytest.mark.parametrize("w", [0, 5, 100])
def test_mla_absorbed_equals_non_absorbed(rng, score, w):
    """SPEC §4: MLA prefill in non-absorbed form = condense in latent space (§2), up-project c
    and c̄ per head, then §3 through gqa_attend.  It must match absorbed lca.attention.

    Per head h: k_h = [W_uk[h] c ; r], v_h = W_uv[h] c, q_h = [q_nope_h ; q_rope_h];
    absorbed: q'_h = [W_uk[h]^T q_nope_h ; q_rope_h], out_h = W_uv[h] · attention(q', c, r)_h."""
    B, L, H, Dc, Dr, Dn, Dv, g = 1, 27, 3, 8, 4, 5, 6, 4
    tau = 1 / np.sqrt(Dn + Dr)
    c = rng.standard_normal((B, L, Dc))
    r = rng.standard_normal((B, L, Dr))
    Wuk = rng.standard_normal((H, Dn, Dc)) / np.sqrt(Dc)
    Wuv = rng.standard_normal((H, Dv, Dc)) / np.sqrt(Dc)
    q_nope = rng.standard_normal((B, L, H, Dn))
    q_rope = rng.standard_normal((B, L, H, Dr))
    q_abs = np.concatenate([np.einsum("blhn,hnc->blhc", q_nope, Wuk), q_rope], -1)
    kw = dict(group_size=g, softmax_scale=tau)
    out_lat = lca.attention(q_abs, c, r, window=w, score=score, rep_bias=0.4, **kw)
    want = np.einsum("hvc,blhc->blhv", Wuv, out_lat)

    cb, rb, _, _ = lca.condense(q_abs, c, r, score=score, **kw)

    def up(cc, rr):
        kk = np.concatenate([np.einsum("hnc,blc->blhn", Wuk, cc),
                             np.broadcast_to(rr[:, :, None], rr.shape[:2] + (H, Dr))], -1)
        return np.ascontiguousarray(kk), np.einsum("hvc,blc->blhv", Wuv, cc)

    k, v = up(c, r)
    kb, vb = up(cb, rb)
    q = np.concatenate([q_nope, q_rope], -1)
    got = lca.gqa_attend(q, k, v, kb, vb, window=w, rep_bias=0.4, **kw)
    assert_rel(got, want, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_equals_gqa_when_exact(rng, dtype):
    """With w >= L both variants are causal attention: MLA(q, c, r) = GQA(q, [c; r], c)."""
    q, c, r = mla_inputs(rng, 2, 19, 3, 5, 2, dtype)
    out = lca.attention(q, c, r, group_size=4, window=19)
    k = np.concatenate([c, r], 2)[:, :, None]
    out2 = lca.gqa_attention(q, k, c[:, :, None], group_size=4, window=19)
    assert_rel(out, out2, tol(dtype))


def test_inputs_not_modified_and_deterministic(rng):
    kw = dict(group_size=4, window=6, n_summary=2, key_mode="pool")
    q, k, v = gqa_inputs(rng, 2, 45, 6, 2, 8, 4)
    saved = [a.copy() for a in (q, k, v)]
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    for a, s in zip((q, k, v), saved):
        np.testing.assert_array_equal(a, s)
    for _ in range(3):
        o, l = lca.gqa_attention(q, k, v, return_lse=True, **kw)
        np.testing.assert_array_equal(o, out)
        np.testing.assert_array_equal(l, lse)
