"""Attack suites: what the evaluation runner calls on each batch.

A suite is `suite(model, x, y, key) -> SuiteResult`, with `model(x, key)` a random classifier
bound to the batch's dataset indices. It attacks the batch and reports, per example, the
adversarial point, each attack's one-draw prediction, and whether the point is robust under the
suite's own check (the `one_draw` protocol). A new attack is one module in this package and one
suite here.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .autoattack import AutoAttackConfig, autoattack
from .base import Threat
from .diffattack import deviated_model
from .diffhammer import NORMS as DIFFHAMMER_NORMS
from .diffhammer import diffhammer
from .pgd import bpda_eot, pgd
from .stadv import stadv


class SuiteResult(NamedTuple):
    """x_adv: (B, H, W, C) in [0, 1], inside the threat; attack_preds: {attack name: (B,) int}
    the prediction of one draw after each attack (cumulative); robust: (B,) bool, robust under
    the suite's own check (the `one_draw` protocol); clean_pred: (B,) int, one clean draw;
    grid: (B, H, W, 2) the sampling grid of a spatial threat (StAdv: x_adv is `grid_sample(x,
    grid)`, and the runner checks the grid's bound), None for an Lp threat; attack_scores:
    {name: (B,) bool or float} robustness as the attack itself scores it during the attack
    (DiffHammer's N-evaluation), recorded next to the protocols' scores, or None."""

    x_adv: jax.Array
    attack_preds: dict[str, jax.Array]
    robust: jax.Array
    clean_pred: jax.Array
    grid: jax.Array | None = None
    attack_scores: dict[str, jax.Array] | None = None


def autoattack_suite(threat: Threat, config: AutoAttackConfig):
    """A suite running AutoAttack; its one-draw check is the `one_draw` protocol."""

    def attack(model, x, y, key):
        r = autoattack(model, x, y, key, threat=threat, config=config)
        preds = {name: r.preds[j] for j, name in enumerate(config.attacks)}
        return SuiteResult(r.x_adv, preds, r.robust[-1], r.clean_pred)

    return attack


def diffattack_suite(threat: Threat, config: AutoAttackConfig, n_dev: int = 10, lam: float = 1.0):
    """A suite running DiffAttack (`diffattack`): AutoAttack's APGD attacks of `config` (e.g.
    `rand`: APGD-CE then APGD-DLR, EOT 20) on the classification loss plus lam times the
    deviated-reconstruction loss at n_dev evenly spread reverse steps. The model must be a
    defense with exact (or adjoint) gradients; its one-draw check is `one_draw`."""
    if any(not a.startswith("apgd") for a in config.attacks):
        raise ValueError(f"DiffAttack runs APGD attacks only, got {config.attacks}")
    if threat.norm not in ("Linf", "L2"):
        raise ValueError(f"DiffAttack attacks Linf or L2 threats, got {threat}")
    base = autoattack_suite(threat, config)

    def attack(model, x, y, key):
        return base(deviated_model(model, n_dev, lam), x, y, key)

    return attack


def _pgd_family_suite(attack_fn, threat: Threat, name: str, kwargs: dict):
    """A suite running `attack_fn` (`pgd` or `bpda_eot`) on the points classified right at one
    clean draw; the attack's own (EOT-averaged, optionally re-checked) check is `one_draw`."""

    def attack(model, x, y, key):
        k_clean, k_attack, k_check = jax.random.split(key, 3)
        clean_pred = jnp.argmax(model(x, k_clean), -1)
        active = clean_pred == y
        result = attack_fn(model, x, y, k_attack, threat=threat, active=active, **kwargs)
        # attack_preds records one draw at x_adv; robustness is the attack's own check.
        pred_after = jnp.argmax(model(result.x_adv, k_check), -1)
        return SuiteResult(result.x_adv, {name: pred_after}, active & ~result.fooled, clean_pred)

    return attack


def pgd_suite(threat: Threat, name: str = "pgd-eot", **pgd_kwargs):
    """A suite running `pgd.pgd` with `pgd_kwargs` on the points classified right at one clean
    draw; the attack's own (EOT-averaged, optionally re-checked) check is `one_draw`."""
    return _pgd_family_suite(pgd, threat, name, pgd_kwargs)


def bpda_eot_suite(threat: Threat, name: str = "bpda-eot", **overrides):
    """A suite running DiffPure's BPDA+EOT (`pgd.bpda_eot`, its settings with `overrides`), as
    `pgd_suite` runs PGD. The model must be the defense in `grad="bpda"` mode."""
    return _pgd_family_suite(bpda_eot, threat, name, overrides)


def stadv_suite(threat: Threat, name: str = "stadv", **stadv_kwargs):
    """A suite running DiffPure's StAdv (`stadv.stadv`, bound `threat.eps`, with `stadv_kwargs`)
    on the points classified right at one clean draw; its one-draw check at the last iterate is
    `one_draw`. Returns the grid with x_adv, for the runner's threat check. threat: StAdv."""
    if threat.norm != "StAdv":
        raise ValueError(f"stadv_suite attacks the StAdv threat, got {threat}")

    def attack(model, x, y, key):
        k_clean, k_attack, k_check = jax.random.split(key, 3)
        clean_pred = jnp.argmax(model(x, k_clean), -1)
        active = clean_pred == y
        r = stadv(model, x, y, k_attack, bound=threat.eps, active=active, **stadv_kwargs)
        pred_after = jnp.argmax(model(r.x_adv, k_check), -1)
        return SuiteResult(r.x_adv, {name: pred_after}, active & ~r.fooled, clean_pred, r.grid)

    return attack


def diffhammer_suite(threat: Threat, name: str = "diffhammer", **kwargs):
    """A suite running DiffHammer (`diffhammer.diffhammer` with `kwargs`) on the points classified
    right at one clean draw, as `pgd_suite` runs PGD; its one fresh draw at x_adv is `one_draw`.
    Its own N-evaluation scores come back as `attack_scores`: `diffhammer_average_of_N` (1 - the
    best fraction of the N draws misclassified at any iterate: its Avg.Rob) and
    `diffhammer_worst_of_N` (no draw misclassified at any iterate: its Wor.Rob), 0 / False for
    the points the clean draw got wrong. The model must be a `DefendedClassifier` with exact,
    adjoint or bpda gradients. The whole suite (clean draw, attack, check draw) is one jitted
    program."""
    if threat.norm not in DIFFHAMMER_NORMS:
        raise ValueError(f"DiffHammer attacks Linf or L2 threats, got {threat}")
    n_eval = kwargs.get("n_eval", 10)

    @eqx.filter_jit
    def attack(model, x, y, key):
        k_clean, k_attack, k_check = jax.random.split(key, 3)
        clean_pred = jnp.argmax(model(x, k_clean), -1)
        active = clean_pred == y
        r = diffhammer(model, x, y, k_attack, threat=threat, active=active, **kwargs)
        pred_after = jnp.argmax(model(r.x_adv, k_check), -1)
        scores = {
            f"diffhammer_average_of_{n_eval}": jnp.where(active, 1.0 - r.avg_success, 0.0),
            f"diffhammer_worst_of_{n_eval}": active & ~r.any_success,
        }
        robust = active & ~r.fooled
        return SuiteResult(r.x_adv, {name: pred_after}, robust, clean_pred, None, scores)

    return attack
