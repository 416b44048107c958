"""lca.mla_prefill: MLA prefill in the non-absorbed form (SPEC §4; issue 3 item 4).

The claim tested: condensing in latent space, up-projecting per head and attending per head
gives the absorbed result lca.reference.attention(q_abs, c, r) up-projected by W_UV, to
rounding (float64 <= 1e-12, float32 <= 1e-5 relative, SPEC §8), and with window >= L exact
causal non-absorbed MLA.  Then bad input, the torch-frontend products (the CUDA path's matmuls,
run here on CPU tensors), and the GPU path (skipped without a device)."""
import zlib

import numpy as np
import pytest

import lca
from conftest import assert_rel, ref, rel_err, tol

# B, L, H, Dc, Dr, Dn, Dv, keywords
CASES = [
    (1, 37, 2, 11, 5, 7, 6, dict(group_size=4, window=5)),
    (2, 29, 3, 9, 4, 6, 5, dict(group_size=3, window=0, score="latent", rep_bias=0.3)),
    (2, 41, 2, 16, 8, 8, 8, dict(group_size=5, window=7, n_summary=2, rep_bias=-0.4)),
    (1, 33, 4, 13, 0, 5, 3, dict(group_size=4, window=6)),                     # Dr = 0
    (2, 20, 1, 7, 3, 4, 9, dict(group_size=1, window=3, softmax_scale=0.7)),   # g = 1
    (1, 9, 2, 6, 2, 3, 4, dict(group_size=16, window=4)),                      # L < g: m = 0
    (2, 23, 3, 10, 4, 6, 7, dict(group_size=4, window=100)),                   # window >= L
]
IDS = [f"B{c[0]}-L{c[1]}-H{c[2]}-Dc{c[3]}-Dr{c[4]}-Dn{c[5]}-Dv{c[6]}" for c in CASES]


def inputs(rng, B, L, H, Dc, Dr, Dn, Dv, dtype=np.float64):
    q = rng.standard_normal((B, L, H, Dn + Dr)).astype(dtype)
    c = rng.standard_normal((B, L, Dc)).astype(dtype)
    r = rng.standard_normal((B, L, Dr)).astype(dtype)
    w_uk = (rng.standard_normal((H, Dc, Dn)) / np.sqrt(Dc)).astype(dtype)
    w_uv = (rng.standard_normal((H, Dc, Dv)) / np.sqrt(Dc)).astype(dtype)
    return q, c, r, w_uk, w_uv


