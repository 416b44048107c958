"""The condensed KV cache (SPEC §6): lca.LatentCache and lca.GQACache.

Decode after a prefill of P tokens must reproduce, row by row, the one-shot attention of the
whole sequence (lca/reference.py in float64; SPEC §8 tolerances); `entries` must follow the
SPEC §6 formula at every step; `nbytes` must be the storage held; every bad call must raise the
SPEC exception naming the argument and leave the cache exactly as it was.  The GPU tests at the
end (skipped without a CUDA device) run the same sequences through the CUDA decode."""
import math

import zlib

import numpy as np
import pytest

import lca
from conftest import gqa_inputs, mla_inputs, ref, rel_err, tol

# B, L, H, Dc, Dr, g, w, n, score, rep_bias, P
MLA_CASES = [
    (1, 40, 2, 8, 4, 4, 8, None, "full", 0.0, 0),        # no prefill: steps only
    (2, 57, 3, 16, 8, 4, 9, 2, "full", 0.0, 13),          # B > 1, P not a multiple of g, n < g
    (2, 50, 4, 12, 4, 3, 0, None, "full", 0.0, 7),        # window 0
    (1, 61, 2, 10, 6, 5, 7, 3, "latent", 0.4, 22),        # score latent, rep_bias
    (3, 45, 1, 8, 0, 2, 3, 1, "full", -0.7, 5),           # Dr = 0, g = 2, many condensations
    (1, 33, 2, 8, 4, 1, 4, None, "full", 0.2, 3),         # g = 1: one condensation a step
    (2, 40, 2, 8, 4, 4, 100, None, "full", 0.0, 11),      # window > max_len: exact attention
    (1, 64, 2, 8, 4, 8, 16, 8, "full", 0.0, 64),          # prefill fills the cache
    (1, 48, 3, 8, 4, 16, 1, 5, "latent", 0.0, 17),        # window 1
]

# B, L, H, Hkv, D, Dv, g, w, n, key_mode, rep_bias, P
GQA_CASES = [
    (1, 40, 4, 2, 8, 6, 4, 8, None, "anchor", 0.0, 0),
    (2, 53, 6, 2, 8, 5, 4, 9, 3, "pool", 0.0, 10),
    (2, 47, 4, 4, 6, 6, 3, 0, None, "anchor", 0.3, 8),     # MHA, window 0, rep_bias
    (1, 50, 8, 1, 16, 8, 5, 6, 2, "pool", -0.5, 21),
    (3, 30, 2, 1, 4, 4, 2, 3, 1, "anchor", 0.0, 1),
]


def run_mla(case, dtype):
    B, L, H, Dc, Dr, g, w, n, score, bias, P = case
    return B, L, H, Dc, Dr, dict(group_size=g, window=w, n_summary=n, score=score,
                                 rep_bias=bias), P


def decode_mla(cache, q, c, r, P, check_entries=True):
    """Prefill P tokens, then step the rest; returns the (B, L, H, Dc) outputs."""
    B, L = q.shape[:2]
    rows = [cache.prefill(q[:, :P], c[:, :P], r[:, :P])]
    assert rows[0].shape == (B, P, q.shape[2], c.shape[2])
    for t in range(P, L):
        if check_entries:
            assert cache.length == t
            assert cache.entries == lca.cache_entries(t, cache.group_size, cache.window)
        o = cache.step(q[:, t], c[:, t], r[:, t])
        assert o.shape == (B, q.shape[2], c.shape[2]) and o.dtype == q.dtype
        rows.append(o[:, None])
    assert cache.length == L
    assert cache.entries == lca.cache_entries(L, cache.group_size, cache.window)
    return np.concatenate(rows, axis=1)


def assert_rows(got, want, bound, what):
    e = rel_err(got, want)
    assert e <= bound, f"{what}: relative error {e:.3e} > {bound:.1e}"
    for t in range(want.shape[1]):                          # row by row
        e = rel_err(got[:, t], want[:, t])
        assert e <= bound, f"{what}: row {t}: relative error {e:.3e} > {bound:.1e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_decode_matches_one_shot(case, dtype, rng):
    B, L, H, Dc, Dr, kw, P = run_mla(case, dtype)
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, dtype)
    want, _ = ref.attention(q, c, r, **kw)
    cache = lca.LatentCache(B, H, Dc, Dr, L, dtype=dtype, **kw)
    got = decode_mla(cache, q, c, r, P)
    assert_rows(got, want, tol(dtype), "decode vs reference")
    if np.dtype(dtype) == np.float64:                       # and the engine's one-shot prefill
        assert_rows(got, lca.attention(q, c, r, **kw), 1e-12, "decode vs lca.attention")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gqa_decode_matches_one_shot(case, dtype, rng):
    B, L, H, Hkv, D, Dv, g, w, n, km, bias, P = case
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    q, k, v = gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype)
    want, _ = ref.gqa_attention(q, k, v, **kw)
    cache = lca.GQACache(B, H, Hkv, D, Dv, L, dtype=dtype, **kw)
    rows = [cache.prefill(q[:, :P], k[:, :P], v[:, :P])]
    for t in range(P, L):
        assert cache.entries == lca.cache_entries(t, g, w)
        rows.append(cache.step(q[:, t], k[:, t], v[:, t])[:, None])
    assert cache.entries == lca.cache_entries(L, g, w)
    assert_rows(np.concatenate(rows, axis=1), want, tol(dtype), "GQA decode vs reference")


