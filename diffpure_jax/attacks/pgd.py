"""PGD with EOT, covering two protocols from the DiffPure literature.

* PGD-EOT, as Lee & Kim (ICCV 2023) ran it: 200 steps, and each step averages the gradient of the
  cross-entropy over 20 draws of the random defense. This is `average="loss"`.
* BPDA+EOT, as DiffPure ran it (`bpda_eot_attack.py`, adapted from ebm-defense): 50 steps of 2/255,
  no random start. Each step averages the logits of 15 purifications before the cross-entropy
  (`average="logits"`). A point that looks broken is re-checked with 150 purifications averaged
  (`recheck_draws=150`), and once broken it stays broken. The BPDA gradient itself comes from the
  model: pass a defense in `grad="bpda"` mode.

The attack knows nothing of diffusion. `logits_fn(x, key)` is any random or deterministic model.
"""

from __future__ import annotations

from types import MappingProxyType

import equinox as eqx
import jax
import jax.numpy as jnp

from .base import AttackResult, Threat, check_eot_chunk, eot_logits, project
from .losses import cross_entropy


def _direction(grad, norm):
    if norm == "Linf":
        return jnp.sign(grad)
    flat = grad.reshape(grad.shape[0], -1)
    n = jnp.sqrt(jnp.sum(flat**2, axis=1)).reshape((-1,) + (1,) * (grad.ndim - 1))
    return grad / jnp.maximum(n, 1e-12)


@eqx.filter_jit
def _pgd(
    logits_fn, x, y, key, active, threat, n_iter, step_size, n_eot, average, start, recheck, stop,
    chunk,
):  # fmt: skip
    def value_and_grad(x_cur, k):
        def total(xc):
            logits = eot_logits(logits_fn, xc, k, n_eot, chunk)
            mean_logits = logits.mean(0)
            if average == "logits":
                loss = cross_entropy(mean_logits, y)
            else:
                loss = jax.vmap(lambda lg: cross_entropy(lg, y))(logits).mean(0)
            return jnp.sum(loss), mean_logits

        return jax.grad(total, has_aux=True)(x_cur)

    def check(x_cur, mean_logits, broken, k):
        candidate = active & ~broken & (jnp.argmax(mean_logits, -1) != y)
        if not recheck:
            return candidate

        def confirm():
            logits = eot_logits(logits_fn, x_cur, k, recheck, chunk).mean(0)
            return jnp.argmax(logits, -1) != y

        confirmed = jax.lax.cond(jnp.any(candidate), confirm, lambda: jnp.zeros_like(candidate))
        return candidate & confirmed

    k_start, k_loop = jax.random.split(key)
    x_adv = x
    if start:
        if threat.norm == "Linf":
            noise = jax.random.uniform(k_start, x.shape, minval=-threat.eps, maxval=threat.eps)
        else:
            noise = _direction(jax.random.normal(k_start, x.shape), "L2") * threat.eps
        x_adv = jnp.where(active[:, None, None, None], project(x + noise, x, threat), x)

    def body(i, state):
        x_cur, x_best, broken = state
        k_grad, k_check = jax.random.split(jax.random.fold_in(k_loop, i))
        grad, mean_logits = value_and_grad(x_cur, k_grad)
        newly = check(x_cur, mean_logits, broken, k_check)
        x_best = jnp.where(newly[:, None, None, None], x_cur, x_best)
        broken = broken | newly
        moving = (active & ~broken)[:, None, None, None]
        x_next = project(x_cur + step_size * _direction(grad, threat.norm), x, threat)
        return jnp.where(moving, x_next, x_cur), x_best, broken

    def final_step(i, x_cur):
        grad, _ = value_and_grad(x_cur, jax.random.split(jax.random.fold_in(k_loop, i))[0])
        x_next = project(x_cur + step_size * _direction(grad, threat.norm), x, threat)
        return jnp.where(active[:, None, None, None], x_next, x_cur)

    broken0 = jnp.zeros_like(active)
    if stop:
        x_cur, x_best, broken = jax.lax.fori_loop(0, n_iter, body, (x_adv, x, broken0))
    else:  # every step for every example; judged at the last iterate only
        x_cur, x_best, broken = jax.lax.fori_loop(0, n_iter, final_step, x_adv), x, broken0
    k_last = jax.random.fold_in(k_loop, n_iter)
    mean_logits = eot_logits(logits_fn, x_cur, k_last, n_eot, chunk).mean(0)
    newly = check(x_cur, mean_logits, broken, jax.random.fold_in(k_last, 1))
    broken = broken | newly
    x_best = jnp.where(newly[:, None, None, None], x_cur, x_best)
    x_final = jnp.where(broken[:, None, None, None], x_best, x_cur)
    return jnp.where(active[:, None, None, None], x_final, x), broken


