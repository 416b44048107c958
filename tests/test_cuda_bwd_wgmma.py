"""GPU tests of the Hopper dq kernel of the backward (csrc/cuda/attend_bwd_dq_sm90a.cu: wgmma +
TMA, a producer warpgroup and two consumer warpgroups) for heads (D, Dv) = (192, 128) and
(128, 128), bf16 and fp16; skipped without a CUDA device.

Each case runs the backward twice on the same inputs: on the default route (the wgmma dq kernel
on a compute 9.0 device; _C.cuda_last_bwd_dq_kernel() says which kernel ran) and with
LCA_CUDA_DISABLE=wgmma (attend_bwd_mma.cu's mma.sync dq_kernel), and holds
  (a) dq of the two routes to each other: both sum the same products of the same bf16/fp16
      operands in float32 (S, dP, dS in float32; dS rounded once to bf16/fp16 before dQ += dS K;
      the float32 dq rounded once to the output dtype).  They can differ only where float32 sums
      taken in a different order make one of those two roundings fall the other way — one unit
      in the last place of that element, 2u relative (u = 2^-8 for bf16, 2^-11 for fp16) — so
      the relative Frobenius difference stays below 2u plus the (random-signed, averaging) effect
      of flipped dS roundings; 4u is the bound.  A wrong descriptor or row gives O(1); a mask
      off by one key changes the rows it touches by about 1 / sqrt(keys seen), which the
      Frobenius norm over all rows can dilute, so each row is held too: its difference at most
      16u of its own norm (rows whose norm is below a quarter of the rms row norm — dq nearly
      cancelling, e.g. a row that sees one key — against that floor instead).
  (b) every gradient of each route to the float64 CPU engine on the same rounded inputs with
      the SPEC §8 rule (tests/torch_lca.py check_grads: at most twice the error of the same
      gradients by plain PyTorch autograd at that precision).
Outputs are NaN-poisoned (LCA_POISON_OUTPUTS) and so is the backward's float32 scratch
(LCA_POISON_WORKSPACE), so a dq row the kernel leaves unwritten fails even where the caching
allocator would hand back the previous route's values.
"""
import zlib

import numpy as np
import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from lca import _C                                   # noqa: E402
    from torch_lca import (check_grads, gqa_attend_lca, gqa_lca, hopper, naive_grads,  # noqa: E402
                           rand, rel, to_np)

DTYPES = ["bfloat16", "float16"]
UNIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    monkeypatch.setenv("LCA_POISON_WORKSPACE", "1")
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)


def gen_for(*key):
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def check_routes(got, alt, dtype):
    """dq of the wgmma route (got) against the mma.sync route's (alt): see (a) above."""
    a, b = to_np(got), to_np(alt)
    diff = rel(a, b)
    assert diff <= 4 * UNIT[dtype], f"dq: wgmma and mma.sync differ by {diff:.2e}"
    num, den = np.linalg.norm(a - b, axis=-1), np.linalg.norm(b, axis=-1)
    if den.size:
        floor = 0.25 * np.sqrt(np.mean(den ** 2))
        worst = (num / np.maximum(den, max(floor, 1e-30))).max()
        assert worst <= 16 * UNIT[dtype], f"dq: a row differs by {worst:.2e} of its norm"


def both_routes(monkeypatch, fn):
    """fn() on the default route, then with LCA_CUDA_DISABLE=wgmma; checks which dq kernel ran
    each time and returns the two results."""
    got = fn()
    assert _C.cuda_last_bwd_dq_kernel() == ("wgmma" if hopper() else "mma")
    monkeypatch.setenv("LCA_CUDA_DISABLE", "wgmma")
    alt = fn()
    assert _C.cuda_last_bwd_dq_kernel() == "mma"
    monkeypatch.delenv("LCA_CUDA_DISABLE")
    return got, alt