def test_threaded_decode_matches(rng):
    """Large enough for the CPU step to use its thread team (B x kv heads units)."""
    B, L, H, Dc, Dr = 8, 300, 8, 64, 16
    kw = dict(group_size=8, window=32, n_summary=5, rep_bias=0.1)
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr)
    cache = lca.LatentCache(B, H, Dc, Dr, L, dtype=np.float64, **kw)
    assert_rows(decode_mla(cache, q, c, r, 150, check_entries=False),
                lca.attention(q, c, r, **kw), 1e-12, "threaded")
    q, k, v = gqa_inputs(rng, 8, 220, 16, 8, 64, 56)
    kw = dict(group_size=4, window=16, key_mode="pool")
    cache = lca.GQACache(8, 16, 8, 64, 56, 220, dtype=np.float64, **kw)
    rows = [cache.prefill(q[:, :160], k[:, :160], v[:, :160])]
    rows += [cache.step(q[:, t], k[:, t], v[:, t])[:, None] for t in range(160, 220)]
    assert_rows(np.concatenate(rows, 1), lca.gqa_attention(q, k, v, **kw), 1e-12, "GQA threaded")


def test_max_len_not_a_multiple_and_reset(rng):
    """A cache longer than the sequence, reused after reset() with a different prefill."""
    q, c, r = mla_inputs(rng, 2, 30, 2, 8, 4)
    kw = dict(group_size=4, window=5, n_summary=3)
    cache = lca.LatentCache(2, 2, 8, 4, 37, dtype=np.float64, **kw)
    want = lca.attention(q, c, r, **kw)
    assert_rows(decode_mla(cache, q, c, r, 9), want, 1e-12, "first")
    cache.reset()
    assert cache.length == 0 and cache.entries == 0
    assert_rows(decode_mla(cache, q, c, r, 0), want, 1e-12, "after reset")


def test_spec_default_shape_entries_and_bytes():
    """The SPEC §6 figure: 9,152 entries at T = 131,072 with the defaults, and storage for
    max_len that is far below max_len raw tokens."""
    T = 131072
    assert lca.cache_entries(T) == 9152
    cache = lca.LatentCache(1, 16, 512, 64, T, dtype=np.float32)
    M, R, S = T // 16, 1024 + 16 - 1, (1024 + 16 - 2) // 16 + 1
    assert cache.nbytes == (M + R + S) * 576 * 4
    assert cache.nbytes < 0.08 * T * 576 * 4                 # vs a full latent cache
    with pytest.raises(AttributeError):
        cache.length = T                                      # read-only: the state follows it
    cache._length = T                                         # the count alone (internal)
    assert cache.entries == 9152 and cache.entry_bytes == 9152 * 576 * 4


