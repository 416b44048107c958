"""Absorbed MLA forward alone on the GPU (the tensor-core kernel csrc/cuda/attend_mla.cu):
SPEC §9 shape by default (H = 16, Dc = 512, Dr = 64, g = 16, w = 1024, B = 1, bf16).  Prints,
per length, the attention alone (lca.attend over precomputed condensed entries) and the whole
lca.attention (condensation included): CUDA-event medians, ms and TFLOP/s on the attended FLOPs
(2*(Dc+Dr) + 2*Dc per pair and head, SPEC §9), and which kernel ran.

    python3 benchmarks/bench_mla.py [--lengths 8192 32768] [--heads 16] [--dc 512 --dr 64]
                                    [--dtype bfloat16] [--reps 5]

On a compute 9.0 device the 576/512 shape runs the Hopper wgmma kernel (attend_mla_sm90a.cu);
LCA_CUDA_DISABLE=wgmma runs the mma.sync kernel (attend_mla.cu); the "kernel" column says which
one ran.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lca  # noqa: E402
from bench_prefill import attended_pairs, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dc", type=int, default=512)
    ap.add_argument("--dr", type=int, default=64)
    ap.add_argument("--g", type=int, default=16)
    ap.add_argument("--w", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    assert lca.HAS_CUDA, "needs a CUDA device"
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    print(f"| L | H | Dc/Dr | dtype | attend ms | TFLOP/s | attention (with condense) ms "
          f"| TFLOP/s | kernel |")
    print("|" + "---|" * 9)
    for L in a.lengths:
        q = torch.randn(1, L, a.heads, a.dc + a.dr, device="cuda", dtype=dt)
        c = torch.randn(1, L, a.dc, device="cuda", dtype=dt)
        r = torch.randn(1, L, a.dr, device="cuda", dtype=dt)
        kw = dict(group_size=a.g, window=a.w)
        cb, rb, _, _ = lca.condense(q, c, r, group_size=a.g)
        t_att = median_ms(lambda: lca.attend(q, c, r, cb, rb, **kw), a.reps)
        kernel = lca._C.cuda_last_attend_kernel()
        t_all = median_ms(lambda: lca.attention(q, c, r, **kw), a.reps)
        flop = attended_pairs(L, a.g, a.w) * a.heads * (2 * (a.dc + a.dr) + 2 * a.dc)
        print(f"| {L} | {a.heads} | {a.dc}/{a.dr} | {a.dtype} | {t_att:.3f} | "
              f"{flop / t_att / 1e9:.1f} | {t_all:.3f} | {flop / t_all / 1e9:.1f} | {kernel} |",
              flush=True)
        del q, c, r, cb, rb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