def absorbed_reference(q, c, r, w_uk, w_uv, kw):
    """The same layer in absorbed form through lca.reference (float64): (out, lse)."""
    q, c, r, w_uk, w_uv = (np.asarray(a, np.float64) for a in (q, c, r, w_uk, w_uv))
    Dn = w_uk.shape[2]
    kw = dict(kw)
    kw.setdefault("softmax_scale", 1.0 / np.sqrt(q.shape[-1]))
    q_abs = np.concatenate([np.einsum("blhn,hcn->blhc", q[..., :Dn], w_uk), q[..., Dn:]], -1)
    out_lat, lse = ref.attention(q_abs, c, r, **kw)
    return np.einsum("blhc,hcv->blhv", out_lat, w_uv), lse


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equals_absorbed_form(case, dtype, rng):
    *shape, kw = case
    q, c, r, w_uk, w_uv = inputs(rng, *shape, dtype=dtype)
    out, lse = lca.mla_prefill(q, c, r, w_uk, w_uv, return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == dtype
    B, L, H, Dc, Dr, Dn, Dv = shape
    assert out.shape == (B, L, H, Dv) and lse.shape == (B, H, L)
    want, want_lse = absorbed_reference(q, c, r, w_uk, w_uv, kw)
    assert_rel(out, want, tol(dtype), "out")
    assert_rel(lse, want_lse, tol(dtype), "lse")
    # the library's own absorbed path agrees too (same engine, other route)
    Dq = q.shape[-1]
    q_abs = np.concatenate([np.einsum("blhn,hcn->blhc", q[..., :Dn], w_uk), q[..., Dn:]], -1)
    lat = lca.attention(q_abs, c, r, **{"softmax_scale": 1 / np.sqrt(Dq), **kw})
    assert_rel(out, np.einsum("blhc,hcv->blhv", lat, w_uv), tol(dtype), "out vs lca.attention")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unbatched(dtype, rng):
    q, c, r, w_uk, w_uv = inputs(rng, 1, 30, 2, 8, 4, 5, 6, dtype)
    kw = dict(group_size=4, window=6)
    out = lca.mla_prefill(q[0], c[0], r[0], w_uk, w_uv, **kw)
    assert out.shape == (30, 2, 6)
    np.testing.assert_array_equal(out, lca.mla_prefill(q, c, r, w_uk, w_uv, **kw)[0])


def test_window_covering_everything_is_causal_mla(rng):
    """window >= L: exact causal attention of the non-absorbed layer, written out per head."""
    B, L, H, Dc, Dr, Dn, Dv = 2, 19, 3, 8, 4, 5, 6
    q, c, r, w_uk, w_uv = inputs(rng, B, L, H, Dc, Dr, Dn, Dv)
    k = np.concatenate([np.einsum("blc,hcn->blhn", c, w_uk),
                        np.broadcast_to(r[:, :, None], (B, L, H, Dr))], -1)
    v = np.einsum("blc,hcv->blhv", c, w_uv)
    want, want_lse = ref.causal_attention(q, k, v)
    for g in (1, 4, 7):
        out, lse = lca.mla_prefill(q, c, r, w_uk, w_uv, group_size=g, window=L,
                                   return_lse=True)
        assert_rel(out, want, 1e-12, f"out g={g}")
        assert_rel(lse, want_lse, 1e-12, f"lse g={g}")


def test_strided_inputs(rng):
    """Views (a sliced q, a transposed weight) give the same answer as contiguous copies."""
    q, c, r, w_uk, w_uv = inputs(rng, 2, 26, 2, 8, 4, 5, 6)
    big = rng.standard_normal((2, 26, 2, 12))
    big[..., 1:10] = q
    w_t = np.ascontiguousarray(w_uv.transpose(0, 2, 1)).transpose(0, 2, 1)
    kw = dict(group_size=3, window=5)
    got = lca.mla_prefill(big[..., 1:10], c, r, w_uk, w_t, **kw)
    np.testing.assert_array_equal(got, lca.mla_prefill(q, c, r, w_uk, w_uv, **kw))


# ---------------------------------------------------------------------------------------------
# bad input: the exception names the argument

def _bad(rng):
    return list(inputs(rng, 1, 12, 2, 6, 2, 3, 4))


@pytest.mark.parametrize("which, make, exc, name", [
    (3, lambda a: a[:1], ValueError, "w_uk"),                 # heads 1 != 2
    (4, lambda a: a[:, :5], ValueError, "w_uv"),              # Dc 5 != 6
    (3, lambda a: a[0], ValueError, "w_uk"),                  # rank 2
    (3, lambda a: a[..., :2], ValueError, "q"),               # Dn 2: q width 5 != 2+2
    (4, lambda a: a.astype(np.float32), TypeError, "w_uv"),   # dtype
    (1, lambda a: a[:, :7], ValueError, "latent"),            # length
    (2, lambda a: a[0], ValueError, "kpos"),                  # rank
    (4, lambda a: a.astype(np.int64), TypeError, "w_uv"),
    (4, lambda a: a[..., :0], ValueError, "w_uv"),            # Dv = 0
])
def test_bad_input_names_argument(which, make, exc, name, rng):
    args = _bad(rng)
    args[which] = make(args[which])
    with pytest.raises(exc, match=name):
        lca.mla_prefill(*args, group_size=4, window=3)


@pytest.mark.parametrize("kw, name", [(dict(group_size=0), "group_size"),
                                      (dict(score="both"), "score"),
                                      (dict(n_summary=9, group_size=4), "n_summary"),
                                      (dict(window=-1), "window"),
                                      (dict(rep_bias=float("nan")), "rep_bias")])
def test_bad_keyword_names_it(kw, name, rng):
    with pytest.raises(ValueError, match=name):
        lca.mla_prefill(*_bad(rng), **kw)


def test_torch_frontend_products_match_numpy(rng):
    """The CUDA path runs its products through the caller's framework; with torch that is
    permute/reshape/@ on torch tensors.  Run those same helpers on CPU tensors here."""
    torch = pytest.importorskip("torch")
    from lca import _cuda, _prefill
    c, r = rng.standard_normal((2, 7, 6)), rng.standard_normal((2, 7, 3))
    w_uk, w_uv = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6, 5))
    x = rng.standard_normal((2, 5, 3, 4))
    fe = _cuda._Torch(torch.from_numpy(c))
    tk, tv = _prefill._up_project(fe, *(torch.from_numpy(a) for a in (c, r, w_uk, w_uv)))
    nk, nv = _prefill._up_project(None, c, r, w_uk, w_uv)
    np.testing.assert_allclose(tk.numpy(), nk, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(tv.numpy(), nv, rtol=1e-13, atol=1e-13)
    assert rel_err(nk[..., :4], np.einsum("blc,hcn->blhn", c, w_uk)) < 1e-14
    assert np.array_equal(nk[..., 4:], np.broadcast_to(r[:, :, None], (2, 7, 3, 3)))
    t = _prefill._matmul_heads_t(torch.from_numpy(x), torch.from_numpy(w_uk), fe)
    n = _prefill._matmul_heads_t(x, w_uk, None)
    np.testing.assert_allclose(t.numpy(), n, rtol=1e-13, atol=1e-13)
    assert rel_err(n, np.einsum("bmhn,hcn->bmc", x, w_uk)) < 1e-14


# ---------------------------------------------------------------------------------------------
# gradients: lca.torch.mla_prefill's backward runs the non-absorbed steps (attend backward over
# the up-projected entries, the products' transposes, the latent-space condensation backward);
# it must equal the absorbed-identity gradient it replaced (lca.torch._mla_prefill_grad_absorbed)

GRAD_CASES = [  # B, L, H, Dc, Dr, Dn, Dv, keywords
    (2, 37, 3, 11, 5, 7, 6, dict(group_size=4, window=5, rep_bias=0.3)),
    (2, 29, 2, 9, 4, 6, 5, dict(group_size=3, window=0, score="latent", rep_bias=-0.4)),
    (3, 41, 2, 16, 8, 8, 8, dict(group_size=5, window=7, n_summary=2, rep_bias=0.5)),
    (2, 33, 4, 13, 6, 5, 3, dict(group_size=4, window=0, n_summary=3, score="full",
                                 rep_bias=0.2, softmax_scale=0.6)),
    (2, 23, 3, 10, 4, 6, 7, dict(group_size=4, window=23, score="latent", rep_bias=0.7)),
    (2, 25, 2, 8, 4, 5, 6, dict(group_size=3, window=100, n_summary=1, rep_bias=0.4)),
    (2, 31, 2, 7, 0, 4, 5, dict(group_size=4, window=6, n_summary=2, rep_bias=0.1)),   # Dr = 0
    (2, 9, 2, 6, 2, 3, 4, dict(group_size=16, window=4, rep_bias=0.3)),                # m = 0
    (2, 19, 2, 6, 3, 4, 5, dict(group_size=1, window=3, score="latent", rep_bias=0.3)),  # g = 1
]
GRAD_IDS = [f"B{c[0]}-L{c[1]}-H{c[2]}-" + "-".join(f"{k}{v}" for k, v in c[7].items())
            for c in GRAD_CASES]


def _torch_inputs(torch, rng, shape, dtype=np.float64):
    return [torch.from_numpy(a).requires_grad_() for a in inputs(rng, *shape, dtype=dtype)]


def _op_keywords(lt, q, kw):
    """lca.torch.mla_prefill's keywords as the custom op takes them (positional)."""
    g, w, n, scale, bias = lt._keywords(kw.get("group_size", 16), kw.get("window", 1024),
                                        kw.get("n_summary"), kw.get("softmax_scale"),
                                        kw.get("rep_bias", 0.0))
    return (g, w, n, scale if scale is not None else 1 / np.sqrt(q.shape[-1]),
            kw.get("score", "full"), bias)


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_torch_backward_equals_absorbed_identity(case, rng):
    """float64 on the CPU: the non-absorbed backward against (a) the absorbed-identity one it
    replaced and (b) plain torch autograd through the same non-absorbed steps (tests/torch_lca.py
    mla_prefill_lca), both to 1e-12 relative."""
    torch = pytest.importorskip("torch")
    import lca.torch as lt
    from torch_lca import mla_prefill_lca
    *shape, kw = case
    args = _torch_inputs(torch, rng, shape)
    out = lt.mla_prefill(*args, **kw)
    dout = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    got = torch.autograd.grad(out, args, dout)
    with torch.no_grad():
        old = lt._mla_prefill_grad_absorbed(dout, *args, _op_keywords(lt, args[0], kw))
    plain = torch.autograd.grad(mla_prefill_lca(*args, **kw)[0], args, dout)
    for g, o, p, nm in zip(got, old, plain, ("dq", "dlatent", "dkpos", "dw_uk", "dw_uv")):
        assert g.dtype == torch.float64 and g.shape == o.shape
        assert_rel(g.numpy(), o.numpy(), 1e-12, f"{nm} vs absorbed identity")
        assert_rel(g.numpy(), p.numpy(), 1e-12, f"{nm} vs plain torch")


@pytest.mark.parametrize("case", [GRAD_CASES[1], GRAD_CASES[4], GRAD_CASES[7]],
                         ids=[GRAD_IDS[i] for i in (1, 4, 7)])
def test_torch_gradcheck(case, rng):
    """Central finite differences (torch.autograd.gradcheck, float64), smaller widths."""
    torch = pytest.importorskip("torch")
    import lca.torch as lt
    B, L, H, Dc, Dr, Dn, Dv, kw = case
    args = _torch_inputs(torch, rng, (B, L, H, min(Dc, 5), min(Dr, 3), 3, 3))
    assert torch.autograd.gradcheck(lambda *a: lt.mla_prefill(*a, **kw), args)


def test_torch_backward_takes_the_non_absorbed_route(rng, monkeypatch):
    """The backward calls the attend backward over given entries and the condensation backward
    (each once), never the absorbed attention_backward; unbatched inputs give the batched
    gradients; float32 within 1e-5 of float64."""
    torch = pytest.importorskip("torch")
    import lca.torch as lt
    calls = []
    for nm in ("attention_backward", "gqa_attend_backward", "condense_backward"):
        real = getattr(lca, nm)
        monkeypatch.setattr(lca, nm, lambda *a, _real=real, _nm=nm, **k: (calls.append(_nm),
                                                                           _real(*a, **k))[1])
    kw = dict(group_size=4, window=6, n_summary=3, rep_bias=0.2)
    args = _torch_inputs(torch, rng, (2, 27, 3, 8, 4, 5, 6))
    dout = torch.from_numpy(rng.standard_normal((2, 27, 3, 6)))
    want = torch.autograd.grad(lt.mla_prefill(*args, **kw), args, dout)
    assert calls == ["gqa_attend_backward", "condense_backward"], calls
    # unbatched: row 1 alone; its dq, dlatent, dkpos are the batched call's row 1, its weight
    # gradients those of the batched call on rows 1:2
    one = [a.detach()[1].clone().requires_grad_() for a in args[:3]] + args[3:]
    got = torch.autograd.grad(lt.mla_prefill(*one, **kw), one, dout[1])
    two = [a.detach()[1:].clone().requires_grad_() for a in args[:3]] + args[3:]
    want2 = torch.autograd.grad(lt.mla_prefill(*two, **kw), two, dout[1:])
    for g, w, nm in zip(got, [w[1] for w in want[:3]] + list(want2[3:]),
                        ("dq", "dlatent", "dkpos", "dw_uk", "dw_uv")):
        assert g.shape == w.shape, nm
        assert_rel(g.numpy(), w.numpy(), 1e-12, f"unbatched {nm}")
    f32 = [a.detach().float().requires_grad_() for a in args]
    got32 = torch.autograd.grad(lt.mla_prefill(*f32, **kw), f32, dout.float())
    for g, w, nm in zip(got32, want, ("dq", "dlatent", "dkpos", "dw_uk", "dw_uv")):
        assert g.dtype == torch.float32
        assert_rel(g.numpy(), w.numpy(), 1e-5, f"float32 {nm}")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device)

