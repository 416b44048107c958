"""Shared fixtures and helpers for the lca test suite.

- `ref`: lca/reference.py loaded by path, so the reference tests run even before the C engine
  (lca._C) is built; every kernel test compares against it.
- `rng`: a NumPy Generator seeded per test (from the test id, so every test and every
  parametrisation draws different inputs, yet a failure reproduces).  Set LCA_TEST_SEED to
  draw a different set of inputs for the whole run.
- `rel_err`, `TOL`, `check_anchors`, input builders: imported by the test modules
  (`from conftest import ...`).
"""
import importlib.util
import os
import pathlib
import zlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("lca_reference_by_path",
                                               ROOT / "lca" / "reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

# SPEC §8: relative Frobenius error against the float64 reference
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
DTYPES = [np.float64, np.float32]


def tol(dtype):
    return TOL[np.dtype(dtype)]


def rel_err(got, want):
    """‖got − want‖ / ‖want‖ in float64 (absolute error when want is all zero).

    Fails outright on a shape mismatch or a non-finite value (NaN never passes, SPEC §8)."""
    got = np.asarray(got)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    got = got.astype(np.float64)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    d = float(np.linalg.norm((got - want).ravel()))
    n = float(np.linalg.norm(want.ravel()))
    return d / n if n > 0 else d


def assert_rel(got, want, bound, name="result"):
    """rel_err(got, want) <= bound, with a short message (not two array reprs)."""
    e = rel_err(got, want)
    assert e <= bound, f"{name}: relative error {e:.3e} > {bound:.1e}"


def assert_close(got, want, dtype, name="", factor=1.0):
    e = rel_err(got, want)
    assert e <= factor * tol(dtype), f"{name}: relative error {e:.3e} > {factor * tol(dtype):.1e}"


def check_anchors(got, alpha, want, rtol=1e-6):
    """Compare anchor indices to the reference's.

    got, want: int arrays of the same shape (..., ) ; alpha: the reference weights (..., g).
    Exact equality is required except where the reference's top weights are within `rtol`
    relative of each other (SPEC §8: ties may resolve either way); there `got` must still pick
    one of the (near-)maximal tokens.  Returns the boolean mask of groups that differ."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"anchor shape {got.shape}, expected {want.shape}"
    assert got.dtype == np.int32, f"anchor dtype {got.dtype}, expected int32"
    g = alpha.shape[-1]
    assert np.all((got >= 0) & (got < g)), "anchor index out of [0, group_size)"
    diff = got != want
    if diff.any():
        a = alpha[diff]
        top = a.max(axis=-1)
        picked = np.take_along_axis(a, got[diff][:, None].astype(np.int64), -1)[:, 0]
        ok = picked >= top * (1 - rtol)
        assert ok.all(), (f"{int((~ok).sum())} anchors differ from the reference where there "
                          f"is no tie: got {got[diff][~ok][:8]}, want {want[diff][~ok][:8]}")
    return diff


# ---------------------------------------------------------------------------------------------
# input builders

def mla_inputs(rng, B, L, H, Dc, Dr, dtype=np.float64, batched=True, scale=1.0):
    """q (B,L,H,Dc+Dr), latent (B,L,Dc), kpos (B,L,Dr); without the batch dim if not batched."""
    q = (scale * rng.standard_normal((B, L, H, Dc + Dr))).astype(dtype)
    c = rng.standard_normal((B, L, Dc)).astype(dtype)
    r = rng.standard_normal((B, L, Dr)).astype(dtype)
    if not batched:
        assert B == 1
        q, c, r = q[0], c[0], r[0]
    return q, c, r


def gqa_inputs(rng, B, L, H, Hkv, D, Dv, dtype=np.float64, batched=True, scale=1.0):
    q = (scale * rng.standard_normal((B, L, H, D))).astype(dtype)
    k = rng.standard_normal((B, L, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, L, Hkv, Dv)).astype(dtype)
    if not batched:
        assert B == 1
        q, k, v = q[0], k[0], v[0]
    return q, k, v


def batch(*arrays):
    """Add the leading batch dim the reference needs."""
    return tuple(np.asarray(a)[None] for a in arrays)


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture
def rng(request):
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("LCA_TEST_SEED", "0"))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def reference():
    return ref


@pytest.fixture
def rel_err_fn():
    return rel_err


def pytest_runtest_makereport(item, call):
    # show the seed next to a failure, so it can be reproduced with LCA_TEST_SEED
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"rng seed {v}")