@pytest.mark.parametrize("w", [0, 1, 5, 16, 100])
def test_nbytes_is_the_storage_held(w):
    g, L, B = 4, 50, 3
    c = lca.LatentCache(B, 2, 8, 4, L, group_size=g, window=w, dtype=np.float64)
    R = min(max(w + g - 1, g), L)
    S = min((w + g - 2) // g + 1 if w else 1, (L - 1) // g + 1)
    assert c.nbytes == B * (L // g + R + S) * 12 * 8
    assert c.nbytes == sum(a.nbytes for a in c._held_arrays)
    assert c._held_arrays[0].base is None and all(a.base is None for a in c._held_arrays)
    gq = lca.GQACache(B, 4, 2, 6, 5, L, group_size=g, window=w, dtype=np.float32)
    assert gq.nbytes == B * 2 * ((L // g + R) * (6 + 5) + S * 6) * 4
    assert gq.nbytes == sum(a.nbytes for a in gq._held_arrays)


def test_nbytes_constant_while_decoding(rng):
    q, c, r = mla_inputs(rng, 1, 40, 2, 8, 4)
    cache = lca.LatentCache(1, 2, 8, 4, 40, group_size=4, window=6, dtype=np.float64)
    n0 = cache.nbytes
    decode_mla(cache, q, c, r, 10)
    assert cache.nbytes == n0


# ---------------------------------------------------------------------------------------------
# bad calls: the SPEC exception naming the argument, and the cache exactly as it was

def snapshot(cache):
    return cache.length, [np.array(a, copy=True) for a in cache._held_arrays]


def assert_unchanged(cache, snap):
    length, arrays = snap
    assert cache.length == length
    for a, b in zip(cache._held_arrays, arrays):
        assert np.array_equal(a, b, equal_nan=True), "the cache changed on a failed call"


@pytest.fixture
def mla_cache(rng):
    q, c, r = mla_inputs(rng, 2, 20, 3, 8, 4)
    cache = lca.LatentCache(2, 3, 8, 4, 20, group_size=4, window=5, dtype=np.float64)
    cache.prefill(q[:, :9], c[:, :9], r[:, :9])
    cache.step(q[:, 9], c[:, 9], r[:, 9])
    return cache, (q, c, r)


def bad_step_calls(q, c, r):
    t = 10
    qq, cc, rr = q[:, t], c[:, t], r[:, t]
    return [
        ("q", ValueError, (qq[:1], cc, rr)),                          # wrong batch
        ("latent", ValueError, (qq, cc[:1], rr)),
        ("kpos", ValueError, (qq, cc, rr[:, :3])),                    # wrong width
        ("q", ValueError, (qq[:, :2], cc, rr)),                       # wrong heads
        ("q", ValueError, (qq[..., :-1], cc, rr)),
        ("latent", ValueError, (qq, cc[:, :, None], rr)),             # wrong rank
        ("q", TypeError, (qq.astype(np.float32), cc, rr)),            # wrong dtype
        ("kpos", TypeError, (qq, cc, rr.astype(np.float32))),
        ("latent", TypeError, (qq, cc.astype(np.int64), rr)),
        ("q", TypeError, (None, cc, rr)),
        ("latent", TypeError, (qq, "abc", rr)),
    ]


def test_bad_steps_leave_the_cache_unchanged(mla_cache):
    cache, (q, c, r) = mla_cache
    snap = snapshot(cache)
    for name, exc, args in bad_step_calls(q, c, r):
        with pytest.raises(exc, match=name):
            cache.step(*args)
        assert_unchanged(cache, snap)
    # and the next good step still agrees with the one-shot result
    want = lca.attention(q, c, r, group_size=4, window=5)
    assert rel_err(cache.step(q[:, 10], c[:, 10], r[:, 10]), want[:, 10]) <= 1e-12


def test_step_past_max_len(rng):
    q, c, r = mla_inputs(rng, 1, 8, 2, 8, 4)
    cache = lca.LatentCache(1, 2, 8, 4, 8, group_size=2, window=3, dtype=np.float64)
    cache.prefill(q, c, r)
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="max_len"):
        cache.step(q[:, 0], c[:, 0], r[:, 0])
    assert_unchanged(cache, snap)


def test_bad_prefills(rng):
    q, c, r = mla_inputs(rng, 2, 12, 3, 8, 4)
    cache = lca.LatentCache(2, 3, 8, 4, 10, group_size=4, window=5, dtype=np.float64)
    snap = snapshot(cache)
    for name, exc, args in [
        ("q", ValueError, (q, c, r)),                                  # 12 > max_len 10
        ("q", ValueError, (q[0], c[0], r[0])),                         # no batch dim
        ("latent", ValueError, (q[:, :5], c[:, :4], r[:, :5])),        # lengths differ
        ("kpos", ValueError, (q[:, :5], c[:, :5], r[:1, :5])),
        ("q", TypeError, (q[:, :5].astype(np.float32), c[:, :5], r[:, :5])),
    ]:
        with pytest.raises(exc, match=name):
            cache.prefill(*args)
        assert_unchanged(cache, snap)
    cache.prefill(q[:, :5], c[:, :5], r[:, :5])
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="empty"):
        cache.prefill(q[:, :5], c[:, :5], r[:, :5])
    assert_unchanged(cache, snap)


def test_gqa_bad_calls(rng):
    q, k, v = gqa_inputs(rng, 2, 12, 4, 2, 8, 6)
    cache = lca.GQACache(2, 4, 2, 8, 6, 12, group_size=2, window=3, dtype=np.float64)
    cache.prefill(q[:, :5], k[:, :5], v[:, :5])
    snap = snapshot(cache)
    t = 5
    for name, exc, args in [
        ("k", ValueError, (q[:, t], k[:, t, :1], v[:, t])),           # wrong kv heads
        ("v", ValueError, (q[:, t], k[:, t], v[:, t, :, :5])),
        ("q", ValueError, (q[:1, t], k[:, t], v[:, t])),
        ("v", TypeError, (q[:, t], k[:, t], v[:, t].astype(np.float32))),
    ]:
        with pytest.raises(exc, match=name):
            cache.step(*args)
        assert_unchanged(cache, snap)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(group_size=0), ValueError, "group_size"),
    (dict(n_summary=5, group_size=4), ValueError, "n_summary"),
    (dict(window=-1), ValueError, "window"),
    (dict(score="both"), ValueError, "score"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(rep_bias="x"), TypeError, "rep_bias"),
    (dict(dtype=np.int32), TypeError, "dtype"),
    (dict(dtype="bfloat16"), TypeError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device=3.5), TypeError, "device"),
    (dict(device=-1), ValueError, "device"),
])
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        lca.LatentCache(1, 2, 8, 4, 16, **kwargs)


@pytest.mark.parametrize("args, exc, name", [
    ((0, 2, 8, 4, 16), ValueError, "batch"),
    ((1, 0, 8, 4, 16), ValueError, "num_heads"),
    ((1, 2, 0, 4, 16), ValueError, "latent_dim"),
    ((1, 2, 8, -1, 16), ValueError, "kpos_dim"),
    ((1, 2, 8, 4, 0), ValueError, "max_len"),
    ((1, 2.0, 8, 4, 16), TypeError, "num_heads"),
])
def test_bad_sizes(args, exc, name):
    with pytest.raises(exc, match=name):
        lca.LatentCache(*args)


def test_gqa_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        lca.GQACache(1, 6, 4, 8, 8, 16)
    with pytest.raises(ValueError, match="key_mode"):
        lca.GQACache(1, 4, 2, 8, 8, 16, key_mode="mean")


