"""Prefill on the GPU, side by side in one run (SPEC §9 shape, DeepSeek-V2-Lite: H = 16,
absorbed Dc = 512 / Dr = 64, non-absorbed q/k 192, v 128; g = 16, w = 1024; B = 1; bf16):

  - LCA absorbed forward (lca.attention, 576/512) and the condensation's share of it;
  - LCA non-absorbed forward (lca.gqa_attention, 192/128, 16 kv heads);
  - the same non-absorbed LCA math in FlexAttention: condensation in torch, then
    flex_attention over [condensed; exact] keys with a block mask of the SPEC §3 visibility
    (forward: the flex_attention call alone is timed, keys prepared outside the timing;
    forward+backward: everything, since the gradient flows through the condensation);
  - dense causal attention, torch SDPA on its cuDNN backend.

With --backward, forward+backward of the non-absorbed form too (LCA, FlexAttention, dense),
backward counted as 2.5x the forward FLOPs (LCA's as lca.torch trains: the forward's
condensation handed to the backward, condensed=; a note gives the time with the backward
recomputing it); and the training path of the non-absorbed MLA
layer, "mla_prefill fwd+bwd (lca.torch)": from q, latent, kpos, W_UK, W_UV, up-projections,
condensation in latent space and their backward included, FLOPs counted as for the
non-absorbed row.  FLOPs are counted on attended pairs only:
absorbed 2*(Dc+Dr) + 2*Dc per pair and head, non-absorbed 2*192 + 2*128.  Times are CUDA-event
medians.  The bf16 matrix-product ceiling is measured in the same run (a 8192^3 torch.matmul)
and every TFLOP/s figure is also given as a share of it.  Appends the table to
benchmarks/RESULTS.md.

    python3 benchmarks/bench_prefill.py [--lengths 8192 32768] [--reps 5] [--backward]
                                        [--no-flex | --flex-lengths L..] [--no-append]
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


def median_ms(fn, reps, warmup=1, before=None):
    """Median CUDA-event time of fn() in ms over reps runs, after warmup runs; before(), when
    given, runs untimed ahead of every run (e.g. to reset state)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def matmul_peak(reps):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = median_ms(lambda: a @ b, max(reps, 10), warmup=3)
    return 2 * n ** 3 / t / 1e9


# ---- LCA in FlexAttention (non-absorbed / GQA form, key_mode "anchor") ----

