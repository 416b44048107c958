"""python -m lca.demo — LCA on random MLA inputs of a realistic size, on the CPU.

Prints LCA's difference from exact causal attention (same inputs, window >= L), the time of
each, and how many cache entries LCA keeps against the full cache.  Defaults: one layer of
DeepSeek-V2-Lite attention (H = 16, Dc = 512, Dr = 64), L = 4096, group 16, window 1024.
"""
import argparse
import time

import numpy as np

import lca


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--latent-dim", type=int, default=512)
    ap.add_argument("--kpos-dim", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    L, H, Dc, Dr = a.length, a.heads, a.latent_dim, a.kpos_dim
    rng = np.random.default_rng(a.seed)
    q = rng.standard_normal((L, H, Dc + Dr), dtype=np.float32)
    latent = rng.standard_normal((L, Dc), dtype=np.float32)
    kpos = rng.standard_normal((L, Dr), dtype=np.float32)
    kw = dict(group_size=a.group_size, window=a.window)
    print(f"MLA layer: L={L}, H={H}, Dc={Dc}, Dr={Dr}, group_size={a.group_size}, "
          f"window={a.window}, float32, {lca._C.max_threads()} CPU threads")

    t = time.perf_counter()
    out = lca.attention(q, latent, kpos, **kw)
    t_lca = time.perf_counter() - t
    t = time.perf_counter()
    exact = lca.attention(q, latent, kpos, group_size=a.group_size, window=L)
    t_exact = time.perf_counter() - t

    err = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    tail = slice(min(a.window, L), L)           # rows that actually see condensed entries
    err_tail = np.linalg.norm(out[tail] - exact[tail]) / max(np.linalg.norm(exact[tail]), 1e-30)
    print(f"LCA attention      {t_lca * 1e3:9.1f} ms")
    print(f"exact attention    {t_exact * 1e3:9.1f} ms   ({t_exact / t_lca:.1f}x slower)")
    print(f"LCA vs exact: relative error {err:.3e} over all rows, {err_tail:.3e} over the "
          f"{max(L - a.window, 0)} rows past the window (random inputs: no structure to keep)")

    bytes_per = (Dc + Dr) * 2                   # one cache entry in bf16
    for T in (L, 131072):
        kept = lca.cache_entries(T, a.group_size, a.window)
        print(f"cache at T={T:>6}: {kept:>6} of {T:>6} entries kept "
              f"({100 * (1 - kept / T):.1f}% smaller; {kept * bytes_per / 2**20:.2f} MiB vs "
              f"{T * bytes_per / 2**20:.2f} MiB per sequence per layer in bf16)")


if __name__ == "__main__":
    main()