GPU_CASES = [  # B, L, H, Dc, Dr, Dn, Dv, keywords
    (1, 300, 16, 512, 64, 128, 128, dict(group_size=16, window=64)),     # DeepSeek-V2-Lite
    (2, 97, 4, 256, 32, 96, 64, dict(group_size=8, window=20, score="latent", rep_bias=0.5)),
    (1, 61, 3, 40, 8, 24, 16, dict(group_size=4, window=0, n_summary=2)),
    (2, 9, 2, 32, 0, 16, 8, dict(group_size=16, window=4)),             # L < g, Dr = 0
]


@pytest.mark.gpu
@pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_gpu_torch(case, dtype, monkeypatch):
    """torch CUDA tensors in, torch CUDA tensors out; against float64 CPU on the same rounded
    inputs: float32 1e-5, bf16/fp16 at most 2x the same layer in plain torch at that precision
    (absorbed form, tests/torch_lca.py)."""
    torch = pytest.importorskip("torch")
    from torch_lca import mla_lca
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    *shape, kw = case
    B, L, H, Dc, Dr, Dn, Dv = shape
    dt = getattr(torch, dtype)
    rng = np.random.default_rng(zlib.crc32(repr((case[:7], dtype)).encode()))
    host = inputs(rng, *shape)
    q, c, r, w_uk, w_uv = (torch.from_numpy(a).to("cuda", dt) for a in host)
    out, lse = lca.mla_prefill(q, c, r, w_uk, w_uv, return_lse=True, **kw)
    assert isinstance(out, torch.Tensor) and out.device == q.device and out.dtype == dt
    assert out.shape == (B, L, H, Dv) and lse.dtype == torch.float32 and lse.shape == (B, H, L)
    assert torch.isfinite(out.float()).all()
    exact = [a.double().cpu().numpy() for a in (q, c, r, w_uk, w_uv)]
    want, want_lse = lca.mla_prefill(*exact, return_lse=True, **kw)
    err = rel_err(out.double().cpu().numpy(), want)
    if dtype == "float32":
        assert err <= 1e-5, f"float32 error {err:.2e}"
        assert rel_err(lse.double().cpu().numpy(), want_lse) <= 1e-6
    else:
        kwn = {"softmax_scale": 1 / np.sqrt(Dn + Dr), **kw}
        q_abs = torch.cat([torch.einsum("blhn,hcn->blhc", q[..., :Dn], w_uk), q[..., Dn:]], -1)
        naive = torch.einsum("blhc,hcv->blhv", mla_lca(q_abs, c, r, **kwn)[0], w_uv)
        bound = 2 * rel_err(naive.double().cpu().numpy(), want)
        assert err <= max(bound, 1e-3), f"{dtype} error {err:.2e} > 2x naive {bound:.2e}"


