"""GPU tests of the Hopper GQA forward (csrc/cuda/attend_gqa_sm90a.cu: wgmma, producer warpgroup
and two consumer warpgroups) for heads (D, Dv) = (192, 128) — the non-absorbed MLA shape — and
(128, 128), bf16 and fp16, against the float64 CPU engine on the same (rounded) inputs with the
SPEC §8 rule (at most twice the error of the same computation in plain PyTorch at that
precision, tests/torch_lca.py).  Outputs are NaN-poisoned before launch.  Each test checks
through _C.cuda_last_attend_kernel() which kernel ran: "gqa_wgmma" on a compute 9.0 device,
the mma.sync kernel ("mma") elsewhere and with LCA_CUDA_DISABLE=wgmma."""
import zlib

import pytest

import lca

pytestmark = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
torch = pytest.importorskip("torch") if lca.HAS_CUDA else None

if lca.HAS_CUDA:
    from lca import _C                                   # noqa: E402
    from torch_lca import check_forward, gqa_lca, hopper, rand, rel, to_np  # noqa: E402


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    monkeypatch.delenv("LCA_CUDA_DISABLE", raising=False)


CASES = [  # B, L, H, Hkv, D, g, w, n, key_mode, rep_bias
    (1, 257, 16, 16, 192, 16, 64, None, "anchor", 0.0),     # SPEC §9 heads, one row a position
    (2, 333, 8, 2, 192, 8, 40, 3, "pool", 0.5),             # B = 2, 4 heads a kv head
    (1, 1000, 6, 2, 192, 16, 200, None, "anchor", -0.3),    # 3 heads a kv head: tiles straddle
    (1, 2100, 4, 4, 192, 16, 300, 5, "pool", 0.25),         # fully visible blocks, both segments
    (3, 77, 128, 1, 192, 4, 9, None, "anchor", 0.0),        # 128 heads a kv head: a tile a token
    (1, 130, 2, 1, 192, 1, 0, None, "anchor", 0.7),         # g = 1, window 0: condensed only
    (1, 4500, 2, 2, 192, 16, 1024, None, "anchor", 0.0),    # SPEC g, w: 20+ blocks, ring wraps
    (2, 171, 6, 2, 128, 16, 0, 7, "anchor", 0.0),           # 128/128, window 0
    (1, 1300, 8, 2, 128, 16, 256, None, "pool", -0.5),      # 128/128, several blocks
    (1, 63, 5, 5, 128, 4, 16, 2, "anchor", 0.0),            # one partial tile, a dead warpgroup
]


def run_case(case, dtype, salt=""):
    B, L, H, Hkv, D, g, w, n, km, bias = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype, salt)).encode()))
    q, k, v = rand(gen, (B, L, H, D), dtype), rand(gen, (B, L, Hkv, D), dtype), \
        rand(gen, (B, L, Hkv, 128), dtype)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    kernel = _C.cuda_last_attend_kernel()
    return q, k, v, kw, out, lse, kernel


def check(q, k, v, kw, out, lse, dtype):
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (128,)
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    ref = lca.gqa_attention(to_np(q), to_np(k), to_np(v), return_lse=True, **kw)
    check_forward(out, lse, ref, gqa_lca(q, k, v, **kw), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_wgmma_forward(case, dtype):
    q, k, v, kw, out, lse, kernel = run_case(case, dtype)
    assert kernel == ("gqa_wgmma" if hopper() else "mma"), f"kernel {kernel!r} ran"
    check(q, k, v, kw, out, lse, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[8]],
                         ids=lambda c: "-".join(map(str, c)))
def test_disable_wgmma_takes_the_mma_kernel(case, dtype, monkeypatch):
    """LCA_CUDA_DISABLE=wgmma: the mma.sync kernel, on the same inputs, within the same bound;
    and the two kernels agree with each other to bf16/fp16 rounding."""
    q, k, v, kw, out, lse, kernel = run_case(case, dtype)
    monkeypatch.setenv("LCA_CUDA_DISABLE", "wgmma")
    out2, lse2 = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "mma"
    check(q, k, v, kw, out2, lse2, dtype)
    assert rel(to_np(out), to_np(out2)) <= (2e-2 if dtype == "bfloat16" else 4e-3)
    assert rel(to_np(lse), to_np(lse2)) <= 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_strided_views(dtype):
    """q a slice of a wider tensor, k and v two slices of one fused kv tensor (rows still 16-byte
    aligned): the wgmma kernel reads the strides, not a contiguous copy."""
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(dtype.encode()))
    B, L, H, Hkv = 2, 700, 4, 2
    qw = rand(gen, (B, L, H, 256), dtype)
    kv = rand(gen, (B, L, Hkv, 192 + 128 + 8), dtype)
    q, k, v = qw[..., :192], kv[..., :192], kv[..., 192:320]
    kw = dict(group_size=16, window=100, n_summary=None, key_mode="anchor", rep_bias=0.0)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == ("gqa_wgmma" if hopper() else "mma")
    check(q, k, v, kw, out, lse, dtype)
    ref = lca.gqa_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", [25, 57])
