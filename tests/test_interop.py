"""Arrays of libraries other than NumPy, PyTorch and CuPy (SPEC §7: any DLPack or
__cuda_array_interface__ exporter is taken without a copy, and results come back as the
caller's array type).

On the CPU: JAX arrays (when jax is installed) and two stand-in exporters — one that offers only
DLPack (no __array__, no buffer protocol: np.asarray cannot read it) and one that also names an
array namespace.  Every result is compared bit for bit with the same call on NumPy arrays.  On
a CUDA device (skipped without one): stand-ins over torch CUDA tensors offering only
__cuda_array_interface__ or only DLPack."""
import os

import numpy as np
import pytest

import lca
from conftest import gqa_inputs, mla_inputs

# JAX on a GPU machine would otherwise take 75% of the device's memory at its first array
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def jax_cpu():
    """jax.numpy and a function putting NumPy arrays on JAX's CPU device (JAX's default device
    is a GPU where it has one)."""
    jnp = pytest.importorskip("jax.numpy")
    import jax
    cpu = jax.devices("cpu")[0]
    return jnp, lambda a: jax.device_put(a, cpu)


class DLPackOnly:
    """An array known only through DLPack."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class Wrapped(DLPackOnly):
    """A DLPack exporter with an array namespace whose from_dlpack returns Wrapped arrays."""

    class ns:
        @staticmethod
        def from_dlpack(x):
            return Wrapped(np.from_dlpack(x))

    def __array_namespace__(self, api_version=None):
        return Wrapped.ns


def unwrap(x):
    assert isinstance(x, Wrapped), type(x)
    return x._a


def same(got, want):
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert np.array_equal(np.asarray(g), w, equal_nan=False)


def test_dlpack_only_arrays_run_and_return_numpy(rng):
    q, c, r = mla_inputs(rng, 2, 37, 3, 16, 8, np.float32)
    kw = dict(group_size=4, window=9, return_lse=True)
    want = lca.attention(q, c, r, **kw)
    got = lca.attention(DLPackOnly(q), DLPackOnly(c), DLPackOnly(r), **kw)
    assert all(isinstance(x, np.ndarray) for x in got)      # no namespace: the engine's type
    same(got, want)
    with pytest.raises(TypeError):                          # what lca took before (np.asarray)
        np.asarray(DLPackOnly(q)) + 1


def test_adoption_shares_memory(rng):
    q = rng.standard_normal((5, 2, 8)).astype(np.float32)
    a = lca._adopt(DLPackOnly(q), "q")
    assert isinstance(a, np.ndarray) and np.shares_memory(a, q)


def test_results_come_back_through_the_callers_namespace(rng):
    q, k, v = gqa_inputs(rng, 1, 41, 4, 2, 16, 12, np.float64)
    kw = dict(group_size=4, window=10)
    out, lse = lca.gqa_attention(Wrapped(q), Wrapped(k), Wrapped(v), return_lse=True, **kw)
    want, want_lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    same((unwrap(out), unwrap(lse)), (want, want_lse))
    dout = rng.standard_normal(want.shape)
    grads = lca.gqa_attention_backward(Wrapped(dout), Wrapped(q), k, v, out=Wrapped(want),
                                       lse=want_lse, **kw)      # mixed, and by keyword
    same(tuple(unwrap(g) for g in grads), lca.gqa_attention_backward(dout, q, k, v, want,
                                                                     want_lse, **kw))


def test_bad_exporters_name_the_argument(rng):
    q, c, r = mla_inputs(rng, 1, 20, 2, 16, 8, np.float32)

    class Broken(DLPackOnly):
        def __dlpack_device__(self):
            raise RuntimeError("no device")

    class Elsewhere(DLPackOnly):
        def __dlpack_device__(self):
            return (14, 0)                  # kDLOneAPI: neither the CPU nor a CUDA device

    with pytest.raises(TypeError, match="latent"):
        lca.attention(q, Broken(c), r)
    with pytest.raises(TypeError, match="kpos"):
        lca.attention(q, c, Elsewhere(r))
    with pytest.raises(TypeError, match="q: expected dtype float32 or float64"):
        lca.attention(DLPackOnly(q.astype(np.float16)), c, r)


def test_jax_arrays(rng):
    jnp, j = jax_cpu()
    q, c, r = mla_inputs(rng, 2, 45, 4, 16, 8, np.float32)
    kw = dict(group_size=4, window=10)
    out, lse = lca.attention(j(q), j(c), j(r), return_lse=True, **kw)
    want, want_lse = lca.attention(q, c, r, return_lse=True, **kw)
    assert type(out) is type(j(q)) and out.dtype == jnp.float32
    same((out, lse), (want, want_lse))
    dout = rng.standard_normal(want.shape).astype(np.float32)
    grads = lca.attention_backward(j(dout), j(q), j(c), j(r), out, lse, **kw)
    same(grads, lca.attention_backward(dout, q, c, r, want, want_lse, **kw))
    cb = lca.condense(j(q), c, r, group_size=4)
    same(cb, lca.condense(q, c, r, group_size=4))
    assert cb[2].dtype == jnp.int32                          # the anchors
    with pytest.raises(TypeError, match="^q: "):             # bf16 on the CPU: no such engine
        lca.attention(j(q).astype(jnp.bfloat16), j(c), j(r), **kw)


def test_jax_scalar_keyword_keeps_the_numpy_result(rng):
    """A JAX 0-d integer as a keyword (group_size) is read as that integer; it does not turn the
    NumPy arrays' results into JAX arrays."""
    jnp, j = jax_cpu()
    q, c, r = mla_inputs(rng, 1, 30, 2, 16, 8, np.float32)
    got = lca.attention(q, c, r, group_size=j(np.int32(4)), window=6)
    assert isinstance(got, np.ndarray)
    same(got, lca.attention(q, c, r, group_size=4, window=6))
    got = lca.attention(j(q), c, r, group_size=j(np.int32(4)), window=6)
    assert type(got) is type(j(q))


