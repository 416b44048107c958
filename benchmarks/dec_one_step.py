"""One decode step on a random 128K cache (B = 64, H = 16), synchronised: a run for
compute-sanitizer.  python3 benchmarks/dec_one_step.py [T B H]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lca  # noqa: E402
from bench_decode import DC, DR, filled_cache  # noqa: E402

T, B, H = (int(x) for x in (sys.argv[1:4] if len(sys.argv) > 3 else (131072, 64, 16)))
cache = filled_cache(B, H, T)
q = torch.randn(B, H, DC + DR, device="cuda", dtype=torch.bfloat16)
c = torch.randn(B, DC, device="cuda", dtype=torch.bfloat16)
r = torch.randn(B, DR, device="cuda", dtype=torch.bfloat16)
for i in range(3):
    cache._length = T
    out = cache.step(q, c, r)
    torch.cuda.synchronize()
    print(i, lca._C.cuda_last_decode_kernel(), float(out.float().abs().sum()), flush=True)
