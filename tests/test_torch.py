"""lca.torch: autograd wrappers and torch.compile custom ops (issue 5 item 2).

CPU: the wrappers give exactly the lca functions' results and gradients, reach the engine with no
copies, pass torch.autograd.gradcheck in float64 for every differentiable input, compile with
fullgraph=True as opaque ops with the same output and gradients as eager, and train a tiny MLA
layer.  GPU (skipped without a device): the same against the CPU in float64, and the training
loop's loss trajectory against the CPU one."""
import subprocess
import sys

import numpy as np
import pytest

import lca
from conftest import ROOT, rel_err

torch = pytest.importorskip("torch")
import lca.torch as lt  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

F64 = torch.float64


def randn(gen, *shape, dtype=F64, grad=True):
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)


def mla_args(gen, B, L, H, Dc, Dr, dtype=F64):
    lead = (B,) if B else ()
    return (randn(gen, *lead, L, H, Dc + Dr, dtype=dtype), randn(gen, *lead, L, Dc, dtype=dtype),
            randn(gen, *lead, L, Dr, dtype=dtype))


def gqa_args(gen, B, L, H, Hkv, D, Dv, dtype=F64):
    lead = (B,) if B else ()
    return (randn(gen, *lead, L, H, D, dtype=dtype), randn(gen, *lead, L, Hkv, D, dtype=dtype),
            randn(gen, *lead, L, Hkv, Dv, dtype=dtype))


def prefill_args(gen, B, L, H, Dc, Dr, Dn, Dv, dtype=F64):
    lead = (B,) if B else ()
    return (randn(gen, *lead, L, H, Dn + Dr, dtype=dtype), randn(gen, *lead, L, Dc, dtype=dtype),
            randn(gen, *lead, L, Dr, dtype=dtype),
            (torch.randn(H, Dc, Dn, generator=gen, dtype=dtype) / Dc ** 0.5).requires_grad_(),
            (torch.randn(H, Dc, Dv, generator=gen, dtype=dtype) / Dc ** 0.5).requires_grad_())


def np64(t):
    return t.detach().numpy()


def npd(t):
    """float64 NumPy copy of any tensor (CUDA, bf16, requiring grad)."""
    return t.detach().double().cpu().numpy()


# (B (0: no batch dim), L, H, Dc, Dr, keywords): small odd shapes, every keyword
MLA_CASES = [
    (1, 13, 2, 5, 3, dict(group_size=3, window=4)),
    (2, 17, 2, 7, 3, dict(group_size=4, window=5, score="latent", rep_bias=0.4)),
    (2, 11, 2, 3, 1, dict(group_size=2, window=3, n_summary=1, softmax_scale=0.6)),
    (0, 20, 2, 5, 3, dict(group_size=3, window=5, n_summary=2, rep_bias=-0.3)),
    (1, 9, 2, 3, 0, dict(group_size=4, window=3)),                                 # Dr = 0
]
# (B, L, H, Hkv, D, Dv, keywords)
GQA_CASES = [
    (1, 13, 2, 1, 5, 3, dict(group_size=3, window=4, key_mode="anchor")),
    (2, 17, 2, 2, 3, 5, dict(group_size=4, window=5, key_mode="pool", rep_bias=0.4)),
    (2, 11, 2, 1, 4, 4, dict(group_size=2, window=3, key_mode="anchor", n_summary=1)),
    (0, 19, 2, 1, 5, 3, dict(group_size=3, window=5, key_mode="pool", softmax_scale=0.7)),
]
# (B, L, H, Dc, Dr, Dn, Dv, keywords)
PREFILL_CASES = [
    (1, 13, 2, 5, 3, 4, 3, dict(group_size=3, window=4)),
    (2, 17, 2, 7, 3, 3, 5, dict(group_size=4, window=5, score="latent", rep_bias=0.4)),
    (0, 15, 2, 4, 2, 3, 3, dict(group_size=2, window=3, n_summary=1, softmax_scale=0.6)),
]


def mla_id(c):
    return f"B{c[0]}-L{c[1]}-H{c[2]}-Dc{c[3]}-Dr{c[4]}-" + "-".join(f"{v}" for v in c[-1].values())