CASES = [  # B, L, H, Hkv, g, w, n, key_mode, rep_bias
    (2, 2, 4, 1, 16, 64, None, "anchor", 0.0),             # 8 live rows of 128
    (2, 63, 8, 4, 4, 16, 2, "pool", 0.5),                  # 2 heads a kv head, one tile
    (2, 129, 6, 2, 8, 0, 3, "anchor", -0.3),               # 3 a kv head: tiles straddle, w = 0
    (2, 300, 8, 2, 16, 40, None, "pool", 0.25),            # 4 a kv head
    (2, 1000, 4, 4, 16, 10**6, None, "anchor", 0.0),       # w >= L: exact causal, 16 blocks
    (2, 1000, 6, 2, 4, 100, None, "anchor", 0.7),          # 225 entries: 4 condensed blocks
    (2, 300, 4, 1, 1, 0, None, "anchor", 0.4),             # g = 1, w = 0: condensed entries only
    (2, 1000, 8, 2, 8, 300, 5, "pool", -0.5),              # 4 a kv head, both segments long
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [192, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dq_wgmma(case, D, dtype, monkeypatch):
    B, L, H, Hkv, g, w, n, km, bias = case
    gen = gen_for("dq-wgmma", case, D, dtype)
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, 128), dtype)
    dout = rand(gen, (B, L, H, 128), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    got, alt = both_routes(monkeypatch,
                           lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw))
    check_routes(got[0], alt[0], dtype)
    args64 = [to_np(x) for x in (q, k, v)]
    out64, lse64 = lca.gqa_attention(*args64, return_lse=True, **kw)
    ref = lca.gqa_attention_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = naive_grads(gqa_lca, (q, k, v), dout, kw)
    for res, route in ((got, "default"), (alt, "mma")):
        check_grads(res, ref, naive, dtype, ["dq", "dk", "dv"], f"{case} D={D} {route}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [192, 128])
def test_single_position(D, dtype, monkeypatch):
    """L = 1: 4 live rows of the tile's 128, each seeing one key, so P = 1 and dS = dP - delta
    = 0 up to float32 rounding (dP and delta summed in different orders): dq and dk are
    rounding noise (no relative bound applies: the float64 gradient is exactly 0), dv = dout."""
    gen = gen_for("dq-wgmma-one", D, dtype)
    q, k, v = rand(gen, (2, 1, 4, D), dtype), rand(gen, (2, 1, 1, D), dtype), \
        rand(gen, (2, 1, 1, 128), dtype)
    dout = rand(gen, (2, 1, 4, 128), dtype)
    kw = dict(group_size=16, window=64)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    for got in both_routes(monkeypatch,
                           lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)):
        dq, dk, dv = (x.float() for x in got)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert dq.abs().max() <= 1e-3 and dk.abs().max() <= 1e-3
        assert rel(to_np(dv), to_np(dout.sum(dim=2, keepdim=True))) <= 2 * UNIT[dtype]


