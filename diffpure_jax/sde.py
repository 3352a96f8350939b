"""The VP-SDE of DiffPure: schedule, forward diffusion, reverse drift and diffusion.

Time `t` is the diffusion time in [0, 1] (the paper's t*; DiffPure's code calls 1000 t* "t").
Images live in [-1, 1] here; the purifier does the [0, 1] <-> [-1, 1] scaling.

    beta(t)      = beta_min + t (beta_max - beta_min)
    alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))
    forward SDE  : dx = -beta(t)/2 x dt + sqrt(beta(t)) dW
    reverse SDE  : dx = [-beta(t)/2 x - beta(t) score(x, t)] dt + sqrt(beta(t)) dW,  t decreasing
    prob.-flow   : dx = [-beta(t)/2 x - beta(t)/2 score(x, t)] dt,                  t decreasing
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE with a linear beta schedule (score_sde's `VPSDE`).

    `n_discrete` is the number of steps of the discrete DDPM schedule that DiffPure's forward
    diffusion uses: betas = linspace(beta_min / N, beta_max / N, N), alpha_bar = cumprod(1 - betas).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    n_discrete: int = 1000

    def beta(self, t):
        """beta(t) for t in [0, 1] (any shape)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha_bar(self, t):
        """Continuous alpha_bar(t) = exp(-int_0^t beta)."""
        return jnp.exp(self.log_alpha_bar(t))

    def std(self, t):
        """Marginal std of x_t given x_0: sqrt(1 - alpha_bar(t)) (score_sde `marginal_prob`)."""
        # The same float32 operation order as score_sde's VPSDE.marginal_prob, for parity.
        log_mean_coeff = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return jnp.sqrt(1.0 - jnp.exp(2.0 * log_mean_coeff))

    def discrete_alphas_cumprod(self) -> np.ndarray:
        """The (N,) float32 alpha_bar of DiffPure's discrete schedule, accumulated in float32."""
        n = self.n_discrete
        betas = np.linspace(self.beta_min / n, self.beta_max / n, n, dtype=np.float64)
        return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)

    def forward_coefficients(
        self, t_star: float, schedule: str = "discrete"
    ) -> tuple[float, float]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at t_star.

        `schedule="discrete"` is paper-exact: the discrete alpha_bar at index round(N t*) - 1, as
        DiffPure's `image_editing_sample` does. `"continuous"` uses alpha_bar(t*); the diffused
        images of the two differ by about 1e-3 relative (tests/test_score_sde_parity.py).
        """
        if schedule == "discrete":
            index = int(round(t_star * self.n_discrete)) - 1
            if index < 0 or abs((index + 1) - t_star * self.n_discrete) > 1e-6 * self.n_discrete:
                raise ValueError(
                    f"t_star={t_star} is not on the discrete grid k/{self.n_discrete}; "
                    "use forward_schedule='continuous' or a t_star that is a multiple of "
                    f"{1 / self.n_discrete}."
                )
            a = float(self.discrete_alphas_cumprod()[index])
        elif schedule == "continuous":
            a = float(
                np.exp(
                    -(self.beta_min * t_star + 0.5 * (self.beta_max - self.beta_min) * t_star**2)
                )
            )
        else:
            raise ValueError(
                f"forward schedule must be 'discrete' or 'continuous', got {schedule!r}"
            )
        return float(np.float32(np.sqrt(np.float32(a)))), float(
            np.float32(np.sqrt(np.float32(1.0 - a)))
        )

    def diffuse(self, x0, eps, t_star: float, schedule: str = "discrete"):
        """x_t* = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; x0, eps (B, H, W, C) in [-1, 1]."""
        signal, noise = self.forward_coefficients(t_star, schedule)
        return x0 * signal + eps * noise

    def reverse_drift(self, score, x, t, probability_flow: bool = False):
        """Drift of the reverse-time SDE (or probability-flow ODE) in forward-time convention.

        Args:
          score: score(x, t) at this point, same shape as x.
          x: (B, ...) state.
          t: scalar diffusion time.
        Returns: -beta/2 x - beta score (SDE) or -beta/2 x - beta/2 score (ODE). Integrated with
          dt < 0, this is DiffPure's `RevVPSDE.f` (which flips time and returns the negation).
        """
        b = self.beta(t)
        weight = 0.5 if probability_flow else 1.0
        return -0.5 * b * x - weight * b * score

    def diffusion(self, t):
        """g(t) = sqrt(beta(t)); the noise is additive (independent of x)."""
        return jnp.sqrt(self.beta(t))
