"""GPU tests of the two parts of the backward on CUDA arrays, skipped without a CUDA device:
lca.attend_backward / gqa_attend_backward (the gradients of attend with the condensed entries
given: dq, dk, dv, dkbar, dvbar; attend_bwd.cu lca_cuda_attend_bwd) and lca.condense_backward /
gqa_condense_backward (the condensation's backward alone, given dkbar, dvbar;
lca_cuda_condense_bwd).

Every gradient is compared with the CPU engine's in float64 on the same (rounded) inputs (the
CPU versions are checked against finite differences in tests/test_attend_grad.py), with the
bounds of tests/test_cuda_bwd.py (SPEC §8): float32 within 1e-5 relative; bf16 / fp16 within
twice the error of the same gradients by plain PyTorch autograd at that precision
(tests/torch_lca.py).  Outputs are NaN-poisoned (LCA_POISON_OUTPUTS), so an element the kernels
fail to write fails.  Each case runs on the default path (the tensor-core kernels for bf16/fp16
at head widths 64/64, 128/128, 192/128) and on the portable kernels (LCA_CUDA_DISABLE=mma).
SPEC §5's chain on the GPU: attention_backward == attend_backward over the condensed entries +
condense_backward of their gradients.
"""
import zlib

import numpy as np
import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from torch_lca import (check_grads, gqa_attend_lca, gqa_condense_lca,   # noqa: E402
                           gqa_lca, mla_attend_lca, mla_condense_lca, mla_lca, naive_grads,
                           rand, rel, run_captured, to_np)

DTYPES = ["float32", "bfloat16", "float16"]
PATHS = {"default": None, "simt": "mma"}          # LCA_CUDA_DISABLE per path
UNIT = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")


def use_path(monkeypatch, path):
    if PATHS[path]:
        monkeypatch.setenv("LCA_CUDA_DISABLE", PATHS[path])
    else:
        monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)


def gen_for(*key):
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def check_attend(attend, attend_backward, naive_fn, args, dout, kw, dtype, names, what):
    """attend_backward of the device arrays args (q, k, v or latent and kpos, then the entries)
    against the CPU engine's float64 gradients of the same rounded inputs; returns them."""
    out, lse = attend(*args, return_lse=True, **kw)
    got = attend_backward(dout, *args, out, lse, **kw)
    args64 = [to_np(x) for x in args]
    out64, lse64 = attend(*args64, return_lse=True, **kw)
    ref = attend_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = None if dtype == "float32" else naive_grads(naive_fn, args, dout, kw)
    check_grads(got, ref, naive, dtype, names, what)
    return got


def check_condense(condense_backward, naive_fn, grads, args, kw, dtype, names, what):
    """condense_backward(*grads, *args) likewise (grads: the entries' gradients)."""
    got = condense_backward(*grads, *args, **kw)
    ref = condense_backward(*(to_np(x) for x in grads + args), **kw)
    naive = None if dtype == "float32" else naive_grads(naive_fn, args, grads, kw)
    check_grads(got, ref, naive, dtype, names, what)


# -- attend_backward ---------------------------------------------------------------------------