def test_cuda_device_without_cuda():
    """Without a CUDA engine a CUDA device is refused (before torch is imported)."""
    if lca.HAS_CUDA:
        pytest.skip("a CUDA device is present")
    for dev in ("cuda", "cuda:0", 0):
        with pytest.raises(ValueError, match="device"):
            lca.LatentCache(1, 2, 8, 4, 16, device=dev)


def test_engine_checks_direct_misuse():
    """_C.decode_step checks capacities itself (a ring too small is an error, not a wrong
    answer)."""
    B, H, D, Dv = 1, 2, 6, 6
    z = lambda *s: np.zeros(s)                                   # noqa: E731
    q, k, v, out = z(B, 1, H, D), z(B, 1, 1, D), z(B, 1, 1, Dv), z(B, 1, H, Dv)
    kbar, vbar, qsum = z(B, 4, 1, D), z(B, 4, 1, Dv), z(B, 4, 1, D)
    good = (q, k, v, out, kbar, vbar, z(B, 7, 1, D), z(B, 7, 1, Dv), qsum)
    lca._C.decode_step(*good, 10, 2, 6, 2, 0.5, 0.0, D, 0, 0)
    for arrays, T, exc, what in [
        ((q, k, v, out, kbar, vbar, z(B, 3, 1, D), z(B, 3, 1, Dv), qsum), 10, ValueError, "kr"),
        ((q, k, v, out, kbar, vbar, z(B, 7, 1, D), z(B, 7, 1, Dv), z(B, 3, 1, D)), 10,
         ValueError, "qsum"),
        ((q, k, v, out, z(B, 2, 1, D), z(B, 2, 1, Dv), z(B, 7, 1, D), z(B, 7, 1, Dv), qsum), 10,
         ValueError, "kbar"),
        (good[:3] + (z(B, 1, H, 5),) + good[4:], 10, ValueError, "out"),
        (good, -1, ValueError, "T"),
        ((q.astype(np.float32),) + good[1:], 10, TypeError, "k"),
    ]:
        with pytest.raises(exc, match=what):
            lca._C.decode_step(*arrays, T, 2, 6, 2, 0.5, 0.0, D, 0, 0)
    with pytest.raises(ValueError, match="v_in_k"):
        lca._C.decode_step(*good, 10, 2, 6, 2, 0.5, 0.0, D, D, 1)


def test_unbatched_window_exact_equals_causal(rng):
    """window >= max_len: the cache never condenses and decode is exact causal MLA."""
    q, c, r = mla_inputs(rng, 1, 25, 2, 8, 4)
    cache = lca.LatentCache(1, 2, 8, 4, 25, group_size=4, window=25, dtype=np.float64)
    got = decode_mla(cache, q, c, r, 6)
    k = np.concatenate([c, r], axis=2)[:, :, None]
    want, _ = ref.causal_attention(q, k, c[:, :, None])
    assert_rows(got, want, 1e-12, "exact")
    assert cache.entries == 25


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA decode against the float64 CPU result (skipped without a CUDA device)

gpu = pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")


def _torch():
    return pytest.importorskip("torch")


def gpu_bound(naive_err, dtype):
    """SPEC §8: float32 1e-5; bf16/fp16 twice the error of the same decode done in plain torch
    at that precision (floor 1e-3 as in tests/test_cuda.py)."""
    return 1e-5 if dtype == "float32" else max(2 * naive_err, 1e-3)


def check_decoded(got, want, naive, dtype, rows):
    """SPEC §8 on the whole output and on each decoded row (axis 1) on its own: float32 1e-5,
    bf16/fp16 twice the error of the same decode in plain torch (naive; None for float32)."""
    def bound(n, w):
        return gpu_bound(0.0 if n is None else rel_err(n, w), dtype)

    err, b = rel_err(got, want), bound(naive, want)
    assert err <= b, f"{dtype} decode error {err:.2e} > {b:.2e}"
    for t in rows:
        e_t, b_t = rel_err(got[:, t], want[:, t]), bound(None if naive is None else naive[:, t],
                                                          want[:, t])
        assert e_t <= b_t, f"row {t}: {dtype} error {e_t:.2e} > {b_t:.2e}"