def gqa_id(c):
    return f"B{c[0]}-L{c[1]}-H{c[2]}-Hkv{c[3]}-D{c[4]}-Dv{c[5]}-" + "-".join(
        f"{v}" for v in c[-1].values())


def prefill_id(c):
    return f"B{c[0]}-L{c[1]}-Dn{c[5]}-Dv{c[6]}-" + "-".join(f"{v}" for v in c[-1].values())


def test_import_lca_does_not_import_torch():
    code = "import sys, lca; assert 'torch' not in sys.modules, 'import lca imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------------------------------
# the same numbers as lca, and no copies on the way

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", MLA_CASES[:2] + MLA_CASES[3:4], ids=mla_id)
def test_attention_equals_lca(case, dtype):
    gen = torch.Generator().manual_seed(1)
    *shape, kw = case
    q, c, r = mla_args(gen, *shape, dtype=dtype)
    out, lse = lt.attention(q, c, r, return_lse=True, **kw)
    want, want_lse = lca.attention(np64(q), np64(c), np64(r), return_lse=True, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and lse.dtype == dtype
    assert out.requires_grad and not lse.requires_grad
    assert np.array_equal(np64(out), want) and np.array_equal(np64(lse), want_lse)
    dout = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (q, c, r), dout)
    want_g = lca.attention_backward(dout.numpy(), np64(q), np64(c), np64(r), want, want_lse,
                                    **kw)
    for got, w, nm in zip(grads, want_g, ("dq", "dlatent", "dkpos")):
        assert got.dtype == dtype and np.array_equal(got.numpy(), w), nm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", GQA_CASES, ids=gqa_id)
def test_gqa_attention_equals_lca(case, dtype):
    gen = torch.Generator().manual_seed(2)
    *shape, kw = case
    q, k, v = gqa_args(gen, *shape, dtype=dtype)
    out, lse = lt.gqa_attention(q, k, v, return_lse=True, **kw)
    want, want_lse = lca.gqa_attention(np64(q), np64(k), np64(v), return_lse=True, **kw)
    assert np.array_equal(np64(out), want) and np.array_equal(np64(lse), want_lse)
    dout = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want_g = lca.gqa_attention_backward(dout.numpy(), np64(q), np64(k), np64(v), want,
                                        want_lse, **kw)
    for got, w, nm in zip(grads, want_g, ("dq", "dk", "dv")):
        assert np.array_equal(got.numpy(), w), nm


@pytest.mark.parametrize("case", PREFILL_CASES, ids=prefill_id)
def test_mla_prefill_equals_lca(case):
    gen = torch.Generator().manual_seed(3)
    *shape, kw = case
    args = prefill_args(gen, *shape)
    out, lse = lt.mla_prefill(*args, return_lse=True, **kw)
    want, want_lse = lca.mla_prefill(*map(np64, args), return_lse=True, **kw)
    assert np.array_equal(np64(out), want) and np.array_equal(np64(lse), want_lse)
    assert out.requires_grad and not lse.requires_grad


def _spy(monkeypatch, name, keywords=None):
    """Record (args, result) of each call of lca.<name> (and its keywords into keywords)."""
    calls = []
    real = getattr(lca, name)

    def spy(*args, **kw):
        res = real(*args, **kw)
        calls.append((args, res))
        if keywords is not None:
            keywords.append(kw)
        return res
    monkeypatch.setattr(lca, name, spy)
    return calls


def test_cpu_tensors_reach_the_engine_without_copies(monkeypatch):
    """The engine gets NumPy views of the tensors' own memory (a strided view included), and
    the results come back as tensors over the engine's arrays."""
    gen = torch.Generator().manual_seed(4)
    bwd_kw = []
    fwd = _spy(monkeypatch, "attention")
    bwd = _spy(monkeypatch, "attention_backward", bwd_kw)
    big = randn(gen, 2, 15, 3, 9)
    q = big[:, :, :2, 1:]                          # strided: heads and width sliced
    c, r = randn(gen, 2, 15, 5), randn(gen, 2, 15, 3)
    out, lse = lt.attention(q, c, r, group_size=3, window=4, return_lse=True)
    (args, (o, l, cond)), = fwd
    for a, t in zip(args, (q, c, r)):
        assert isinstance(a, np.ndarray) and np.shares_memory(a, t.detach().numpy())
    assert args[0].strides == tuple(s * 8 for s in q.stride())
    assert np.shares_memory(out.detach().numpy(), o) and np.shares_memory(lse.numpy(), l)
    out.sum().backward()
    (bargs, grads), = bwd
    for a, t in zip(bargs[1:4], (q, c, r)):
        assert np.shares_memory(a, t.detach().numpy())
    # the forward's condensation is saved and handed to the backward, not recomputed
    handed = bwd_kw[0]["condensed"]
    assert len(handed) == 4 and all(np.shares_memory(a, b) for a, b in zip(handed, cond))
    assert np.shares_memory(c.grad.numpy(), grads[1])
    # the grad of q flows back through the slice into big
    assert big.grad is not None and torch.count_nonzero(big.grad[:, :, 2]) == 0


