"""LCA forward and backward on CUDA, bf16, the SPEC §9 shape (H = 16, g = 16, w = 1024, B = 1):
non-absorbed MLA (per-head 192/128, the GQA entry with Hkv = H), or with --absorbed the absorbed
form (Dc = 512, Dr = 64, one kv head).  CUDA-event medians, TFLOP/s on the attended pairs
(forward 2·192 + 2·128, absorbed 2·576 + 2·512 per pair per head; backward counted as 2.5×
forward, as issue 5 asks), and with --profile the per-kernel split of one backward.  The
backward is timed as lca.torch runs it, given the forward's condensation (condensed=), and
once more recomputing it.

The bf16 matrix-product ceiling is measured in the same run twice: "burst", ten 8192^3 products
timed one by one (as bench_prefill.py and SPEC §9's 730-773 TFLOP/s), and "sustained", the
products back to back for as long as one backward, timed in the same pattern as the backward
(the H200's clocks fall under a long tensor-core load: a backward timed after a pause runs 7-10%
faster than one in a series).

    PYTHONPATH=. python3 benchmarks/bench_backward.py --L 8192 32768 [--profile] [--absorbed]
"""
import argparse
import statistics

import torch

import lca

PEAK = 750e12          # SPEC §9: measured bf16 matrix-product ceiling on the H200 (730-773)


def pairs(L, g, w):
    t = torch.arange(L, dtype=torch.int64)
    G = torch.clamp(torch.div(t - w + 1, g, rounding_mode="floor"), min=0)
    return int((G + t - G * g + 1).sum())


def event_times(fn, reps):
    """CUDA-event times (ms) of reps calls of fn, each synchronised, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return ts


def timed(fn, reps):
    return statistics.median(event_times(fn, reps))


def matmul_ceilings(t_ms, reps):
    """(burst, sustained) TFLOP/s of 8192^3 bf16 products: ten timed one at a time, and runs
    of back-to-back products lasting ~t_ms each, timed like the backward (median of reps)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t1 = timed(lambda: torch.matmul(a, b, out=c), 10)
    k = max(1, round(t_ms / t1))

    def run():
        for _ in range(k):
            torch.matmul(a, b, out=c)
    tk = timed(run, reps)
    return 2 * n ** 3 / t1 / 1e9, k * 2 * n ** 3 / tk / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[32768])
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--absorbed", action="store_true")
    a = ap.parse_args()
    g, w, H = 16, 1024, a.H
    D, Dv = (576, 512) if a.absorbed else (192, 128)
    print(f"LCA bf16, {'absorbed MLA' if a.absorbed else 'non-absorbed MLA'}, H={H}, "
          f"D/Dv={D}/{Dv}, g={g}, w={w}, B=1; CUDA events, median of {a.reps}")
    print(f"{'L':>7} {'fwd ms':>8} {'TF/s':>6} {'bwd ms':>8} {'TF/s':>6} {'%peak':>6} {'f+b ms':>8}")
    for L in a.L:
        gen = torch.Generator(device="cuda").manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda").bfloat16()  # noqa: E731
        kw = dict(group_size=g, window=w)
        if a.absorbed:
            q, c, r, dout = rnd(1, L, H, D), rnd(1, L, Dv), rnd(1, L, D - Dv), rnd(1, L, H, Dv)
            args, fn, fn_bwd = (q, c, r), lca.attention, lca.attention_backward
        else:
            q, k, v, dout = rnd(1, L, H, D), rnd(1, L, H, D), rnd(1, L, H, Dv), rnd(1, L, H, Dv)
            args, fn, fn_bwd = (q, k, v), lca.gqa_attention, lca.gqa_attention_backward
        out, lse, cond = fn(*args, return_lse=True, return_condensed=True, **kw)
        fwd = lambda: fn(*args, return_lse=True, return_condensed=True, **kw)        # noqa: E731
        # the backward as lca.torch runs it: the forward's condensation handed over
        bwd = lambda: fn_bwd(dout, *args, out, lse, condensed=cond, **kw)             # noqa: E731
        bwd_rec = lambda: fn_bwd(dout, *args, out, lse, **kw)                         # noqa: E731
        tf, tb = timed(fwd, a.reps), timed(bwd, a.reps)
        fl = pairs(L, g, w) * H * (2 * D + 2 * Dv)
        tfs = 2.5 * fl / tb / 1e9
        print(f"{L:>7} {tf:8.3f} {fl / tf / 1e9:6.0f} {tb:8.3f} {tfs:6.0f} "
              f"{100 * tfs * 1e12 / PEAK:5.1f}% {tf + tb:8.3f}", flush=True)
        tr = timed(bwd_rec, a.reps)
        print(f"        backward recomputing the condensation (no condensed=): {tr:.3f} ms, "
              f"{2.5 * fl / tr / 1e9:.0f} TFLOP/s", flush=True)
        burst, sustained = matmul_ceilings(tb, a.reps)
        print(f"        bf16 matmul ceiling in this run: burst {burst:.0f} TFLOP/s (backward "
              f"{100 * tfs / burst:.1f}%), sustained for {tb:.0f} ms {sustained:.0f} TFLOP/s "
              f"(backward {100 * tfs / sustained:.1f}%)", flush=True)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                bwd()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
