"""GPU tests of the CUDA backward (SPEC §5), skipped without a CUDA device.

Every gradient is compared with the CPU engine's backward in float64 on the same (rounded)
inputs — itself checked against central finite differences in tests/test_grad.py.  The CUDA
side runs its own forward (out, lse) and backward, as a training step would.  Outputs are
NaN-poisoned before launch (LCA_POISON_OUTPUTS) so an element the kernels fail to write fails.

Bounds (SPEC §8):
- float32: relative Frobenius error <= 1e-5.  Every quantity is a float32 dot product or sum
  over at most a few thousand terms (row sums over the visible entries, column sums over the
  query rows that see a key, g-term softmax backward): float32 rounding of such sums with
  random data is ~1e-7 .. 1e-6 relative, the SPEC's 1e-5 leaves an order of magnitude.
- bfloat16 / float16: at most twice the error of the same gradient computed by plain PyTorch
  autograd at that precision (tests/torch_lca.py), against the same float64 reference.
"""
import zlib

import numpy as np
import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from torch_lca import (check_grads, gqa_lca, mla_lca, naive_grads,   # noqa: E402
                           run_captured)                         # (tests/ on sys.path)

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / nb if nb > 0 else np.linalg.norm(a - b)


def to_np(x):
    return x.detach().double().cpu().numpy()


def rand(gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cuda").to(
        getattr(torch, dtype))