def pgd(
    logits_fn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    n_iter: int = 200,
    step_size: float | None = None,
    n_eot: int = 20,
    average: str = "loss",
    random_start: bool = True,
    recheck_draws: int = 0,
    stop_at_success: bool = True,
    active: jax.Array | None = None,
    eot_chunk: int | None = None,
) -> AttackResult:
    """Projected gradient ascent on the cross-entropy, with EOT over `n_eot` draws per step.

    Args:
      logits_fn: (x, key) -> (B, K) logits; may be an equinox Module (its arrays stay traced).
      x: (B, H, W, C) clean images in [0, 1]; y: (B,) int labels.
      threat: Linf or L2 ball (L1 is not supported by this attack; use APGD).
      step_size: default eps / 4 (2/255 at eps = 8/255).
      average: "loss" (mean cross-entropy over the draws, Lee & Kim) or "logits" (cross-entropy of
        the mean logits, DiffPure's BPDA+EOT).
      recheck_draws: if > 0, a point that the step's averaged logits call broken only counts as
        broken if the mean logits of this many fresh draws misclassify it too.
      stop_at_success: True: the check runs at the start point, after every step and at the
        end, and an example stops at the first point found broken (x_adv is that point, or the
        last iterate if it never was; fooled is that "broken" flag). With a random defense a lucky
        draw can end it early at a weak point. False: every example takes all n_iter steps, x_adv
        is the last iterate and fooled is the check there alone: the point to give protocols
        that vote or take the worst of many draws.
      active: (B,) bool, examples to attack (default all); the others are returned unchanged.
      eot_chunk: draws per vmapped call, for the step's EOT and the re-check draws alike (None:
        all at once; `base.eot_logits`): memory of eot_chunk draws in the gradient too, the same
        result up to float32 summation order.
    Returns: AttackResult(x_adv, fooled), as set by stop_at_success.
    """
    if threat.norm not in ("Linf", "L2"):
        raise NotImplementedError(f"pgd supports Linf and L2, not {threat.norm}; use apgd for L1")
    if average not in ("loss", "logits"):
        raise ValueError(f"average must be 'loss' or 'logits', got {average!r}")
    active = jnp.ones(x.shape[0], bool) if active is None else jnp.asarray(active, bool)
    step = threat.eps / 4 if step_size is None else step_size
    # Raises unless None or a positive int; None when one chunk holds every draw of a call.
    eot_chunk = check_eot_chunk(eot_chunk, max(n_eot, recheck_draws))
    x_adv, fooled = _pgd(
        logits_fn,
        x,
        jnp.asarray(y),
        key,
        active,
        threat,
        n_iter,
        step,
        n_eot,
        average,
        random_start,
        recheck_draws,
        stop_at_success,
        eot_chunk,
    )
    return AttackResult(x_adv, fooled)


# DiffPure's BPDA+EOT settings (`bpda_eot_attack.py`), the defaults of `bpda_eot`.
BPDA_EOT_SETTINGS = MappingProxyType(
    dict(
        n_iter=50,
        step_size=2 / 255,
        n_eot=15,
        average="logits",
        random_start=False,
        recheck_draws=150,
    )
)


def bpda_eot(logits_fn, x, y, key, *, threat: Threat, active=None, **overrides) -> AttackResult:
    """DiffPure's BPDA+EOT protocol: `pgd` with 50 steps of 2/255, logits averaged over 15 draws
    per step, broken points re-checked with 150 draws, no random start (`BPDA_EOT_SETTINGS`).
    `overrides` are `pgd` arguments replacing these (e.g. n_iter, n_eot). `logits_fn` must be the
    defense in `grad="bpda"` mode."""
    return pgd(
        logits_fn, x, y, key, threat=threat, active=active, **{**BPDA_EOT_SETTINGS, **overrides}
    )
