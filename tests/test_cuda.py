"""GPU tests of the CUDA forward (condensation + attention), skipped without a CUDA device.

Every output is compared with the CPU engine in float64 on the same (rounded) inputs; outputs
are poisoned with NaN before each launch (LCA_POISON_OUTPUTS) so an unwritten element fails.
SPEC §8: float32 within 1e-5; bf16 and fp16 at most twice the error of the same computation in
plain PyTorch at that precision (tests/torch_lca.py)."""

import zlib

import numpy as np
import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from torch_lca import gqa_lca, mla_lca, rand, rel, run_captured, to_np  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")


def check(got, ref64, naive, dtype, what):
    """got and naive are device tensors; ref64 a float64 NumPy array."""
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite (unwritten) elements"
    err = rel(to_np(got), ref64)
    if dtype == "float32":
        assert err <= 1e-5, f"{what}: float32 error {err:.2e}"
    else:
        bound = 2 * rel(to_np(naive), ref64)
        assert err <= max(bound, 1e-3), f"{what}: {dtype} error {err:.2e} > 2x naive {bound:.2e}"
    return err


MLA_CASES = [  # B, L, H, Dc, Dr, g, w, n, score, rep_bias
    (1, 257, 16, 512, 64, 16, 64, None, "full", 0.0),
    (2, 97, 4, 256, 32, 8, 20, 3, "latent", 0.5),
    (1, 130, 128, 512, 64, 16, 32, None, "full", 0.0),
    (1, 61, 1, 40, 0, 4, 0, 1, "full", 0.0),
    (2, 77, 3, 48, 16, 1, 9, None, "full", -0.3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_forward(case, dtype):
    B, L, H, Dc, Dr, g, w, n, score, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert isinstance(out, torch.Tensor) and out.device == q.device and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
    ref, ref_lse = lca.attention(to_np(q), to_np(c), to_np(r), return_lse=True, **kw)
    naive, _ = mla_lca(q, c, r, **kw)
    check(out, ref, naive, dtype, "out")
    assert rel(to_np(lse), ref_lse) <= (1e-6 if dtype == "float32" else 1e-2)
    # condensation alone: the anchors agree with float64 except at near-ties
    cb, rb, anchor, alpha = lca.condense(q, c, r, group_size=g, n_summary=n, score=score)
    rcb, rrb, ranchor, ralpha = lca.condense(to_np(q), to_np(c), to_np(r), group_size=g,
                                             n_summary=n, score=score)
    assert anchor.dtype == torch.int32 and alpha.dtype == torch.float32
    agree = (anchor.cpu().numpy() == ranchor).mean() if ranchor.size else 1.0
    assert agree >= (1.0 if dtype == "float32" else 0.9)
    assert rel(to_np(alpha), ralpha) <= (1e-5 if dtype == "float32" else 5e-2)


GQA_CASES = [  # B, L, H, Hkv, D, Dv, g, w, n, key_mode
    (1, 200, 32, 8, 128, 128, 16, 48, None, "anchor"),
    (2, 97, 8, 1, 64, 64, 4, 10, 2, "pool"),
    (1, 129, 4, 4, 256, 256, 16, 32, None, "pool"),
    (1, 150, 16, 16, 192, 128, 16, 40, None, "anchor"),   # non-absorbed MLA shape
    (1, 1025, 2, 1, 59, 37, 16, 100, 5, "anchor"),
    (1, 70, 128, 1, 64, 64, 8, 16, None, "pool"),        # 128 heads per kv head: 2 blocks/row
    (2, 171, 6, 2, 128, 128, 16, 0, 7, "anchor"),         # 3 heads per kv head, window 0
    # long enough for fully visible key blocks (the unmasked fast path) in both segments
    (1, 2000, 16, 16, 192, 128, 16, 300, None, "anchor"),
    (2, 1300, 8, 2, 128, 128, 16, 256, None, "pool"),
    (1, 900, 4, 4, 64, 64, 8, 128, 3, "anchor"),
]
# "default" runs the tensor-core kernel where the shape has one and the warp-per-group
# condensation where the widths allow it, "simt" the CUDA-core kernel and the block-per-group
# condensation on the same cases (LCA_CUDA_DISABLE=mma,cond_warp).
PATHS = {"default": "", "simt": "mma,cond_warp"}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_forward(case, dtype, path, monkeypatch):
    if PATHS[path]:
        monkeypatch.setenv("LCA_CUDA_DISABLE", PATHS[path])
    B, L, H, Hkv, D, Dv, g, w, n, km = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, Dv), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km)
    out = lca.gqa_attention(q, k, v, **kw)
    ref = lca.gqa_attention(to_np(q), to_np(k), to_np(v), **kw)
    naive, _ = gqa_lca(q, k, v, **kw)
    check(out, ref, naive, dtype, "out")


