"""APGD (Auto-PGD) as AutoAttack runs it, in JAX: APGD-CE, APGD-DLR, APGD-T, and L1-APGD.

References: Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (Linf, L2); Croce & Hein 2021, "Mind the box: l1-APGD for sparse
adversarial attacks on image classifiers" (L1). The rules follow the reference code,
fra31/auto-attack `autoattack/autopgd_base.py` (`APGDAttack.attack_single_run`, `perturb`,
`decr_eps_pgd`, `APGDAttack_targeted.perturb`, `L1_projection`); "ref" below means that file.

One run (`_single_run`) on a batch x (B, H, W, C) in [0, 1]:

* Start (ref): Linf x + eps * t / ||t||_inf, t ~ U[-1, 1]^d; L2 x + eps * t / ||t||_2, t ~ N(0, I);
  L1 x + P(t), t ~ N(0, I), P the exact projection onto {||d||_1 <= eps} n {0 <= x + d <= 1};
  then clipped to [0, 1].
* Step (ref): Linf/L2: z = P(x_k + eta * s), s = sign(g) (Linf) or g / ||g||_2 (L2);
  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})), a = `momentum` = 0.75, but a = 1 at
  the first step; P = `base.project` (ball, then [0, 1]); eta starts at 2 eps.
  L1 (no momentum, as ref): s = sign(g) on the coordinates with the largest |g| (fraction
  `topk`, initially 0.2), x_{k+1} = x + P(x_k + eta s / ||s||_1 - x); eta starts at eps.
* Loss, gradient and logits at each iterate: the mean over n_eot draws (`base.eot_value_and_grad`;
  `eot_chunk` draws per vmapped call bound its memory without changing the result). When
  `logits_fn` is a `base.AuxObjective` (DiffAttack's, `attacks.diffattack`), the loss of each
  draw is the APGD loss of its logits plus the objective's own per-example term, from the same
  forward pass; every check (clean, in-loop, re-check) still uses the logits alone.
* Best loss point (x_best, its gradient, loss_best) updated where the loss strictly increased.
  Best adversarial point: wherever the iterate is misclassified, x_best_adv := iterate (the start
  point included), and the example counts as found.
* Step-size checkpoints (Linf/L2), see `checkpoints`: at the end of a window of k iterations,
  halve eta where (1) #{iterations in the window whose loss exceeded the previous iterate's}
  <= rho * k (ref `check_oscillation`: `<=`, the paper writes `<`), or (2) eta was not halved at
  the previous checkpoint and loss_best has not increased since; where halved, continue from
  x_best with its gradient (the momentum term then uses x_best - previous iterate, as ref).
  Condition (2) is off at the first checkpoint (ref `reduced_last_check = 1`).
* L1 checkpoints (ref): every k = max(int(0.04 n_iter), 1) iterations, sp = ||x_best - x||_0;
  if sp dropped by more than 5% since the last check, eta := eps and continue from x_best, else
  eta /= 1.5; eta clipped to [eps / 10, eps]; topk := sp / d / 1.5.

`apgd` / `apgd_targeted` (ref `perturb`): one clean forward pass (one draw) decides which examples
are misclassified already (they keep x_adv = x and count as fooled); then each restart (and, for
APGD-T, each target) runs on the whole batch, and its result is kept only for the examples still
to be fooled (masks: static shapes, no recompilation). Restart r uses `fold_in(key, r)`, so a run
with more restarts extends a run with fewer.

`fooled` (B,) bool means: active, and either the clean pass misclassified x (x_adv = x), or the
APGD loop found x_adv misclassified (EOT-averaged logits) AND one fresh forward pass of
`logits_fn` (one draw) at x_adv right after that restart also misclassifies it. An example the
loop found but the fresh pass did not confirm keeps the loop's x_adv, has fooled = False, and is
attacked again by the next restart/target. For a deterministic model both checks agree.

Deviations from ref (all deliberate, documented where they occur):
* The in-loop misclassification check uses the EOT-averaged logits (ref: the last draw's logits,
  since its EOT loop overwrites `logits`). Same for n_eot = 1.
* Condition (1) at the first checkpoint compares the first iterate's loss with the start point's
  loss, as the paper's formula; ref compares it with `loss_steps[-1]`, an unfilled 0.
* Restarts re-attack examples whose loop success the fresh single-draw check did not confirm
  (ref: the loop's check alone decides); identical for deterministic models.
* APGD-T targets come from the clean pass's logits, computed once (ref: a fresh forward pass per
  target and restart, which for a random model can repeat or skip classes).
* L1 with use_largereps: the first start point is x + P_{3 eps}(t), t ~ N(0, I) (current ref; an
  older ref version projected x + t instead of t, a bug).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import losses as _losses
from .base import (
    AttackResult,
    AuxObjective,
    LogitsFn,
    Threat,
    check_eot_chunk,
    eot_value_and_grad,
    project,
    project_l1_box,
)

LOSSES = ("ce", "dlr", "dlr-targeted")


def checkpoints(n_iter: int) -> list[int]:
    """The Linf/L2 step-size checkpoints: iteration counts w_1 < w_2 < ... <= n_iter.

    The check after w_j iterations (0-based loop index w_j - 1) looks at the window of the last
    k_j = w_j - w_{j-1} iterations (w_0 = 0). The paper's rule is w_j = ceil(p_j n_iter) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); the reference code
    (`init_hyperparam`, `attack_single_run`) realises it in integers: k_1 = max(int(0.22 n_iter),
    1), k_{j+1} = max(k_j - max(int(0.03 n_iter), 1), max(int(0.06 n_iter), 1)), with a check
    whenever an iteration counter reaches k_j; the last check is the last w_j <= n_iter.
    n_iter = 100 gives [22, 41, 57, 70, 80, 87, 93, 99].
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    k_decr = max(int(0.03 * n_iter), 1)
    out, w = [], 0
    while w + k <= n_iter:
        w += k
        out.append(w)
        k = max(k - k_decr, k_min)
    return out