GPU_GRAD_CASES = [  # B, L, H, Dc, Dr, Dn, Dv, keywords
    (1, 300, 16, 512, 64, 128, 128, dict(group_size=16, window=64)),     # DeepSeek-V2-Lite
    (2, 97, 4, 256, 32, 96, 64, dict(group_size=8, window=20, n_summary=3, score="latent",
                                     rep_bias=0.5)),
    (2, 61, 3, 40, 8, 24, 16, dict(group_size=4, window=0, n_summary=2, rep_bias=0.3)),
    (2, 45, 4, 64, 16, 48, 32, dict(group_size=4, window=10**6, rep_bias=0.2)),  # window >= L
    (2, 9, 2, 32, 0, 16, 8, dict(group_size=16, window=4)),             # L < g, Dr = 0
]


@pytest.mark.gpu
@pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", GPU_GRAD_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_gpu_torch_backward(case, dtype, monkeypatch):
    """lca.torch.mla_prefill's backward on CUDA tensors (lca_cuda_attend_bwd over the
    up-projected entries, lca_cuda_condense_bwd, torch products) against the float64 CPU
    gradients of the same rounded inputs, SPEC §8 as tests/test_cuda_bwd.py holds it
    (tests/torch_lca.py check_grads): float32 within 1e-5, bf16 / fp16 within twice the error
    of the same non-absorbed computation by plain torch autograd at that precision."""
    torch = pytest.importorskip("torch")
    import lca.torch as lt
    from torch_lca import check_grads, mla_prefill_lca, naive_grads, to_np
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    *shape, kw = case
    dt = getattr(torch, dtype)
    rng = np.random.default_rng(zlib.crc32(repr(("bwd", case[:7], dtype)).encode()))
    dev = [torch.from_numpy(a).to("cuda", dt).requires_grad_() for a in inputs(rng, *shape)]
    out = lt.mla_prefill(*dev, **kw)
    dout = torch.from_numpy(rng.standard_normal(tuple(out.shape))).to("cuda", dt)
    got = torch.autograd.grad(out, dev, dout)
    exact = [torch.from_numpy(to_np(a)).requires_grad_() for a in dev]
    ref = [g.numpy() for g in torch.autograd.grad(lt.mla_prefill(*exact, **kw), exact,
                                                  torch.from_numpy(to_np(dout)))]
    naive = None if dtype == "float32" else naive_grads(mla_prefill_lca, dev, dout, kw)
    check_grads(got, ref, naive, dtype, ["dq", "dlatent", "dkpos", "dw_uk", "dw_uv"],
                f"mla_prefill backward {tuple(case[:7])}")