COND_CASES = [  # kind, B, L, H, width(s), g, n, mode
    ("mla", 2, 160, 4, (60, 4), 16, None, "full"),     # d_pool = 60 inside an 8-column chunk
    ("mla", 1, 257, 16, (512, 64), 32, 5, "latent"),   # g = 32: the warp kernel's largest group
    ("mla", 1, 99, 2, (64, 0), 33, None, "full"),      # g = 33: the block kernel both ways
    ("gqa", 2, 200, 8, (192, 128), 16, None, "pool"),  # non-absorbed MLA, 4 heads a kv head
    ("gqa", 1, 300, 2, (128, 64), 32, 7, "anchor"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", COND_CASES, ids=lambda c: "-".join(map(str, c)))
def test_warp_and_block_condensation_agree(case, dtype, monkeypatch):
    """condense.cu's warp-per-group kernel (the default for these widths) against its
    block-per-group kernel (LCA_CUDA_DISABLE=cond_warp): the same anchors except at near-ties
    (where the two alphas must be equal to float32 rounding), alphas to float32 rounding, and
    the condensed rows to one rounding of the element type where the anchors agree."""
    kind, B, L, H, widths, g, n, mode = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    if kind == "mla":
        Dc, Dr = widths
        q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
            rand(gen, (B, L, Dr), dtype)
        call = lambda: lca.condense(q, c, r, group_size=g, n_summary=n, score=mode)  # noqa: E731
    else:
        D, Dv = widths
        q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, 2, D), dtype), \
            rand(gen, (B, L, 2, Dv), dtype)
        call = lambda: lca.gqa_condense(q, k, v, group_size=g, n_summary=n,  # noqa: E731
                                        key_mode=mode)
    warp = [t.clone() for t in call()]
    monkeypatch.setenv("LCA_CUDA_DISABLE", "cond_warp")
    block = call()
    a_w, a_b = warp[2].long(), block[2].long()
    al_w, al_b = warp[3].double(), block[3].double()
    assert torch.isfinite(al_w).all() and torch.isfinite(warp[0].float()).all()
    assert (al_w - al_b).abs().max().item() <= 1e-5
    differ = a_w != a_b
    assert differ.float().mean().item() <= 0.01
    if differ.any():                                  # near-ties: both anchors' weights equal
        pw = al_w.gather(-1, a_w[..., None])[..., 0][differ]
        pb = al_w.gather(-1, a_b[..., None])[..., 0][differ]
        assert (pw - pb).abs().max().item() <= 1e-5
    same = ~differ
    for got, want in zip(warp[:2], block[:2]):        # kbar / latent_bar, vbar / kpos_bar
        if got.shape[-1] == 0:
            continue
        gs, ws = got.float()[same], want.float()[same]
        tol = 8e-3 if dtype == "bfloat16" else 1e-3
        assert (gs - ws).abs().max().item() <= tol * (1 + ws.abs().max().item())


