"""Decode on the GPU: one lca.LatentCache.step per sequence against dense absorbed-MLA decode
over the full latent cache in plain torch (bmm + softmax: what a user without FlashMLA has),
and against the bytes-moved floor (the LCA cache bytes over the measured 4.27 TB/s copy rate).

Shape: absorbed MLA, Dc = 512, Dr = 64 (576/512), g = 16, w = 1024, bf16; H in {16, 128},
B in {1, 16, 64}, context 32K and 128K (tokens already in the cache).  The cache is filled
directly with random data (a prefill at 128K x B = 64 would only cost time): condensed rows,
ring and summary sums, then `length` is set to the context, and every timed step is a real
step at that position (append, attention over the G_T condensed rows and the exact window,
and the condensation when one falls due) — `length` is set back before each repetition.

Bytes read per step = the visible entries (G_T + T + 1 - G_T g) x 576 x 2 bytes x B (the
cache, once); the dense baseline reads (T + 1) x 576 x 2 x B.  GB/s = those bytes / time.
Two LCA times: one Python call (host overhead included: what a Python caller sees per step)
and the device time of the same step captured in a CUDA graph and replayed.  Times are
CUDA-event medians.  Prints one table; appends it to benchmarks/RESULTS.md.

    python3 benchmarks/bench_decode.py [--quick | --rows T:B:H,...] [--reps 30] [--no-append]
                                       [--no-dense] [--profile] [--variants ws wsc v3 ...]
Routing knobs for comparisons (csrc/cuda/decode.cu): LCA_CUDA_DISABLE=dec_bulk (decode.cu's
mma.sync partial instead of the Hopper one), LCA_DECODE_NSPLIT=n (the Hopper kernel's split
count), LCA_DECODE_VARIANT=wsa2|wsa|ws|wsc|wsm|v3|kt2|cp|kt2cp (the Hopper kernel's variants:
wsa2 the default for 16-head blocks, warp-specialised, appending the token and merging its
splits itself, 2 rows a bulk copy; wsa the same with a row a copy; ws wsa after the append
kernel; wsc with the combine kernel; v3 the one before them; the list in
csrc/cuda/decode_sm90a.cu).
--variants times each named
variant on the same cache in the same run (LCA_DECODE_VARIANT set before each; "default"
leaves it unset) and prints them side by side: one table row per (row, variant), the dense
baseline measured once per row.
"""
import argparse
import datetime
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lca  # noqa: E402
from bench_prefill import median_ms  # noqa: E402  (benchmarks/ is sys.path[0])

DC, DR, G, W = 512, 64, 16, 1024
COPY_TBS = 4.27          # measured device copy rate (SPEC §9)


