"""AutoAttack (Croce & Hein 2020), as the reference `autoattack.AutoAttack` runs it, in JAX.

Versions (the reference's settings; every attack 100 iterations unless said):
* `standard`: APGD-CE (1 restart), APGD-T (9 targets, 1 restart each), FAB-T (9 targets, 1
  restart each), Square (5000 queries, 1 run). For L1, as the reference: APGD-CE (5 restarts)
  and APGD-T (5 targets), both with the large-eps schedule.
* `rand` (for random defenses): APGD-CE and APGD-DLR, EOT over 20 draws, 1 restart each.
* `liu`: the protocol of Liu et al. (ICLR 2025, "Towards Understanding the Robustness of
  Diffusion-Based Purification: A Stochastic Perspective") as DiffBreak (Kassis et al.) quotes
  it: 20 iterations, EOT over 10 draws, robustness judged over 20 final draws. Here APGD-CE
  alone (1 restart), to be given the exact gradient (`grad="exact"`) and judged with
  `LIU_PROTOCOLS` (the CLI's `--version liu` sets them). Liu et al.'s own script runs PGD
  (20 steps of 2/255, EOT 10, no random start) and their patched AutoAttack averages 20 draws;
  which attacks DiffBreak ran under this protocol could not be checked, hence APGD-CE only.
* `custom`: any list of the attacks in ATTACKS, with the settings the reference's
  `AutoAttack.__init__` gives them (it calls no `set_version`): APGD-CE, APGD-DLR and the
  untargeted FAB 5 restarts each; APGD-T and FAB-T 9 targets, 1 restart each; Square 5000
  queries; no EOT. (The reference's `fab-t` also sets its shared FAB object's restarts to 1 for
  good, so there a `fab` listed after `fab-t` runs 1 restart; here it keeps `fab_restarts`.)

`eot_chunk` (any version) runs the EOT draws that many per vmapped call, accumulating their
gradients (`base.eot_value_and_grad`): the memory of eot_chunk draws, the same result.

As in the reference, each attack runs only on the points still robust. Afterwards its
adversarial points are re-checked with one fresh forward pass of the model, which is one draw of
a random defense, and the points misclassified there count as broken for good. This single-draw
check is what the DiffPure paper reports. The evaluation protocols in `diffpure_jax.protocols`
re-evaluate the final points over many draws.

Before attacking, `autoattack` runs the reference's guardrails (`checks`, skippable with
`checks=False`): it warns when the model's outputs look like probabilities, and when the attacks
average no draws (`standard`) but the model's logits change with the key (use `rand`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .apgd import apgd, apgd_targeted
from .base import Threat, check_eot_chunk
from .checks import check_randomized, check_range_output
from .fab import fab
from .square import square

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "rand", "liu", "custom")
# How the `liu` version's final points are judged (`diffpure_jax.protocols`): 20 draws each.
LIU_PROTOCOLS = ("one_draw", "worst_of_20", "majority_of_20", "average_of_20")


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Which attacks run, in order, and their settings (defaults: the reference's `standard`).

    n_restarts applies to APGD-CE and APGD-DLR, fab_restarts to the untargeted FAB; the targeted
    attacks run one restart per target and Square one run, as in the reference. eot_chunk: EOT
    draws per vmapped call of the APGD attacks (None: all n_eot at once); it bounds memory and
    does not change results (up to float32 summation order)."""

    attacks: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
    n_iter: int = 100
    n_restarts: int = 1
    fab_restarts: int = 1
    n_eot: int = 1
    n_target_classes: int = 9
    n_queries: int = 5000
    use_largereps: bool = False
    # The reference never places a square on the last row/column; True is the stronger variant.
    square_cover_edges: bool = False
    eot_chunk: int | None = None

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"unknown or no attacks {unknown}; choose from {ATTACKS}")
        check_eot_chunk(self.eot_chunk, 1)  # raises unless None or a positive int
        for name in ("n_restarts", "fab_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def autoattack_config(
    version: str = "standard", norm: str = "Linf", **overrides
) -> AutoAttackConfig:
    """The reference settings of an AutoAttack version, with `overrides` (for `custom`, give
    `attacks`; its restarts default to the reference constructor's 5 for APGD-CE, APGD-DLR and
    FAB)."""
    if version == "standard":
        if norm == "L1":
            base = AutoAttackConfig(
                attacks=("apgd-ce", "apgd-t"), n_restarts=5, n_target_classes=5, use_largereps=True
            )
        else:
            base = AutoAttackConfig()
    elif version == "rand":
        base = AutoAttackConfig(attacks=("apgd-ce", "apgd-dlr"), n_eot=20)
    elif version == "liu":
        base = AutoAttackConfig(attacks=("apgd-ce",), n_iter=20, n_eot=10)
    elif version == "custom":
        if "attacks" not in overrides:
            raise ValueError("version 'custom' needs attacks=(...), e.g. ('apgd-ce', 'square')")
        base = AutoAttackConfig(
            attacks=tuple(overrides.pop("attacks")), n_restarts=5, fab_restarts=5
        )
    else:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if "attacks" in overrides:
        overrides["attacks"] = tuple(overrides["attacks"])
    return dataclasses.replace(base, **overrides)