def test_results_are_contiguous_and_unaliased():
    """What a custom op may return: engine results that are views of one buffer or strided
    (as a CUDA backward may give) are copied; separate contiguous ones are passed through."""
    buf = torch.randn(3, 5, 7)
    a, b = buf[..., :4], buf[..., 4:]
    ra, rb = lt._results((a, b))
    assert ra.is_contiguous() and rb.is_contiguous()
    assert ra.untyped_storage().data_ptr() != rb.untyped_storage().data_ptr()
    assert torch.equal(ra, a) and torch.equal(rb, b)
    x, y = np.zeros((2, 3)), np.ones((4,))
    rx, ry = lt._results((x, y))
    assert np.shares_memory(rx.numpy(), x) and np.shares_memory(ry.numpy(), y)


def test_lse_is_not_differentiable():
    gen = torch.Generator().manual_seed(5)
    q, c, r = mla_args(gen, 1, 10, 2, 3, 2)
    out, lse = lt.attention(q, c, r, group_size=2, window=3, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()
    # a loss over both: the gradient is out's alone
    (out.sum() + lse.sum()).backward()
    g = q.grad.clone()
    q.grad = None
    lt.attention(q, c, r, group_size=2, window=3).sum().backward()
    assert torch.equal(q.grad, g)


# ---------------------------------------------------------------------------------------------
# gradcheck, float64, every differentiable input

@pytest.mark.parametrize("case", MLA_CASES, ids=mla_id)
def test_gradcheck_attention(case):
    gen = torch.Generator().manual_seed(6)
    *shape, kw = case
    args = mla_args(gen, *shape)
    assert torch.autograd.gradcheck(lambda *a: lt.attention(*a, **kw), args)


@pytest.mark.parametrize("case", GQA_CASES, ids=gqa_id)
def test_gradcheck_gqa_attention(case):
    gen = torch.Generator().manual_seed(7)
    *shape, kw = case
    args = gqa_args(gen, *shape)
    assert torch.autograd.gradcheck(lambda *a: lt.gqa_attention(*a, **kw), args)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=prefill_id)
def test_gradcheck_mla_prefill(case):
    gen = torch.Generator().manual_seed(8)
    *shape, kw = case
    args = prefill_args(gen, *shape)
    assert torch.autograd.gradcheck(lambda *a: lt.mla_prefill(*a, **kw), args)


def given_args(gen, B, L, Hkv, m, D, Dv, mla):
    """Condensed entries of m rows to go with mla_args / gqa_args (leaves, float64)."""
    if mla:          # latent_bar (B, m, Dc = Dv), kpos_bar (B, m, Dr = D - Dv)
        return randn(gen, B, m, Dv, dtype=F64), randn(gen, B, m, D - Dv, dtype=F64)
    return randn(gen, B, m, Hkv, D, dtype=F64), randn(gen, B, m, Hkv, Dv, dtype=F64)


@pytest.mark.parametrize("extra", [0, 2])
def test_gradcheck_given_entries(extra):
    """lca.torch.gqa_attend / attend: gradients reach the given condensed entries too (rows
    past what the last query sees included: their gradient is zero)."""
    gen = torch.Generator().manual_seed(9)
    kw = dict(group_size=4, window=5, rep_bias=0.3)
    m = lca.num_condensed(18, 4, 5) + extra
    args = gqa_args(gen, 2, 19, 4, 2, 5, 3) + given_args(gen, 2, 19, 2, m, 5, 3, False)
    assert torch.autograd.gradcheck(lambda *a: lt.gqa_attend(*a, **kw), args)
    q, c, r = mla_args(gen, 1, 19, 3, 4, 2)
    args = (q, c, r) + given_args(gen, 1, 19, 1, m, 6, 4, True)
    assert torch.autograd.gradcheck(lambda *a: lt.attend(*a, **kw), args)