def torch_decode_rows(q, k, v, g, w, n, scale, rep_bias, d_score, d_pool, first=0):
    """The same decode in plain torch at the inputs' precision: condense each group from the
    mean of its summary queries, attend over [condensed rows; exact tokens] per position (rows
    first .. L - 1)."""
    torch = _torch()
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    hg = H // Hkv
    outs = []
    condensed = {}
    for t in range(first, L):
        G = max(0, (t - w + 1) // g)
        keys, vals = [], []
        for j in range(G):
            if j in condensed:
                keys.append(condensed[j][0]), vals.append(condensed[j][1])
                continue
            qb = q[:, j * g + g - n:j * g + g].reshape(B, n, Hkv, hg, D).mean(dim=(1, 3))
            kg, vg = k[:, j * g:j * g + g], v[:, j * g:j * g + g]          # (B, g, Hkv, .)
            s = scale * torch.einsum("bhd,bghd->bhg", qb[..., :d_score], kg[..., :d_score])
            a = torch.softmax(s.float(), dim=-1).to(q.dtype)
            an = a.argmax(-1)
            vb = torch.einsum("bhg,bghd->bhd", a, vg)
            ka = torch.gather(kg, 1, an[:, None, :, None].expand(B, 1, Hkv, D))[:, 0]
            kb = torch.cat([torch.einsum("bhg,bghd->bhd", a, kg[..., :d_pool]),
                            ka[..., d_pool:]], -1)
            keys.append(kb[:, None]), vals.append(vb[:, None])
            condensed[j] = (kb[:, None], vb[:, None])
        keys.append(k[:, G * g:t + 1]), vals.append(v[:, G * g:t + 1])
        K, V = torch.cat(keys, 1), torch.cat(vals, 1)                    # (B, N, Hkv, .)
        K, V = K.repeat_interleave(hg, 2), V.repeat_interleave(hg, 2)
        s = scale * torch.einsum("bhd,bnhd->bhn", q[:, t], K)
        s[..., :G] += rep_bias
        p = torch.softmax(s.float(), -1).to(q.dtype)
        outs.append(torch.einsum("bhn,bnhd->bhd", p, V)[:, None])
    return torch.cat(outs, 1)


def to64(x):
    return x.detach().double().cpu().numpy()


def decode_route(dtype, D, Dv, v_in_k, disabled=""):
    """The partial kernel a CUDA decode step must take (csrc/cuda/decode.cu): "bulk" on a
    compute 9.0 device for absorbed MLA 576/512 and 288/256 in bf16/fp16, "mma" for those and
    GQA 256/128/64 elsewhere, "simt" for the rest."""
    torch = _torch()
    if dtype == "float32":
        return "simt"
    off = disabled.split(",")
    mla = v_in_k and (D, Dv) in ((576, 512), (288, 256))
    if mla and torch.cuda.get_device_capability() == (9, 0) and "dec_bulk" not in off \
            and "mma" not in off and hasattr(lca._C, "cuda_last_decode_kernel"):
        return "bulk"
    if "mma" not in off and (mla or (not v_in_k and D == Dv and D in (256, 128, 64))):
        return "mma"
    return "simt"


GPU_MLA = [  # B, L, H, Dc, Dr, g, w, n, score, rep_bias, P
    (2, 90, 16, 512, 64, 4, 9, 3, "full", 0.0, 13),
    (2, 75, 16, 512, 64, 4, 9, None, "full", 0.2, 0),
    (1, 70, 128, 512, 64, 8, 16, None, "full", 0.3, 0),
    (3, 60, 16, 256, 32, 4, 0, None, "latent", 0.0, 9),
    (1, 50, 5, 64, 16, 2, 3, 1, "full", -0.4, 7),
]


# The Hopper kernel's variants (csrc/cuda/decode_sm90a.cu, LCA_DECODE_VARIANT): "ws" the
# warp-specialised kernel after the append kernel (forced, it takes 16-head blocks at any H:
# H = 128 is 8 blocks; it merges the splits itself), "wsc" the same with the combine kernel,
# "wsa" ws appending the token itself, "wsa2" (the default for 16-head blocks) that with 2 rows
# a copy and the keys permuted within a tile, "v3" the
# one-tile-an-iteration kernel (16/32/64-head blocks).  Only the bf16/fp16 MLA 576/512 and
# 288/256 steps run it; elsewhere the others would repeat the first.
DEC_VARIANTS = ["wsa2", "wsa", "ws", "wsc", "v3"]


@gpu
@pytest.mark.parametrize("variant", DEC_VARIANTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", GPU_MLA, ids=lambda c: "-".join(map(str, c)))
def test_gpu_mla_decode(case, dtype, variant, monkeypatch):
    torch = _torch()
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    B, L, H, Dc, Dr, g, w, n, score, bias, P = case
    if variant != DEC_VARIANTS[0] and decode_route(dtype, Dc + Dr, Dc, True) != "bulk":
        pytest.skip("the variant only changes the Hopper absorbed-MLA kernel")
    monkeypatch.setenv("LCA_DECODE_VARIANT", variant)
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    dt = getattr(torch, dtype)
    q = torch.randn(B, L, H, Dc + Dr, generator=gen, device="cuda").to(dt)
    c = torch.randn(B, L, Dc, generator=gen, device="cuda").to(dt)
    r = torch.randn(B, L, Dr, generator=gen, device="cuda").to(dt)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    cache = lca.LatentCache(B, H, Dc, Dr, L, dtype=dt, device="cuda", **kw)
    assert cache.nbytes == sum(a.numel() * a.element_size() for a in cache._held_arrays)
    rows = [cache.prefill(q[:, :P], c[:, :P], r[:, :P])]
    for t in range(P, L):
        assert cache.entries == lca.cache_entries(t, g, w)
        o = cache.step(q[:, t], c[:, t], r[:, t])
        assert o.device == q.device and o.dtype == dt and o.shape == (B, H, Dc)
        rows.append(o[:, None])
    got = torch.cat(rows, 1)
    assert torch.isfinite(got.float()).all(), "non-finite (unwritten) elements"
    want = lca.attention(to64(q), to64(c), to64(r), **kw)
    naive = None
    if dtype != "float32":
        k = torch.cat([c, r], -1)[:, :, None]
        naive = to64(torch_decode_rows(q, k, c[:, :, None], g, w, n or g, 1 / math.sqrt(Dc + Dr),
                                       bias, Dc + Dr if score == "full" else Dc, Dc))
    check_decoded(to64(got), want, naive, dtype, range(P, L))
    if P < L:
        assert lca._C.cuda_last_decode_kernel() == decode_route(dtype, Dc + Dr, Dc, True)


# Longer sequences: several key tiles per split (more than the Hopper kernel's stages, so its
# ring of stages wraps), split counts forced through LCA_DECODE_NSPLIT (the Hopper kernel's
# override) or chosen by the engine, partial last tiles, the exact ring wrapping inside a tile,
# 16/32/64-head blocks (H = 40 and 24: blocks with zero rows; H = 128: two 64-head blocks), and
# the same steps through decode.cu's mma.sync kernel (LCA_CUDA_DISABLE=dec_bulk).
GPU_MLA_LONG = [  # B, L, H, Dc, Dr, g, w, n, score, rep_bias, P, nsplit
    (1, 430, 128, 512, 64, 4, 201, None, "full", 0.3, 395, "1"),
    (1, 430, 128, 512, 64, 4, 37, 3, "full", -0.2, 400, None),
    (3, 610, 16, 512, 64, 8, 301, 5, "full", 0.0, 570, "1"),
    (3, 610, 16, 512, 64, 8, 101, None, "full", 0.1, 575, "3"),
    (2, 470, 40, 256, 32, 4, 129, None, "latent", -0.3, 440, "2"),
    (1, 401, 24, 512, 64, 2, 203, None, "full", 0.2, 377, None),
]


# kernel: "bulk" the Hopper kernel as routed, "mma" decode.cu's (LCA_CUDA_DISABLE=dec_bulk),
# "ws" / "wsc" the warp-specialised Hopper kernel (merging its splits / with the combine
# kernel) in 16-head blocks at every H, and for 16-head blocks the other Hopper variants (LCA_DECODE_VARIANT: "v3" one tile
# an iteration, two tiles an iteration, cp.async loads, both)
HOPPER_VARIANTS = ("ws", "wsc", "wsa", "wsa2", "v3", "kt2", "cp", "kt2cp")
LONG_RUNS = [(c, k) for c in GPU_MLA_LONG
             for k in ["bulk", "mma", "ws", "wsc", "wsa", "wsa2"]
             + (["v3", "kt2", "cp", "kt2cp"] if c[2] <= 16 else [])]


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case,kernel", LONG_RUNS,
                         ids=[k + "-" + "-".join(map(str, c)) for c, k in LONG_RUNS])
def test_gpu_mla_decode_long(case, kernel, dtype, monkeypatch):
    torch = _torch()
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    disable = "dec_bulk" if kernel == "mma" else ""
    monkeypatch.setenv("LCA_CUDA_DISABLE", disable)
    monkeypatch.setenv("LCA_DECODE_VARIANT", kernel if kernel in HOPPER_VARIANTS else "")
    B, L, H, Dc, Dr, g, w, n, score, bias, P, nsplit = case
    if nsplit is None:
        monkeypatch.delenv("LCA_DECODE_NSPLIT", raising=False)
    else:
        monkeypatch.setenv("LCA_DECODE_NSPLIT", nsplit)
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    dt = getattr(torch, dtype)
    q = torch.randn(B, L, H, Dc + Dr, generator=gen, device="cuda").to(dt)
    c = torch.randn(B, L, Dc, generator=gen, device="cuda").to(dt)
    r = torch.randn(B, L, Dr, generator=gen, device="cuda").to(dt)
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    cache = lca.LatentCache(B, H, Dc, Dr, L, dtype=dt, device="cuda", **kw)
    cache.prefill(q[:, :P], c[:, :P], r[:, :P])
    rows = []
    for t in range(P, L):
        rows.append(cache.step(q[:, t], c[:, t], r[:, t])[:, None])
        assert lca._C.cuda_last_decode_kernel() == decode_route(dtype, Dc + Dr, Dc, True,
                                                                 disable)
    got = torch.cat(rows, 1)
    assert torch.isfinite(got.float()).all(), "non-finite (unwritten) elements"
    # the arrival counters of the kernels that merge their splits are left at zero
    assert int(cache._work[-B * H:].view(torch.int32).abs().sum()) == 0
    want = lca.attention(to64(q), to64(c), to64(r), **kw)[:, P:]
    k = torch.cat([c, r], -1)[:, :, None]
    naive = to64(torch_decode_rows(q, k, c[:, :, None], g, w, n or g, 1 / math.sqrt(Dc + Dr),
                                   bias, Dc + Dr if score == "full" else Dc, Dc, first=P))
    check_decoded(to64(got), want, naive, dtype, range(L - P))


@gpu
@pytest.mark.parametrize("case", [GPU_MLA_LONG[2], GPU_MLA_LONG[4], GPU_MLA_LONG[5],
                                  (2, 90, 16, 512, 64, 4, 0, None, "full", 0.0, 40, "2")],
                         ids=lambda c: "-".join(map(str, c)))
def test_gpu_fused_append_is_exact(case, monkeypatch):
    """The Hopper kernel appending the step's token itself ("wsa": no append kernel, the new key
    row read from k) gives the same bits as the append kernel before it ("ws"): every output
    row and the whole cache state (ring, condensed rows, summary sums) after every step;
    "wsa2" (2 rows a copy, keys permuted within a tile) the same cache state and outputs within
    rounding.  w = 0 makes the token complete its own group (a condensation before the
    attention: the append kernel then runs)."""
    torch = _torch()
    B, L, H, Dc, Dr, g, w, n, score, bias, P, nsplit = case
    if decode_route("bfloat16", Dc + Dr, Dc, True) != "bulk":
        pytest.skip("the fused append is the Hopper absorbed-MLA kernel's")
    if nsplit is None:
        monkeypatch.delenv("LCA_DECODE_NSPLIT", raising=False)
    else:
        monkeypatch.setenv("LCA_DECODE_NSPLIT", nsplit)
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(case).encode()))
    q = torch.randn(B, L, H, Dc + Dr, generator=gen, device="cuda").bfloat16()
    c = torch.randn(B, L, Dc, generator=gen, device="cuda").bfloat16()
    r = torch.randn(B, L, Dr, generator=gen, device="cuda").bfloat16()
    kw = dict(group_size=g, window=w, n_summary=n, score=score, rep_bias=bias)
    caches = {}
    for v in ("ws", "wsa", "wsa2"):
        monkeypatch.setenv("LCA_DECODE_VARIANT", v)
        cache = lca.LatentCache(B, H, Dc, Dr, L, dtype=torch.bfloat16, device="cuda", **kw)
        cache.prefill(q[:, :P], c[:, :P], r[:, :P])
        caches[v] = cache
    for t in range(P, L):
        outs = {}
        for v, cache in caches.items():
            monkeypatch.setenv("LCA_DECODE_VARIANT", v)
            outs[v] = cache.step(q[:, t], c[:, t], r[:, t])
        assert torch.equal(outs["ws"], outs["wsa"]), f"step {t}: outputs differ"
        for v in ("wsa2",):                # keys permuted within a tile: other roundings
            torch.testing.assert_close(outs[v].float(), outs["ws"].float(), rtol=2e-2,
                                       atol=2e-2, msg=lambda m: f"step {t}, {v}: {m}")
        for v in ("wsa", "wsa2"):
            for a, b in zip(caches["ws"]._held_arrays[:-1], caches[v]._held_arrays[:-1]):
                assert torch.equal(a, b), f"step {t}, {v}: cache state differs"


