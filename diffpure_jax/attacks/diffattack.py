"""DiffAttack (Kang, Song, Li, NeurIPS 2023, "DiffAttack: Evasion Attacks Against Diffusion-Based
Adversarial Purification"): APGD on the classification loss plus the deviated-reconstruction
loss, through the exact gradient of the purification.

The deviated-reconstruction loss pushes the reverse process's intermediate states x'_t away from
the diffused input x_t at the same noise level, so that the score network is evaluated off the
states it would see, and its estimate of the density gradient goes wrong:

    L_dev(x) = (1 / S) sum_{k in steps} abar(t_k) * (1 / 2d) ||x'_{t_k} - x_{t_k}||^2

over S reverse steps spread evenly over the solve (`dev_steps`), in the model's [-1, 1] scale, d
the number of pixels, x_t = sqrt(abar(t)) (2x - 1) + sqrt(1 - abar(t)) eps with the
purification's own forward noise eps (`purify.Trajectory`). The attack maximises
L_cls + lambda L_dev, lambda = 1 (the paper's choice: 0.1 and 10 were weaker), inside APGD
(Linf and L2): cross-entropy in the first run, DLR in the second, as the paper's AutoAttack
framework does, each averaged over EOT draws (one trajectory per draw gives both terms).

The paper writes L_dev = E_t[alpha_t D(x_t, x'_t)] and says the steps are sampled uniformly; its
code is not in our index. The weight abar(t), the half mean squared distance and the inclusion of
the last step (x'_0 against the input itself) follow the one public re-implementation we could
read, DiffHammer's (`defense/diffpure.py`, `diff_attack`); the steps are a fixed even grid here,
not redrawn each iteration, so a run is a deterministic function of its key.

"Segment-wise forward-backward", the paper's memory fix (store the states, recompute one step's
graph at a time in the backward pass), is what `grad="exact"` does already: diffrax's
RecursiveCheckpointAdjoint (and `unroll=True`: one state per step, each step rematerialised).
The memory of the two is compared in `benchmarks/diffattack_memory.py` (benchmarks/README.md
section 14): at the paper's Table 5 size (batch 16, a CIFAR-10 DDPM UNet, WRN-28-10), XLA:CPU's
compiled memory analysis gives our default `exact` 1.7 GB at every T from 5 to 1000 and
checkpoints = T (their scheme) 1.2 to 1.4 GB, where the paper reports 2.8 to 3.9 GB on a GPU
for theirs and 14.5 to 38.8 GB (out of memory at T = 30) for naive backpropagation.

Cost: the same as APGD with EOT on the defended model (the trajectory is the same solve; the
extra term costs S squared distances).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..purify import Trajectory
from .base import AuxObjective, IndexedModel


def dev_steps(n_steps: int, n_dev: int) -> tuple[int, ...]:
    """n_dev reverse-step indices spread evenly over (0, n_steps], the last one n_steps (all of
    1..n_steps when n_dev >= n_steps). E.g. dev_steps(100, 10) = (10, 20, ..., 100)."""
    if n_dev < 1 or n_steps < 1:
        raise ValueError(f"n_dev and n_steps must be >= 1, got {n_dev}, {n_steps}")
    n = min(n_dev, n_steps)
    return tuple(sorted({round(j * n_steps / n) for j in range(1, n + 1)}))


def deviated_reconstruction_loss(trajectory: Trajectory) -> jax.Array:
    """(B,) L_dev of a trajectory: the mean over its steps of abar(t) times half the mean
    squared distance between the reverse state x'_t and the diffused input x_t (model scale)."""
    diff = trajectory.reverse - trajectory.diffused  # (S, B, h, w, c)
    per_step = 0.5 * jnp.mean(diff.reshape(*diff.shape[:2], -1) ** 2, axis=-1)  # (S, B)
    return jnp.mean(trajectory.alpha_bar[:, None] * per_step, axis=0)


class DeviatedReconstruction(AuxObjective):
    """A defended model (`IndexedModel` of a `DefendedClassifier`) with DiffAttack's objective:
    `obj(x, key)` is the model's logits; `obj.logits_and_aux(x, key)` is (logits, lam * L_dev)
    from one purification (its trajectory at `steps`)."""

    model: IndexedModel
    steps: tuple[int, ...] = eqx.field(static=True)
    lam: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        defended = getattr(self.model, "model", None)
        if not hasattr(defended, "purifier") or not hasattr(defended, "classifier"):
            raise ValueError(
                "DiffAttack needs a purified model: bind_index(DefendedClassifier(...), index), "
                f"got {type(defended).__name__}"
            )
        if defended.purifier.config.grad in ("bpda", "blind"):
            raise ValueError(
                f"DiffAttack differentiates the reverse states; grad="
                f"{defended.purifier.config.grad!r} gives them no gradient: use exact"
            )

    def __call__(self, x, key):
        return self.model(x, key)

    def logits_and_aux(self, x, key):
        defended = self.model.model
        traj = defended.purifier.trajectory(x, key, self.steps, self.model.index)
        logits = defended.classifier(traj.purified, check=False)
        return logits, self.lam * deviated_reconstruction_loss(traj)


def deviated_model(model: IndexedModel, n_dev: int = 10, lam: float = 1.0):
    """`DeviatedReconstruction` of the runner's model with n_dev evenly spread steps."""
    defended = getattr(model, "model", None)
    purifier = getattr(defended, "purifier", None)
    if purifier is None:
        raise ValueError(
            f"DiffAttack needs a purified model (--defense diffpure), got {type(defended).__name__}"
        )
    return DeviatedReconstruction(model, dev_steps(purifier.n_steps, n_dev), float(lam))