@pytest.mark.gpu
@pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
def test_gpu_cupy():
    """CuPy CUDA arrays in, CuPy arrays out (float32; the half-precision bounds are checked
    through torch above)."""
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    shape, kw = GPU_CASES[1][:7], GPU_CASES[1][7]
    host = inputs(rng, *shape)
    dev = [cp.asarray(a.astype(np.float32)) for a in host]
    out = lca.mla_prefill(*dev, **kw)
    assert isinstance(out, cp.ndarray) and out.dtype == np.float32
    assert out.device.id == dev[0].device.id
    want = lca.mla_prefill(*(cp.asnumpy(a).astype(np.float64) for a in dev), **kw)
    assert rel_err(cp.asnumpy(out), want) <= 1e-5


def test_torch_route_end_to_end_on_cpu_tensors(rng, monkeypatch):
    """The whole CUDA-array route of mla_prefill (torch frontend: intake, summary query,
    scatter into the one-head query, up-projections, outputs) run on CPU float32 tensors: the
    framework check is told they are CUDA arrays and the two engine calls are routed to the
    CPU engine through NumPy.  Catches torch-syntax slips without a GPU; the real CUDA run is
    test_gpu_torch."""
    torch = pytest.importorskip("torch")
    from lca import _cuda
    monkeypatch.setattr(_cuda, "framework", lambda x: "torch" if isinstance(x, torch.Tensor)
                        else None)
    real = {nm: getattr(lca, nm) for nm in ("condense", "gqa_attend")}

    def via_numpy(nm):
        def call(*args, **kw):
            assert all(isinstance(a, torch.Tensor) for a in args), f"{nm}: non-torch input"
            res = real[nm](*(a.numpy() for a in args), **kw)
            return tuple(torch.from_numpy(np.ascontiguousarray(r)) for r in res)
        return call
    for nm in real:
        monkeypatch.setattr(lca, nm, via_numpy(nm))
    for B, L, kw in ((2, 37, dict(group_size=4, window=5, n_summary=3)),
                     (1, 9, dict(group_size=16, window=4)),
                     (2, 29, dict(group_size=3, window=0, score="latent", rep_bias=0.3))):
        host = inputs(rng, B, L, 3, 10, 4, 6, 5, dtype=np.float32)
        out, lse = lca.mla_prefill(*(torch.from_numpy(a) for a in host), return_lse=True, **kw)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        want, want_lse = absorbed_reference(*host, kw)
        assert_rel(out.numpy(), want, 1e-5, "out")
        assert_rel(lse.numpy(), want_lse, 1e-5, "lse")