class AutoAttackResult(NamedTuple):
    """x_adv (B, H, W, C); clean_pred (B,); preds (A, B): the re-check prediction after each of
    the A attacks (carried over once broken); robust (A, B) bool: still robust after each attack
    (one-draw protocol). An example broken by attack j has x_adv from attack j."""

    x_adv: jax.Array
    clean_pred: jax.Array
    preds: jax.Array
    robust: jax.Array


def run_attack(name, logits_fn, x, y, key, threat: Threat, config: AutoAttackConfig, active):
    """One attack of the suite by name (see ATTACKS); returns an AttackResult."""
    common = dict(threat=threat, active=active)
    if name in ("apgd-ce", "apgd-dlr"):
        loss = "ce" if name == "apgd-ce" else "dlr"
        return apgd(
            logits_fn,
            x,
            y,
            key,
            loss=loss,
            n_iter=config.n_iter,
            n_restarts=config.n_restarts,
            n_eot=config.n_eot,
            eot_chunk=config.eot_chunk,
            use_largereps=config.use_largereps,
            **common,
        )
    if name == "apgd-t":
        return apgd_targeted(
            logits_fn,
            x,
            y,
            key,
            n_target_classes=config.n_target_classes,
            n_iter=config.n_iter,
            n_eot=config.n_eot,
            eot_chunk=config.eot_chunk,
            use_largereps=config.use_largereps,
            **common,
        )
    if name in ("fab", "fab-t"):
        return fab(
            logits_fn,
            x,
            y,
            key,
            targeted=name == "fab-t",
            n_target_classes=config.n_target_classes,
            n_iter=config.n_iter,
            n_restarts=1 if name == "fab-t" else config.fab_restarts,
            **common,
        )
    if name == "square":
        return square(
            logits_fn,
            x,
            y,
            key,
            n_queries=config.n_queries,
            cover_edges=config.square_cover_edges,
            **common,
        )
    raise ValueError(f"unknown attack {name!r}")


def autoattack(
    logits_fn,
    x,
    y,
    key,
    *,
    threat: Threat,
    config: AutoAttackConfig | None = None,
    checks: bool = True,
) -> AutoAttackResult:
    """Run the AutoAttack suite on a batch.

    Args:
      logits_fn: (x, key) -> (B, K) logits (random or deterministic; may be an equinox Module).
      x: (B, H, W, C) in [0, 1]; y: (B,) int labels; key: PRNG key.
      checks: the reference's guardrails (`checks`), on the clean batch before attacking: a
        warning if the outputs look like probabilities (no extra forward pass), and, when the
        attacks average no draws (n_eot = 1, as `standard`), a warning if the logits change with
        the key (one extra forward pass). Results do not depend on it.
    """
    config = config or autoattack_config("standard", threat.norm)
    y = jnp.asarray(y)
    k_clean = jax.random.fold_in(key, 0)
    clean_logits = logits_fn(x, k_clean)
    if checks:
        check_range_output(clean_logits)
        if config.n_eot == 1:
            check_randomized(logits_fn, x, k_clean, logits=clean_logits)
    clean_pred = jnp.argmax(clean_logits, -1)
    robust = clean_pred == y
    x_adv, pred = x, clean_pred
    preds, robusts = [], []
    for j, name in enumerate(config.attacks):
        k_attack, k_check = jax.random.split(jax.random.fold_in(key, j + 1))
        result = run_attack(name, logits_fn, x, y, k_attack, threat, config, robust)
        check = jnp.argmax(logits_fn(result.x_adv, k_check), -1)
        newly = robust & (check != y)
        x_adv = jnp.where(newly[:, None, None, None], result.x_adv, x_adv)
        pred = jnp.where(robust, check, pred)
        robust = robust & ~newly
        preds.append(pred)
        robusts.append(robust)
    return AutoAttackResult(x_adv, clean_pred, jnp.stack(preds), jnp.stack(robusts))
