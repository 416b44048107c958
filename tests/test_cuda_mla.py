"""GPU tests of the tensor-core absorbed-MLA forward (csrc/cuda/attend_mla.cu): (Dc, Dr) in
{(512, 64), (256, 32)}, bf16 and fp16, against the float64 CPU engine on the same (rounded)
inputs with the SPEC §8 rule (at most twice the error of the same computation in plain PyTorch
at that precision, tests/torch_lca.py).  Outputs are NaN-poisoned before launch.  Each test
also checks, through _C.cuda_last_attend_kernel(), that the call ran the tensor-core kernel and
not the SIMT fallback (which would give the same answers, slowly)."""
import zlib

import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from lca import _C                       # noqa: E402
    from torch_lca import check_forward, mla_lca, rand, rel, to_np  # noqa: E402


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    # the mma.sync kernel (attend_mla.cu) here; on compute 9.0 the default for 576/512 is the
    # wgmma kernel, tested by test_mla_wgmma_forward (and through tests/test_cuda.py)
    monkeypatch.setenv("LCA_CUDA_DISABLE", "wgmma")


CASES = [  # B, L, H, Dc, Dr, g, w, n, score, rep_bias
    (1, 257, 16, 512, 64, 16, 64, None, "full", 0.0),      # SPEC §9 head shape, 4 tokens a tile
    (2, 131, 3, 256, 32, 8, 20, 3, "latent", 0.5),         # H = 3: tiles straddle tokens
    (1, 67, 128, 512, 64, 16, 32, None, "full", -0.7),     # H = 128: two tiles a token
    (1, 523, 1, 256, 32, 4, 50, 2, "latent", 0.3),         # H = 1: 118 condensed, 2 blocks
    (2, 201, 16, 256, 32, 16, 300, None, "full", 0.0),     # w >= L: exact causal MLA
    (1, 150, 3, 512, 64, 8, 0, None, "full", 1.0),         # window 0
    (1, 1500, 16, 512, 64, 16, 200, 5, "full", 0.25),      # several condensed + exact blocks
    (3, 45, 128, 256, 32, 1, 7, None, "latent", -0.2),     # g = 1, odd everything
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_tensor_core_forward(case, dtype):
    B, L, H, Dc, Dr, g, w, n, score, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "mla", "the tensor-core MLA kernel did not run"
    assert out.shape == (B, L, H, Dc) and out.dtype == q.dtype and lse.dtype == torch.float32
    ref = lca.attention(to_np(q), to_np(c), to_np(r), return_lse=True, **kw)
    check_forward(out, lse, ref, mla_lca(q, c, r, **kw), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mla_attend_given_condensed(dtype):
    """lca.attend with condensed entries from lca.condense: the same kernel, the same answer as
    lca.attention, and against float64 on the given entries."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    B, L, H, Dc, Dr = 2, 333, 8, 512, 64
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=8)
    got = lca.attend(q, c, r, cb, rb, group_size=8, window=40, rep_bias=0.1)
    assert _C.cuda_last_attend_kernel() == "mla"
    full = lca.attention(q, c, r, group_size=8, window=40, rep_bias=0.1)
    assert torch.equal(got, full)
    ref = lca.attend(to_np(q), to_np(c), to_np(r), to_np(cb), to_np(rb), group_size=8,
                     window=40, rep_bias=0.1)
    assert rel(to_np(got), ref) <= (1e-2 if dtype == "bfloat16" else 2e-3)


def test_other_widths_and_float32_do_not_take_the_mla_kernel():
    gen = torch.Generator(device="cuda").manual_seed(9)
    q, c, r = rand(gen, (1, 40, 2, 576), "float32"), rand(gen, (1, 40, 512), "float32"), \
        rand(gen, (1, 40, 64), "float32")
    lca.attention(q, c, r, group_size=4, window=8)
    assert _C.cuda_last_attend_kernel() == "simt"
    q, c, r = (x.to(torch.bfloat16) for x in (q, c, r))
    lca.attention(q[..., 64:], c[..., 64:], r, group_size=4, window=8)       # Dc = 448
    assert _C.cuda_last_attend_kernel() == "simt"
    lca.attention(q, c, r, group_size=4, window=8)
    assert _C.cuda_last_attend_kernel() == "mla"


GQA256_CASES = [  # B, L, H, Hkv, g, w, n, key_mode
    (1, 129, 4, 4, 16, 32, None, "pool"),        # MHA
    (2, 333, 8, 1, 8, 40, 3, "anchor"),          # 8 heads a kv head, 2 condensed blocks
    (1, 97, 6, 2, 4, 0, 2, "pool"),              # 3 heads a kv head, window 0
    (1, 70, 128, 1, 8, 16, None, "anchor"),      # 128 heads a kv head: 2 tiles a position
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", GQA256_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_256_tensor_core_forward(case, dtype):
    from torch_lca import gqa_lca
    B, L, H, Hkv, g, w, n, km = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, k, v = rand(gen, (B, L, H, 256), dtype), rand(gen, (B, L, Hkv, 256), dtype), \
        rand(gen, (B, L, Hkv, 256), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "wide", "the tensor-core kernel did not run"
    ref = lca.gqa_attention(to_np(q), to_np(k), to_np(v), return_lse=True, **kw)
    check_forward(out, lse, ref, gqa_lca(q, k, v, **kw), dtype)


WGMMA_CASES = [c for c in CASES if c[3] == 512]


@pytest.mark.parametrize("variant", ["0", "1", "2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", WGMMA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_wgmma_forward(case, dtype, variant, monkeypatch):
    """The Hopper kernel (attend_mla_sm90a.cu), the default for 576/512 on a compute 9.0 device,
    with its key tiles by cp.async (LCA_MLA90_VARIANT=0), by TMA (1), and warp-specialised (2):
    the same checks;
    elsewhere the call must take the mma.sync kernel."""
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)
    monkeypatch.setenv("LCA_MLA90_VARIANT", variant)
    B, L, H, Dc, Dr, g, w, n, score, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype, "wgmma")).encode()))
    q, c, r = rand(gen, (B, L, H, Dc + Dr), dtype), rand(gen, (B, L, Dc), dtype), \
        rand(gen, (B, L, Dr), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert _C.cuda_last_attend_kernel() == ("mla_wgmma" if hopper else "mla")
    ref = lca.attention(to_np(q), to_np(c), to_np(r), return_lse=True, **kw)
    check_forward(out, lse, ref, mla_lca(q, c, r, **kw), dtype)


@pytest.mark.parametrize("variant", ["0", "1", "2"])
def test_mla_wgmma_given_entries_past_the_last_needed_are_not_read(variant, monkeypatch):
    """lca.attend takes kbar with more rows than the last query sees: rows past those must not
    reach the output (here NaN; the TMA variant's tensor map ends at the last needed row)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute 9.0")
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)
    monkeypatch.setenv("LCA_MLA90_VARIANT", variant)
    gen = torch.Generator(device="cuda").manual_seed(77)
    B, L, H, Dc, Dr, g, w = 2, 300, 16, 512, 64, 16, 40
    q, c, r = rand(gen, (B, L, H, Dc + Dr), "bfloat16"), rand(gen, (B, L, Dc), "bfloat16"), \
        rand(gen, (B, L, Dr), "bfloat16")
    cb, rb, _, _ = lca.condense(q, c, r, group_size=g)
    need = (L - w) // g
    want = lca.attend(q, c, r, cb[:, :need], rb[:, :need], group_size=g, window=w)
    pad = torch.full((B, 40, Dc), float("nan"), device="cuda", dtype=torch.bfloat16)
    cbp = torch.cat([cb[:, :need], pad], 1)
    rbp = torch.cat([rb[:, :need], pad[..., :Dr]], 1)
    got = lca.attend(q, c, r, cbp, rbp, group_size=g, window=w)
    assert _C.cuda_last_attend_kernel() == "mla_wgmma"
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["0", "1", "2"])
def test_mla_wgmma_later_non_finite_values_do_not_reach_earlier_rows(variant, monkeypatch):
    """Inf in the latent of every token from T = 64 on (a row tile's boundary: 64 rows a tile,
    16 heads, so 4 tokens a tile): rows before T never see them, so their output must be finite
    and equal to the same call on the first T tokens (the TMA variant zeroes the key rows past
    each block's end)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute 9.0")
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)
    monkeypatch.setenv("LCA_MLA90_VARIANT", variant)
    gen = torch.Generator(device="cuda").manual_seed(81)
    B, L, H, Dc, Dr, T = 1, 300, 16, 512, 64, 64
    q, c, r = rand(gen, (B, L, H, Dc + Dr), "bfloat16"), rand(gen, (B, L, Dc), "bfloat16"), \
        rand(gen, (B, L, Dr), "bfloat16")
    c[:, T:] = float("inf")
    kw = dict(group_size=16, window=32)
    out = lca.attention(q, c, r, **kw)
    assert _C.cuda_last_attend_kernel() == "mla_wgmma"
    want = lca.attention(q[:, :T], c[:, :T], r[:, :T], **kw)
    assert torch.isfinite(out[:, :T].float()).all()
    assert rel(to_np(out[:, :T]), to_np(want)) <= 1e-2