def test_mla_prefill_grads_equal_absorbed_composition():
    """The non-absorbed layer's gradient is that of absorb -> attention -> W_UV product."""
    gen = torch.Generator().manual_seed(9)
    args = prefill_args(gen, 2, 19, 3, 6, 2, 4, 5)
    kw = dict(group_size=3, window=4, rep_bias=0.2)
    q, c, r, w_uk, w_uv = args
    dout = torch.randn(2, 19, 3, 5, generator=gen, dtype=F64)
    got = torch.autograd.grad(lt.mla_prefill(*args, **kw), args, dout)
    q_abs = torch.cat([torch.einsum("blhn,hcn->blhc", q[..., :4], w_uk), q[..., 4:]], -1)
    lat = lt.attention(q_abs, c, r, softmax_scale=6 ** -0.5, **kw)
    want = torch.autograd.grad(torch.einsum("blhc,hcv->blhv", lat, w_uv), args, dout)
    for g, w, nm in zip(got, want, ("dq", "dlatent", "dkpos", "dw_uk", "dw_uv")):
        assert rel_err(g.numpy(), w.numpy()) <= 1e-13, nm


# ---------------------------------------------------------------------------------------------
# torch.compile: opaque ops, same numbers as eager

OPS = ["attention", "attention_backward", "gqa_attention", "gqa_attention_backward",
       "mla_prefill", "mla_prefill_backward", "gqa_attend", "gqa_attend_backward", "attend",
       "attend_backward"]