GQA_ATTEND = [  # B, L, H, Hkv, D, Dv, g, w, extra rows, rep_bias
    (2, 97, 8, 2, 128, 128, 8, 20, 3, 0.0),
    (1, 150, 16, 16, 192, 128, 16, 40, 0, 0.3),     # the non-absorbed MLA shape
    (2, 77, 6, 2, 64, 64, 4, 0, 5, 0.0),            # window 0, 3 heads per kv head
    (1, 61, 4, 1, 59, 37, 4, 9, 2, -0.2),           # odd widths: portable kernels only
    (1, 45, 4, 4, 64, 64, 8, 10**6, 2, 0.0),        # window >= L: no entry seen, dkbar = 0
    (1, 1100, 2, 1, 128, 128, 8, 64, 0, 0.0),       # > 128 entries: several key blocks
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GQA_ATTEND, ids=lambda c: "-".join(map(str, c)))
def test_gqa_attend_backward(case, dtype, path, monkeypatch):
    use_path(monkeypatch, path)
    B, L, H, Hkv, D, Dv, g, w, extra, bias = case
    gen = gen_for("gqa-attend", case, dtype)
    seen = lca.num_condensed(L - 1, g, w)
    m = seen + extra
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    kbar, vbar = rand(gen, (B, m, Hkv, D), dtype), rand(gen, (B, m, Hkv, Dv), dtype)
    dout = rand(gen, (B, L, H, Dv), dtype)
    kw = dict(group_size=g, window=w, rep_bias=bias)
    got = check_attend(lca.gqa_attend, lca.gqa_attend_backward, gqa_attend_lca,
                       (q, k, v, kbar, vbar), dout, kw, dtype,
                       ["dq", "dk", "dv", "dkbar", "dvbar"], f"gqa attend {case} {path}")
    assert not got[3][:, seen:].any() and not got[4][:, seen:].any()   # rows no query sees


MLA_ATTEND = [  # B, L, H, Dc, Dr, g, w, extra rows, rep_bias
    (2, 77, 4, 256, 32, 8, 20, 2, 0.5),
    (1, 97, 16, 512, 64, 16, 32, 0, 0.0),
    (1, 61, 2, 40, 0, 4, 7, 1, 0.0),                # no positional key
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_ATTEND, ids=lambda c: "-".join(map(str, c)))
def test_mla_attend_backward(case, dtype):
    B, L, H, Dc, Dr, g, w, extra, bias = case
    gen = gen_for("mla-attend", case, dtype)
    m = lca.num_condensed(L - 1, g, w) + extra
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    cb, rb = rand(gen, (B, m, Dc), dtype), rand(gen, (B, m, Dr), dtype)
    dout = rand(gen, (B, L, H, Dc), dtype)
    kw = dict(group_size=g, window=w, rep_bias=bias)
    check_attend(lca.attend, lca.attend_backward, mla_attend_lca, (q, c, r, cb, rb), dout, kw,
                 dtype, ["dq", "dlatent", "dkpos", "dlatent_bar", "dkpos_bar"],
                 f"mla attend {case}")


# -- condense_backward -------------------------------------------------------------------------

GQA_CONDENSE = [  # B, L, H, Hkv, D, Dv, g, n
    (2, 97, 8, 2, 128, 128, 8, 3),
    (1, 150, 16, 16, 192, 128, 16, None),
    (1, 61, 4, 1, 59, 37, 4, 2),                    # odd widths, a partial last group
    (2, 33, 6, 3, 64, 32, 1, None),                 # groups of one: alpha = 1
]


@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GQA_CONDENSE, ids=lambda c: "-".join(map(str, c)))
def test_gqa_condense_backward(case, dtype, key_mode):
    B, L, H, Hkv, D, Dv, g, n = case
    gen = gen_for("gqa-condense", case, dtype, key_mode)
    m = L // g
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    dkbar, dvbar = rand(gen, (B, m, Hkv, D), dtype), rand(gen, (B, m, Hkv, Dv), dtype)
    kw = dict(group_size=g, n_summary=n, key_mode=key_mode)
    check_condense(lca.gqa_condense_backward, gqa_condense_lca, (dkbar, dvbar), (q, k, v), kw,
                   dtype, ["dq", "dk", "dv"], f"gqa condense {case} {key_mode}")