def l1_checkpoint_interval(n_iter: int) -> int:
    """L1-APGD checks every k = max(int(0.04 n_iter), 1) iterations (ref)."""
    return max(int(0.04 * n_iter), 1)


def largereps_schedule(n_iter: int, eps: float) -> list[tuple[float, int]]:
    """L1 `use_largereps` (ref `perturb`): eps 3, 2, 1 times eps for ceil(0.3 n), ceil(0.3 n) and
    the remaining iterations (n = 100: 30, 30, 40; n = 11: 4, 4, 3)."""
    iters = [math.ceil(0.3 * n_iter), math.ceil(0.3 * n_iter)]
    iters.append(n_iter - sum(iters))
    if min(iters) < 1:
        raise ValueError(f"use_largereps needs n_iter >= 3, got {n_iter}")
    return list(zip([3.0 * eps, 2.0 * eps, 1.0 * eps], iters, strict=True))


@dataclasses.dataclass(frozen=True)
class _Config:
    norm: str
    eps: float
    n_iter: int
    n_restarts: int
    n_eot: int
    rho: float
    momentum: float
    use_largereps: bool
    n_targets: int  # > 0: APGD-T over the n_targets runner-up classes of the clean pass
    eot_chunk: int | None = None  # draws per vmapped EOT call (None: all n_eot at once)

    @classmethod
    def of(
        cls, threat, n_iter, n_restarts, n_eot, rho, momentum, use_largereps, n_targets,
        eot_chunk=None,
    ):  # fmt: skip
        """The static config of a call, every value cast to its Python type (hashable); an
        eot_chunk covering every draw is None (the same program as no chunking)."""
        return cls(
            threat.norm, float(threat.eps), int(n_iter), int(n_restarts), int(n_eot),
            float(rho), float(momentum), bool(use_largereps), int(n_targets),
            check_eot_chunk(eot_chunk, int(n_eot)),
        )  # fmt: skip


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _loss(loss_id, logits, y, y_t):
    """(B,) the loss LOSSES[loss_id]. loss_id is traced, so the CE and DLR runs of one model
    share one compilation (AutoAttack's apgd-ce and apgd-dlr: through DiffPure's exact gradient
    that halves the compile time). DLR needs K >= 4 (`_attack` checks it); below, only CE."""
    if logits.shape[1] < 4:
        return _losses.cross_entropy(logits, y)
    branches = [
        lambda z: _losses.cross_entropy(z, y),
        lambda z: _losses.dlr(z, y),
        lambda z: _losses.dlr_targeted(z, y, y_t),
    ]
    return jax.lax.switch(loss_id, branches, logits)