def _op_samples():
    gen = torch.Generator().manual_seed(10)
    q, c, r = mla_args(gen, 2, 11, 2, 4, 2)
    kw = (3, 4, None, None, "full", 0.2)
    out, lse, *cond = torch.ops.lca.attention(q, c, r, *kw)         # + the condensation
    qg, k, v = gqa_args(gen, 1, 11, 2, 1, 4, 3)
    kwg = (3, 4, 2, 0.5, "pool", 0.0)
    og, lg, *condg = torch.ops.lca.gqa_attention(qg, k, v, *kwg)
    pa = prefill_args(gen, 1, 11, 2, 4, 2, 3, 3)
    kwp = (3, 4, None, 0.4, "latent", 0.2)
    op, lp = torch.ops.lca.mla_prefill(*pa, *kwp)
    d = [a.detach() for a in (q, c, r, out, qg, k, v, og)]      # no double backward: no grad
    kb, vb = given_args(gen, 1, 11, 1, 3, 4, 3, False)
    kwa = (3, 4, 0.5, 0.1)
    oa, la = torch.ops.lca.gqa_attend(qg, k, v, kb, vb, *kwa)
    cb, rb = given_args(gen, 2, 11, 1, 3, 6, 4, True)
    om, lm = torch.ops.lca.attend(q, c, r, cb, rb, *kwa)
    da = [a.detach() for a in (kb, vb, oa, cb, rb, om)]
    return {
        "gqa_attend": (qg, k, v, kb, vb) + kwa,
        "gqa_attend_backward": (torch.randn_like(oa), *d[4:7], *da[:3], la) + kwa,
        "attend": (q, c, r, cb, rb) + kwa,
        "attend_backward": (torch.randn_like(om), *d[:3], *da[3:], lm) + kwa,
        "attention": (q, c, r) + kw,
        "attention_backward": (torch.randn_like(out), *d[:4], lse, *cond) + kw,
        "gqa_attention": (qg, k, v) + kwg,
        "gqa_attention_backward": (torch.randn_like(og), *d[4:], lg, *condg) + kwg,
        "mla_prefill": pa + kwp,
        "mla_prefill_backward": (torch.randn_like(op), *(a.detach() for a in pa), op.detach(),
                                 lp) + kwp,
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """torch.library.opcheck: schema, fake (meta) kernel against the real one, autograd
    registration, and AOT dispatch with dynamic shapes.  (The backward ops have no autograd
    formula: there is no double backward.)"""
    args = _op_samples()[name]
    torch.library.opcheck(getattr(torch.ops.lca, name), args)


def _loss_fns():
    return {
        "attention": (lambda g: mla_args(g, 2, 14, 2, 5, 3),
                      lambda q, c, r: lt.attention(q, c, r, group_size=3, window=4,
                                                   return_lse=True)),
        "gqa_attention": (lambda g: gqa_args(g, 2, 14, 2, 1, 4, 3),
                          lambda q, k, v: lt.gqa_attention(q, k, v, group_size=3, window=4,
                                                           key_mode="pool", return_lse=True)),
        "mla_prefill": (lambda g: prefill_args(g, 2, 14, 2, 5, 3, 4, 3),
                        lambda *a: lt.mla_prefill(*a, group_size=3, window=4, score="latent",
                                                  return_lse=True)),
        "gqa_attend": (lambda g: gqa_args(g, 2, 14, 2, 1, 4, 3) + given_args(g, 2, 14, 1, 4, 4,
                                                                             3, False),
                       lambda *a: lt.gqa_attend(*a, group_size=3, window=4, return_lse=True)),
        "attend": (lambda g: mla_args(g, 2, 14, 2, 5, 3) + given_args(g, 2, 14, 1, 4, 8, 5,
                                                                      True),
                   lambda *a: lt.attend(*a, group_size=3, window=4, return_lse=True)),
    }


@pytest.mark.parametrize("name", ["attention", "gqa_attention", "mla_prefill", "gqa_attend",
                                  "attend"])
def test_compile_fullgraph_matches_eager(name):
    """fullgraph=True with AOTAutograd and no code generation (the aot_eager backend, with the
    graphs captured): it traces forward and backward through the fake kernels and the
    registered autograd; the same loss, lse and gradients as eager, bit for bit; dynamo's graph
    holds the lca op as one node, the backward graph the lca backward op."""
    make, fn = _loss_fns()[name]
    args = make(torch.Generator().manual_seed(11))
    torch._dynamo.reset()       # one code object for `loss` across the cases: fresh recompile count

    def loss(*a):
        out, lse = fn(*a)
        return (out.sin() * out).sum(), lse

    seen, bw = [], []

    def ops(gm):
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    def keep(store):
        def compiler(gm, _):
            store.append(ops(gm))
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        seen.append(ops(gm))
        return aot_autograd(fw_compiler=keep([]), bw_compiler=keep(bw))(gm, example_inputs)

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    want, want_lse = loss(*args)
    want_g = torch.autograd.grad(want, args)
    got, got_lse = compiled(*args)
    got_g = torch.autograd.grad(got, args)
    assert f"lca.{name}.default" in seen[0]
    assert f"lca.{name}_backward.default" in bw[0], bw[0]
    assert not got_lse.requires_grad
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
    for g, w in zip(got_g, want_g):
        assert torch.equal(g, w)
    # a second length: recompiled or dynamic, still right
    args2 = [a.detach()[:, :11].clone().requires_grad_() for a in args[:3]] + list(args[3:])
    got2, _ = compiled(*args2)
    assert torch.equal(got2, loss(*args2)[0])


def test_compile_inductor():
    """The default backend (inductor, which compiles C++ for the CPU) around the opaque op."""
    make, fn = _loss_fns()["attention"]
    args = make(torch.Generator().manual_seed(12))

    def loss(*a):
        return (fn(*a)[0].sin() * 2).sum()

    want = loss(*args)
    want_g = torch.autograd.grad(want, args)
    got = torch.compile(loss, fullgraph=True)(*args)
    got_g = torch.autograd.grad(got, args)
    assert rel_err(got.detach().numpy(), want.detach().numpy()) <= 1e-12
    for g, w in zip(got_g, want_g):
        assert rel_err(g.numpy(), w.numpy()) <= 1e-12


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_input_names_argument():
    gen = torch.Generator().manual_seed(13)
    q, c, r = mla_args(gen, 1, 10, 2, 3, 2)
    with pytest.raises(TypeError, match="q: the CPU engine takes float32 or float64"):
        lt.attention(q.detach().bfloat16(), c, r)
    with pytest.raises(TypeError, match="latent"):
        lt.attention(q, np64(c), r)
    with pytest.raises(TypeError, match="kpos"):
        lt.attention(q, c, r.detach().float())
    with pytest.raises(ValueError, match="group_size"):
        lt.attention(q, c, r, group_size=0)
    with pytest.raises(ValueError, match="score"):
        lt.attention(q, c, r, score="both")
    with pytest.raises(ValueError, match="latent"):
        lt.attention(q, c[:, :9], r)
    with pytest.raises(ValueError, match="key_mode"):
        lt.gqa_attention(q, q, q, key_mode="mean")
    with pytest.raises(ValueError, match="n_summary"):
        lt.gqa_attention(q, q, q, group_size=2, n_summary=3)
    with pytest.raises(TypeError, match="window"):
        lt.mla_prefill(q, c, r, q, q, window=2.5)


# ---------------------------------------------------------------------------------------------
# a tiny training loop: an MLA layer fitting a random target

def _layer(form, d=16, H=2, Dc=8, Dr=4, Dn=6, Dv=5, seed=0):
    """Parameters (float64, CPU) of one MLA layer: absorbed (attention) or non-absorbed."""
    gen = torch.Generator().manual_seed(seed)

    def w(*s):
        return torch.randn(*s, generator=gen, dtype=F64) / s[-2] ** 0.5
    if form == "absorbed":
        return dict(wq=w(d, H * (Dc + Dr)), wc=w(d, Dc), wr=w(d, Dr), wo=w(H * Dc, d))
    return dict(wq=w(d, H * (Dn + Dr)), wc=w(d, Dc), wr=w(d, Dr), wuk=w(H, Dc, Dn),
                wuv=w(H, Dc, Dv), wo=w(H * Dv, d))


def _data(B=2, L=24, d=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, d, generator=gen, dtype=F64), \
        torch.randn(B, L, d, generator=gen, dtype=F64)


def train(form, dtype=F64, device="cpu", attn_dtype=None, steps=12, lr=0.05):
    """Adam on an MLA layer; q, latent, kpos in attn_dtype (default: dtype) into lca.torch.
    Returns the loss per step."""
    p = {k: v.to(device, dtype).requires_grad_() for k, v in _layer(form).items()}
    x, y = (a.to(device, dtype) for a in _data())
    B, L, _ = x.shape
    H, kw = 2, dict(group_size=4, window=5)
    adt = attn_dtype or dtype
    opt = torch.optim.Adam(p.values(), lr=lr)
    losses = []
    for _ in range(steps):
        q = (x @ p["wq"]).view(B, L, H, -1).to(adt)
        c, r = (x @ p["wc"]).to(adt), (x @ p["wr"]).to(adt)
        if form == "absorbed":
            o = lt.attention(q, c, r, **kw)
        else:
            o = lt.mla_prefill(q, c, r, p["wuk"].to(adt), p["wuv"].to(adt), **kw)
        out = o.to(dtype).reshape(B, L, -1) @ p["wo"]
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize("form", ["absorbed", "non-absorbed"])
def test_training_loop_cpu(form):
    l64 = train(form, F64)
    assert np.all(np.isfinite(l64))
    assert np.all(np.diff(l64) < 0), f"loss not decreasing: {l64}"
    assert l64[-1] < 0.8 * l64[0], f"loss {l64[0]:.4f} -> {l64[-1]:.4f}"
    l32 = train(form, torch.float32)
    assert np.all(np.diff(l32) < 0)
    assert np.max(np.abs(l32 - l64) / l64) < 1e-5, f"float32 {l32} vs float64 {l64}"


# ---------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device).  The backward tests need lca's CUDA backward.

needs_gpu = pytest.mark.skipif(not (lca.HAS_CUDA and torch.cuda.is_available()),
                               reason="needs a CUDA device")


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")


def _cuda(args, dtype):
    return [a.detach().to("cuda", dtype).requires_grad_() for a in args]


def _gpu_cases():
    return {
        "attention": (lambda g: mla_args(g, 2, 97, 4, 64, 16),
                      lambda *a, **k: lt.attention(*a, group_size=8, window=20,
                                                   return_lse=True, **k)),
        "gqa_attention": (lambda g: gqa_args(g, 2, 97, 8, 2, 64, 64),
                          lambda *a, **k: lt.gqa_attention(*a, group_size=8, window=20,
                                                           key_mode="anchor", return_lse=True,
                                                           **k)),
        "mla_prefill": (lambda g: prefill_args(g, 1, 130, 4, 64, 16, 48, 32),
                        lambda *a, **k: lt.mla_prefill(*a, group_size=16, window=33,
                                                       return_lse=True, **k)),
    }


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["attention", "gqa_attention", "mla_prefill"])
@pytest.mark.usefixtures("poison")
def test_gpu_forward_and_compile(name, dtype):
    """Forward on CUDA tensors (needs only the CUDA forward): against float64 CPU, lse float32
    as the fake kernel says, and torch.compile(fullgraph) giving the eager answer."""
    make, fn = _gpu_cases()[name]
    host = make(torch.Generator().manual_seed(20))
    dev = _cuda(host, getattr(torch, dtype))
    out, lse = fn(*dev)
    assert out.is_cuda and out.dtype == dev[0].dtype and lse.dtype == torch.float32
    want, want_lse = fn(*(a.detach().to("cpu", F64) for a in dev))
    if dtype == "float32":
        bounds = (1e-5, 1e-6)
    else:   # SPEC §8: at most 2x the error of the same computation in plain torch at bf16
        bounds = [2 * rel_err(npd(a), npd(w))
                  for a, w in zip(_naive(name, dev), (want, want_lse))]
    err = rel_err(npd(out), npd(want))
    assert err <= bounds[0], f"out: {dtype} error {err:.2e} > {bounds[0]:.2e}"
    lerr = rel_err(npd(lse), npd(want_lse))
    assert lerr <= bounds[1], f"lse: {dtype} error {lerr:.2e} > {bounds[1]:.2e}"
    cout, clse = torch.compile(fn, fullgraph=True, backend="aot_eager")(*dev)
    assert clse.dtype == torch.float32 and torch.equal(cout, out)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["attention", "gqa_attention", "mla_prefill"])
