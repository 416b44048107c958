"""LCA forward and backward on CUDA, bf16, the SPEC §9 non-absorbed MLA shape (H = 16, per-head
192/128, g = 16, w = 1024, B = 1): CUDA-event medians, TFLOP/s on the attended pairs (forward
2·192 + 2·128 per pair per head; backward counted as 2.5× forward, as the issue asks), and with
--profile the per-kernel split of one backward.

    python3 benchmarks/bench_backward.py --L 8192 32768 [--profile]
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


def timed(fn, reps):
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
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[32768])
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    g, w, D, Dv, H = 16, 1024, 192, 128, a.H
    print(f"LCA bf16, H={H}, D/Dv={D}/{Dv}, g={g}, w={w}, B=1; CUDA events, median of {a.reps}")
    print(f"{'L':>7} {'fwd ms':>8} {'TF/s':>6} {'bwd ms':>8} {'TF/s':>6} {'%peak':>6} {'f+b ms':>8}")
    for L in a.L:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k = (torch.randn(1, L, H, D, generator=gen, device="cuda").bfloat16() for _ in range(2))
        v, dout = (torch.randn(1, L, H, Dv, generator=gen, device="cuda").bfloat16()
                   for _ in range(2))
        kw = dict(group_size=g, window=w)
        out, lse = lca.gqa_attention(q, k, v, return_lse=True, **kw)
        fwd = lambda: lca.gqa_attention(q, k, v, return_lse=True, **kw)        # noqa: E731
        bwd = lambda: lca.gqa_attention_backward(dout, q, k, v, out, lse, **kw)  # noqa: E731
        tf, tb = timed(fwd, a.reps), timed(bwd, a.reps)
        fl = pairs(L, g, w) * H * (2 * D + 2 * Dv)
        print(f"{L:>7} {tf:8.3f} {fl / tf / 1e9:6.0f} {tb:8.3f} {2.5 * fl / tb / 1e9:6.0f} "
              f"{100 * 2.5 * fl / (tb * 1e-3) / PEAK:5.1f}% {tf + tb:8.3f}")
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                bwd()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