def _windows(norm: str, n_iter: int) -> np.ndarray:
    """(n_iter,) int32: the window length k at the 0-based iterations ending in a check, else 0."""
    w = np.zeros(n_iter, np.int32)
    if norm == "L1":
        k = l1_checkpoint_interval(n_iter)
        w[k - 1 :: k] = k
    else:
        prev = 0
        for c in checkpoints(n_iter):
            w[c - 1] = c - prev
            prev = c
    return w


class _LoopState(NamedTuple):
    """The carry of one APGD run's loop; every field is per example (leading axis B)."""

    x_adv: jax.Array  # the current iterate x_k
    x_old: jax.Array  # the previous iterate x_{k-1} (momentum)
    grad: jax.Array  # the gradient at x_adv (at x_best after a reset)
    loss_prev: jax.Array  # the loss at the previous iterate (condition 1's counter)
    n_incr: jax.Array  # int32: iterations in the current window whose loss increased
    x_best: jax.Array  # the best loss point so far
    grad_best: jax.Array  # its gradient
    loss_best: jax.Array  # its loss
    loss_best_last: jax.Array  # loss_best at the previous checkpoint (condition 2)
    reduced_last: jax.Array  # bool: the step was halved at the previous checkpoint
    step: jax.Array  # the step size eta
    x_best_adv: jax.Array  # the last misclassified iterate (x_adv's start point if none)
    found: jax.Array  # bool: some iterate was misclassified
    topk: jax.Array  # L1: the fraction of coordinates stepped on (zeros for Linf/L2)
    sp_old: jax.Array  # L1: ||x_best - x||_0 at the previous checkpoint (zeros for Linf/L2)


