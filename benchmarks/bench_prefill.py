"""Prefill forward on the GPU: LCA's CUDA kernels against dense causal attention (torch SDPA,
cuDNN backend), side by side in one run, SPEC §9 shape (DeepSeek-V2-Lite: H = 16, absorbed
Dc = 512 / Dr = 64, non-absorbed q/k 192, v 128; g = 16, w = 1024; B = 1; bf16).

FLOPs are counted on attended pairs only: absorbed 2*(Dc+Dr) + 2*Dc per pair and head,
non-absorbed 2*192 + 2*128.  Times are CUDA-event medians.  Appends the table to
benchmarks/RESULTS.md.

    python3 benchmarks/bench_prefill.py [--lengths 8192 32768] [--no-append]
"""
import argparse
import datetime
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lca  # noqa: E402

H, DC, DR, DQK, DV, G, W = 16, 512, 64, 192, 128, 16, 1024


def attended_pairs(L, g=G, w=W):
    """Sum over t of G_t + (t - G_t*g + 1), per head."""
    t = torch.arange(L, dtype=torch.float64)
    Gt = torch.clamp(torch.div(t - w + 1, g, rounding_mode="floor"), min=0)
    return float((Gt + t - Gt * g + 1).sum())


def median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    assert lca.HAS_CUDA, "needs a CUDA device"
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for L in a.lengths:
        pairs = attended_pairs(L) * H
        dense_pairs = L * (L + 1) / 2 * H
        q = torch.randn(1, L, H, DC + DR, device=dev, dtype=bf)
        c = torch.randn(1, L, DC, device=dev, dtype=bf)
        r = torch.randn(1, L, DR, device=dev, dtype=bf)
        qn, kn = (torch.randn(1, L, H, DQK, device=dev, dtype=bf) for _ in range(2))
        vn = torch.randn(1, L, H, DV, device=dev, dtype=bf)

        t_abs = median_ms(lambda: lca.attention(q, c, r), a.reps)
        t_cond = median_ms(lambda: lca.condense(q, c, r), a.reps)
        t_non = median_ms(lambda: lca.gqa_attention(qn, kn, vn), a.reps)
        qt, kt, vt = (x.transpose(1, 2) for x in (qn, kn, vn))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            t_dense = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True), a.reps)
        f_abs = pairs * (2 * (DC + DR) + 2 * DC)
        f_non = pairs * (2 * DQK + 2 * DV)
        f_dense = dense_pairs * (2 * DQK + 2 * DV)
        rows.append((L, t_abs, f_abs / t_abs / 1e9, t_cond / t_abs, t_non, f_non / t_non / 1e9,
                     t_dense, f_dense / t_dense / 1e9))
        del q, c, r, qn, kn, vn

    head = ("| L | LCA absorbed fwd ms | TFLOP/s | condense share | LCA non-absorbed fwd ms "
            "| TFLOP/s | dense cuDNN fwd ms | TFLOP/s | non-absorbed speedup over dense |")
    lines = [head, "|" + "---|" * 9]
    for L, ta, fa, cs, tn, fn_, td, fd in rows:
        lines.append(f"| {L} | {ta:.2f} | {fa:.1f} | {100 * cs:.1f}% | {tn:.2f} | {fn_:.1f} | "
                     f"{td:.2f} | {fd:.1f} | {td / tn:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not a.no_append:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                             text=True).strip()
        except Exception:  # noqa: BLE001 - the device copy may have no git metadata
            commit = os.environ.get("LCA_COMMIT", "unknown")
        gpu = torch.cuda.get_device_name()
        with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
            f.write(f"\n## Prefill forward, GPU — {datetime.date.today()}, {gpu}, commit "
                    f"{commit}\n\nCommand: `python3 benchmarks/bench_prefill.py "
                    f"{' '.join(sys.argv[1:])}`. LCA absorbed (576/512) runs the tensor-core "
                    "mma.sync kernel attend_mla.cu; LCA non-absorbed (192/128) the tensor-core "
                    "mma.sync kernel attend_mma.cu. Medians of CUDA-event times, bf16.\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