def test_unaligned_views_fall_back_and_agree():
    """Rows not 16-byte aligned leave the tensor-core path; the answer must not change."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    big = rand(gen, (1, 120, 4, 129), "bfloat16")
    q = big[..., 1:]                                   # last dim contiguous, rows misaligned
    k, v = rand(gen, (1, 120, 2, 128), "bfloat16"), rand(gen, (1, 120, 2, 128), "bfloat16")
    got = lca.gqa_attention(q, k, v, group_size=8, window=24)
    ref = lca.gqa_attention(q.contiguous(), k, v, group_size=8, window=24)
    assert rel(to_np(got), to_np(ref)) <= 1e-2


def test_unbatched_attend_and_window_exact():
    gen = torch.Generator(device="cuda").manual_seed(7)
    L, H, Dc, Dr = 90, 4, 64, 16
    q, c, r = (rand(gen, s, "float32") for s in ((L, H, Dc + Dr), (L, Dc), (L, Dr)))
    cb, rb, _, _ = lca.condense(q, c, r, group_size=8)
    a = lca.attend(q, c, r, cb, rb, group_size=8, window=16)
    b = lca.attention(q, c, r, group_size=8, window=16)
    assert a.shape == (L, H, Dc) and rel(to_np(a), to_np(b)) <= 1e-6
    exact = lca.attention(q, c, r, group_size=8, window=10**9)
    ref = lca.attention(to_np(q), to_np(c), to_np(r), group_size=8, window=L)
    assert rel(to_np(exact), ref) <= 1e-5


def test_runs_on_the_callers_stream():
    """Recorded on the caller's stream with no synchronisation (tests/torch_lca.run_captured)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (rand(gen, (1, 300, 8, 64), "bfloat16") for _ in range(3))
    ref = lca.gqa_attention(q, k, v, group_size=16, window=32)
    out = run_captured(lambda: lca.gqa_attention(q, k, v, group_size=16, window=32))
    assert torch.equal(out, ref)
    c, r = rand(gen, (1, 300, 576), "bfloat16").split([512, 64], -1)
    qm = rand(gen, (1, 300, 16, 576), "bfloat16")
    ref = lca.attention(qm, c, r, group_size=16, window=32, return_lse=True)
    got = run_captured(lambda: lca.attention(qm, c, r, group_size=16, window=32,
                                             return_lse=True))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_cupy_intake():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 100, 4, 32), dtype=np.float32) for _ in range(3))
    out = lca.gqa_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), group_size=8, window=20)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float32
    ref = lca.gqa_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                            group_size=8, window=20)
    assert rel(cp.asnumpy(out), ref) <= 1e-5


def test_cuda_errors():
    q = torch.randn(1, 40, 2, 16, device="cuda")
    k = torch.randn(1, 40, 2, 16, device="cuda")
    with pytest.raises(TypeError, match="k"):
        lca.gqa_attention(q, k.cpu(), k)
    with pytest.raises(TypeError, match="v"):
        lca.gqa_attention(q, k, k.double())
    with pytest.raises(ValueError, match="lse"):         # backward: see test_cuda_bwd.py
        lca.gqa_attention_backward(q, q, k, k, q, torch.zeros(1, 2, 39, device="cuda"))
    big = torch.randn(1, 8, 1, 1100, device="cuda")
    with pytest.raises(NotImplementedError, match="1024"):
        lca.gqa_attention(big, big, big, group_size=4, window=4)


def test_cuda_failure_is_a_runtime_error_and_the_process_goes_on():
    """A failing CUDA call (here: a device that does not exist) raises RuntimeError naming the
    call, and the next call works."""
    from lca import _C, _cuda
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    fe = _cuda.frontend(q)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, 16, device="cuda")
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        _C.cuda_attend(_cuda.BF16, fe.desc(q), fe.desc(q), fe.desc(q), fe.desc(q), fe.desc(q),
                       fe.desc(out), fe.desc(lse), 4, 4, 0.125, 0.0, 0, 4096, fe.stream())
    ref = lca.gqa_attention(q.double().cpu().numpy(), q.double().cpu().numpy(),
                            q.double().cpu().numpy(), group_size=4, window=4)
    got = lca.gqa_attention(q, q, q, group_size=4, window=4)
    assert rel(to_np(got), ref) <= 1e-2
