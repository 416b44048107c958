"""Leaks: many repeated calls of every public function and of lca._C, good and bad (Python
and binding error paths, and the engine's out-of-memory path), leave nothing behind.

  heap      bytes in use by malloc (glibc mallinfo2: the engine's workspaces, NumPy's data)
  RSS       resident memory of the process
  traced    Python allocations (tracemalloc)
  refs      reference counts of every argument, and of every result (one owner only)

test_errors.py has a shorter version of the refs and traced checks for the public calls; this
file adds the C-level heap and RSS, the binding's error paths and the out-of-memory path.
"""
import ctypes
import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import lca
from conftest import gqa_inputs, mla_inputs
from lca import _C

ROUNDS = int(os.environ.get("LCA_LEAK_ROUNDS", "300"))
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")        # .ci/sanitize.sh


def calls(rng):
    """(arrays, good calls, bad calls): every public function on small inputs, and failures
    from every layer."""
    kw = dict(group_size=4, window=6, n_summary=3, rep_bias=0.1)
    ak = dict(group_size=4, window=6, rep_bias=0.1)
    q, c, r = mla_inputs(rng, 2, 48, 4, 24, 8)
    gq, gk, gv = gqa_inputs(rng, 2, 48, 4, 2, 24, 16)
    out, lse = lca.attention(q, c, r, return_lse=True, **kw)
    gout, glse = lca.gqa_attention(gq, gk, gv, return_lse=True, **kw)
    cb, rb, _, _ = lca.condense(q, c, r, group_size=4)
    kb, vb, _, _ = lca.gqa_condense(gq, gk, gv, group_size=4)
    q32, c32, r32 = (a.astype(np.float32) for a in (q, c, r))
    # direct binding calls: one good, then failures after some arguments were already taken
    B, L, H, D, Dv, m = 2, 48, 4, 24, 16, 12
    z = np.zeros
    cq, ck, cv = gq, gk, gv
    ckb, cvb = z((B, m, 2, D)), z((B, m, 2, Dv))
    cout, clse = z((B, L, H, Dv)), z((B, H, L))
    huge = 2**40                                     # zero-stride heads: no memory behind them

    def zs(shape):
        return as_strided(z(shape[-1]), shape, (0,) * (len(shape) - 1) + (8,), writeable=True)

    hq, hout, hlse = zs((1, 8, huge, 4)), zs((1, 8, huge, 3)), zs((1, huge, 8))
    hk, hv, hkb, hvb = z((1, 8, 1, 4)), z((1, 8, 1, 3)), z((1, 4, 1, 4)), z((1, 4, 1, 3))
    arrays = [q, c, r, gq, gk, gv, out, lse, gout, glse, cb, rb, kb, vb, q32, c32, r32,
              ckb, cvb, cout, clse, hq, hout, hlse, hk, hv, hkb, hvb]
    good = [
        lambda: lca.attention(q, c, r, return_lse=True, **kw),
        lambda: lca.attention(q32, c32, r32, **kw),
        lambda: lca.condense(q, c, r, group_size=4, score="latent"),
        lambda: lca.attend(q, c, r, cb, rb, return_lse=True, **ak),
        lambda: lca.attention_backward(out, q, c, r, out, lse, **kw),
        lambda: lca.gqa_attention(gq, gk, gv, key_mode="pool", **kw),
        lambda: lca.gqa_condense(gq, gk, gv, group_size=4),
        lambda: lca.gqa_attend(gq, gk, gv, kb, vb, **ak),
        lambda: lca.gqa_attention_backward(gout, gq, gk, gv, gout, glse, **kw),
        lambda: lca.gqa_attend_backward(gout, gq, gk, gv, kb, vb, gout, glse, **ak),
        lambda: lca.attend_backward(out, q, c, r, cb, rb, out, lse, **ak),
        lambda: lca.condense_backward(cb, rb, q, c, r, group_size=4),
        lambda: lca.gqa_condense_backward(kb, vb, gq, gk, gv, group_size=4),
        lambda: lca.attention(q[:, ::-1], np.asfortranarray(c), r[::-1][::-1], **kw),
        lambda: lca.num_condensed(131071, 16, 1024) + lca.cache_entries(131072),
        lambda: _C.attend(cq, ck, cv, ckb, cvb, cout, clse, 4, 6, 0.5, 0.0, 0),
    ]
    bad = [
        lambda: lca.attention(q, c32, r, **kw),                                  # TypeError
        lambda: lca.attention(q, c, r, group_size=0),                            # ValueError
        lambda: lca.attention(q32, c32, r32, softmax_scale=1e300),               # binding
        lambda: lca.gqa_attention(gq, gk[:, :-1], gv, **kw),
        lambda: lca.attend(q, c, r, cb[:, :1], rb[:, :1], window=0),
        lambda: lca.attention_backward(out[:, 1:], q, c, r, out, lse, **kw),
        lambda: lca.gqa_attention_backward(gout, gq, gk, gv, gout, glse[..., 1:], **kw),
        lambda: lca.gqa_attend(gq, gk, gv, kb, None, **ak),
        lambda: lca.gqa_attend_backward(gout, gq, gk, gv, kb, vb[:, :1], gout, glse, **ak),
        lambda: lca.attend_backward(out, q, c, r, cb, rb, out, lse[:, :, 1:], **ak),
        lambda: lca.condense_backward(cb, rb[:, 1:], q, c, r, group_size=4),
        lambda: lca.gqa_condense_backward(kb, vb, gq, gk, gv, group_size=5),
        lambda: lca.num_condensed(-1),
        lambda: _C.attend(cq, ck, cv, ckb, cvb, cout[:, :, :, :-1], clse, 4, 6, 0.5, 0.0, 0),
        lambda: _C.attend(cq, ck, cv, ckb, cvb, cout, clse[::-1], 4, 6, 0.5, 0.0, 0),
        lambda: _C.condense(cq, ck, cv, ckb, cvb, z((B, m, 2)), z((B, m, 2, 4)), 4, 4, 0.5,
                            D, 0, 0),
        lambda: _C.backward(cout, cq, ck, cv, cout, clse, z(cq.shape), z(ck.shape),
                            z((B, L, 2, Dv + 1)), 4, 6, 4, 0.5, 0.0, D, 0, 0),
        lambda: _C.attend(cq, ck, cv, ckb, cvb, cout, clse, 2**64, 6, 0.5, 0.0, 0),
        lambda: _C.attend(hq, hk, hv, hkb, hvb, hout, hlse, 2, 1, 0.5, 0.0, 0),   # no memory
        lambda: _C.backward(hout, hq, hk, hv, hout, hlse, zs((1, 8, huge, 4)), z(hk.shape),
                            z(hv.shape), 2, 1, 2, 0.5, 0.0, 4, 0, 0),
    ]
    return arrays, good, bad