@pytest.mark.usefixtures("poison")
def test_gpu_backward(name, dtype):
    """Gradients on CUDA tensors against the CPU float64 gradients of the same rounded inputs:
    float32 within 1e-5; bf16 within 2x the error of the gradients of the same computation in
    plain torch at bf16 (eager, through tests/torch_lca.py for attention/gqa_attention; for
    mla_prefill the absorbed composition)."""
    make, fn = _gpu_cases()[name]
    host = make(torch.Generator().manual_seed(21))
    dt = getattr(torch, dtype)
    dev = _cuda(host, dt)
    out, _ = fn(*dev)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(22), dtype=F64)
    got = torch.autograd.grad(out, dev, dout.to("cuda", dt))
    exact = [a.detach().to("cpu", F64).requires_grad_() for a in dev]
    want = torch.autograd.grad(fn(*exact)[0], exact, dout)
    naive = None
    if dtype != "float32":
        naive = torch.autograd.grad(_naive(name, dev)[0], dev, dout.to("cuda", dt))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_cuda and g.dtype == dt and torch.isfinite(g.float()).all()
        err = rel_err(npd(g), npd(w))
        if dtype == "float32":
            assert err <= 1e-5, f"grad {i}: float32 error {err:.2e}"
        else:
            bound = 2 * rel_err(npd(naive[i]), npd(w))
            assert err <= max(bound, 1e-3), f"grad {i}: bf16 error {err:.2e} > {bound:.2e}"


