"""Property-based tests (hypothesis) of the invariants SPEC §2-§4 promise, on random small
shapes, parameters and both float dtypes:

  causality         changing tokens at positions >= s leaves every output at t < s unchanged,
                    bit for bit; a condensed entry depends on its own group's tokens only
  prefix            the outputs for a prefix of the sequence are the prefix of the outputs, to
                    rounding (a shorter sequence tiles its rows differently; on the H200
                    machine's CPU that moved an output by 1 ulp)
  exact limit       window >= L is exact causal attention (the float64 causal reference)
  heads             permuting MLA query heads permutes out and lse (q̄ averages all heads);
                    GQA: permuting kv heads with their query-head blocks, or query heads
                    inside a block, likewise
  batch rows        each batch row's forward and backward is the call on that row alone
  two halves        attention == attend(condense(...)) and gqa_attention ==
                    gqa_attend(gqa_condense(...)), bit for bit

Each test draws a fixed number of examples (LCA_HYPOTHESIS_EXAMPLES, default 40) with no
deadline; a failure prints the drawn case, and the input arrays come from its `seed`.
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lca  # noqa: E402
from conftest import TOL, check_anchors, ref  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("LCA_HYPOTHESIS_EXAMPLES", "40")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, kind, max_L=40):
    """(arrays, keywords, dtype) for one random MLA or GQA call."""
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, max_L))
    g = draw(st.integers(1, 8))
    kw = dict(group_size=g, window=draw(st.integers(0, L + 2)),
              n_summary=draw(st.integers(1, g)), rep_bias=draw(st.floats(-2, 2)),
              softmax_scale=draw(st.one_of(st.none(), st.just(0.0), st.floats(0.01, 2),
                                           st.floats(-2, -0.01))))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "mla":
        H, Dc, Dr = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(0, 5))
        kw["score"] = draw(st.sampled_from(["full", "latent"]))
        shapes = [(B, L, H, Dc + Dr), (B, L, Dc), (B, L, Dr)]
    else:
        Hkv, hg, D, Dv = (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                          draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        kw["key_mode"] = draw(st.sampled_from(["anchor", "pool"]))
        shapes = [(B, L, Hkv * hg, D), (B, L, Hkv, D), (B, L, Hkv, Dv)]
    return [rng.standard_normal(s).astype(dtype) for s in shapes], kw, dtype


def fns(kind):
    """(forward, condense, attend, backward) for kind, and the keywords each takes."""
    if kind == "mla":
        return lca.attention, lca.condense, lca.attend, lca.attention_backward, "score"
    return lca.gqa_attention, lca.gqa_condense, lca.gqa_attend, lca.gqa_attention_backward, \
        "key_mode"


def cond_kw(kw, mode):
    return {k: kw[k] for k in ("group_size", "n_summary", "softmax_scale", mode)}


def att_kw(kw):
    return {k: kw[k] for k in ("group_size", "window", "softmax_scale", "rep_bias")}


def close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    n = np.linalg.norm(want)
    err = np.linalg.norm(got - want) / (n if n > 0 else 1.0)
    assert err <= 4 * TOL[np.dtype(dtype)], f"{what}: relative error {err:.2e}"


KINDS = ["mla", "gqa"]


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_causality(kind, data):
    args, kw, dtype = data.draw(cases(kind))
    fwd, cond, _, _, mode = fns(kind)
    L = args[0].shape[1]
    s = data.draw(st.integers(0, L - 1), label="s")
    out, lse = fwd(*args, return_lse=True, **kw)
    rng = np.random.default_rng(s)
    changed = [a.copy() for a in args]
    for a in changed:
        a[:, s:] = rng.standard_normal(a[:, s:].shape)
    out2, lse2 = fwd(*changed, return_lse=True, **kw)
    np.testing.assert_array_equal(out2[:, :s], out[:, :s])
    np.testing.assert_array_equal(lse2[..., :s], lse[..., :s])
    # condensation: group j depends on tokens [j g, j g + g) only
    g = kw["group_size"]
    for x, y in zip(cond(*args, **cond_kw(kw, mode)), cond(*changed, **cond_kw(kw, mode))):
        np.testing.assert_array_equal(x[:, :s // g], y[:, :s // g])


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_prefix(kind, data):
    args, kw, dtype = data.draw(cases(kind))
    fwd = fns(kind)[0]
    s = data.draw(st.integers(1, args[0].shape[1]), label="s")
    out, lse = fwd(*args, return_lse=True, **kw)
    out2, lse2 = fwd(*(a[:, :s] for a in args), return_lse=True, **kw)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out2, out[:, :s], rtol=tol, atol=tol)
    np.testing.assert_allclose(lse2, lse[..., :s], rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_window_at_least_L_is_exact(kind, data):
    args, kw, dtype = data.draw(cases(kind))
    fwd = fns(kind)[0]
    L = args[0].shape[1]
    kw["window"] = data.draw(st.one_of(st.integers(L, L + 5), st.just(2**40)), label="window")
    out, lse = fwd(*args, return_lse=True, **kw)
    if kind == "mla":
        q, c, r = args
        k, v = np.concatenate([c, r], 2)[:, :, None], c[:, :, None]
    else:
        q, k, v = args
    want, wlse = ref.causal_attention(q, k, v, kw["softmax_scale"])
    close(out, want, dtype, "out")
    close(lse, wlse, dtype, "lse")


def anchors_tie(cond, args, args2, kw, perm_kv=None):
    """True where the two calls' anchors differ only on near-ties (then the outputs may
    legitimately differ); fails if they differ anywhere else."""
    c1, c2 = cond(*args, **kw), cond(*args2, **kw)
    a1, a2 = c1[2], c2[2]
    if perm_kv is not None:
        a2 = a2[:, :, np.argsort(perm_kv)]
        al2 = c2[3][:, :, np.argsort(perm_kv)]
    else:
        al2 = c2[3]
    if np.array_equal(a1, a2):
        return False
    check_anchors(a1, np.asarray(al2, np.float64), a2, rtol=1e-4)
    return True


@SETTINGS
@given(data=st.data())
def test_mla_head_permutation(data):
    (q, c, r), kw, dtype = data.draw(cases("mla"))
    H = q.shape[2]
    perm = np.array(data.draw(st.permutations(range(H)), label="perm"))
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    qp = q[:, :, perm]
    if anchors_tie(lca.condense, (q, c, r), (qp, c, r), cond_kw(kw, "score")):
        return                      # q̄ summed in another order tipped a tie: either is right
    out2, lse2 = lca.attention(qp, c, r, return_lse=True, **kw)
    close(out2, out[:, :, perm], dtype, "out")
    close(lse2, lse[:, perm], dtype, "lse")


@SETTINGS
@given(data=st.data())
def test_gqa_head_permutation(data):
    (q, k, v), kw, dtype = data.draw(cases("gqa"))
    Hkv, hg = k.shape[2], q.shape[2] // k.shape[2]
    pkv = np.array(data.draw(st.permutations(range(Hkv)), label="kv perm"))
    pin = np.array(data.draw(st.permutations(range(hg)), label="in-block perm"))
    qperm = (pkv[:, None] * hg + pin[None, :]).ravel()      # query heads follow their kv head
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    args2 = (q[:, :, qperm], k[:, :, pkv], v[:, :, pkv])
    if anchors_tie(lca.gqa_condense, (q, k, v), args2, cond_kw(kw, "key_mode"), pkv):
        return
    out2, lse2 = lca.gqa_attention(*args2, return_lse=True, **kw)
    close(out2, out[:, :, qperm], dtype, "out")
    close(lse2, lse[:, qperm], dtype, "lse")


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_batch_rows_independent(kind, data):
    args, kw, dtype = data.draw(cases(kind))
    fwd, cond, _, bwd, mode = fns(kind)
    out, lse = fwd(*args, return_lse=True, **kw)
    dout = np.random.default_rng(0).standard_normal(out.shape).astype(dtype)
    grads = bwd(dout, *args, out, lse, **kw)
    conds = cond(*args, **cond_kw(kw, mode))
    for b in range(args[0].shape[0]):
        row = [a[b:b + 1] for a in args]
        o, l_ = fwd(*row, return_lse=True, **kw)
        np.testing.assert_array_equal(o, out[b:b + 1])       # forward: bit for bit
        np.testing.assert_array_equal(l_, lse[b:b + 1])
        for x, y in zip(cond(*row, **cond_kw(kw, mode)), conds):
            np.testing.assert_array_equal(x, y[b:b + 1])
        # backward: the thread count may differ with the problem size, and with it the order
        # in which per-thread partial sums are added
        for x, y in zip(bwd(dout[b:b + 1], *row, o, l_, **kw), grads):
            close(x, y[b:b + 1], dtype, "gradient")


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_attention_is_attend_of_condense(kind, data):
    args, kw, dtype = data.draw(cases(kind))
    fwd, cond, att, _, mode = fns(kind)
    out, lse = fwd(*args, return_lse=True, **kw)
    bars = cond(*args, **cond_kw(kw, mode))[:2]
    out2, lse2 = att(*args, *bars, return_lse=True, **att_kw(kw))
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