def _single_run(
    logits_fn, x, y, y_t, key, loss_id, cfg: _Config, eps: float, n_iter: int, x_init=None
):
    """One APGD run on the whole batch. Returns (x_best_adv, found (B,), x_best)."""
    threat = Threat(cfg.norm, eps)
    k_start, k_loop = jax.random.split(key)
    bsz = x.shape[0]
    n_fts = math.prod(x.shape[1:])

    def value_and_grad(xa, k):
        def loss_fn(xx, kk):
            if isinstance(logits_fn, AuxObjective):  # static: e.g. DiffAttack's L_dev
                z, aux = logits_fn.logits_and_aux(xx, kk)
                return _loss(loss_id, z, y, y_t) + aux, z
            z = logits_fn(xx, kk)
            return _loss(loss_id, z, y, y_t), z

        return eot_value_and_grad(loss_fn, xa, k, cfg.n_eot, cfg.eot_chunk)

    def wrong(logits):
        return jnp.argmax(logits, axis=1) != y

    if x_init is not None:
        x_adv = x_init
    elif cfg.norm == "Linf":
        t = jax.random.uniform(k_start, x.shape, x.dtype, -1.0, 1.0)
        tn = jnp.max(jnp.abs(t.reshape(bsz, -1)), axis=1)
        x_adv = x + eps * t / _bcast(tn + 1e-12, x)
    elif cfg.norm == "L2":
        t = jax.random.normal(k_start, x.shape, x.dtype)
        tn = jnp.sqrt(jnp.sum(t.reshape(bsz, -1) ** 2, axis=1))
        x_adv = x + eps * t / _bcast(tn + 1e-12, x)
    else:
        x_adv = x + project_l1_box(jax.random.normal(k_start, x.shape, x.dtype), x, eps)
    x_adv = jnp.clip(x_adv, 0.0, 1.0)

    loss, grad, logits = value_and_grad(x_adv, jax.random.fold_in(k_loop, 0))
    found = wrong(logits)
    alpha = 1.0 if cfg.norm == "L1" else 2.0
    if cfg.norm == "L1":
        if x_init is None:
            topk = jnp.full((bsz,), 0.2, x.dtype)
            sp_old = jnp.full((bsz,), float(n_fts), x.dtype)
        else:
            sp_old = jnp.sum((x_adv - x).reshape(bsz, -1) != 0, axis=1).astype(x.dtype)
            topk = sp_old / n_fts / 1.5
    else:  # unused for Linf/L2; kept so that both norms share one loop state
        topk = sp_old = jnp.zeros((bsz,), x.dtype)
    state = _LoopState(
        x_adv=x_adv,
        x_old=x_adv,
        grad=grad,
        loss_prev=loss,
        n_incr=jnp.zeros((bsz,), jnp.int32),
        x_best=x_adv,
        grad_best=grad,
        loss_best=loss,
        loss_best_last=loss,
        reduced_last=jnp.ones((bsz,), bool),
        step=jnp.full((bsz,), alpha * eps, x.dtype),
        x_best_adv=x_adv,
        found=found,
        topk=topk,
        sp_old=sp_old,
    )
    windows = jnp.asarray(_windows(cfg.norm, n_iter))

    def body(i, s: _LoopState) -> _LoopState:
        x_adv, grad = s.x_adv, s.grad
        step = _bcast(s.step, x)
        if cfg.norm == "L1":
            g = grad.reshape(bsz, -1)
            srt = jnp.sort(jnp.abs(g), axis=1)
            idx = jnp.clip((1.0 - s.topk) * n_fts, 0, n_fts - 1).astype(jnp.int32)
            thr = jnp.take_along_axis(srt, idx[:, None], axis=1)
            sg = (jnp.sign(g) * (jnp.abs(g) >= thr)).reshape(x.shape)
            l0 = jnp.sum(jnp.abs(sg).reshape(bsz, -1), axis=1)
            x1 = x_adv + step * sg / _bcast(l0 + 1e-10, x)
            x_new = x + project_l1_box(x1 - x, x, eps)
        else:
            a = jnp.where(i > 0, cfg.momentum, 1.0)
            if cfg.norm == "Linf":
                direction = jnp.sign(grad)
            else:
                gn = jnp.sqrt(jnp.sum(grad.reshape(bsz, -1) ** 2, axis=1))
                direction = grad / _bcast(gn + 1e-12, x)
            z = project(x_adv + step * direction, x, threat)
            x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - s.x_old), x, threat)

        loss, grad, logits = value_and_grad(x_new, jax.random.fold_in(k_loop, i + 1))
        hit = wrong(logits)
        x_best_adv = jnp.where(_bcast(hit, x), x_new, s.x_best_adv)
        n_incr = s.n_incr + (loss > s.loss_prev).astype(jnp.int32)
        better = loss > s.loss_best
        x_best = jnp.where(_bcast(better, x), x_new, s.x_best)
        grad_best = jnp.where(_bcast(better, x), grad, s.grad_best)
        loss_best = jnp.where(better, loss, s.loss_best)

        k = windows[i]
        check = k > 0
        if cfg.norm == "L1":
            sp = jnp.sum((x_best - x).reshape(bsz, -1) != 0, axis=1).astype(x.dtype)
            fl = sp / s.sp_old < 0.95
            new_step = jnp.clip(
                jnp.where(fl, alpha * eps, s.step / 1.5), alpha * eps / 10, alpha * eps
            )
            s = s._replace(
                step=jnp.where(check, new_step, s.step),
                topk=jnp.where(check, sp / n_fts / 1.5, s.topk),
                sp_old=jnp.where(check, sp, s.sp_old),
            )
            reset = check & fl
        else:
            cond1 = n_incr.astype(x.dtype) <= k * cfg.rho
            cond2 = ~s.reduced_last & (s.loss_best_last >= loss_best)
            reset = check & (cond1 | cond2)
            s = s._replace(
                reduced_last=jnp.where(check, cond1 | cond2, s.reduced_last),
                loss_best_last=jnp.where(check, loss_best, s.loss_best_last),
                step=jnp.where(reset, s.step / 2, s.step),
            )
        return s._replace(
            x_adv=jnp.where(_bcast(reset, x), x_best, x_new),
            x_old=x_adv,
            grad=jnp.where(_bcast(reset, x), grad_best, grad),
            loss_prev=loss,
            n_incr=jnp.where(check, 0, n_incr),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            x_best_adv=x_best_adv,
            found=s.found | hit,
        )

    s = jax.lax.fori_loop(0, n_iter, body, state)
    return s.x_best_adv, s.found, s.x_best