def _naive(name, dev):
    """(out, lse) of the case in plain torch at the inputs' precision (tests/torch_lca.py)."""
    from torch_lca import gqa_lca, mla_lca
    if name == "attention":
        return mla_lca(*dev, group_size=8, window=20)
    if name == "gqa_attention":
        return gqa_lca(*dev, group_size=8, window=20, key_mode="anchor")
    q, c, r, w_uk, w_uv = dev
    Dn = w_uk.shape[2]
    q_abs = torch.cat([torch.einsum("blhn,hcn->blhc", q[..., :Dn], w_uk), q[..., Dn:]], -1)
    lat, lse = mla_lca(q_abs, c, r, group_size=16, window=33, softmax_scale=q.shape[-1] ** -0.5)
    return torch.einsum("blhc,hcv->blhv", lat, w_uv), lse


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("attn", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", ["absorbed", "non-absorbed"])
def test_gpu_training_loop_matches_cpu(form, attn):
    """The same layer, data and steps on the GPU (float32 parameters; the attention inputs in
    float32 or bf16) follows the float32 CPU loss trajectory."""
    cpu = train(form, torch.float32)
    got = train(form, torch.float32, device="cuda", attn_dtype=getattr(torch, attn))
    assert np.all(np.isfinite(got)) and got[-1] < 0.8 * got[0]
    dev = np.max(np.abs(got - cpu) / cpu)
    assert dev <= (1e-4 if attn == "float32" else 3e-2), f"GPU {got} vs CPU {cpu}"



# ---- the plain lca API with torch CPU tensors: results in the caller's array type (SPEC §7) ----

def test_torch_cpu_tensors_in_torch_tensors_out():
    gen = torch.Generator().manual_seed(21)
    q, c, r = mla_args(gen, 2, 37, 3, 16, 8, dtype=torch.float32)
    q, c, r = (x.detach() for x in (q, c, r))
    kw = dict(group_size=4, window=9)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    ref, ref_lse = lca.attention(q.numpy(), c.numpy(), r.numpy(), return_lse=True, **kw)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), ref)
    assert np.array_equal(lse.numpy(), ref_lse)
    grads = lca.attention_backward(torch.ones_like(out), q, c, r, out, lse, **kw)
    refs = lca.attention_backward(np.ones_like(ref), q.numpy(), c.numpy(), r.numpy(), ref,
                                  ref_lse, **kw)
    for g, gr in zip(grads, refs):
        assert isinstance(g, torch.Tensor) and np.array_equal(g.numpy(), gr)
    parts = lca.condense(q, c, r, group_size=4)
    assert all(isinstance(x, torch.Tensor) for x in parts) and parts[2].dtype == torch.int32
    qg, k, v = (x.detach() for x in gqa_args(gen, 1, 30, 4, 2, 8, 6, dtype=torch.float32))
    o = lca.gqa_attention(qg, k, v, **kw)
    assert isinstance(o, torch.Tensor)
    assert np.array_equal(o.numpy(), lca.gqa_attention(qg.numpy(), k.numpy(), v.numpy(), **kw))


