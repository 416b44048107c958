"""The executable specification of LCA (SPEC §2-§4), in plain float64 NumPy.

Written for clarity, not speed: one loop per group for condensation, one per query position
for attention, every visible entry listed explicitly.  The tests compare every kernel against
these functions; nothing in the library calls them.

Shapes follow the public API (SPEC §7) with the batch dimension present:
    MLA: q (B, L, H, Dc+Dr), latent (B, L, Dc), kpos (B, L, Dr)
    GQA: q (B, L, H, D),     k (B, L, Hkv, D),  v (B, L, Hkv, Dv)
"""
import numpy as np


def num_condensed(t, group_size, window):
    """G_t: how many condensed entries query position t sees (SPEC §3)."""
    return max(0, (t - window + 1) // group_size)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _pool_group(qbar, keys, scale, score_dims):
    """Softmax weights over one group's tokens and the anchor (SPEC §2)."""
    s = scale * (keys[:, :score_dims] @ qbar[:score_dims])
    alpha = _softmax(s)
    return alpha, int(np.argmax(alpha))          # argmax: first index of the maximum


def gqa_condense(q, k, v, *, group_size=16, n_summary=None, softmax_scale=None,
                 key_mode="anchor"):
    """SPEC §4 condensation: (kbar (B,m,Hkv,D), vbar (B,m,Hkv,Dv), anchor (B,m,Hkv), alpha)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    g, n = group_size, n_summary or group_size
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(D)
    m, hg = L // g, H // Hkv
    kbar = np.zeros((B, m, Hkv, D)); vbar = np.zeros((B, m, Hkv, Dv))
    anchor = np.zeros((B, m, Hkv), np.int32); alpha = np.zeros((B, m, Hkv, g))
    for b in range(B):
        for j in range(m):
            toks = slice(j * g, j * g + g)
            for h in range(Hkv):
                # summary query: last n queries of the group, over the heads sharing kv head h
                qbar = q[b, j * g + g - n: j * g + g, h * hg:(h + 1) * hg].mean(axis=(0, 1))
                a, i = _pool_group(qbar, k[b, toks, h], scale, D)
                vbar[b, j, h] = a @ v[b, toks, h]
                kbar[b, j, h] = k[b, j * g + i, h] if key_mode == "anchor" else a @ k[b, toks, h]
                anchor[b, j, h], alpha[b, j, h] = i, a
    return kbar, vbar, anchor, alpha


def condense(q, latent, kpos, *, group_size=16, n_summary=None, softmax_scale=None,
             score="full"):
    """SPEC §2 condensation: (latent_bar (B,m,Dc), kpos_bar (B,m,Dr), anchor (B,m), alpha (B,m,g))."""
    q, c, r = (np.asarray(a, np.float64) for a in (q, latent, kpos))
    B, L, H, Dq = q.shape
    Dc = c.shape[2]
    g, n = group_size, n_summary or group_size
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(Dq)
    score_dims = Dq if score == "full" else Dc
    keys = np.concatenate([c, r], axis=2)
    m = L // g
    cbar = np.zeros((B, m, Dc)); rbar = np.zeros((B, m, r.shape[2]))
    anchor = np.zeros((B, m), np.int32); alpha = np.zeros((B, m, g))
    for b in range(B):
        for j in range(m):
            toks = slice(j * g, j * g + g)
            qbar = q[b, j * g + g - n: j * g + g].mean(axis=(0, 1))   # over n tokens, all H heads
            a, i = _pool_group(qbar, keys[b, toks], scale, score_dims)
            cbar[b, j] = a @ c[b, toks]
            rbar[b, j] = r[b, j * g + i]
            anchor[b, j], alpha[b, j] = i, a
    return cbar, rbar, anchor, alpha


def gqa_attend(q, k, v, kbar, vbar, *, group_size=16, window=1024, softmax_scale=None,
               rep_bias=0.0):
    """SPEC §3 over given condensed (kbar, vbar) and exact (k, v) entries: (out, lse (B,H,L))."""
    q, k, v, kbar, vbar = (np.asarray(a, np.float64) for a in (q, k, v, kbar, vbar))
    B, L, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    hg = H // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(D)
    out = np.zeros((B, L, H, Dv)); lse = np.zeros((B, H, L))
    for b in range(B):
        for t in range(L):
            G = num_condensed(t, group_size, window)
            for h in range(H):
                kv = h // hg
                keys = np.concatenate([kbar[b, :G, kv], k[b, G * group_size:t + 1, kv]])
                vals = np.concatenate([vbar[b, :G, kv], v[b, G * group_size:t + 1, kv]])
                logits = scale * (keys @ q[b, t, h])
                logits[:G] += rep_bias
                mx = logits.max()
                p = np.exp(logits - mx)
                out[b, t, h] = p @ vals / p.sum()
                lse[b, h, t] = mx + np.log(p.sum())
    return out, lse


def attend(q, latent, kpos, latent_bar, kpos_bar, *, group_size=16, window=1024,
           softmax_scale=None, rep_bias=0.0):
    """SPEC §3 for MLA in absorbed form: keys [c; r], values c. Returns (out, lse)."""
    c, r = np.asarray(latent, np.float64), np.asarray(kpos, np.float64)
    cb, rb = np.asarray(latent_bar, np.float64), np.asarray(kpos_bar, np.float64)
    k = np.concatenate([c, r], axis=2)[:, :, None]          # one key/value head shared by all
    kbar = np.concatenate([cb, rb], axis=2)[:, :, None]
    return gqa_attend(q, k, c[:, :, None], kbar, cb[:, :, None], group_size=group_size,
                      window=window, softmax_scale=softmax_scale, rep_bias=rep_bias)


def attention(q, latent, kpos, *, group_size=16, window=1024, n_summary=None,
              softmax_scale=None, score="full", rep_bias=0.0):
    """LCA attention for MLA (SPEC §2 + §3): (out (B,L,H,Dc), lse (B,H,L))."""
    cbar, rbar, _, _ = condense(q, latent, kpos, group_size=group_size, n_summary=n_summary,
                                softmax_scale=softmax_scale, score=score)
    return attend(q, latent, kpos, cbar, rbar, group_size=group_size, window=window,
                  softmax_scale=softmax_scale, rep_bias=rep_bias)


def gqa_attention(q, k, v, *, group_size=16, window=1024, n_summary=None, softmax_scale=None,
                  key_mode="anchor", rep_bias=0.0):
    """LCA attention for GQA/MHA (SPEC §4): (out (B,L,H,Dv), lse (B,H,L))."""
    kbar, vbar, _, _ = gqa_condense(q, k, v, group_size=group_size, n_summary=n_summary,
                                    softmax_scale=softmax_scale, key_mode=key_mode)
    return gqa_attend(q, k, v, kbar, vbar, group_size=group_size, window=window,
                      softmax_scale=softmax_scale, rep_bias=rep_bias)


def causal_attention(q, k, v, softmax_scale=None):
    """Plain causal softmax attention (GQA layout), the w >= L limit of LCA: (out, lse)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, L, H, D = q.shape
    hg = H // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(D)
    kk = np.repeat(k, hg, axis=2); vv = np.repeat(v, hg, axis=2)
    s = scale * np.einsum("bthd,bshd->bhts", q, kk)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    lse = (mx + np.log(p.sum(-1, keepdims=True)))[..., 0]
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), vv), lse