def round_of(good, bad):
    for f in good:
        f()
    for f in bad:
        try:
            f()
        except (TypeError, ValueError, OverflowError, MemoryError):
            pass
        else:
            raise AssertionError("a bad call was accepted")


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2                                  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    return libc


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def heap_in_use():
    """Bytes malloc has handed out and not had back (all arenas, mmap'd chunks included);
    None where glibc's mallinfo2 is missing or malloc is not glibc's (a sanitizer's)."""
    libc = _libc()
    if libc is None:
        return None
    libc.mallinfo2.restype = _Mallinfo2
    mi = libc.mallinfo2()
    used = mi.uordblks + mi.hblkhd
    return used if used > 0 and mi.arena > 0 else None


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle():
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def test_heap_and_rss_flat(rng):
    _, good, bad = calls(rng)
    for _ in range(20):                                 # warm: caches, thread pools, arenas
        round_of(good, bad)
    settle()
    heap0, rss0 = heap_in_use(), rss()
    for _ in range(ROUNDS):
        round_of(good, bad)
    settle()
    heap1, rss1 = heap_in_use(), rss()
    n = ROUNDS * (len(good) + len(bad))
    print(f"{n} calls: heap {heap0} -> {heap1} bytes, RSS {rss0 >> 10} -> {rss1 >> 10} KiB")
    if heap0 is not None:
        # one leaked workspace (tens of KiB) or even one 64-byte block per call is far above
        assert heap1 - heap0 < 64 * 1024, f"malloc heap grew {heap1 - heap0} bytes in {n} calls"
    if SANITIZED:
        pytest.skip("AddressSanitizer's quarantine holds freed memory: LeakSanitizer judges "
                    "leaks in that build (.ci/sanitize.sh)")
    assert rss1 - rss0 < 8 << 20, f"RSS grew {(rss1 - rss0) >> 10} KiB in {n} calls"


def test_traced_python_memory_flat(rng):
    _, good, bad = calls(rng)
    for _ in range(5):
        round_of(good, bad)
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(ROUNDS // 3):
            round_of(good, bad)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes of Python allocations still held"


def test_reference_counts_unchanged(rng):
    arrays, good, bad = calls(rng)
    round_of(good, bad)
    before = [sys.getrefcount(a) for a in arrays]
    for _ in range(50):
        round_of(good, bad)
    after = [sys.getrefcount(a) for a in arrays]
    changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    assert not changed, f"reference counts changed for arrays {changed}: " \
        f"{[before[i] for i in changed]} -> {[after[i] for i in changed]}"
    assert not gc.garbage


def test_results_have_one_owner(rng):
    """Every array a public function returns is referenced by its caller alone (and by the
    views it has, none here), so dropping it frees it."""
    _, good, _ = calls(rng)
    for f in good[:10]:
        res = f()
        items = list(res) if isinstance(res, tuple) else [res]
        del res
        for x in items:
            if isinstance(x, np.ndarray) and x.base is None:
                # the list, the loop variable and getrefcount's own argument
                assert sys.getrefcount(x) == 3, f"{f}: a result has extra references"


@pytest.mark.parametrize("threads", [4])
def test_no_growth_under_threads(rng, threads):
    """The per-thread OpenMP teams that concurrent Python threads start do not accumulate."""
    import threading
    _, good, bad = calls(rng)

    def work():
        for _ in range(10):
            round_of(good, bad)

    def burst():
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    burst()
    if SANITIZED:
        pytest.skip("AddressSanitizer's quarantine holds freed memory")
    settle()
    rss0 = rss()
    for _ in range(5):
        burst()
    settle()
    assert rss() - rss0 < 16 << 20, f"RSS grew {(rss() - rss0) >> 10} KiB over 5 bursts"
