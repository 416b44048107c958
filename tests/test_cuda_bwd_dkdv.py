"""GPU tests of the Hopper dk/dv kernel (csrc/cuda/attend_bwd_dkdv_sm90a.cu), skipped without a
CUDA device.  On a compute 9.0 device gqa_attention_backward takes it for bf16/fp16 heads
(192, 128) and (128, 128) whenever H / Hkv divides 64; LCA_CUDA_DISABLE=wgmma takes the
mma.sync kernel instead.  Each case is held to SPEC §8 against the float64 CPU gradients
(check_grads: twice plain PyTorch's error at that precision) and compared with the mma.sync
kernel's dk, dv on the same inputs.

The two kernels sum the same products in float32, in a different order inside a row tile, and
at D = 192 the wgmma kernel takes dS from P rounded to the input type (its registers cannot
hold P in float32 beside dP): their dk, dv differ by a few units of the output type's last
place.  1e-2 relative is ~3 bf16 ulps, two orders of magnitude below a wrong mask, a missing
row tile or a swapped operand (each > 0.1)."""
import zlib

import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from torch_lca import check_grads, gqa_lca, naive_grads, rand, rel, to_np  # noqa: E402


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")


CASES = [  # B, L, H, Hkv, D, g, w, n, key_mode, rep_bias
    (1, 150, 16, 16, 192, 16, 40, None, "anchor", 0.0),       # SPEC §9's heads, one key block
    (2, 301, 4, 2, 192, 8, 64, 3, "pool", 0.7),               # hg 2, rep_bias, B = 2
    (1, 1000, 8, 2, 128, 4, 100, None, "anchor", -0.4),       # hg 4, 225 condensed: 2 blocks
    (1, 777, 8, 8, 128, 16, 0, 2, "pool", 0.0),               # window 0
    (2, 129, 64, 1, 192, 8, 16, None, "anchor", 0.0),         # hg 64: one position a tile
    (1, 263, 32, 4, 128, 1, 9, None, "pool", 0.0),            # hg 8, group of one
    (1, 200, 2, 2, 192, 16, 10**6, None, "anchor", 0.0),      # window >= L: exact causal
    (3, 65, 2, 1, 128, 32, 5, 1, "anchor", 0.3),              # B = 3, n = 1, g = 32
    (1, 2, 4, 4, 192, 16, 8, None, "anchor", 0.0),            # L = 2 (L = 1: dq is exactly 0)
    (1, 2050, 2, 2, 192, 16, 1024, None, "anchor", 0.0),      # SPEC §9's g, w: 16 tiles a block
    (1, 517, 8, 2, 192, 16, 64, 5, "pool", 0.2),              # hg 4 with the folds (g 16, n 5)
]


def run_case(case, dtype, monkeypatch, views=None):
    B, L, H, Hkv, D, g, w, n, km, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, k, v = (rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype),
               rand(gen, (B, L, Hkv, 128), dtype))
    dout = rand(gen, (B, L, H, 128), dtype)
    if views is not None:
        q, k, v, dout = views(q, k, v, dout)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    got = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    monkeypatch.setenv("LCA_CUDA_DISABLE", "wgmma")
    mma = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    monkeypatch.delenv("LCA_CUDA_DISABLE")
    return (q, k, v, dout), kw, got, mma


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dkdv_against_reference_and_mma(case, dtype, monkeypatch):
    (q, k, v, dout), kw, got, mma = run_case(case, dtype, monkeypatch)
    args64 = [to_np(x) for x in (q, k, v)]
    out64, lse64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = naive_grads(gqa_lca, (q, k, v), dout, kw)
    check_grads(got, ref, naive, dtype, ["dq", "dk", "dv"], f"dkdv {case}")
    for a, b, nm in zip(got[1:], mma[1:], ["dk", "dv"]):
        err = rel(to_np(a), to_np(b))
        assert err <= 1e-2, f"{nm}: wgmma vs mma.sync {err:.2e}"