def test_jax_cache_and_prefill(rng):
    jnp, j = jax_cpu()
    B, L, H, Dc, Dr = 2, 30, 4, 16, 8
    q, c, r = mla_inputs(rng, B, L, H, Dc, Dr, np.float32)
    kw = dict(group_size=4, window=6)
    a, b = lca.LatentCache(B, H, Dc, Dr, L, **kw), lca.LatentCache(B, H, Dc, Dr, L, **kw)
    same(a.prefill(j(q[:, :9]), j(c[:, :9]), j(r[:, :9])), b.prefill(q[:, :9], c[:, :9],
                                                                     r[:, :9]))
    for t in range(9, L):
        o = a.step(j(q[:, t]), j(c[:, t]), j(r[:, t]))
        assert type(o) is type(j(q))
        same(o, b.step(q[:, t], c[:, t], r[:, t]))
    w_uk = rng.standard_normal((H, Dc, 12)).astype(np.float32)
    w_uv = rng.standard_normal((H, Dc, 10)).astype(np.float32)
    qn = rng.standard_normal((B, L, H, 12 + Dr)).astype(np.float32)
    same(lca.mla_prefill(j(qn), j(c), j(r), j(w_uk), j(w_uv), **kw),
         lca.mla_prefill(qn, c, r, w_uk, w_uv, **kw))


# -- CUDA: stand-ins over torch CUDA tensors -----------------------------------------------------

class CAIOnly:
    """A CUDA array known only through __cuda_array_interface__."""

    def __init__(self, t):
        self._t = t
        self.__cuda_array_interface__ = t.__cuda_array_interface__


@pytest.mark.gpu
@pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("wrap", [CAIOnly, DLPackOnly])
def test_cuda_exporters(wrap, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, 130, 4, 64, generator=gen, device="cuda").to(torch.float16)
               for _ in range(3))
    kw = dict(group_size=8, window=24)
    want = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    got = lca.gqa_attention(wrap(q), wrap(k), wrap(v), return_lse=True, **kw)
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.is_cuda and torch.equal(g, w)
    assert lca._adopt(wrap(q), "q").data_ptr() == q.data_ptr()          # no copy


@pytest.mark.gpu
@pytest.mark.skipif(not lca.HAS_CUDA, reason="needs a CUDA device")
def test_jax_cuda_arrays(monkeypatch):
    """JAX arrays on the GPU: the same kernels as the torch tensors over the same data, bit for
    bit, and JAX arrays back on the GPU."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    import jax
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("jax has no GPU backend here")
    monkeypatch.setenv("LCA_POISON_OUTPUTS", "1")
    gen = torch.Generator(device="cuda").manual_seed(8)
    q, k, v = (torch.randn(1, 150, 4, 64, generator=gen, device="cuda").to(torch.bfloat16)
               for _ in range(3))
    kw = dict(group_size=8, window=24)
    want = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    jq, jk, jv = (jnp.from_dlpack(t) for t in (q, k, v))
    got = lca.gqa_attention(jq, jk, jv, return_lse=True, **kw)
    for g, w in zip(got, want):
        assert type(g) is type(jq) and g.devices() == jq.devices()
        assert torch.equal(torch.from_dlpack(g), w)