MLA_CONDENSE = [  # B, L, H, Dc, Dr, g, n, score
    (2, 77, 4, 256, 32, 8, 3, "latent"),
    (1, 97, 16, 512, 64, 16, None, "full"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_CONDENSE, ids=lambda c: "-".join(map(str, c)))
def test_mla_condense_backward(case, dtype):
    B, L, H, Dc, Dr, g, n, score = case
    gen = gen_for("mla-condense", case, dtype)
    m = L // g
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    dcb, drb = rand(gen, (B, m, Dc), dtype), rand(gen, (B, m, Dr), dtype)
    kw = dict(group_size=g, n_summary=n, score=score)
    check_condense(lca.condense_backward, mla_condense_lca, (dcb, drb), (q, c, r), kw, dtype,
                   ["dq", "dlatent", "dkpos"], f"mla condense {case}")


# -- attention_backward == attend_backward + condense_backward ---------------------------------

def check_sum(parts_a, parts_b, whole, ref, naive, dtype, names, what):
    """float32: the split and the whole differ by roundings of the final sums only, at most
    4 u (|a| + |b| + |whole|) an element (u the unit roundoff), summed in norm.  bf16 / fp16: the
    entries' gradients are rounded to the dtype between the two calls, so the split sum is held
    to SPEC §8 against the float64 gradient instead (2x plain torch's error)."""
    for a, b, wh, r, nv, nm in zip(parts_a, parts_b, whole, ref, naive or [None] * 3, names):
        assert torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all(), nm
        split = to_np(a) + to_np(b)
        if dtype == "float32":
            bound = 4 * UNIT[dtype] * (np.linalg.norm(to_np(a)) + np.linalg.norm(to_np(b)) +
                                       np.linalg.norm(to_np(wh)))
            diff = np.linalg.norm(split - to_np(wh))
            assert diff <= bound, f"{what} {nm}: |split - whole| {diff:.2e} > {bound:.2e}"
        else:
            err, lim = rel(split, r), 2 * rel(to_np(nv), r)
            assert err <= lim, f"{what} {nm}: {dtype} split error {err:.2e} > {lim:.2e}"


def check_chain(kind, args, dout, ck, akw, dtype, names, what):
    """attention_backward against attend_backward over condense's entries + condense_backward
    of their gradients (ck: condense's keywords, akw: attend's)."""
    if kind == "gqa":
        condense, attention, whole_bwd, attend_bwd, condense_bwd, naive_fn = (
            lca.gqa_condense, lca.gqa_attention, lca.gqa_attention_backward,
            lca.gqa_attend_backward, lca.gqa_condense_backward, gqa_lca)
    else:
        condense, attention, whole_bwd, attend_bwd, condense_bwd, naive_fn = (
            lca.condense, lca.attention, lca.attention_backward, lca.attend_backward,
            lca.condense_backward, mla_lca)
    kw = dict(ck, **akw)
    entries = condense(*args, **ck)[:2]
    out, lse = attention(*args, return_lse=True, **kw)
    whole = whole_bwd(dout, *args, out, lse, **kw)
    parts = attend_bwd(dout, *args, *entries, out, lse, **akw)
    cparts = condense_bwd(*parts[3:], *args, **ck)
    args64 = [to_np(x) for x in args]
    o64, l64 = attention(*args64, return_lse=True, **kw)
    ref = whole_bwd(to_np(dout), *args64, o64, l64, **kw)
    naive = None if dtype == "float32" else naive_grads(naive_fn, args, dout, kw)
    check_sum(parts[:3], cparts, whole, ref, naive, dtype, names, what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("key_mode", ["anchor", "pool"])
def test_gqa_attention_backward_is_the_sum(key_mode, dtype, path, monkeypatch):
    use_path(monkeypatch, path)
    B, L, H, Hkv, D, Dv = 2, 151, 8, 2, 128, 128
    gen = gen_for("gqa-sum", key_mode, dtype)
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    dout = rand(gen, (B, L, H, Dv), dtype)
    check_chain("gqa", (q, k, v), dout, dict(group_size=8, n_summary=5, key_mode=key_mode),
                dict(group_size=8, window=30, rep_bias=0.2), dtype, ["dq", "dk", "dv"],
                f"gqa sum {key_mode} {path}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("score", ["full", "latent"])
def test_mla_attention_backward_is_the_sum(score, dtype):
    B, L, H, Dc, Dr = 2, 90, 4, 256, 32
    gen = gen_for("mla-sum", score, dtype)
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    dout = rand(gen, (B, L, H, Dc), dtype)
    check_chain("mla", (q, c, r), dout, dict(group_size=8, n_summary=4, score=score),
                dict(group_size=8, window=20), dtype, ["dq", "dlatent", "dkpos"],
                f"mla sum {score}")


# -- determinism, streams, views, autograd, errors ---------------------------------------------

def small_gqa(dtype="bfloat16", B=2, L=300, H=8, Hkv=4, D=128, Dv=128, g=8, w=40):
    gen = gen_for("small", dtype, B, L, H, Hkv, D, Dv, g, w)
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    dout = rand(gen, (B, L, H, Dv), dtype)
    kbar, vbar, _, _ = lca.gqa_condense(q, k, v, group_size=g)
    kw = dict(group_size=g, window=w)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    return q, k, v, kbar, vbar, dout, out, lse, kw


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, path, monkeypatch):
    """Two runs on the same inputs give bit-identical gradients (no atomics)."""
    use_path(monkeypatch, path)
    q, k, v, kbar, vbar, dout, out, lse, kw = small_gqa(dtype)
    runs = [lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b)
    dkb, dvb = runs[0][3:]
    runs = [lca.gqa_condense_backward(dkb, dvb, q, k, v, group_size=kw["group_size"],
                                      key_mode="pool") for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b)


def test_runs_on_the_callers_stream():
    """Captured in a CUDA graph (tests/torch_lca.py run_captured): every launch and memset of
    both calls must go to the caller's stream, or the replayed results stay poisoned."""
    q, k, v, kbar, vbar, dout, out, lse, kw = small_gqa()
    ref = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    got = run_captured(lambda: lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse,
                                                       **kw))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    dkb, dvb = ref[3], ref[4]
    ck = dict(group_size=kw["group_size"], key_mode="pool")
    ref = lca.gqa_condense_backward(dkb, dvb, q, k, v, **ck)
    got = run_captured(lambda: lca.gqa_condense_backward(dkb, dvb, q, k, v, **ck))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_unbatched_and_sliced_entries():
    """Unbatched inputs give the batched call's gradients; kbar, vbar as row slices of larger
    buffers (a preallocated store) give the contiguous call's, bit for bit."""
    q, k, v, kbar, vbar, dout, out, lse, kw = small_gqa(B=1)
    want = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    got = lca.gqa_attend_backward(dout[0], q[0], k[0], v[0], kbar[0], vbar[0], out[0], lse[0],
                                  **kw)
    for a, b in zip(got, want):
        assert a.shape == b.shape[1:] and torch.equal(a, b[0])
    m = kbar.shape[1]
    kbig = torch.zeros((1, m + 7) + tuple(kbar.shape[2:]), dtype=kbar.dtype, device="cuda")
    vbig = torch.zeros((1, m + 7) + tuple(vbar.shape[2:]), dtype=vbar.dtype, device="cuda")
    kbig[:, :m], vbig[:, :m] = kbar, vbar
    got = lca.gqa_attend_backward(dout, q, k, v, kbig[:, :m], vbig[:, :m], out, lse, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dq, dk, dv = lca.gqa_condense_backward(want[3][0], want[4][0], q[0], k[0], v[0],
                                           group_size=kw["group_size"])
    wq, wk, wv = lca.gqa_condense_backward(want[3], want[4], q, k, v,
                                           group_size=kw["group_size"])
    assert torch.equal(dq, wq[0]) and torch.equal(dk, wk[0]) and torch.equal(dv, wv[0])


def test_no_queries():
    """L = 0 with given rows: the entries' gradients are zeros, written (not left poisoned)."""
    q = torch.randn(1, 0, 2, 16, device="cuda")
    k = torch.randn(1, 0, 1, 16, device="cuda")
    kbar, vbar = torch.randn(1, 3, 1, 16, device="cuda"), torch.randn(1, 3, 1, 16, device="cuda")
    got = lca.gqa_attend_backward(q, q, k, k, kbar, vbar, q, torch.zeros(1, 2, 0, device="cuda"),
                                  group_size=4, window=4)
    assert [tuple(x.shape) for x in got] == [(1, 0, 2, 16), (1, 0, 1, 16), (1, 0, 1, 16),
                                             (1, 3, 1, 16), (1, 3, 1, 16)]
    assert not got[3].any() and not got[4].any()


def test_torch_autograd_through_given_entries():
    """lca.torch.gqa_attend / attend on CUDA tensors: backward reaches all five inputs and
    equals lca.gqa_attend_backward / attend_backward (the custom ops call them)."""
    import lca.torch as lt
    q, k, v, kbar, vbar, dout, out, lse, kw = small_gqa()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, kbar, vbar)]
    lt.gqa_attend(*leaves, **kw).backward(dout)
    want = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    for x, w in zip(leaves, want):
        assert torch.equal(x.grad, w)
    gen = gen_for("autograd-mla")
    q, c, r = rand(gen, (2, 70, 4, 96), "bfloat16"), rand(gen, (2, 70, 64), "bfloat16"), \
        rand(gen, (2, 70, 32), "bfloat16")
    cb, rb, _, _ = lca.condense(q, c, r, group_size=4)
    kw = dict(group_size=4, window=12)
    out, lse = lca.attend(q, c, r, cb, rb, return_lse=True, **kw)
    dout = rand(gen, tuple(out.shape), "bfloat16")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, c, r, cb, rb)]
    lt.attend(*leaves, **kw).backward(dout)
    want = lca.attend_backward(dout, q, c, r, cb, rb, out, lse, **kw)
    for x, w in zip(leaves, want):
        assert torch.equal(x.grad, w)


