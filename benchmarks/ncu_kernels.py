"""One call of each kernel that sets a target, for Nsight Compute (ncu) to profile: the
non-absorbed forward (gqa_wgmma), its backward (dk/dv and dq), and the decode partial at
H = 16, B = 64.  Run under ncu, e.g. (gpu_check.sh's `ncu` stage):

    ncu --clock-control none -k regex:'gqa_wgmma|dkdv|dq_kernel|dec_partial' -c 4 \
        --section SpeedOfLight ... python3 benchmarks/ncu_kernels.py [--L 32768]

Each is called once; ncu replays the profiled launch for its sections."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lca  # noqa: E402
from bench_decode import filled_cache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--T", type=int, default=131072)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda").bfloat16()  # noqa: E731
    L, H = a.L, 16
    q, k, v, dout = rnd(1, L, H, 192), rnd(1, L, H, 192), rnd(1, L, H, 128), rnd(1, L, H, 128)
    out, lse = lca.gqa_attention(q, k, v, return_lse=True)
    lca.gqa_attention_backward(dout, q, k, v, out, lse)
    torch.cuda.synchronize()
    B = 64
    cache = filled_cache(B, H, a.T)
    qd, c, r = rnd(B, H, 576), rnd(B, 512), rnd(B, 64)
    cache.step(qd, c, r)
    torch.cuda.synchronize()
    print("kernels:", lca._C.cuda_last_attend_kernel(), lca._C.cuda_last_decode_kernel())


if __name__ == "__main__":
    main()
