"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), as AutoAttack runs it, in JAX.

A minimum-norm attack. Each step linearises the decision boundary at the current iterate x1,
{z : f_t(x1) - f_y(x1) + g . (z - x1) = 0} with g the gradient of f_t - f_y, and projects both x1
and the clean point x0 onto that hyperplane intersected with the box [0, 1]^d under the threat's
norm (`projection_linf`, `projection_l2`, `projection_l1`: d1, d2). The new iterate is the biased
combination ((x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha) clipped to the box, with
alpha = min(|d1| / (|d1| + |d2|), alpha_max) (eta: extrapolation). When it is misclassified it is
recorded if it is the closest to x0 so far, and x1 steps back towards x0: x0 + beta (x1 - x0).

* FAB-T (`targeted=True`, AutoAttack's standard version): one run per target class, the targets
  being the 2nd, ..., (n_target_classes + 1)-th largest clean logits; f_t is the target's logit.
* Untargeted: the hyperplane of the class k != y whose linearised boundary is closest,
  |f_k - f_y| / ||grad(f_k - f_y)||_q (q the dual norm), from the Jacobian of all logits.

Each (target, restart) run attacks the examples not yet fooled; the first run starts at x0, the
others at a random point at distance eps / 2 (as the reference). As in AutoAttack, an example
counts as fooled only when the smallest adversarial perturbation found has norm <= eps; x_adv is
that point where fooled, x elsewhere, so x_adv is always inside the threat.

FAB is meant for deterministic models. With a random `logits_fn`, each step uses one draw for the
logits and their Jacobian, and another for the misclassification check of the new iterate.

Differences from the reference: per-example gradients come from the gradient of the sum over the
batch (as the reference's backward passes), which assumes the model treats examples independently;
the projections compute the exact solution from one sort (no bisection); an active example
misclassified at x counts as fooled with x_adv = x (the reference leaves such points to the
caller).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .base import AttackResult, LogitsFn, Threat, lp_norm

_TINY = 1e-12


def _orient(t, w, b):
    """Orient the hyperplane so that t is on its positive side. Returns (a = |w| (N, D),
    direction of the move towards the hyperplane (N, D) in {-1, 0, 1}, capacity p (N, D): the
    largest move inside [0, 1] in that direction, gap c = |w . t - b| (N,))."""
    c = jnp.sum(w * t, axis=1) - b
    w = jnp.where((c >= 0)[:, None], w, -w)
    direction = -jnp.sign(w)
    cap = jnp.where(w > 0, t, 1.0 - t)
    cap = jnp.where(w != 0, jnp.clip(cap, 0.0, 1.0), 0.0)
    return jnp.abs(w), direction, cap, jnp.abs(c)


def projection_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """delta of least Linf norm with w . (t + delta) = b and t + delta in [0, 1]^D, row-wise.

    t, w: (N, D), b: (N,). The optimum is delta_i = dir_i min(lam, p_i) with the smallest lam >= 0
    reaching the hyperplane (p_i: room in the box). If the box cannot reach the hyperplane, the
    box corner closest to it (delta_i = dir_i p_i), as the reference.
    """
    a, direction, cap, c = _orient(t, w, b)
    order = jnp.argsort(cap, axis=1)
    cap_s = jnp.take_along_axis(cap, order, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    # reach(lam) = sum_i a_i min(lam, p_i); at lam = p_(k): sum_{j<k} a p + p_(k) sum_{j>=k} a.
    below = jnp.cumsum(a_s * cap_s, axis=1) - a_s * cap_s
    tail = jnp.flip(jnp.cumsum(jnp.flip(a_s, 1), axis=1), 1)
    reach = below + cap_s * tail
    m = jnp.sum(reach < c[:, None], axis=1)
    feasible = m < t.shape[1]
    k = jnp.minimum(m, t.shape[1] - 1)[:, None]
    num = c - jnp.take_along_axis(below, k, axis=1)[:, 0]
    den = jnp.take_along_axis(tail, k, axis=1)[:, 0]
    lam = jnp.where(c > 0, num / jnp.maximum(den, _TINY), 0.0)
    lam = jnp.where(feasible, lam, jnp.inf)
    return direction * jnp.minimum(lam[:, None], cap)


def projection_l2(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """delta of least L2 norm with w . (t + delta) = b and t + delta in [0, 1]^D, row-wise.

    The KKT point delta_i = dir_i min(lam |w_i|, p_i), lam >= 0 solving the piecewise-linear
    equation on the sorted breakpoints p_i / |w_i|. If infeasible, the box corner closest to the
    hyperplane.
    """
    a, direction, cap, c = _orient(t, w, b)
    nz = a > _TINY
    a = jnp.where(nz, a, 0.0)
    direction = jnp.where(nz, direction, 0.0)
    brk = jnp.where(nz, cap / jnp.where(nz, a, 1.0), 1e30)
    order = jnp.argsort(brk, axis=1)
    brk_s = jnp.take_along_axis(brk, order, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    ap_s = jnp.take_along_axis(a * cap, order, axis=1)
    # reach(lam) = sum_i a_i min(lam a_i, p_i); at lam = r_(k): sum_{j<k} a p + r_(k) sum_{j>=k} a^2
    below = jnp.cumsum(ap_s, axis=1) - ap_s
    tail = jnp.flip(jnp.cumsum(jnp.flip(a_s**2, 1), axis=1), 1)
    reach = below + jnp.where(tail > 0, brk_s * tail, 0.0)
    m = jnp.sum(reach < c[:, None], axis=1)
    feasible = m < t.shape[1]
    k = jnp.minimum(m, t.shape[1] - 1)[:, None]
    num = c - jnp.take_along_axis(below, k, axis=1)[:, 0]
    den = jnp.take_along_axis(tail, k, axis=1)[:, 0]
    lam = jnp.where(c > 0, num / jnp.maximum(den, _TINY**2), 0.0)
    move = jnp.where(feasible[:, None], jnp.minimum(lam[:, None] * a, cap), cap)
    return direction * move


def projection_l1(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """delta of least L1 norm with w . (t + delta) = b and t + delta in [0, 1]^D, row-wise.

    A fractional knapsack: move the coordinates by decreasing |w_i|, each as far as the box lets
    it, until the hyperplane is reached (the last one partly). If infeasible, the box corner
    closest to the hyperplane.
    """
    a, direction, cap, c = _orient(t, w, b)
    n, d = t.shape
    order = jnp.argsort(-a, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    ap_s = jnp.take_along_axis(a * cap, order, axis=1)
    reach = jnp.cumsum(ap_s, axis=1)
    m = jnp.sum(reach < c[:, None], axis=1)  # coordinates moved fully
    feasible = m < d
    k = jnp.minimum(m, d - 1)[:, None]
    before = jnp.take_along_axis(reach - ap_s, k, axis=1)[:, 0]
    a_k = jnp.take_along_axis(a_s, k, axis=1)[:, 0]
    partial = jnp.where(c > 0, (c - before) / jnp.maximum(a_k, _TINY), 0.0)
    rank = jnp.zeros((n, d), jnp.int32).at[jnp.arange(n)[:, None], order].set(jnp.arange(d))
    m = jnp.where(feasible, m, d)[:, None]
    move = jnp.where(rank < m, cap, jnp.where(rank == m, partial[:, None], 0.0))
    return direction * jnp.minimum(move, cap)


_PROJECTIONS = {"Linf": projection_linf, "L2": projection_l2, "L1": projection_l1}
_DUAL = {"Linf": "L1", "L2": "L2", "L1": "Linf"}


def _flat_norm(v, norm):
    if norm == "Linf":
        return jnp.max(jnp.abs(v), axis=-1)
    if norm == "L2":
        return jnp.sqrt(jnp.sum(v**2, axis=-1))
    return jnp.sum(jnp.abs(v), axis=-1)


def _random_start(key, x0, threat):
    """A random point at distance eps / 2 from x0 (the reference's restarts), clipped to [0,1]."""
    shape = x0.shape
    if threat.norm == "Linf":
        t = jax.random.uniform(key, shape, x0.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(key, shape, x0.dtype)
    t = t / jnp.maximum(lp_norm(t, threat.norm), _TINY).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0 + 0.5 * threat.eps * t, 0.0, 1.0)


@eqx.filter_jit
def _fab(
    logits_fn,
    x,
    y,
    key,
    active,
    threat,
    targeted,
    n_target_classes,
    n_iter,
    n_restarts,
    alpha_max,
    eta,
    beta,
):
    bsz = x.shape[0]
    norm = threat.norm
    project = _PROJECTIONS[norm]
    bcast = (slice(None),) + (None,) * (x.ndim - 1)
    x0 = x.reshape(bsz, -1)
    k_clean, k_run = jax.random.split(key)
    logits0 = logits_fn(x, k_clean)
    n_classes = logits0.shape[-1]
    fooled0 = active & (jnp.argmax(logits0, -1) != y)
    if targeted:
        n_t = max(1, min(n_target_classes, n_classes - 1))
        order = jnp.argsort(logits0, axis=-1)
        targets = jnp.stack([order[:, n_classes - 2 - j] for j in range(n_t)])  # (n_t, B)
    else:
        n_t = 1
        targets = jnp.zeros((1, bsz), jnp.int32)
    onehot_y = jax.nn.one_hot(y, n_classes, dtype=x.dtype)

    def hyperplane_targeted(x1, target, k):
        onehot_t = jax.nn.one_hot(target, n_classes, dtype=x.dtype)

        def total(xx):
            diff = jnp.sum(logits_fn(xx, k) * (onehot_t - onehot_y), axis=-1)
            return jnp.sum(diff), diff

        grad, diff = jax.grad(total, has_aux=True)(x1)
        return diff, grad.reshape(bsz, -1)

    def hyperplane_untargeted(x1, k):
        def summed(xx):
            logits = logits_fn(xx, k)
            return jnp.sum(logits, axis=0), logits

        jac, logits = jax.jacrev(summed, has_aux=True)(x1)  # (K, B, ...), (B, K)
        jac = jnp.moveaxis(jac.reshape(n_classes, bsz, -1), 0, 1)  # (B, K, D)
        df = logits - jnp.sum(logits * onehot_y, axis=-1, keepdims=True)
        dg = jac - jnp.einsum("bk,bkd->bd", onehot_y, jac)[:, None, :]
        dist = jnp.abs(df) / (_TINY + _flat_norm(dg, _DUAL[norm]))
        dist = jnp.where(onehot_y > 0, jnp.inf, dist)
        ind = jnp.argmin(dist, axis=-1)
        df = jnp.take_along_axis(df, ind[:, None], axis=1)[:, 0]
        dg = jnp.take_along_axis(dg, ind[:, None, None], axis=1)[:, 0]
        return df, dg

    def one_run(run_key, target, todo, rand_start):
        k_start, k_loop = jax.random.split(run_key)
        x1 = jnp.where(rand_start, _random_start(k_start, x, threat), x).reshape(bsz, -1)

        def step(i, state):
            x1, best, best_norm = state
            k_grad, k_check = jax.random.split(jax.random.fold_in(k_loop, i))
            x1_img = x1.reshape(x.shape)
            if targeted:
                df, w = hyperplane_targeted(x1_img, target, k_grad)
            else:
                df, w = hyperplane_untargeted(x1_img, k_grad)
            b = jnp.sum(w * x1, axis=1) - df
            d = project(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
            d1, d2 = d[:bsz], d[bsz:]
            a1 = jnp.maximum(_flat_norm(d1, norm), 1e-8)
            a2 = jnp.maximum(_flat_norm(d2, norm), 1e-8)
            alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
            is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape), k_check), -1) != y
            dist = _flat_norm(x1 - x0, norm)
            better = todo & is_adv & (dist < best_norm)
            best = jnp.where(better[:, None], x1, best)
            best_norm = jnp.where(better, dist, best_norm)
            x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
            return x1, best, best_norm

        init = (x1, x0, jnp.full((bsz,), jnp.inf, x.dtype))
        _, best, best_norm = jax.lax.fori_loop(0, n_iter, step, init)
        return best.reshape(x.shape), best_norm

    n_runs = n_t * n_restarts

    def cond(state):
        r, _, fooled = state
        return (r < n_runs) & jnp.any(active & ~fooled)

    def body(state):
        r, x_adv, fooled = state
        todo = active & ~fooled
        target = targets[r // n_restarts]
        rand_start = (r % n_restarts) > 0
        best, best_norm = one_run(jax.random.fold_in(k_run, r), target, todo, rand_start)
        success = todo & (best_norm <= threat.eps)
        x_adv = jnp.where(success[bcast], best, x_adv)
        return r + 1, x_adv, fooled | success

    _, x_adv, fooled = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), x, fooled0))
    return AttackResult(x_adv, fooled)


def fab(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    targeted: bool = True,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    active: jax.Array | None = None,
) -> AttackResult:
    """FAB (targeted FAB-T by default, as AutoAttack's standard version); see the module docstring.

    Args:
      logits_fn: (x, key) -> (B, K) logits, ideally deterministic.
      x: (B, H, W, C) in [0, 1]; y: (B,) int labels; key: PRNG key.
      threat: norm (Linf, L2 or L1) and eps; the attack minimises the norm, and succeeds where
        the smallest perturbation found has norm <= eps (eps also sets the random starts).
      targeted: FAB-T with n_target_classes targets, else the untargeted FAB.
      n_iter, n_restarts: steps per run; runs per target (the first from x, then random starts).
      alpha_max, eta, beta: bias towards x, extrapolation, backward step (the reference's).
      active: (B,) bool; inactive examples are returned unchanged with fooled False.

    Returns AttackResult: x_adv is the minimal adversarial point of the first successful run
    where fooled (inside the threat), else x.
    """
    y = jnp.asarray(y, jnp.int32)
    if active is None:
        active = jnp.ones(x.shape[:1], bool)
    return _fab(
        logits_fn,
        x,
        y,
        key,
        jnp.asarray(active, bool),
        threat,
        bool(targeted),
        int(n_target_classes),
        int(n_iter),
        int(n_restarts),
        float(alpha_max),
        float(eta),
        float(beta),
    )
