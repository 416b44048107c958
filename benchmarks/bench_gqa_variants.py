"""The non-absorbed forward (lca.gqa_attention, SPEC §9 shape: H = Hkv = 16, q/k 192, v 128,
g = 16, w = 1024, B = 1, bf16) on the H200, kernel by kernel in one run: the mma.sync kernel
(LCA_CUDA_DISABLE=wgmma) and each tuning variant of the wgmma kernel attend_gqa_sm90a.cu
(LCA_GQA90_VARIANT; 28 is the default).  Times include the condensation, as in
bench_prefill.py; TFLOP/s on attended pairs (2*192 + 2*128 FLOP a pair and head).  Also the
relative difference of each variant's output from the mma.sync kernel's.  Prints; appends
nothing.  For tuning runs, not a results table.

    python3 benchmarks/bench_gqa_variants.py [--lengths 8192 131072] [--variants 0 1 ...]
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
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--variants", type=int, nargs="+",
                    default=[0, 1, 2, 3, 4, 5, 6, 7, 15, 17, 25, 28, 29, 56, 57])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    for L in a.lengths:
        torch.manual_seed(0)
        q, k = (torch.randn(1, L, 16, 192, device="cuda", dtype=dt) for _ in range(2))
        v = torch.randn(1, L, 16, 128, device="cuda", dtype=dt)
        flop = attended_pairs(L) * 16 * (2 * 192 + 2 * 128)
        runs = [("mma.sync", {"LCA_CUDA_DISABLE": "wgmma"})] + \
            [(f"variant {x}", {"LCA_GQA90_VARIANT": str(x)}) for x in a.variants]
        ref = None
        for name, env in runs:
            saved = {key: os.environ.get(key) for key in ("LCA_CUDA_DISABLE", "LCA_GQA90_VARIANT")}
            os.environ.update(env)
            try:
                t = median_ms(lambda: lca.gqa_attention(q, k, v), a.reps)
                kernel = lca._C.cuda_last_attend_kernel()
                out = lca.gqa_attention(q, k, v).double()
            finally:
                for key, val in saved.items():
                    if val is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = val
            ref = out if ref is None else ref
            diff = float((out - ref).norm() / ref.norm())
            print(f"L={L} {a.dtype} {name:10s} kernel={kernel:9s} {t:8.3f} ms "
                  f"{flop / t / 1e9:6.1f} TFLOP/s  diff vs mma.sync {diff:.1e}", flush=True)
        q = k = v = ref = out = None           # free before the next length


if __name__ == "__main__":
    main()