GPU_GQA = [  # B, L, H, Hkv, D, Dv, g, w, n, key_mode, rep_bias, P
    (2, 70, 32, 8, 128, 128, 4, 10, None, "anchor", 0.0, 9),
    (1, 60, 8, 1, 64, 64, 2, 0, 1, "pool", 0.2, 0),
    (2, 50, 4, 4, 256, 256, 4, 5, 3, "anchor", 0.0, 17),
]


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", GPU_GQA, ids=lambda c: "-".join(map(str, c)))
def test_gpu_gqa_decode(case, dtype, monkeypatch):
    torch = _torch()
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    B, L, H, Hkv, D, Dv, g, w, n, km, bias, P = case
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    dt = getattr(torch, dtype)
    q = torch.randn(B, L, H, D, generator=gen, device="cuda").to(dt)
    k = torch.randn(B, L, Hkv, D, generator=gen, device="cuda").to(dt)
    v = torch.randn(B, L, Hkv, Dv, generator=gen, device="cuda").to(dt)
    kw = dict(group_size=g, window=w, n_summary=n, key_mode=km, rep_bias=bias)
    cache = lca.GQACache(B, H, Hkv, D, Dv, L, dtype=dt, device="cuda", **kw)
    rows = [cache.prefill(q[:, :P], k[:, :P], v[:, :P])]
    for t in range(P, L):
        rows.append(cache.step(q[:, t], k[:, t], v[:, t])[:, None])
    got = torch.cat(rows, 1)
    assert torch.isfinite(got.float()).all()
    want = lca.gqa_attention(to64(q), to64(k), to64(v), **kw)
    naive_err = 0.0
    if dtype != "float32":
        naive = torch_decode_rows(q, k, v, g, w, n or g, 1 / math.sqrt(D), bias, D,
                                  D if km == "pool" else 0)
        naive_err = rel_err(to64(naive), want)
    bound = gpu_bound(naive_err, dtype)
    err = rel_err(to64(got), want)
    assert err <= bound, f"{dtype} decode error {err:.2e} > {bound:.2e}"
    if P < L:
        assert lca._C.cuda_last_decode_kernel() == decode_route(dtype, D, Dv, False)


