"""Square Attack (Andriushchenko et al., ECCV 2020), as AutoAttack runs it, in JAX.

Score-based and gradient-free: each iteration changes the current best point inside one random
square window (two windows for L2) and keeps the change if the margin loss
`logit_y - max_{k != y} logit_k` decreases (or the point is misclassified). Untargeted, margin
loss, one query per iteration for the examples that are still robust.

Schedule of p, the fraction of the image covered by a square (reference `p_selection` of
`fra31/auto-attack/autoattack/square.py`, with `resc_schedule=True`): the iteration i is rescaled
to `it = int(i / n_queries * 10000)`, and

    it in [0, 10]: p_init          (10, 50]: p_init / 2      (50, 200]: p_init / 4
    (200, 500]: p_init / 8         (500, 1000]: p_init / 16  (1000, 2000]: p_init / 32
    (2000, 4000]: p_init / 64      (4000, 6000]: p_init / 128
    (6000, 8000]: p_init / 256     (8000, ...): p_init / 512.

The side of the square is s = round(sqrt(p * H * W)), at least 1 (Linf) or at least 3 and odd
(L2), and at most min(H, W).

Initialisation (as the reference): Linf, vertical stripes x + eps * (+-1) per column and channel;
L2, a grid of 5x5 centred blocks of side min(H, W) // 5, each holding the reference's
`eta(s)` pattern (two rectangles of opposite sign, each concentric squares weighted 1/k^2) with a
random sign per channel and a random transposition, scaled to L2 norm eps.

Differences from the reference: the squares' positions (and, for L2, the sign and orientation of
the new pattern) are drawn per example, not once per iteration for the whole batch (as in the
authors' original code); by default positions cover [0, H - s] inclusive (the reference's
`random_int(0, h - s)` never places a square on the last row or column; `cover_edges=False`
reproduces that); the bookkeeping is masked on the whole batch (static shapes) and the loop stops
when every active example is fooled. An active example misclassified at a run's initial point
counts as fooled (the reference attacks only the clean-correct points).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .base import AttackResult, LogitsFn, Threat

_IT_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(it: int, n_queries: int, p_init: float) -> float:
    """The reference schedule of p at iteration `it` of `n_queries` (host-side, for reference)."""
    it = int(it / n_queries * 10000)
    level = sum(it > t for t in _IT_THRESHOLDS)
    return p_init / 2**level


def _square_sides(h: int, w: int, p_init: float, norm: str) -> np.ndarray:
    """Side of the square at each of the 10 schedule levels."""
    sides = []
    for level in range(len(_IT_THRESHOLDS) + 1):
        p = p_init / 2**level
        s = int(round(math.sqrt(p * h * w)))
        if norm == "Linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            if s % 2 == 0:
                s += 1
        sides.append(max(1, min(s, h, w)))
    return np.asarray(sides, np.int32)


def _rectangles(nr: int, nc: int) -> np.ndarray:
    """Concentric rectangles around the centre, the k-th (k = 1, 2, ...) weighted 1/k^2."""
    out = np.zeros((nr, nc))
    if nr == 0 or nc == 0:
        return out
    rc, cc = nr // 2, nc // 2
    for k in range(max(rc, cc) + 1):
        out[max(rc - k, 0) : rc + k + 1, max(cc - k, 0) : cc + k + 1] += 1.0 / (k + 1) ** 2
    return out / np.sqrt(np.sum(out**2))


def eta_pattern(s: int) -> np.ndarray:
    """(s, s) unit-L2 pattern: top half positive rectangles, bottom half negative."""
    out = np.concatenate([_rectangles(s // 2, s), -_rectangles(s - s // 2, s)], axis=0)
    return out / np.sqrt(np.sum(out**2))


def _l2_tables(h: int, w: int, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels, h, w) eta(s) at the top-left corner, and its transpose, for each level."""
    e = np.zeros((len(sides), h, w), np.float32)
    et = np.zeros_like(e)
    for i, s in enumerate(sides):
        pat = eta_pattern(int(s))
        e[i, :s, :s] = pat
        et[i, :s, :s] = pat.T
    return e, et