def _run_once(logits_fn, x, y, y_t, key, loss_id, cfg: _Config):
    """One restart: a single run, or the L1 3-stage decreasing-eps schedule (ref `decr_eps_pgd`:
    each stage starts from the previous stage's x_best projected onto the next ball; the result
    is the last stage's)."""
    if not cfg.use_largereps:
        adv, found, _ = _single_run(logits_fn, x, y, y_t, key, loss_id, cfg, cfg.eps, cfg.n_iter)
        return adv, found
    stages = largereps_schedule(cfg.n_iter, cfg.eps)
    k0, key = jax.random.split(key)
    x_init = x + project_l1_box(jax.random.normal(k0, x.shape, x.dtype), x, stages[0][0])
    for n, (eps_s, it_s) in enumerate(stages):
        x_init = x + project_l1_box(x_init - x, x, eps_s)
        adv, found, x_init = _single_run(
            logits_fn, x, y, y_t, jax.random.fold_in(key, n), loss_id, cfg, eps_s, it_s, x_init
        )
    return adv, found


@eqx.filter_jit
def _attack(logits_fn, x, y, key, active, y_target, loss_id, cfg: _Config):
    """loss_id: int32 scalar, the index in LOSSES (traced: see `_loss`)."""
    k_clean, k_runs, k_check = jax.random.split(key, 3)
    clean = logits_fn(x, k_clean)
    if clean.shape[1] < 4:  # static; the loss is not, so the check runs with the attack
        clean = eqx.error_if(
            clean,
            loss_id != 0,
            "APGD's DLR losses need at least 4 classes; use loss='ce' for this model",
        )
    fooled = active & (jnp.argmax(clean, axis=1) != y)
    if cfg.n_targets:
        if clean.shape[1] < max(4, cfg.n_targets + 1):  # static: raised while tracing
            raise ValueError(
                f"apgd_targeted needs K >= max(4, n_target_classes + 1) = "
                f"{max(4, cfg.n_targets + 1)} classes, got K = {clean.shape[1]}"
            )
        # Ref: target_class in 2..n+1 -> the target_class-th largest clean logit.
        targets = jax.lax.top_k(clean, cfg.n_targets + 1)[1][:, 1:].T.astype(jnp.int32)
    else:
        targets = y_target[None]
    n_runs = targets.shape[0] * cfg.n_restarts

    def body(r, carry):
        x_adv, fooled = carry
        todo = active & ~fooled
        y_t = targets[r // cfg.n_restarts]

        def attack(_):
            cand, found = _run_once(
                logits_fn, x, y, y_t, jax.random.fold_in(k_runs, r), loss_id, cfg
            )
            recheck = logits_fn(cand, jax.random.fold_in(k_check, r))
            return cand, found, jnp.argmax(recheck, axis=1) != y

        def skip(_):
            no = jnp.zeros_like(todo)
            return x, no, no

        cand, found, confirmed = jax.lax.cond(jnp.any(todo), attack, skip, None)
        take = todo & found
        return jnp.where(_bcast(take, x), cand, x_adv), fooled | (take & confirmed)

    return jax.lax.fori_loop(0, n_runs, body, (x, fooled))


def _validate(x, y, threat, n_iter, n_restarts, n_eot, use_largereps, active, eot_chunk=None):
    if not isinstance(threat, Threat):
        raise TypeError(f"threat must be a base.Threat, got {type(threat).__name__}")
    if x.ndim < 2 or y.shape != x.shape[:1]:
        raise ValueError(f"x must be (B, ...) and y (B,), got {x.shape} and {y.shape}")
    for name, v in (("n_iter", n_iter), ("n_restarts", n_restarts), ("n_eot", n_eot)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v}")
    check_eot_chunk(eot_chunk, 1)  # raises unless None or a positive int
    if use_largereps:
        if threat.norm != "L1":
            raise ValueError("use_largereps is the L1 schedule (ref asserts norm == 'L1')")
        largereps_schedule(int(n_iter), 1.0)  # raises if n_iter is too small
    if active is None:
        return jnp.ones(x.shape[:1], bool)
    active = jnp.asarray(active)
    if active.shape != x.shape[:1] or active.dtype != jnp.bool_:
        raise ValueError(f"active must be bool {x.shape[:1]}, got {active.dtype} {active.shape}")
    return active


def apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    loss: str = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    n_eot: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    y_target: jax.Array | None = None,
    active: jax.Array | None = None,
    use_largereps: bool = False,
    eot_chunk: int | None = None,
) -> AttackResult:
    """Untargeted APGD (ref `APGDAttack.perturb`), Linf, L2 or L1.

    Args:
      logits_fn: (x, key) -> logits (B, K); may be an equinox Module (its arrays are traced).
        A plain function is a static argument: pass the same object to reuse the compilation.
      x: (B, H, W, C) in [0, 1]; y: (B,) int labels; key: PRNG key.
      threat: the Lp ball (Linf, L2 or L1) intersected with [0, 1].
      loss: "ce", "dlr" or "dlr-targeted" (then y_target (B,) int is required).
      n_iter: iterations per run; n_restarts: runs (each on the examples not yet fooled).
      n_eot: draws averaged per loss/gradient/logits evaluation (`base.eot_value_and_grad`).
      eot_chunk: draws per vmapped call (None: all n_eot at once); memory of eot_chunk draws,
        the same result up to float32 summation order.
      rho: the checkpoint threshold of condition (1); momentum: the ref's alpha = 0.75, the
        weight of the new step (1 - momentum on the previous displacement); Linf/L2 only.
      active: (B,) bool; inactive examples come back as x with fooled = False.
      use_largereps: L1 only, the 3 eps -> 2 eps -> eps schedule AutoAttack's standard L1 uses.

    Returns:
      AttackResult(x_adv (B, H, W, C) inside the threat, fooled (B,) bool); see the module
      docstring for exactly what `fooled` means.
    """
    y = jnp.asarray(y).astype(jnp.int32)
    active = _validate(x, y, threat, n_iter, n_restarts, n_eot, use_largereps, active, eot_chunk)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "dlr-targeted":
        if y_target is None:
            raise ValueError("loss 'dlr-targeted' needs y_target (B,)")
        y_target = jnp.asarray(y_target).astype(jnp.int32)
        if y_target.shape != y.shape:
            raise ValueError(f"y_target must be {y.shape}, got {y_target.shape}")
    elif y_target is not None:
        raise ValueError(f"y_target is only used by loss 'dlr-targeted', not {loss!r}")
    else:
        y_target = y
    cfg = _Config.of(threat, n_iter, n_restarts, n_eot, rho, momentum, use_largereps, 0, eot_chunk)
    loss_id = jnp.int32(LOSSES.index(loss))
    x_adv, fooled = _attack(logits_fn, x, y, key, active, y_target, loss_id, cfg)
    return AttackResult(x_adv, fooled)