@gpu
def test_gpu_errors_leave_the_cache_unchanged():
    torch = _torch()
    B, H, Dc, Dr = 2, 16, 64, 16
    cache = lca.LatentCache(B, H, Dc, Dr, 20, group_size=4, window=5, dtype=torch.bfloat16,
                            device="cuda")
    q = torch.randn(B, 8, H, Dc + Dr, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, 8, Dc, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(B, 8, Dr, device="cuda", dtype=torch.bfloat16)
    cache.prefill(q, c, r)
    snap = (cache.length, [a.clone() for a in cache._held_arrays])
    qq, cc, rr = q[:, 0], c[:, 0], r[:, 0]
    for name, exc, args in [
        ("q", TypeError, (qq.float(), cc, rr)),
        ("latent", TypeError, (qq, cc.cpu(), rr)),
        ("kpos", ValueError, (qq, cc, rr[:1])),
        ("q", ValueError, (qq[:, :3], cc, rr)),
        ("latent", TypeError, (qq, cc.cpu().float().numpy(), rr)),
    ]:
        with pytest.raises(exc, match=name):
            cache.step(*args)
        assert cache.length == snap[0]
        assert all(torch.equal(a, b) for a, b in zip(cache._held_arrays, snap[1]))
    with pytest.raises(TypeError, match="dtype"):
        lca.LatentCache(1, 2, 8, 4, 16, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="device"):
        lca.LatentCache(1, 2, 8, 4, 16, device="cuda:99")


@gpu
def test_gpu_step_on_callers_stream_and_no_sync():
    """Each step captured in a CUDA graph and replayed (tests/torch_lca.run_captured: recorded on
    the caller's stream, no synchronisation, no host round trip) equals the eager steps of a
    twin cache, outputs and storage, across condensations."""
    torch = _torch()
    from torch_lca import run_captured
    B, H, Dc, Dr, L = 2, 16, 512, 64, 40
    q = torch.randn(B, L, H, Dc + Dr, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, L, Dc, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(B, L, Dr, device="cuda", dtype=torch.bfloat16)
    kw = dict(group_size=4, window=8, dtype=torch.bfloat16, device="cuda")
    a, b = lca.LatentCache(B, H, Dc, Dr, L, **kw), lca.LatentCache(B, H, Dc, Dr, L, **kw)
    a.prefill(q[:, :10], c[:, :10], r[:, :10])
    b.prefill(q[:, :10], c[:, :10], r[:, :10])
    for t in range(10, L):
        got = run_captured(lambda: a.step(q[:, t], c[:, t], r[:, t]))
        assert torch.equal(got, b.step(q[:, t], c[:, t], r[:, t])), f"step {t}"
    assert a.length == b.length == L
    assert all(torch.equal(x, y) for x, y in zip(a._held_arrays, b._held_arrays))


@gpu
def test_gpu_cupy_cache():
    """A CuPy cache on the last device, called while device 0 is current (on a machine with
    several GPUs: a cache off the current device; with one: the plain case)."""
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    B, L, H, Dc, Dr = 1, 30, 4, 64, 16
    q = rng.standard_normal((B, L, H, Dc + Dr)).astype(np.float32)
    c = rng.standard_normal((B, L, Dc)).astype(np.float32)
    r = rng.standard_normal((B, L, Dr)).astype(np.float32)
    kw = dict(group_size=4, window=6)
    dev = cp.cuda.Device(cp.cuda.runtime.getDeviceCount() - 1)

    def on_dev(a):
        with dev:
            return cp.asarray(a)

    with cp.cuda.Device(0):
        cache = lca.LatentCache(B, H, Dc, Dr, L, dtype="float32", device=dev, **kw)
        rows = [cp.asnumpy(cache.prefill(on_dev(q[:, :7]), on_dev(c[:, :7]), on_dev(r[:, :7])))]
        for t in range(7, L):
            o = cache.step(on_dev(q[:, t]), on_dev(c[:, t]), on_dev(r[:, t]))
            assert isinstance(o, cp.ndarray) and o.device.id == dev.id
            rows.append(cp.asnumpy(o)[:, None])
    want = lca.attention(q.astype(np.float64), c.astype(np.float64), r.astype(np.float64), **kw)
    assert rel_err(np.concatenate(rows, 1), want) <= 1e-5


def test_direct_misuse_of_the_bindings_is_refused():
    """The bindings bound their integers before any size arithmetic (a position near 2^63, a
    workspace size that would overflow, an unknown dtype code)."""
    from lca import _C
    cache = lca.LatentCache(1, 2, 8, 4, 32, group_size=4, window=4)
    q, k = np.zeros((1, 1, 2, 12), np.float32), np.zeros((1, 1, 1, 12), np.float32)
    out = np.empty((1, 1, 2, 8), np.float32)
    args = (q, k, k[..., :8], out, cache._kbar, cache._vbar, cache._kr, cache._vr, cache._qsum)
    with pytest.raises(ValueError, match="T out of range"):
        _C.decode_step(*args, 2**62 + 1, 4, 4, 4, 0.3, 0.0, 12, 8, 1)
    _C.decode_step(*args, 0, 4, 4, 4, 0.3, 0.0, 12, 8, 1)           # the same call, in range
    assert np.isfinite(out).all()
    if hasattr(_C, "cuda_backward_workspace"):
        with pytest.raises(TypeError, match="dtype"):
            _C.cuda_backward_workspace(7, 1, 16, 2, 1, 64, 64, 4, 0)
        with pytest.raises(ValueError, match="out of range"):
            _C.cuda_backward_workspace(2, 2**40, 2**40, 2, 1, 64, 64, 4, 0)
        with pytest.raises(NotImplementedError, match="up to 1024"):   # as the backward says
            _C.cuda_backward_workspace(2, 1, 16, 2, 1, 1100, 64, 4, 0)
        assert _C.cuda_backward_workspace(2, 1, 16, 2, 1, 64, 64, 4, 0) > 0