def torch_condense(q, k, v, g, n, scale):
    """SPEC §4 condensation in plain torch, O(L): q (B,L,H,D), k (B,L,Hkv,D), v (B,L,Hkv,Dv)."""
    B, L, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    m = L // g
    qg = q[:, :m * g].reshape(B, m, g, Hkv, Hq // Hkv, D)[:, :, g - n:].float().mean(dim=(2, 4))
    kg = k[:, :m * g].reshape(B, m, g, Hkv, D)
    vg = v[:, :m * g].reshape(B, m, g, Hkv, Dv)
    s = scale * torch.einsum("bmhd,bmghd->bmhg", qg, kg.float())
    alpha = torch.softmax(s, dim=-1)
    anchor = alpha.argmax(dim=-1)
    vbar = torch.einsum("bmhg,bmghd->bmhd", alpha, vg.float()).to(v.dtype)
    kbar = torch.gather(kg, 2, anchor[:, :, None, :, None].expand(B, m, 1, Hkv, D))[:, :, 0]
    return kbar, vbar


def flex_lca(L, g=G, w=W, rep_bias=0.0):
    """A function (q, k, v) -> out computing LCA with FlexAttention, block mask built once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    m = L // g
    kv_len = -(-(m + L) // 128) * 128             # padded keys are masked out (s > t)

    def visible(b, h, q_idx, kv_idx):
        Gq = torch.where(q_idx >= w - 1, (q_idx - w + 1) // g, 0)
        s = kv_idx - m
        return torch.where(kv_idx < m, kv_idx < Gq, (s >= Gq * g) & (s <= q_idx))

    mask = torch.compile(create_block_mask)(visible, None, None, L, kv_len, device="cuda")
    score_mod = None
    if rep_bias:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx < m, score + rep_bias, score)
    flex = torch.compile(flex_attention, dynamic=False)
    cond = torch.compile(torch_condense, dynamic=False)

    def keys(q, k, v):                           # condensation + [condensed; exact; pad]
        kbar, vbar = cond(q, k, v, g, g, q.shape[-1] ** -0.5)
        pad = kv_len - m - L
        kk = torch.cat([kbar, k, k.new_zeros(k.shape[0], pad, *k.shape[2:])], dim=1)
        vv = torch.cat([vbar, v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], dim=1)
        return kk.transpose(1, 2), vv.transpose(1, 2)

    def attend(q, kk, vv):                       # the attention alone, keys given
        return flex(q.transpose(1, 2), kk, vv, block_mask=mask, score_mod=score_mod,
                    scale=q.shape[-1] ** -0.5).transpose(1, 2)

    def run(q, k, v):
        return attend(q, *keys(q, k, v))
    return run, keys, attend


def mla_prefill_times(L, dout, reps, notes):
    """(forward ms, forward+backward ms) of the non-absorbed MLA layer as a user trains it:
    lca.mla_prefill (forward alone) and lca.torch.mla_prefill forward + backward from q (B, L,
    H, 192), latent (B, L, 512), kpos (B, L, 64), W_UK (H, 512, 128), W_UV (H, 512, 128), all
    bf16 and requiring grad.  The time includes the up-projections, the condensation and their
    backward; FLOPs are still counted on the attended pairs only (3.5x the non-absorbed
    forward's), so the row compares directly with the LCA non-absorbed fwd+bwd one, whose keys
    and values come given."""
    import lca.torch as lt
    dev, bf = "cuda", torch.bfloat16
    leaves = [(torch.randn(*shape, device=dev, dtype=bf) * scale).requires_grad_()
              for shape, scale in (((1, L, H, DQK), 1.0), ((1, L, DC), 1.0), ((1, L, DR), 1.0),
                                   ((H, DC, DQK - DR), DC ** -0.5), ((H, DC, DV), DC ** -0.5))]

    def clear():
        for x in leaves:
            x.grad = None
    try:
        plain = [x.detach() for x in leaves]
        t_f = median_ms(lambda: lca.mla_prefill(*plain), reps)
        t_fb = median_ms(lambda: lt.mla_prefill(*leaves).backward(dout), reps, before=clear)
    except NotImplementedError as e:
        t_f = t_fb = float("nan")
        notes.append(f"L={L}: mla_prefill forward+backward not run: {e}")
    return t_f, t_fb


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="forward+backward rows too")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-lengths", type=int, nargs="+", default=None,
                    help="run FlexAttention only at these lengths (each length compiles anew)")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    assert lca.HAS_CUDA, "needs a CUDA device"
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    peak = matmul_peak(a.reps)
    print(f"measured bf16 matmul ceiling (8192^3): {peak:.0f} TFLOP/s", flush=True)
    fwd_rows, bwd_rows, mla_rows, notes, kernels = [], [], [], [], {}
    for L in a.lengths:
        pairs = attended_pairs(L) * H
        dense_pairs = L * (L + 1) / 2 * H
        f_abs = pairs * (2 * (DC + DR) + 2 * DC)
        f_non = pairs * (2 * DQK + 2 * DV)
        f_dense = dense_pairs * (2 * DQK + 2 * DV)
        q = torch.randn(1, L, H, DC + DR, device=dev, dtype=bf)
        c = torch.randn(1, L, DC, device=dev, dtype=bf)
        r = torch.randn(1, L, DR, device=dev, dtype=bf)
        qn, kn = (torch.randn(1, L, H, DQK, device=dev, dtype=bf) for _ in range(2))
        vn = torch.randn(1, L, H, DV, device=dev, dtype=bf)

        t_abs = median_ms(lambda: lca.attention(q, c, r), a.reps)
        kernels["absorbed"] = lca._C.cuda_last_attend_kernel()
        t_cond = median_ms(lambda: lca.condense(q, c, r), a.reps)
        del q, c, r
        t_non = median_ms(lambda: lca.gqa_attention(qn, kn, vn), a.reps)
        kernels["non-absorbed"] = lca._C.cuda_last_attend_kernel()
        t_flex = float("nan")
        use_flex = not a.no_flex and (a.flex_lengths is None or L in a.flex_lengths)
        if use_flex:
            flex, flex_keys, flex_attend = flex_lca(L)
            kk, vv = flex_keys(qn, kn, vn)
            # the attention alone (condensation and key concatenation not timed: the peer's
            # best case; lca.gqa_attention's time includes its condensation)
            t_flex = median_ms(lambda: flex_attend(qn, kk, vv), a.reps, warmup=2)
            del kk, vv
            err = rel_err(flex(qn, kn, vn), lca.gqa_attention(qn, kn, vn))
            notes.append(f"L={L}: FlexAttention LCA vs lca.gqa_attention, relative error "
                         f"{err:.1e} (bf16 both; anchor ties may differ)")
        qt, kt, vt = (x.transpose(1, 2) for x in (qn, kn, vn))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        cudnn = lambda: torch.nn.attention.sdpa_kernel(   # noqa: E731
            torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
        with cudnn():
            t_dense = median_ms(lambda: sdpa(qt, kt, vt, is_causal=True), a.reps)
        fwd_rows.append((L, t_abs, f_abs / t_abs / 1e9, t_cond / t_abs, t_non,
                         f_non / t_non / 1e9, t_flex, t_dense, f_dense / t_dense / 1e9))
        print(fwd_rows[-1], flush=True)

        if a.backward:
            dout = torch.randn(1, L, H, DV, device=dev, dtype=bf)

            def lca_fb():               # as lca.torch trains: the condensation handed over
                out, lse, cond = lca.gqa_attention(qn, kn, vn, return_lse=True,
                                                   return_condensed=True)
                lca.gqa_attention_backward(dout, qn, kn, vn, out, lse, condensed=cond)

            def lca_fb_recomputed():    # the backward recomputing the condensation
                out, lse = lca.gqa_attention(qn, kn, vn, return_lse=True)
                lca.gqa_attention_backward(dout, qn, kn, vn, out, lse)
            try:
                t_lca_fb = median_ms(lca_fb, a.reps)
                t_rec = median_ms(lca_fb_recomputed, a.reps)
                notes.append(f"L={L}: LCA forward+backward with the backward recomputing the "
                             f"condensation (no condensed=): {t_rec:.2f} ms (vs {t_lca_fb:.2f})")
            except NotImplementedError as e:
                t_lca_fb = float("nan")
                notes.append(f"LCA forward+backward not run: {e}")
            leaves = [x.detach().requires_grad_() for x in (qn, kn, vn)]
            t_flex_fb = float("nan")
            if use_flex:
                t_flex_fb = median_ms(lambda: flex(*leaves).backward(dout), a.reps, warmup=2)
            lt = [x.transpose(1, 2) for x in leaves]
            with cudnn():
                t_dense_fb = median_ms(lambda: sdpa(*lt, is_causal=True).backward(
                    dout.transpose(1, 2)), a.reps)
            bwd_rows.append((L, t_lca_fb, 3.5 * f_non / t_lca_fb / 1e9, t_flex_fb, t_dense_fb,
                             3.5 * f_dense / t_dense_fb / 1e9))
            print(bwd_rows[-1], flush=True)
            del leaves, lt
            t_mla_f, t_mla_fb = mla_prefill_times(L, dout, a.reps, notes)
            mla_rows.append((L, t_mla_f, t_mla_fb, 3.5 * f_non / t_mla_fb / 1e9, t_lca_fb))
            print(mla_rows[-1], flush=True)
            del dout
        del qn, kn, vn, qt, kt, vt
        torch.cuda.empty_cache()

    pct = lambda tf: f"{tf:.1f} ({100 * tf / peak:.0f}%)"   # noqa: E731
    ms = lambda t: "—" if t != t else f"{t:.2f}"            # noqa: E731  (nan: not run)
    vs = lambda a, b: "—" if a != a else f"{a / b:.2f}x"    # noqa: E731
    lines = ["| L | LCA absorbed fwd ms | TFLOP/s (% ceiling) | condense share "
             "| LCA non-absorbed fwd ms | TFLOP/s (% ceiling) | FlexAttention LCA fwd ms "
             "| dense cuDNN fwd ms | TFLOP/s | non-absorbed vs dense | vs Flex |",
             "|" + "---|" * 11]
    for L, ta, fa, cs, tn, fn_, tf, td, fd in fwd_rows:
        lines.append(f"| {L} | {ta:.2f} | {pct(fa)} | {100 * cs:.1f}% | {tn:.2f} | {pct(fn_)} "
                     f"| {ms(tf)} | {td:.2f} | {fd:.1f} | {td / tn:.2f}x | {vs(tf, tn)} |")
    if bwd_rows:
        lines += ["", "| L | LCA non-absorbed fwd+bwd ms | TFLOP/s (% ceiling) "
                  "| FlexAttention LCA fwd+bwd ms | dense cuDNN fwd+bwd ms | TFLOP/s "
                  "| LCA vs dense | LCA vs Flex |", "|" + "---|" * 8]
        for L, tl, fl, tf, td, fd in bwd_rows:
            lines.append(f"| {L} | {tl:.2f} | {pct(fl)} | {ms(tf)} | {td:.2f} | {fd:.1f} "
                         f"| {td / tl:.2f}x | {vs(tf, tl)} |")
    if mla_rows:
        lines += ["", "| L | mla_prefill fwd (lca) ms | mla_prefill fwd+bwd (lca.torch) ms "
                  "| TFLOP/s (% ceiling) | time / LCA non-absorbed fwd+bwd (keys given) |",
                  "|" + "---|" * 5]
        for L, tf, tfb, ffb, tl in mla_rows:
            lines.append(f"| {L} | {ms(tf)} | {ms(tfb)} | {pct(ffb) if tfb == tfb else '—'} "
                         f"| {vs(tfb, tl) if tl == tl else '—'} |")
    table = "\n".join(lines)
    print(table)
    for n_ in notes:
        print(n_)
    if not a.no_append:
        commit = os.environ.get("LCA_COMMIT")    # the device copy's .git may be stale
        if not commit:
            try:
                commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                                 text=True, stderr=subprocess.DEVNULL).strip()
            except Exception:  # noqa: BLE001 - no git metadata
                commit = "unknown"
        gpu = torch.cuda.get_device_name()
        with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
            f.write(f"\n## Prefill, GPU — {datetime.date.today()}, {gpu}, commit {commit}\n\n"
                    f"Command: `python3 benchmarks/bench_prefill.py {' '.join(sys.argv[1:])}`; "
                    f"torch {torch.__version__}. Forward kernels (lca._C.cuda_last_attend_kernel): "
                    f"absorbed {kernels.get('absorbed')}, non-absorbed "
                    f"{kernels.get('non-absorbed')}. Medians of CUDA-event times, bf16. Measured "
                    f"bf16 matmul ceiling in this run: {peak:.0f} TFLOP/s (8192^3).\n\n"
                    f"{table}\n\n" + "".join(f"- {n_}\n" for n_ in notes))


if __name__ == "__main__":
    main()