def test_torch_cpu_tensors_by_keyword_come_back_as_tensors():
    """Tensors passed by keyword (all of them, or only out / lse) count as the caller's arrays
    too: the results are torch tensors, as for positional tensors."""
    gen = torch.Generator().manual_seed(22)
    q, c, r = (x.detach() for x in mla_args(gen, 1, 21, 2, 8, 4))
    kw = dict(group_size=4, window=5)
    out = lca.attention(q=q, latent=c, kpos=r, **kw)
    assert isinstance(out, torch.Tensor)
    assert np.array_equal(out.numpy(), lca.attention(q.numpy(), c.numpy(), r.numpy(), **kw))
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    grads = lca.attention_backward(np.ones(out.shape), q.numpy(), c.numpy(), r.numpy(), out=out,
                                   lse=lse, **kw)
    assert all(isinstance(g, torch.Tensor) for g in grads)


def test_cache_on_torch_cpu():
    """device=torch.device("cpu") with a torch dtype: a CPU cache whose outputs are tensors,
    equal to the NumPy cache's."""
    gen = torch.Generator().manual_seed(5)
    B, L, H, Dc, Dr = 2, 23, 2, 12, 4
    q, c, r = (x.detach() for x in mla_args(gen, B, L, H, Dc, Dr))
    kw = dict(group_size=4, window=6)
    tc = lca.LatentCache(B, H, Dc, Dr, L, dtype=torch.float64, device=torch.device("cpu"), **kw)
    nc = lca.LatentCache(B, H, Dc, Dr, L, dtype=np.float64, **kw)
    a, b = tc.prefill(q[:, :10], c[:, :10], r[:, :10]), nc.prefill(
        q[:, :10].numpy(), c[:, :10].numpy(), r[:, :10].numpy())
    assert isinstance(a, torch.Tensor) and np.array_equal(a.numpy(), b)
    for t in range(10, L):
        a = tc.step(q[:, t], c[:, t], r[:, t])
        b = nc.step(q[:, t].numpy(), c[:, t].numpy(), r[:, t].numpy())
        assert isinstance(a, torch.Tensor) and np.array_equal(a.numpy(), b)
    assert tc.length == nc.length == L