def test_strided_views_reach_the_tensor_maps(monkeypatch):
    """q and dout as column slices of wider tensors, k, v with kv heads strided apart: the 5-d
    and 4-d tensor maps take the views' strides (a wrong stride reads other rows)."""
    def views(q, k, v, dout):
        def widen(x, extra):
            wide = torch.zeros(*x.shape[:-1], x.shape[-1] + extra, dtype=x.dtype, device=x.device)
            wide[..., 8:8 + x.shape[-1]] = x
            return wide[..., 8:8 + x.shape[-1]]
        return widen(q, 64), widen(k, 16), widen(v, 8), widen(dout, 72)
    case = (2, 333, 8, 2, 192, 8, 48, None, "pool", 0.0)
    (q, k, v, dout), kw, got, mma = run_case(case, "bfloat16", monkeypatch, views)
    assert q.stride(2) == 192 + 64
    args64 = [to_np(x) for x in (q, k, v)]
    out64, lse64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = naive_grads(gqa_lca, (q, k, v), dout, kw)
    check_grads(got, ref, naive, "bfloat16", ["dq", "dk", "dv"], "strided")
    for a, b in zip(got[1:], mma[1:]):
        assert rel(to_np(a), to_np(b)) <= 1e-2


@pytest.mark.parametrize("D", [192, 128])
def test_rows_past_the_range_never_reach_dk_dv(D):
    """The keys of exact block 0 (tokens 0-127; group 16, window 64) are seen by positions up
    to 190 only: with 2 heads a kv head, rows 0-381 of the flattened space, so the block's last
    row tile (rows 320-383) ends with two rows past its range, which the TMA box brings anyway.
    Positions from 191 on hold Inf in q and dout: those rows must be zeroed before the
    products, so the block's dk, dv (the attend part alone, condensed entries given, so no
    condensation term reaches the keys) equal, bit for bit, those of finite inputs."""
    gen = torch.Generator(device="cuda").manual_seed(D)
    B, L, H, Hkv = 1, 400, 4, 2
    q, k, v = (rand(gen, (B, L, H, D), "bfloat16"), rand(gen, (B, L, Hkv, D), "bfloat16"),
               rand(gen, (B, L, Hkv, 128), "bfloat16"))
    dout = rand(gen, (B, L, H, 128), "bfloat16")
    kw = dict(group_size=16, window=64)
    kbar, vbar = lca.gqa_condense(q, k, v, group_size=16)[:2]
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    base = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)
    q2, d2 = q.clone(), dout.clone()
    q2[:, 191:] = float("inf")
    d2[:, 191:] = float("inf")
    got = lca.gqa_attend_backward(d2, q2, k, v, kbar, vbar, out, lse, **kw)
    for a, b, nm in zip(got[1:3], base[1:3], ["dk", "dv"]):
        assert torch.isfinite(b.float()).all()
        assert torch.equal(a[:, :128], b[:, :128]), nm
        assert not torch.isfinite(a[:, 128:].float()).all(), nm     # the Inf rows do reach these


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_folded_epilogues_are_bit_identical(case, dtype, monkeypatch):
    """The whole backward on Hopper (groups of 16 or more) runs the condensed entries' dk/dv
    blocks, the condensation's backward, then the exact tokens' blocks and the dq kernel, whose
    epilogues write the final dk, dv and dq in the input dtype with the condensation's terms
    (_C.cuda_last_bwd_folded() 3; LCA_CUDA_DISABLE=dq_fold leaves dq to the conversion: 1).
    They perform the float operations of the float32 route through the workspace and the
    conversion kernel (LCA_CUDA_DISABLE=dkdv_fold: 0) in the same order, so every gradient is
    equal bit for bit; the scratch and the outputs are NaN-poisoned, so an element a fold leaves
    unwritten, or a term read before it is made, cannot pass."""
    from lca import _C
    monkeypatch.setenv("LCA_POISON_WORKSPACE", "1")
    B, L, H, Hkv, D, g, w, n, km, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(("fold", case, dtype))
                                                                .encode()))
    q, k, v = (rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype),
               rand(gen, (B, L, Hkv, 128), dtype))
    dout = rand(gen, (B, L, H, 128), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    folds = torch.cuda.get_device_capability() == (9, 0) and g >= 16   # the terms' staging
    grads = {}
    for off, want in [("", 3), ("dq_fold", 1), ("dkdv_fold", 0)]:
        monkeypatch.setenv("LCA_CUDA_DISABLE", off)
        grads[off] = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
        assert _C.cuda_last_bwd_folded() == (want if folds else 0), off
    for off in ["", "dq_fold"]:
        for a, b, nm in zip(grads[off], grads["dkdv_fold"], ["dq", "dk", "dv"]):
            assert torch.isfinite(a.float()).all(), f"{nm} ({off or 'all folds'}): unwritten"
            assert torch.equal(a, b), f"{nm} ({off or 'all folds'}): differs from float32 route"