def _l2_init_layout(h: int, w: int):
    """The reference's init grid: pattern, transposed pattern and block id (-1: none) per pixel."""
    s = max(min(h, w) // 5, 1)
    pat = eta_pattern(s)
    p = np.zeros((h, w), np.float32)
    pt = np.zeros_like(p)
    bid = -np.ones((h, w), np.int32)
    n = 0
    vh = (h - 5 * s) // 2
    for _ in range(h // s):
        vw = (w - 5 * s) // 2
        for _ in range(w // s):
            rh, rw = min(s, h - vh), min(s, w - vw)
            if rh > 0 and rw > 0:
                p[vh : vh + rh, vw : vw + rw] = pat[:rh, :rw]
                pt[vh : vh + rh, vw : vw + rw] = pat.T[:rh, :rw]
                bid[vh : vh + rh, vw : vw + rw] = n
                n += 1
            vw += s
        vh += s
    return p, pt, bid, max(n, 1)


def _sign(key, shape, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


def _l2n(v, axes=(1, 2, 3)):
    return jnp.sqrt(jnp.sum(v**2, axis=axes, keepdims=True))


def _margin(logits, y):
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(y, k, dtype=bool)
    correct = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return correct - other, jnp.argmax(logits, axis=-1) != y


def _window(key, b, h, w, s, cover_edges):
    """Random top-left corners in [0, h - s] x [0, w - s] ([0, h - s - 1] x [0, w - s - 1], or 0
    when s = h, without cover_edges); (rows (B, h) bool, cols (B, w) bool, row offsets (B, h),
    col offsets (B, w))."""
    kh, kw = jax.random.split(key)
    extra = 1 if cover_edges else 0
    vh = jax.random.randint(kh, (b,), 0, jnp.maximum(h - s + extra, 1))
    vw = jax.random.randint(kw, (b,), 0, jnp.maximum(w - s + extra, 1))
    di = jnp.arange(h)[None, :] - vh[:, None]
    dj = jnp.arange(w)[None, :] - vw[:, None]
    return (di >= 0) & (di < s), (dj >= 0) & (dj < s), di, dj


@eqx.filter_jit
def _square(logits_fn, x, y, key, active, threat, n_queries, p_init, n_restarts, cover_edges):
    b, h, w, c = x.shape
    eps = threat.eps
    dt = x.dtype
    sides_np = _square_sides(h, w, p_init, threat.norm)
    sides = jnp.asarray(sides_np)
    thresholds = jnp.asarray(_IT_THRESHOLDS, jnp.int32)
    bcast = (slice(None), None, None, None)

    if threat.norm == "L2":
        e_np, et_np = _l2_tables(h, w, sides_np)
        e_tab, et_tab = jnp.asarray(e_np, dt), jnp.asarray(et_np, dt)
        p0, pt0, bid_np, n_blocks = _l2_init_layout(h, w)
        p0, pt0 = jnp.asarray(p0, dt), jnp.asarray(pt0, dt)
        bid = jnp.asarray(np.maximum(bid_np, 0))
        in_block = jnp.asarray(bid_np >= 0)

    def init_point(k):
        k1, k2 = jax.random.split(k)
        if threat.norm == "Linf":
            return jnp.clip(x + eps * _sign(k1, (b, 1, w, c), dt), 0.0, 1.0)
        flip = jax.random.bernoulli(k1, 0.5, (b, n_blocks))[:, bid]  # (B, h, w)
        signs = _sign(k2, (b, n_blocks, c), dt)[:, bid]  # (B, h, w, C)
        pat = jnp.where(flip, pt0[None], p0[None]) * in_block[None]
        delta = pat[..., None] * signs
        return jnp.clip(x + delta / (_l2n(delta) + 1e-12) * eps, 0.0, 1.0)

    def proposal(i, x_best, k):
        it = (i * 10000) // n_queries
        level = jnp.sum(it > thresholds)
        s = sides[level]
        kw, ks, kw2, kf = jax.random.split(k, 4)
        rows, cols, di, dj = _window(kw, b, h, w, s, cover_edges)
        mask1 = (rows[:, :, None] & cols[:, None, :])[..., None]  # (B, h, w, 1)
        if threat.norm == "Linf":
            new = x_best + jnp.where(mask1, 2.0 * eps * _sign(ks, (b, 1, 1, c), dt), 0.0)
            return jnp.clip(jnp.clip(new, x - eps, x + eps), 0.0, 1.0)
        rows2, cols2, _, _ = _window(kw2, b, h, w, s, cover_edges)
        mask2 = (rows2[:, :, None] & cols2[:, None, :])[..., None]
        delta = x_best - x
        norm_win1 = _l2n(jnp.where(mask1, delta, 0.0), (1, 2))  # (B, 1, 1, C)
        norm_img = _l2n(delta)
        norm_wins = _l2n(jnp.where(mask1 | mask2, delta, 0.0))
        e_l, et_l = e_tab[level], et_tab[level]
        ri = jnp.clip(di, 0, h - 1)[:, :, None]
        rj = jnp.clip(dj, 0, w - 1)[:, None, :]
        flip = jax.random.bernoulli(kf, 0.5, (b, 1, 1))
        pat = jnp.where(flip, et_l[ri, rj], e_l[ri, rj])[..., None]
        new = jnp.where(mask1, pat, 0.0) * _sign(ks, (b, 1, 1, c), dt)
        new = new + jnp.where(mask1, delta, 0.0) / (1e-12 + norm_win1)
        budget = jnp.maximum(eps**2 - norm_img**2, 0.0) / c + norm_wins**2
        new = new / (1e-12 + _l2n(new, (1, 2))) * jnp.sqrt(budget)
        delta = jnp.where(mask1, new, jnp.where(mask2, 0.0, delta))
        return jnp.clip(x + delta / (_l2n(delta) + 1e-12) * eps, 0.0, 1.0)

    def one_restart(r, carry):
        x_adv, fooled = carry
        todo = active & ~fooled
        k_init, k_q0, k_loop = jax.random.split(jax.random.fold_in(key, r), 3)
        x_best = init_point(k_init)
        margin_min, miscl = _margin(logits_fn(x_best, k_q0), y)
        found = todo & miscl

        def cond(state):
            i, _, _, found = state
            return (i < n_queries) & jnp.any(todo & ~found)

        def body(state):
            i, x_best, margin_min, found = state
            k_prop, k_model = jax.random.split(jax.random.fold_in(k_loop, i))
            x_new = proposal(i, x_best, k_prop)
            margin, miscl = _margin(logits_fn(x_new, k_model), y)
            accept = todo & ~found & ((margin < margin_min) | miscl)
            x_best = jnp.where(accept[bcast], x_new, x_best)
            margin_min = jnp.where(accept, margin, margin_min)
            return i + 1, x_best, margin_min, found | (accept & miscl)

        _, x_best, _, found = jax.lax.while_loop(
            cond, body, (jnp.asarray(0, jnp.int32), x_best, margin_min, found)
        )
        x_adv = jnp.where(found[bcast], x_best, x_adv)
        return x_adv, fooled | found

    def restart_cond(state):
        r, _, fooled = state
        return (r < n_restarts) & jnp.any(active & ~fooled)

    def restart_body(state):
        r, x_adv, fooled = state
        return (r + 1, *one_restart(r, (x_adv, fooled)))

    fooled0 = jnp.zeros((b,), bool)
    _, x_adv, fooled = jax.lax.while_loop(
        restart_cond, restart_body, (jnp.asarray(0, jnp.int32), x, fooled0)
    )
    return AttackResult(x_adv, fooled)


def square(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    n_queries: int = 5000,
    p_init: float = 0.8,
    n_restarts: int = 1,
    active: jax.Array | None = None,
    cover_edges: bool = True,
) -> AttackResult:
    """Untargeted Square Attack with the margin loss (Linf or L2), see the module docstring.

    Args:
      logits_fn: (x, key) -> (B, K) logits; a random model gets a fresh draw per query.
      x: (B, H, W, C) in [0, 1]; y: (B,) int labels; key: PRNG key.
      n_queries: iterations per restart (one query each, plus one for the initial point).
      p_init: initial fraction of the image covered by a square.
      n_restarts: independent runs, each on the examples not yet fooled.
      active: (B,) bool; inactive examples are returned unchanged with fooled False.
      cover_edges: squares may cover the last row and column. False reproduces the reference
        (and the authors' code), whose positions `random_int(0, h - s)` never reach them: on an
        8x8 image that leaves 15 pixels at their initial values, on CIFAR-10 63 of 1024.

    Returns AttackResult: x_adv is the point found where fooled, else x; fooled[i] means a query
    (its draw of the model) misclassified x_adv[i]. An active example misclassified at the initial
    point of a run counts as fooled.
    """
    if threat.norm == "L1":
        raise NotImplementedError("Square Attack: Linf and L2 only (as AutoAttack)")
    y = jnp.asarray(y, jnp.int32)
    if active is None:
        active = jnp.ones(x.shape[:1], bool)
    return _square(
        logits_fn,
        x,
        y,
        key,
        jnp.asarray(active, bool),
        threat,
        int(n_queries),
        float(p_init),
        int(n_restarts),
        bool(cover_edges),
    )