@pytest.mark.parametrize("D, variant", [(128, 0), (128, 1), (128, 2), (192, 0)])
def test_dq_wgmma_variants(D, variant, monkeypatch):
    """The variants LCA_DQ90_VARIANT selects (Q and/or dO from shared memory instead of
    registers; the default is 3 at D = 128, 2 at D = 192) compute the same dq."""
    if not hopper():
        pytest.skip("the variants exist only in the sm_90a kernel")
    dtype = "bfloat16"
    case = (2, 1000, 8, 2, 8, 300, 5, "pool", -0.5)
    B, L, H, Hkv, g, w, n, km, bias = case
    gen = gen_for("dq-wgmma-variant", D, variant)
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, 128), dtype)
    dout = rand(gen, (B, L, H, 128), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    base = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    monkeypatch.setenv("LCA_DQ90_VARIANT", str(variant))
    got = lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
    assert _C.cuda_last_bwd_dq_kernel() == "wgmma"
    assert torch.isfinite(got[0].float()).all()
    check_routes(got[0], base[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [192, 128])
def test_dq_wgmma_given_entries(D, dtype, monkeypatch):
    """attend_backward over given entries with more rows than any query sees (the tensor map of
    kbar stops at the rows seen; rows past it arrive as zeros)."""
    B, L, H, Hkv, g, w = 2, 700, 6, 2, 8, 64
    gen = gen_for("dq-wgmma-attend", D, dtype)
    m = lca.num_condensed(L - 1, g, w) + 9
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, 128), dtype)
    kbar, vbar = rand(gen, (B, m, Hkv, D), dtype), rand(gen, (B, m, Hkv, 128), dtype)
    dout = rand(gen, (B, L, H, 128), dtype)
    kw = dict(group_size=g, window=w, rep_bias=0.3)
    args = (q, k, v, kbar, vbar)
    out, lse = lca.gqa_attend(*args, return_lse=True, **kw)
    got, alt = both_routes(monkeypatch,
                           lambda: lca.gqa_attend_backward(dout, *args, out, lse, **kw))
    check_routes(got[0], alt[0], dtype)
    args64 = [to_np(x) for x in args]
    out64, lse64 = lca.gqa_attend(*args64, return_lse=True, **kw)
    ref = lca.gqa_attend_backward(to_np(dout), *args64, out64, lse64, **kw)
    naive = naive_grads(gqa_attend_lca, args, dout, kw)
    for res, route in ((got, "default"), (alt, "mma")):
        check_grads(res, ref, naive, dtype, ["dq", "dk", "dv", "dkbar", "dvbar"],
                    f"attend D={D} {route}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [192, 128])
@pytest.mark.parametrize("hg, P", [(2, 64), (2, 128), (4, 64), (4, 160)])
def test_inf_past_a_tile_boundary(hg, P, D, dtype, monkeypatch):
    """k, v and the condensed entries that only positions >= P see are +Inf, where P is a row
    tile boundary (a tile holds 128 / hg positions) and a multiple of 32; only rows < P carry
    gradient.  SPEC §3: dq of a row t < P depends only on the entries and tokens it sees (all
    finite), its own lse and delta; so dq[:, :P] must be finite and equal the all-finite run's —
    bit for bit, the kernels reading the same numbers.  The last key block of a tile's walk
    (exact tokens, and the condensed entries) runs past the tile's end into the Inf rows: the
    kernels must not let them reach dQ (0 x Inf).  attend_backward over given entries, so no
    condensation term (whose entries' gradients come from the Inf rows) is added to dq."""
    B, L, Hkv, g, w = 2, 300, 2, 8, 24
    H = hg * Hkv
    gen = gen_for("dq-wgmma-inf", hg, P, D, dtype)
    m = lca.num_condensed(L - 1, g, w)
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, 128), dtype)
    kbar, vbar = rand(gen, (B, m, Hkv, D), dtype), rand(gen, (B, m, Hkv, 128), dtype)
    dout = rand(gen, (B, L, H, 128), dtype)
    dout[:, P:] = 0
    kw = dict(group_size=g, window=w, rep_bias=0.2)
    out, lse = lca.gqa_attend(q, k, v, kbar, vbar, return_lse=True, **kw)
    seen = lca.num_condensed(P - 1, g, w)            # entries rows < P see
    ki, vi, kbi, vbi = k.clone(), v.clone(), kbar.clone(), vbar.clone()
    for x in (ki, vi):
        x[:, P:] = float("inf")
    for x in (kbi, vbi):
        x[:, seen:] = float("inf")
    for route in ("default", "mma"):
        if route == "mma":
            monkeypatch.setenv("LCA_CUDA_DISABLE", "wgmma")
        fin = lca.gqa_attend_backward(dout, q, k, v, kbar, vbar, out, lse, **kw)[0]
        inf = lca.gqa_attend_backward(dout, q, ki, vi, kbi, vbi, out, lse, **kw)[0]
        want = ("wgmma" if hopper() else "mma") if route == "default" else "mma"
        assert _C.cuda_last_bwd_dq_kernel() == want
        assert torch.isfinite(inf[:, :P].float()).all(), f"{route}: non-finite dq rows < {P}"
        assert torch.equal(inf[:, :P], fin[:, :P]), f"{route}: dq rows < {P} changed"


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(dtype, monkeypatch):
    """q a slice of a wider tensor, k and v slices of one fused kv tensor, dout strided (rows
    still 16-byte aligned): the tensor maps and loads read the strides."""
    gen = gen_for("dq-wgmma-strided", dtype)
    B, L, H, Hkv = 2, 500, 4, 2
    qw = rand(gen, (B, L, H, 256), dtype)
    kv = rand(gen, (B, L, Hkv, 192 + 128 + 8), dtype)
    q, k, v = qw[..., :192], kv[..., :192], kv[..., 192:320]
    dout = rand(gen, (B, L, H, 136), dtype)[..., 8:]
    kw = dict(group_size=16, window=100, key_mode="anchor", rep_bias=0.1)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    got, alt = both_routes(monkeypatch,
                           lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw))
    check_routes(got[0], alt[0], dtype)
    contig = lca.gqa_attention_backward(dout.contiguous(), q.contiguous(), k.contiguous(),
                                        v.contiguous(), out, lse, **kw)
    assert torch.equal(got[0], contig[0])


def test_other_calls_do_not_take_it():
    """float32, 64-wide heads and rows not 16-byte aligned go elsewhere (the last off the
    tensor-core kernels altogether: attend_bwd_mma.cu needs the same alignment)."""
    gen = gen_for("dq-wgmma-others")
    kw = dict(group_size=8, window=16)

    def run(q, k, v):
        dout = torch.randn(q.shape[:3] + (v.shape[3],), device="cuda", dtype=q.dtype)
        out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
        lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)
        return _C.cuda_last_bwd_dq_kernel()

    assert run(*(rand(gen, (1, 100, 4, s), "float32") for s in (192, 192, 128))) == "simt"
    assert run(*(rand(gen, (1, 100, 4, 64), "bfloat16") for _ in range(3))) == "mma"
    big = rand(gen, (1, 100, 4, 129), "bfloat16")
    q = big[..., 1:]                                      # rows 2 bytes off 16
    assert run(q, rand(gen, (1, 100, 4, 128), "bfloat16"),
               rand(gen, (1, 100, 4, 128), "bfloat16")) == "simt"