MLA_CASES = [  # B, L, H, Dc, Dr, g, w, n, score, rep_bias
    (1, 97, 16, 512, 64, 16, 32, None, "full", 0.0),
    (2, 77, 4, 256, 32, 8, 20, 3, "latent", 0.5),
    (1, 65, 128, 512, 64, 16, 16, None, "full", 0.0),
    (2, 70, 1, 256, 32, 4, 0, 1, "full", 0.0),           # window 0, n = 1
    (1, 61, 2, 40, 0, 4, 7, 2, "latent", 0.0),           # no positional key
    (1, 50, 3, 48, 16, 1, 9, None, "full", -0.3),        # group of one
    (1, 45, 5, 64, 16, 4, 10**6, None, "full", 0.0),     # window >= L: exact causal MLA
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_backward(case, dtype):
    B, L, H, Dc, Dr, g, w, n, score, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    dout = rand(gen, (B, L, H, Dc), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    got = lca.attention_backward(dout, q, c, r, out, lse, **kw)
    args64 = [to_np(x) for x in (q, c, r)]
    out64, lse64 = lca.attention(*args64, return_lse=True, **kw)
    ref = lca.attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = None if dtype == "float32" else naive_grads(mla_lca, (q, c, r), dout, kw)
    check_grads(got, ref, naive, dtype, ["dq", "dlatent", "dkpos"], f"mla {case}")


GQA_CASES = [  # B, L, H, Hkv, D, Dv, g, w, n, key_mode, rep_bias
    (1, 200, 32, 8, 128, 128, 16, 48, None, "anchor", 0.0),
    (2, 97, 8, 1, 64, 64, 4, 10, 2, "pool", 0.0),
    (1, 129, 4, 4, 256, 256, 16, 32, None, "pool", 0.0),
    (1, 150, 16, 16, 192, 128, 16, 40, None, "anchor", 0.0),   # non-absorbed MLA shape
    (1, 301, 4, 2, 192, 128, 8, 64, 3, "pool", 0.7),           # rep_bias, several key blocks
    (2, 171, 6, 2, 128, 128, 16, 0, 7, "anchor", 0.0),          # 3 heads per kv head, window 0
    (1, 1025, 2, 1, 59, 37, 16, 100, 5, "anchor", 0.0),        # odd widths
    (3, 33, 2, 2, 128, 128, 4, 8, 1, "pool", 0.0),             # B = 3, n = 1
    (1, 90, 4, 4, 64, 64, 8, 10**6, None, "anchor", 0.0),      # window >= L: exact causal
    (1, 2100, 2, 1, 128, 128, 8, 64, None, "anchor", 0.25),    # > 128 condensed entries
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_backward(case, dtype):
    B, L, H, Hkv, D, Dv, g, w, n, km, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    dout = rand(gen, (B, L, H, Dv), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    got = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    args64 = [to_np(x) for x in (q, k, v)]
    out64, lse64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = None if dtype == "float32" else naive_grads(gqa_lca, (q, k, v), dout, kw)
    check_grads(got, ref, naive, dtype, ["dq", "dk", "dv"], f"gqa {case}")


@pytest.mark.parametrize("kind", ["gqa-bf16-192", "gqa-fp16-64", "mla-fp32", "gqa-fp32"])
def test_backward_is_deterministic(kind):
    """Two runs on the same inputs give bit-identical gradients (no atomics)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    if kind.startswith("mla"):
        q, c, r = rand(gen, (2, 300, 8, 576), "float32"), rand(gen, (2, 300, 512), "float32"), \
            rand(gen, (2, 300, 64), "float32")
        dout = rand(gen, (2, 300, 8, 512), "float32")
        kw = dict(group_size=16, window=64)
        out, lse = lca.attention(q, c, r, return_lse=True, **kw)
        runs = [lca.attention_backward(dout, q, c, r, out, lse, **kw) for _ in range(2)]
    else:
        dt = {"gqa-bf16-192": "bfloat16", "gqa-fp16-64": "float16", "gqa-fp32": "float32"}[kind]
        D, Dv = (192, 128) if "192" in kind else (64, 64)
        q, k, v = rand(gen, (1, 777, 8, D), dt), rand(gen, (1, 777, 4, D), dt), \
            rand(gen, (1, 777, 4, Dv), dt)
        dout = rand(gen, (1, 777, 8, Dv), dt)
        kw = dict(group_size=8, window=100, key_mode="pool")
        out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
        runs = [lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.isfinite(a.float()).all()
        assert torch.equal(a, b)


HANDED_CASES = [  # kind, dtype, B, L, H, Hkv, D, Dv, g, w, mode
    ("gqa", "bfloat16", 1, 517, 4, 4, 192, 128, 16, 64, "anchor"),   # wgmma kernels, folds
    ("gqa", "float16", 2, 300, 8, 2, 192, 128, 16, 40, "pool"),
    ("gqa", "bfloat16", 1, 201, 4, 2, 64, 64, 8, 30, "anchor"),
    ("gqa", "float32", 2, 99, 4, 2, 40, 24, 4, 9, "pool"),           # SIMT kernels
    ("mla", "bfloat16", 1, 300, 8, 1, 576, 512, 16, 64, "full"),
    ("mla", "float32", 2, 77, 4, 1, 96, 64, 8, 20, "latent"),
]


def _handed_run(case, gen):
    kind, dt, B, L, H, Hkv, D, Dv, g, w, mode = case
    if kind == "gqa":
        args = (rand(gen, (B, L, H, D), dt), rand(gen, (B, L, Hkv, D), dt),
                rand(gen, (B, L, Hkv, Dv), dt))
        return args, dict(group_size=g, window=w, key_mode=mode), lca.gqa_attention, \
            lca.gqa_attention_backward
    args = (rand(gen, (B, L, H, D), dt), rand(gen, (B, L, Dv), dt), rand(gen, (B, L, D - Dv), dt))
    return args, dict(group_size=g, window=w, score=mode), lca.attention, lca.attention_backward


@pytest.mark.parametrize("case", HANDED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_handed_condensation_is_bit_identical(case, monkeypatch):
    """The backward given the forward's condensation (condensed=) skips recomputing it and
    returns the recomputing backward's gradients bit for bit; the workspace is NaN-poisoned, so
    an entry read from the workspace's (unwritten) condensation instead of the handed one
    cannot pass."""
    monkeypatch.setenv("LCA_POISON_WORKSPACE", "1")
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(case).encode()))
    args, kw, fwd, bwd = _handed_run(case, gen)
    out, lse, cond = fwd(*args, return_lse=True, return_condensed=True, **kw)
    dout = rand(gen, out.shape, case[1])
    want = bwd(dout, *args, out, lse, **kw)
    got = bwd(dout, *args, out, lse, condensed=cond, **kw)
    for a, b in zip(got, want):
        assert torch.isfinite(a.float()).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [HANDED_CASES[0], HANDED_CASES[3], HANDED_CASES[5]],
                         ids=lambda c: "-".join(map(str, c)))
def test_handed_condensation_is_used(case):
    """Handed entries other than the recomputed ones: the gradient is the CPU engine's (float64)
    on the same handed entries, which recomputes only the pooling weights (the same as the
    handed ones); and handed pooling weights (alpha, anchor) other than the forward's change
    the gradient too, so the GPU reads them rather than recomputing them."""
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(case).encode()) + 1)
    args, kw, fwd, bwd = _handed_run(case, gen)
    out, lse, cond = fwd(*args, return_lse=True, return_condensed=True, **kw)
    dout = rand(gen, out.shape, case[1])
    moved = (cond[0] * 1.5, cond[1] - 0.25, cond[2], cond[3])
    got = bwd(dout, *args, out, lse, condensed=moved, **kw)
    plain = bwd(dout, *args, out, lse, **kw)
    args64 = [to_np(x) for x in args]
    out64, lse64 = fwd(*args64, return_lse=True, **kw)
    moved64 = (to_np(moved[0]), to_np(moved[1]), moved[2].cpu().numpy(), to_np(moved[3]))
    ref = bwd(to_np(dout), *args64, out64, lse64, condensed=moved64, **kw)
    tol = 1e-4 if case[1] == "float32" else 3e-2
    for a, b in zip(got, ref):
        assert rel(to_np(a), b) <= tol
    assert rel(to_np(plain[0]), ref[0]) > 3 * tol        # (the move is seen)
    alpha = cond[3].flip(-1).contiguous()                # other weights, same entries
    anchor = (cond[2] + 1) % kw["group_size"]
    got_w = bwd(dout, *args, out, lse, condensed=(cond[0], cond[1], anchor, alpha), **kw)
    assert max(rel(to_np(a), to_np(b)) for a, b in zip(got_w, plain)) > 3 * tol


def test_handed_condensation_errors():
    gen = torch.Generator(device="cuda").manual_seed(11)
    args, kw, fwd, bwd = _handed_run(HANDED_CASES[2], gen)
    out, lse, (kbar, vbar, anchor, alpha) = fwd(*args, return_lse=True, return_condensed=True,
                                                **kw)
    dout = torch.randn_like(out)
    bad = [
        (TypeError, r"condensed\[0\]: expected a CUDA array", (kbar.cpu(), vbar, anchor, alpha)),
        (TypeError, r"condensed\[2\] \(anchor\): expected int32", (kbar, vbar, anchor.long(),
                                                                     alpha)),
        (TypeError, r"condensed\[1\]: dtype", (kbar, vbar.half(), anchor, alpha)),
        (ValueError, r"condensed\[3\]: entries is", (kbar, vbar, anchor, alpha[:, 1:])),
    ]
    for exc, msg, given in bad:
        with pytest.raises(exc, match=msg):
            bwd(dout, *args, out, lse, condensed=given, **kw)
    # a strided alpha or anchor is taken (made contiguous on the way in)
    wide = torch.zeros(alpha.shape[:-1] + (2 * alpha.shape[-1],), device="cuda")
    wide[..., ::2] = alpha
    got = bwd(dout, *args, out, lse, condensed=(kbar, vbar, anchor, wide[..., ::2]), **kw)
    for a, b in zip(got, bwd(dout, *args, out, lse, **kw)):
        assert torch.equal(a, b)


def test_unbatched_strided_and_unaligned_views():
    """Unbatched inputs and rows that are not 16-byte aligned (off the tensor-core path): both
    the strided and the contiguous call held to SPEC §8 against the float64 CPU gradients."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    big = rand(gen, (120, 4, 129), "bfloat16")
    q = big[..., 1:]                                   # last dim contiguous, rows misaligned
    k, v = rand(gen, (120, 2, 128), "bfloat16"), rand(gen, (120, 2, 128), "bfloat16")
    dout = rand(gen, (120, 4, 128), "bfloat16")
    kw = dict(group_size=8, window=24)
    out, lse = lca.gqa_attention(q.contiguous(), k, v, return_lse=True, **kw)
    a = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    b = lca.gqa_attention_backward(dout, q.contiguous(), k, v, out, lse, **kw)
    assert a[0].shape == (120, 4, 128)
    args64 = [to_np(x) for x in (q, k, v)]
    out64, lse64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = naive_grads(gqa_lca, [x[None] for x in (q, k, v)], dout[None], kw)
    naive = [x[0] for x in naive]
    for got, what in ((a, "strided"), (b, "contiguous")):
        check_grads(got, ref, naive, "bfloat16", ["dq", "dk", "dv"], what)


def test_runs_on_the_callers_stream():
    """Captured in a CUDA graph (torch.cuda.graph: its own stream, global capture mode), the
    backward must be recorded on the caller's stream: a launch on another stream, a device-wide
    synchronisation or a host round trip fails the capture or leaves the poisoned results."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout = (rand(gen, (1, 300, 8, 64), "bfloat16") for _ in range(4))
    kw = dict(group_size=16, window=32)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    got = run_captured(lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_cupy_backward():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 100, 4, 32), dtype=np.float32) for _ in range(4))
    kw = dict(group_size=8, window=20)
    dq = [cp.asarray(x) for x in (q, k, v)]
    out, lse = lca.gqa_attention(*dq, return_lse=True, **kw)
    got = lca.gqa_attention_backward(cp.asarray(dout), *dq, out, lse, **kw)
    args64 = [x.astype(np.float64) for x in (q, k, v)]
    o64, l64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(dout.astype(np.float64), *args64, o64, l64, **kw)
    for a, b in zip(got, ref):
        assert isinstance(a, cp.ndarray) and a.dtype == cp.float32
        assert rel(cp.asnumpy(a), b) <= 1e-5


def test_backward_errors():
    q = torch.randn(1, 40, 2, 16, device="cuda")
    k = torch.randn(1, 40, 2, 16, device="cuda")
    lse = torch.zeros(1, 2, 40, device="cuda")
    with pytest.raises(ValueError, match="lse"):
        lca.gqa_attention_backward(q, q, k, k, q, lse[..., :39])
    with pytest.raises(TypeError, match="dout"):
        lca.gqa_attention_backward(q.half(), q, k, k, q, lse)
    with pytest.raises(TypeError, match="lse"):
        lca.gqa_attention_backward(q, q, k, k, q, lse.cpu())
    with pytest.raises(ValueError, match="out"):
        lca.gqa_attention_backward(q, q, k, k, q[:, :39], lse)
    big = torch.randn(1, 8, 1, 1100, device="cuda")
    with pytest.raises(NotImplementedError, match="1024"):
        lca.gqa_attention_backward(big, big, big, big, big, torch.zeros(1, 1, 8, device="cuda"),
                                   group_size=4, window=4)


@pytest.mark.parametrize("case", [
    ("gqa", 2, 300, 8, 2, 192, 128, 16, 40, None, "pool"),
    ("gqa", 1, 257, 4, 4, 128, 128, 32, 20, 5, "anchor"),     # g = 32: every lane a score
    ("gqa", 1, 99, 6, 3, 64, 64, 1, 9, None, "pool"),         # g = 1
    ("mla", 1, 200, 4, 1, 576, 512, 16, 32, None, "latent"),  # d_score = Dc, three chunks
    ("mla", 2, 150, 2, 1, 288, 256, 8, 16, 3, "full"),
], ids=lambda c: "-".join(map(str, c)))
def test_condensation_backward_warp_and_block_agree(case, monkeypatch):
    """The condensation backward's per-group terms by the warp kernel (the default for 2-byte
    types) and by the block kernel (LCA_CUDA_DISABLE=cond_warp) on the same inputs: the same
    sums in another order, so the gradients agree to a few bf16 units in the last place (a
    wrong mask of d_pool / d_score or a missing key would differ by > 0.1)."""
    kind, B, L, H, Hkv, D, Dv, g, w, n, mode = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(case).encode()))
    if kind == "gqa":
        q, k, v = (rand(gen, (B, L, H, D), "bfloat16"), rand(gen, (B, L, Hkv, D), "bfloat16"),
                   rand(gen, (B, L, Hkv, Dv), "bfloat16"))
        dout = rand(gen, (B, L, H, Dv), "bfloat16")
        kw = dict(group_size=g, window=w, n_summary=n, key_mode=mode)
        out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
        run = lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)  # noqa: E731
    else:
        q, c, r = (rand(gen, (B, L, H, D), "bfloat16"), rand(gen, (B, L, Dv), "bfloat16"),
                   rand(gen, (B, L, D - Dv), "bfloat16"))
        dout = rand(gen, (B, L, H, Dv), "bfloat16")
        kw = dict(group_size=g, window=w, n_summary=n, score=mode)
        out, lse = lca.attention(q, c, r, return_lse=True, **kw)
        run = lambda: lca.attention_backward(dout, q, c, r, out, lse, **kw)  # noqa: E731
    warp = run()
    monkeypatch.setenv("LCA_CUDA_DISABLE", "cond_warp")
    block = run()
    for a, b in zip(warp, block):
        assert torch.isfinite(a.float()).all()
        assert rel(to_np(a), to_np(b)) <= 1e-2


# The route below computes the same float operations on the same values in another kernel, so its
# results must be equal bit for bit (torch.equal); the float32 scratch is NaN-poisoned too
# (LCA_POISON_WORKSPACE) so that a row a route leaves unwritten, or a term read before it is made,
# cannot pass.

FINISH_CASES = [  # kind, B, L, H, Hkv, D, Dv, g, w, n, mode
    ("gqa", 2, 301, 8, 2, 192, 128, 16, 40, None, "pool"),    # dk 2 chunks a lane, dv 1
    ("gqa", 1, 257, 4, 4, 128, 128, 8, 20, 3, "anchor"),      # d_pool 0: the anchor path
    ("gqa", 3, 99, 6, 3, 64, 64, 4, 9, 1, "pool"),            # half a warp's lanes a row
    ("gqa", 1, 129, 4, 4, 256, 256, 16, 32, None, "pool"),    # 2 chunks each
    ("gqa", 1, 150, 2, 1, 60, 36, 4, 16, 2, "anchor"),        # widths 4 k, not 8 k
    ("gqa", 1, 120, 2, 1, 59, 37, 4, 16, None, "pool"),       # odd widths: the block kernel
    ("mla", 1, 200, 4, 1, 576, 512, 16, 32, None, "latent"),  # v in k, dk 5 of 8 chunks
    ("mla", 2, 150, 2, 1, 288, 256, 8, 16, 3, "full"),        # d_score > d_pool
]


def finish_case(case, dtype, gen):
    """The whole backward, attend's and the condensation's alone on one case (the three callers
    of the conversion: terms on the groups' rows, none, and on zero base gradients)."""
    kind, B, L, H, Hkv, D, Dv, g, w, n, mode = case
    if kind == "gqa":
        x = (rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype),
             rand(gen, (B, L, Hkv, Dv), dtype))
        ckw = dict(group_size=g, n_summary=n, key_mode=mode)
        fwd, cond, att = lca.gqa_attention, lca.gqa_condense, lca.gqa_attend
        bwd, att_bwd, cond_bwd = (lca.gqa_attention_backward, lca.gqa_attend_backward,
                                  lca.gqa_condense_backward)
    else:
        x = (rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Dv), dtype),
             rand(gen, (B, L, D - Dv), dtype))
        ckw = dict(group_size=g, n_summary=n, score=mode)
        fwd, cond, att = lca.attention, lca.condense, lca.attend
        bwd, att_bwd, cond_bwd = lca.attention_backward, lca.attend_backward, lca.condense_backward
    dout = rand(gen, (B, L, H, Dv), dtype)
    kw = dict(ckw, window=w)
    out, lse = fwd(*x, return_lse=True, **kw)
    ent = cond(*x, **ckw)[:2]                          # the condensed entries (kbar, vbar)
    akw = dict(group_size=g, window=w)
    aout, alse = att(*x, *ent, return_lse=True, **akw)
    dent = [rand(gen, e.shape, dtype) for e in ent]
    return lambda: (bwd(dout, *x, out, lse, **kw) + att_bwd(dout, *x, *ent, aout, alse, **akw) +
                    cond_bwd(*dent, *x, **ckw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FINISH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conversion_kernels_agree(case, dtype, monkeypatch):
    """The float32 gradients into the caller's dtype with the condensation's terms by the
    vector kernel (bwd_finish_vec_kernel, rows on 4 elements, widths 4 k) and by the block
    kernel (LCA_CUDA_DISABLE=finish_vec): the same operations on every element, so every
    gradient of the three backward calls is bit-identical."""
    monkeypatch.setenv("LCA_POISON_WORKSPACE", "1")
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(("finish", case,
                                                                      dtype)).encode()))
    run = finish_case(case, dtype, gen)
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)
    vec = run()
    monkeypatch.setenv("LCA_CUDA_DISABLE", "finish_vec")
    block = run()
    assert len(vec) == len(block)
    for i, (a, b) in enumerate(zip(vec, block)):
        assert torch.isfinite(a.float()).all(), f"gradient {i}: unwritten elements"
        assert torch.equal(a, b), f"gradient {i}: the vector conversion differs"