@pytest.mark.parametrize("scale", [None, 0.0, -0.05])
def test_tma_variants_strided_views_and_any_scale(variant, scale, monkeypatch):
    """The TMA variants read k and v through tensor maps built from the views' strides (k and v
    two slices of one fused tensor here, one kv head, B = 3), and the one-FMA exponent (bit 3)
    needs scale > 0: a zero or negative softmax_scale must still give the right answer (the
    host then runs variant 17)."""
    if not hopper():
        pytest.skip("the variants exist only in the sm_90a kernel")
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((variant, scale)).encode()))
    B, L, H, Hkv = 3, 517, 4, 1
    q = rand(gen, (B, L, H, 192), "bfloat16")
    kv = rand(gen, (B, L, Hkv, 192 + 128 + 8), "bfloat16")
    k, v = kv[..., :192], kv[..., 192:320]
    kw = dict(group_size=8, window=130, n_summary=None, key_mode="pool", rep_bias=0.3,
              softmax_scale=scale)
    monkeypatch.setenv("LCA_GQA90_VARIANT", str(variant))
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "gqa_wgmma"
    check(q, k, v, kw, out, lse, "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dims", [(128, 64), (128, 0)])
def test_absorbed_mla_of_the_same_widths(dims, dtype):
    """Absorbed MLA whose key width is 192 or 128 and value width 128 (Dc = 128, Dr = 64 or 0):
    the same kernel, with V read as the first 128 columns of the key rows (v_in_k)."""
    from torch_lca import mla_lca
    Dc, Dr = dims
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((dims, dtype)).encode()))
    q, c, r = rand(gen, (2, 300, 8, Dc + Dr), dtype), rand(gen, (2, 300, Dc), dtype), \
        rand(gen, (2, 300, Dr), dtype)
    kw = dict(group_size=16, window=40, rep_bias=0.2)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == ("gqa_wgmma" if hopper() else "mma")
    ref = lca.attention(to_np(q), to_np(c), to_np(r), return_lse=True, **kw)
    check_forward(out, lse, ref, mla_lca(q, c, r, **kw), dtype)


def test_other_shapes_do_not_take_it():
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (rand(gen, (1, 100, 4, 64), "bfloat16") for _ in range(3))
    lca.gqa_attention(q, k, v, group_size=8, window=16)
    assert _C.cuda_last_attend_kernel() == "mma"                 # 64/64: mma.sync
    q, k, v = (rand(gen, (1, 100, 4, s), "float32") for s in (192, 192, 128))
    lca.gqa_attention(q, k, v, group_size=8, window=16)
    assert _C.cuda_last_attend_kernel() == "simt"                # float32


VARIANT_CASES = [CASES[1], CASES[3], CASES[6], CASES[9]]


# the variants attend_gqa_sm90a.cu builds (the switch in lca_cuda_attend_gqa_wgmma)
VARIANTS = [0, 1, 2, 3, 4, 5, 6, 7, 15, 17, 25, 28, 29, 56, 57]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_wgmma_tuning_variants(case, dtype, variant, monkeypatch):
    """LCA_GQA90_VARIANT (a tuning knob): ping-pong turns (bit 0), a producer that never waits
    (bit 1), Q from registers (bit 2), the one-FMA exponent with O rescaled only on a new
    maximum (bit 3), TMA loads (bit 4), 128-key blocks (bit 5): each must give the default's
    answer."""
    if not hopper():
        pytest.skip("the variants exist only in the sm_90a kernel")
    q, k, v, kw, out, lse, kernel = run_case(case, dtype, "variant")
    monkeypatch.setenv("LCA_GQA90_VARIANT", str(variant))
    got, got_lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "gqa_wgmma"
    check(q, k, v, kw, got, got_lse, dtype)
    # the same products in the same order: equal to the default up to the order of the
    # floating-point sums the compiler picks
    assert rel(to_np(got), to_np(out)) <= 1e-2 and rel(to_np(got_lse), to_np(lse)) <= 1e-4