def visible(T):
    Gt = max(0, (T - W + 1) // G)
    return Gt + (T + 1 - Gt * G)


def filled_cache(B, H, T):
    """A LatentCache holding T random tokens' state (written directly, no prefill)."""
    cache = lca.LatentCache(B, H, DC, DR, T + 64, group_size=G, window=W,
                            dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(B * 1000 + H)
    for a in cache._held_arrays:
        if a.dtype == torch.float32 and a.dim() == 1:
            continue                                      # the workspace
        a.copy_(torch.randn(a.shape, generator=gen, device="cuda", dtype=torch.float32))
    cache._length = T
    return cache


def dense_step(q, kv, scale):
    """Absorbed MLA decode over the full latent cache: q (B, H, 576), kv (B, T, 576).  The
    values are kv's first 512 columns; P @ kv then a slice avoids copying that strided view."""
    s = torch.bmm(q, kv.transpose(1, 2)) * scale                  # (B, H, T)
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, kv)[..., :DC]                             # (B, H, 512)


def graph_ms(cache, q, c, r, T, reps):
    """GPU time of one step without the host: the step at position T captured once in a CUDA
    graph and replayed (each replay is the same step: same slot, same condensation).  None if
    capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            cache._length = T
            cache.step(q, c, r)                                    # warm: attributes, pools
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        cache._length = T
        with torch.cuda.graph(graph):
            cache.step(q, c, r)
        cache._length = T
        n = 20
        return median_ms(lambda: [graph.replay() for _ in range(n)], reps, warmup=3) / n
    except Exception as e:  # noqa: BLE001 - report and go on with the host-inclusive time
        print(f"  (CUDA graph capture failed: {e})", flush=True)
        return None


def profile_step(cache, q, c, r, T, steps=10):
    """Print the kernels of one step at position T and their mean device time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            cache._length = T
            cache.step(q, c, r)
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_time_total > 0:
            print(f"    {e.key[:90]:90s} x{e.count / steps:.0f} "
                  f"{e.device_time_total / steps:8.1f} us/step", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three rows only")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--rows", default=None,
                    help="comma-separated T:B:H rows instead of the grid, e.g. 131072:64:16")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense torch decode (its columns show nan)")
    ap.add_argument("--profile", action="store_true",
                    help="also print each row's kernels and their device time per step "
                         "(torch.profiler over 10 steps)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="LCA_DECODE_VARIANT values to time side by side on each row (e.g. "
                         "ws v3); 'default' = unset")
    a = ap.parse_args()
    assert lca.HAS_CUDA, "needs a CUDA device"
    grid = [(T, B, H) for T in (32768, 131072) for H in (16, 128) for B in (1, 16, 64)]
    if a.quick:
        grid = [(131072, 64, 16), (131072, 1, 16), (32768, 16, 128)]
    if a.rows:
        grid = [tuple(int(x) for x in r.split(":")) for r in a.rows.split(",")]
    scale = 1.0 / math.sqrt(DC + DR)
    variants = a.variants or [None]              # None: LCA_DECODE_VARIANT as the caller set it
    rows = []
    for T, B, H in grid:
        cache = filled_cache(B, H, T)
        q = torch.randn(B, H, DC + DR, device="cuda", dtype=torch.bfloat16)
        c = torch.randn(B, DC, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(B, DR, device="cuda", dtype=torch.bfloat16)

        def reset():
            cache._length = T

        lca_bytes = visible(T) * (DC + DR) * 2 * B
        held = lca.cache_entries(T + 1, G, W) * (DC + DR) * 2 * B
        timed = []                               # (variant, call ms, GPU ms, kernel)
        for v in variants:
            if v == "default":
                os.environ.pop("LCA_DECODE_VARIANT", None)
            elif v is not None:
                os.environ["LCA_DECODE_VARIANT"] = v
            t_call = median_ms(lambda: cache.step(q, c, r), a.reps, warmup=3, before=reset)
            if a.profile:
                shown = v or os.environ.get("LCA_DECODE_VARIANT", "")
                print(f"  T={T} B={B} H={H} variant {shown}:", flush=True)
                profile_step(cache, q, c, r, T)
            t_gpu = graph_ms(cache, q, c, r, T, a.reps)
            timed.append((v, t_call, t_gpu if t_gpu is not None else t_call,
                          lca._C.cuda_last_decode_kernel()))
        del cache
        full_bytes = (T + 1) * (DC + DR) * 2 * B
        if a.no_dense:
            t_dense = float("nan")
        else:
            kv = torch.randn(B, T + 1, DC + DR, device="cuda", dtype=torch.bfloat16)
            t_dense = median_ms(lambda: dense_step(q, kv, scale), a.reps, warmup=3)
            del kv
        torch.cuda.empty_cache()
        side = []
        for v, t_call, t_lca, kernel in timed:
            rows.append((T, B, H, v, t_call, t_lca, lca_bytes / t_lca / 1e6,
                         lca_bytes / 1e9 / COPY_TBS, t_dense, full_bytes / t_dense / 1e6, held,
                         full_bytes))
            side.append(f"{(v or 'as set') + ': ' if a.variants else ''}call {t_call:.4f} ms, "
                        f"GPU {t_lca:.4f} ms ({lca_bytes / t_lca / 1e6:.0f} GB/s, "
                        f"{100 * lca_bytes / t_lca / 1e6 / (COPY_TBS * 1000):.1f}%, {kernel})")
        print(f"  T={T} B={B} H={H}: LCA " + " | ".join(side) + f"; dense {t_dense:.4f} ms",
              flush=True)

    vcol = "| variant " if a.variants else ""
    head = ("| context | B | H " + vcol + "| LCA step ms (call) | LCA GPU ms | LCA GB/s "
            "| % of 4.27 TB/s | floor ms | dense torch ms | dense GB/s | speedup (call) "
            "| speedup (GPU) | LCA cache MB | full cache MB | smaller |")
    lines = [head, "|" + "---|" * (15 + bool(a.variants))]
    for T, B, H, v, tc, tl, gl, fl, td, gd, held, full in rows:
        vc = f" {v} |" if a.variants else ""
        lines.append(f"| {T // 1024}K | {B} | {H} |{vc} {tc:.4f} | {tl:.4f} | {gl:.0f} | "
                     f"{100 * gl / (COPY_TBS * 1000):.1f}% | {fl:.4f} | {td:.4f} | {gd:.0f} | "
                     f"{td / tc:.1f}x | {td / tl:.1f}x | {held / 1e6:.1f} | {full / 1e6:.1f} | "
                     f"{100 * (1 - held / full):.1f}% |")
    table = "\n".join(lines)
    print(table)
    if not a.no_append:
        commit = os.environ.get("LCA_COMMIT")
        if not commit:
            try:
                commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                                 text=True, stderr=subprocess.DEVNULL).strip()
            except Exception:  # noqa: BLE001 - the device copy may have no git metadata
                commit = "unknown"
        gpu = torch.cuda.get_device_name()
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                  "a") as f:
            f.write(f"\n## Decode step, GPU — {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, "
                    f"{gpu}, commit {commit}\n\nCommand: `python3 benchmarks/bench_decode.py "
                    f"{' '.join(sys.argv[1:])}`. Absorbed MLA 576/512, g = 16, w = 1024, bf16; "
                    "one lca.LatentCache.step (append, attention over the condensed rows and "
                    "the window, condensation when due) vs dense decode over the full latent "
                    "cache in plain torch (bmm + softmax). 'call': one Python call, host "
                    "included; 'GPU': the same step captured in a CUDA graph and replayed "
                    "(device time alone). GB/s on the GPU time and the cache bytes read once "
                    "(LCA: the visible entries; dense: all T + 1 tokens); floor = LCA bytes / "
                    "4.27 TB/s; cache MB after T + 1 tokens. CUDA-event medians.\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