def test_errors():
    q, k, v, kbar, vbar, dout, out, lse, kw = small_gqa(L=64)
    g = kw["group_size"]
    with pytest.raises(ValueError, match="kbar"):
        lca.gqa_attend_backward(dout, q, k, v, kbar[:, :2], vbar[:, :2], out, lse, **kw)
    with pytest.raises(TypeError, match="vbar"):
        lca.gqa_attend_backward(dout, q, k, v, kbar, vbar.half(), out, lse, **kw)
    with pytest.raises(ValueError, match="dvbar"):
        lca.gqa_condense_backward(kbar, vbar[..., :-1], q, k, v, group_size=g)
    with pytest.raises(TypeError, match="dkbar"):
        lca.gqa_condense_backward(kbar.cpu(), vbar, q, k, v, group_size=g)
    with pytest.raises(TypeError, match="dvbar"):
        lca.gqa_condense_backward(kbar, vbar.float(), q, k, v, group_size=g)
    qm, c, r = q[:, :, :2], k[:, :, 0, :96], k[:, :, 0, 96:]
    cb, rb, _, _ = lca.condense(qm, c, r, group_size=g)
    with pytest.raises(ValueError, match="dkpos_bar"):
        lca.condense_backward(cb, rb[:, :-1], qm, c, r, group_size=g)
    big = torch.randn(1, 8, 1, 1100, device="cuda")
    bb = torch.randn(1, 1, 1, 1100, device="cuda")
    with pytest.raises(NotImplementedError, match="1024"):
        lca.gqa_attend_backward(big, big, big, big, bb, bb, big,
                                torch.zeros(1, 1, 8, device="cuda"), group_size=4, window=4)
    bb = torch.randn(1, 2, 1, 1100, device="cuda")
    with pytest.raises(NotImplementedError, match="1024"):
        lca.gqa_condense_backward(bb, bb, big, big, big, group_size=4)