def apgd_targeted(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    n_eot: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    active: jax.Array | None = None,
    use_largereps: bool = False,
    eot_chunk: int | None = None,
) -> AttackResult:
    """APGD-T (ref `APGDAttack_targeted.perturb`): APGD on the targeted DLR loss, for each of
    the 2nd..(n_target_classes + 1)-th largest clean logits in turn (n_restarts runs each), each
    run on the examples not yet fooled, so the first success per example is kept. Success is
    untargeted (argmax != y), as ref. Arguments and result as `apgd`; K >= n_target_classes + 1
    and K >= 4 are required.
    """
    y = jnp.asarray(y).astype(jnp.int32)
    active = _validate(x, y, threat, n_iter, n_restarts, n_eot, use_largereps, active, eot_chunk)
    if int(n_target_classes) != n_target_classes or n_target_classes < 1:
        raise ValueError(f"n_target_classes must be a positive int, got {n_target_classes}")
    cfg = _Config.of(
        threat, n_iter, n_restarts, n_eot, rho, momentum, use_largereps, n_target_classes,
        eot_chunk,
    )  # fmt: skip
    loss_id = jnp.int32(LOSSES.index("dlr-targeted"))
    x_adv, fooled = _attack(logits_fn, x, y, key, active, y, loss_id, cfg)
    return AttackResult(x_adv, fooled)