def test_torch_backward_cuda_route_on_cpu_tensors(rng, monkeypatch):
    """lca.torch.mla_prefill's backward as it runs on CUDA tensors (the torch frontend in
    _prefill._parts, torch tensors into lca.condense / gqa_attend_backward / condense_backward),
    run on CPU float32 tensors: lca.torch hands the tensors over as they are, the framework
    check calls them CUDA arrays, and the engine calls go to the CPU engine through NumPy.
    Catches torch-syntax slips without a GPU; the real CUDA run is test_gpu_torch_backward."""
    torch = pytest.importorskip("torch")
    import lca.torch as lt
    from lca import _cuda
    kw = dict(group_size=4, window=5, n_summary=3, score="latent", rep_bias=0.3)
    args = _torch_inputs(torch, rng, (2, 37, 3, 10, 4, 6, 5), dtype=np.float32)
    dout = torch.from_numpy(rng.standard_normal((2, 37, 3, 5)).astype(np.float32))
    want = torch.autograd.grad(lt.mla_prefill(*args, **kw), args, dout)
    monkeypatch.setattr(_cuda, "framework", lambda x: "torch" if isinstance(x, torch.Tensor)
                        else None)
    monkeypatch.setattr(lt, "_engine", lambda q, ts, names: [t.detach() for t in ts])
    monkeypatch.setattr(lt, "_frontend", lambda q: _cuda._Torch(q))
    real = {nm: getattr(lca, nm) for nm in ("condense", "gqa_attend", "gqa_attend_backward",
                                            "condense_backward")}

    def via_numpy(nm):
        def call(*a, **k):
            assert all(isinstance(x, torch.Tensor) for x in a), f"{nm}: non-torch input"
            res = real[nm](*(x.numpy() for x in a), **k)
            return tuple(torch.from_numpy(np.ascontiguousarray(r)) for r in res)
        return call
    for nm in real:
        monkeypatch.setattr(lca, nm, via_numpy(nm))
    got = torch.autograd.grad(lt.mla_prefill(*args, **kw), args, dout)
    for g, w, nm in zip(got, want, ("dq", "dlatent", "dkpos", "dw_uk", "dw_uv")):
        assert g.dtype == torch.float32
        assert_rel(g.numpy(), w.numpy(), 1e-6, nm)