def test_given_entries_past_the_last_needed_are_not_read():
    """lca.gqa_attend takes kbar / vbar with more rows than the last query sees: rows past those
    must not reach the output (here NaN; the TMA producer's tensor maps end at the last needed
    row, as the cp.async producer's copies do)."""
    if not hopper():
        pytest.skip("the wgmma kernel runs on compute 9.0")
    gen = torch.Generator(device="cuda").manual_seed(78)
    B, L, H, Hkv, g, w = 2, 600, 8, 2, 16, 100
    q, k, v = rand(gen, (B, L, H, 192), "bfloat16"), rand(gen, (B, L, Hkv, 192), "bfloat16"), \
        rand(gen, (B, L, Hkv, 128), "bfloat16")
    kb, vb, _, _ = lca.gqa_condense(q, k, v, group_size=g)
    need = (L - w) // g
    want = lca.gqa_attend(q, k, v, kb[:, :need], vb[:, :need], group_size=g, window=w)
    nan = float("nan")
    kbp = torch.cat([kb[:, :need], torch.full_like(kb[:, :40], nan)], 1)
    vbp = torch.cat([vb[:, :need], torch.full_like(vb[:, :40], nan)], 1)
    got = lca.gqa_attend(q, k, v, kbp, vbp, group_size=g, window=w)
    assert _C.cuda_last_attend_kernel() == "gqa_wgmma"
    assert torch.equal(got, want)


def test_strides_tma_cannot_express_fall_back_to_copies():
    """k and v broadcast over the kv heads (stride 0): no tensor map has such a stride, so the
    default (TMA) variant must fall back to its cp.async twin and still give the answer."""
    if not hopper():
        pytest.skip("the wgmma kernel runs on compute 9.0")
    gen = torch.Generator(device="cuda").manual_seed(79)
    B, L, H, Hkv = 1, 400, 8, 2
    q = rand(gen, (B, L, H, 192), "bfloat16")
    k = rand(gen, (B, L, 1, 192), "bfloat16").expand(B, L, Hkv, 192)
    v = rand(gen, (B, L, 1, 128), "bfloat16").expand(B, L, Hkv, 128)
    kw = dict(group_size=16, window=64, n_summary=None, key_mode="anchor", rep_bias=0.0)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    assert _C.cuda_last_attend_kernel() == "gqa_wgmma"
    check(q, k, v, kw, out, lse, "bfloat16")
    ref = lca.gqa_attention(q, k.contiguous(), v.contiguous(), **kw)
    assert rel(to_np(out), to_np(ref)) <= 1e-2


@pytest.mark.parametrize("variant", [7, 28, 29, 57])
def test_later_non_finite_values_do_not_reach_earlier_rows(variant, monkeypatch):
    """Inf in the values of every token from T = 256 on (a row tile's boundary: 128 rows a tile
    at one head a kv head): rows before T never see them (SPEC §3), so their output must be
    finite and equal to the same call on the first T tokens.  The TMA variants load whole
    64/128-key boxes and zero the value rows past each block's end."""
    if not hopper():
        pytest.skip("the variants exist only in the sm_90a kernel")
    monkeypatch.setenv("LCA_GQA90_VARIANT", str(variant))
    gen = torch.Generator(device="cuda").manual_seed(80 + variant)
    B, L, H, T = 1, 600, 4, 256
    q, k = rand(gen, (B, L, H, 192), "bfloat16"), rand(gen, (B, L, H, 192), "bfloat16")
    v = rand(gen, (B, L, H, 128), "bfloat16")
    v[:, T:] = float("inf")
    kw = dict(group_size=16, window=64)
    out = lca.gqa_attention(q, k, v, **kw)
    assert _C.cuda_last_attend_kernel() == "gqa_wgmma"
    want = lca.gqa_attention(q[:, :T], k[:, :T], v[:, :T], **kw)
    assert torch.isfinite(out[:, :T].float()).all()
    assert rel(to_np(out[:, :T]), to_np(want)) <= 1e-2
