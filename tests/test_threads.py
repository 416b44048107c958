"""Threads (README: the GIL is released while the engine runs): concurrent calls from several
Python threads, each of which starts its own OpenMP team, give results identical, bit for bit,
to the same calls made one after another; bad input raises the same errors under concurrency;
and while one thread is inside the engine, other Python threads keep running.
"""
import random
import threading
import time

import numpy as np
import pytest

import lca
from conftest import gqa_inputs, mla_inputs

THREADS, ROUNDS = 6, 3


def jobs(rng):
    """(name, callable) pairs over every public function, both dtypes; two of the shapes are
    large enough that the engine runs its own OpenMP threads as well."""
    out = []
    for dtype in (np.float64, np.float32):
        for B, L, H, Dc, Dr, Hkv, kw in [
                (2, 37, 3, 8, 4, 1, dict(group_size=4, window=9, n_summary=2, rep_bias=0.2)),
                (2, 300, 4, 32, 8, 2, dict(group_size=16, window=64))]:
            q, c, r = (a.astype(dtype) for a in mla_inputs(rng, B, L, H, Dc, Dr))
            gq, gk, gv = (a.astype(dtype) for a in gqa_inputs(rng, B, L, 2 * H, Hkv, Dc, Dr + 3))
            out_, lse = lca.attention(q, c, r, return_lse=True, **kw)
            gout, glse = lca.gqa_attention(gq, gk, gv, return_lse=True, **kw)
            cb, rb, _, _ = lca.condense(q, c, r, group_size=kw["group_size"])
            kb, vb, _, _ = lca.gqa_condense(gq, gk, gv, group_size=kw["group_size"])
            dout, gdout = (rng.standard_normal(a.shape).astype(dtype) for a in (out_, gout))
            ak = {k: v for k, v in kw.items() if k != "n_summary"}
            tag = f"{np.dtype(dtype).name}-L{L}"
            out += [
                (f"attention-{tag}", lambda q=q, c=c, r=r, kw=kw:
                    lca.attention(q, c, r, return_lse=True, **kw)),
                (f"condense-{tag}", lambda q=q, c=c, r=r, g=kw["group_size"]:
                    lca.condense(q, c, r, group_size=g, score="latent")),
                (f"attend-{tag}", lambda q=q, c=c, r=r, cb=cb, rb=rb, ak=ak:
                    lca.attend(q, c, r, cb, rb, return_lse=True, **ak)),
                (f"attention_backward-{tag}", lambda a=(dout, q, c, r, out_, lse), kw=kw:
                    lca.attention_backward(*a, **kw)),
                (f"gqa_attention-{tag}", lambda a=(gq, gk, gv), kw=kw:
                    lca.gqa_attention(*a, key_mode="pool", **kw)),
                (f"gqa_condense-{tag}", lambda a=(gq, gk, gv), g=kw["group_size"]:
                    lca.gqa_condense(*a, group_size=g)),
                (f"gqa_attend-{tag}", lambda a=(gq, gk, gv, kb, vb), ak=ak:
                    lca.gqa_attend(*a, **ak)),
                (f"gqa_attention_backward-{tag}", lambda a=(gdout, gq, gk, gv, gout, glse), kw=kw:
                    lca.gqa_attention_backward(*a, **kw)),
            ]
    return out


def as_list(x):
    return list(x) if isinstance(x, tuple) else [x]


def run_threads(target, n):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]


def test_concurrent_equals_serial(rng):
    work = jobs(rng)
    serial = {name: as_list(f()) for name, f in work}
    mismatches = []
    calls = [0]
    lock = threading.Lock()

    def worker(i):
        order = list(work)
        random.Random(i).shuffle(order)
        for _ in range(ROUNDS):
            for name, f in order:
                got = as_list(f())
                ok = all(np.array_equal(x, y) for x, y in zip(got, serial[name]))
                with lock:
                    calls[0] += 1
                    if not ok:
                        mismatches.append(name)

    run_threads(worker, THREADS)
    assert calls[0] == THREADS * ROUNDS * len(work)
    assert not mismatches, f"results differ from the serial calls: {sorted(set(mismatches))}"


def test_concurrent_errors(rng):
    """Bad input raises the same exception, with the same message, from every thread."""
    q, c, r = mla_inputs(rng, 1, 20, 2, 4, 2)
    gq, gk, gv = gqa_inputs(rng, 1, 20, 4, 2, 5, 3)
    bad = [
        (lambda: lca.attention(q, c.astype(np.float32), r), TypeError),
        (lambda: lca.attention(q, c[:, :-1], r), ValueError),
        (lambda: lca.gqa_attention(gq, gk, gv, group_size=0), ValueError),
        (lambda: lca.gqa_attend(gq, gk, gv, gk[:, :0], gv[:, :0], window=0), ValueError),
        (lambda: lca.attention_backward(q, q, c, r, q, q), ValueError),
        (lambda: lca.num_condensed(5, 0), ValueError),
    ]
    want = []
    for f, exc in bad:
        with pytest.raises(exc) as e:
            f()
        want.append(str(e.value))

    def worker(i):
        for _ in range(20):
            for (f, exc), msg in zip(bad, want):
                with pytest.raises(exc) as e:
                    f()
                assert str(e.value) == msg
            lca.attention(q, c, r, group_size=4, window=3)      # and a good call in between

    run_threads(worker, THREADS)


def test_gil_released_during_compute():
    """While a thread runs a long engine call, the main thread keeps executing Python: the
    longest pause between its loop iterations stays well below the call's duration (a held
    GIL would stall it for the whole call)."""
    rng = np.random.default_rng(0)
    L = 1024
    while True:
        q, c, r = (a.astype(np.float32) for a in mla_inputs(rng, 1, L, 16, 128, 32))
        t0 = time.perf_counter()
        lca.attention(q, c, r, group_size=16, window=256)
        dt = time.perf_counter() - t0
        if dt >= 0.15 or L >= 8192:
            break
        L *= 2
    if dt < 0.05:
        pytest.skip(f"the longest call here takes only {dt * 1e3:.0f} ms")
    inside = threading.Event()
    done = threading.Event()

    def long_call():
        inside.set()
        for _ in range(3):
            lca.attention(q, c, r, group_size=16, window=256)
        done.set()

    t = threading.Thread(target=long_call)
    t.start()
    inside.wait()
    gaps, last = [], time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    t.join()
    assert len(gaps) > 100, "the main thread hardly ran while the engine worked"
    assert max(gaps) < 0.5 * dt, (f"the main thread stalled {max(gaps) * 1e3:.0f} ms while "
                                  f"one engine call takes {dt * 1e3:.0f} ms")
