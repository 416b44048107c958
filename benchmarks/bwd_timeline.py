"""The GPU timeline of one LCA backward (non-absorbed MLA, the SPEC §9 shape, bf16): every
kernel and memset in launch order with its start, duration and the idle gap before it, against
the call's CUDA-event time — where the event time goes that the kernels do not account for.

    PYTHONPATH=. python3 benchmarks/bwd_timeline.py [--L 131072] [--reps 5]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lca  # noqa: E402
from bench_backward import event_times  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    L, H, D, Dv = a.L, a.H, 192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda").bfloat16()  # noqa: E731
    kw = dict(group_size=16, window=1024)
    q, k, v, dout = rnd(1, L, H, D), rnd(1, L, H, D), rnd(1, L, H, Dv), rnd(1, L, H, Dv)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
    bwd = lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)  # noqa: E731
    ts = event_times(bwd, a.reps)
    print(f"L={L}: backward event time, median of {a.reps}: {statistics.median(ts):.3f} ms "
          f"({' '.join(f'{t:.2f}' for t in ts)})")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        bwd()
        e1.record()
        torch.cuda.synchronize()
    print(f"profiled call's event time: {e0.elapsed_time(e1):.3f} ms")
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        evs = json.load(f)["traceEvents"]
    gpu = sorted((e for e in evs if e.get("ph") == "X" and e.get("cat") in
                  ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    if not gpu:
        print("no GPU events in the trace")
        return
    t0, prev_end, busy = gpu[0]["ts"], gpu[0]["ts"], 0.0
    print(f"{'start ms':>9} {'dur ms':>8} {'gap us':>8}  name")
    for e in gpu:
        gap = e["ts"] - prev_end
        print(f"{(e['ts'] - t0) / 1e3:9.3f} {e['dur'] / 1e3:8.3f} {gap:8.1f}  {e['name'][:90]}")
        prev_end = max(prev_end, e["ts"] + e["dur"])
        busy += e["dur"]
    span = prev_end - t0
    print(f"GPU span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f}"
          f" ms in {len(gpu)} GPU events")
    cpu = [e for e in evs if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    slow = sorted(cpu, key=lambda e: -e["dur"])[:8]
    print("slowest CUDA API calls on the host:")
    for e in slow:
        print(f"  {e['dur'] / 1e3:8.3f} ms  {e['name']}")


if __name__ == "__main__":
    main()
