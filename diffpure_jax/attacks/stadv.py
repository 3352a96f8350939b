"""StAdv, spatially transformed adversarial examples (Xiao et al., ICLR 2018), as DiffPure runs it.

DiffPure's StAdv (`stadv_eot/attacks.py` `StAdvAttack`, bound 0.05) is mister_ed's `PGD` over a
`FullSpatial` perturbation. Its parameters *are* a sampling grid (B, H, W, 2), last axis (x, y),
in `F.affine_grid` normalised coordinates ([-1, 1], align_corners=False: pixel centres at
(2 j + 1) / W - 1). The adversarial image is `F.grid_sample(x, grid)` (bilinear, zero padding,
align_corners=False). The threat (`Threat("StAdv", bound)`) is an Linf bound on grid - identity
in those normalised units (0.05 is 0.8 px on a 32-pixel side), with the grid inside [-1, 1].

The official loop, which `stadv` follows (mister_ed `adversarial_attacks.PGD.attack` with
`signed=False`, `keep_best=True`, `random_init=False`, 100 iterations, `eot_iter` 20):

* the grid starts at the identity; each iteration projects it (`project_flow`: clip to [-1, 1],
  then to the bound around the identity), takes the gradient there, and Adam (lr 0.01) steps;
* the maximised loss is CW-f6 untargeted with kappa = inf (the unclipped margin
  max_{j != y} z_j - z_y) minus (0.0025 / bound) * `flow_norm` (Xiao's flow smoothness); EOT
  averages its gradient over `eot_iter` draws of the random model, each a separate forward pass;
* `keep_best` only feeds mister_ed's (disabled) validator: what the attack returns is the last
  iterate, projected. So does `stadv`;
* success is judged afterwards by one forward pass of the model (`get_accuracy`): one draw.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .base import check_eot_chunk, eot_value_and_grad
from .losses import margin


class StAdvResult(NamedTuple):
    """x_adv: (B, H, W, C) in [0, 1], `grid_sample(x, grid)` (x itself for inactive examples);
    fooled: (B,) bool, one draw at x_adv misclassifies it (False where inactive); grid: (B, H, W,
    2) the sampling grid, within the bound of `flow_grid` (the identity where inactive)."""

    x_adv: jax.Array
    fooled: jax.Array
    grid: jax.Array


def flow_grid(shape: tuple[int, ...]) -> jax.Array:
    """(B, H, W, 2) identity sampling grid (x, y) for images of shape (B, H, W, ...): torch's
    `F.affine_grid` of the identity with align_corners=False, pixel centres (2 j + 1) / W - 1."""
    b, h, w = shape[:3]
    xs = (2 * jnp.arange(w, dtype=jnp.float32) + 1) / w - 1
    ys = (2 * jnp.arange(h, dtype=jnp.float32) + 1) / h - 1
    grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return jnp.broadcast_to(grid, (b, h, w, 2))


@jax.jit
def grid_sample(x: jax.Array, grid: jax.Array) -> jax.Array:
    """Bilinear sampling of x at grid, zero padding, align_corners=False (torch's `F.grid_sample`
    defaults). x (B, H, W, C) in [0, 1]; grid (B, Ho, Wo, 2) normalised (x, y); returns (B, Ho,
    Wo, C), in [0, 1] (a convex combination of pixels and zeros). Differentiable in x and grid."""
    h, w = x.shape[1:3]
    # Unnormalise: -1 and 1 are the outer edges of the corner pixels.
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

    def corner(img, xc, yc):  # img (H, W, C); xc, yc (Ho, Wo) int: img[yc, xc], zero outside
        valid = (xc >= 0) & (xc < w) & (yc >= 0) & (yc < h)
        v = img[jnp.clip(yc, 0, h - 1), jnp.clip(xc, 0, w - 1)]
        return jnp.where(valid[..., None], v, 0.0)

    def one(img, x0, y0, wx1, wy1):
        wx1, wy1 = wx1[..., None], wy1[..., None]
        top = (1 - wx1) * corner(img, x0, y0) + wx1 * corner(img, x0 + 1, y0)
        bottom = (1 - wx1) * corner(img, x0, y0 + 1) + wx1 * corner(img, x0 + 1, y0 + 1)
        return (1 - wy1) * top + wy1 * bottom

    return jax.vmap(one)(x, x0, y0, wx1, wy1).astype(x.dtype)


@jax.jit
def project_flow(grid: jax.Array, bound: float) -> jax.Array:
    """mister_ed `FullSpatial.project_params('inf', bound)`: clip grid (B, H, W, 2) to [-1, 1],
    then to within `bound` (normalised units, Linf) of `flow_grid`."""
    identity = flow_grid(grid.shape)
    grid = jnp.clip(grid, -1.0, 1.0)
    return identity + jnp.clip(grid - identity, -bound, bound)


@jax.jit
def flow_linf(grid: jax.Array) -> jax.Array:
    """(B,) Linf distance of grid (B, H, W, 2) from the identity, in normalised units."""
    delta = grid - flow_grid(grid.shape)
    return jnp.max(jnp.abs(delta.reshape(delta.shape[0], -1)), axis=1)


@jax.jit
def flow_norm(grid: jax.Array) -> jax.Array:
    """(B,) Xiao et al.'s flow smoothness of grid (B, H, W, 2), mister_ed `stAdv_norm`.

    With delta = grid - identity: for each of the 4 neighbours (left, right, up, down; the border
    replicated, so a border pixel's outward neighbour is itself), the per-pixel L2 norm over
    (x, y) of delta - neighbour's delta, with 1e-10 under the square root, summed over pixels.
    """
    delta = grid - flow_grid(grid.shape)
    shifts = (
        jnp.concatenate([delta[:, :1], delta[:, :-1]], axis=1),  # up
        jnp.concatenate([delta[:, 1:], delta[:, -1:]], axis=1),  # down
        jnp.concatenate([delta[:, :, :1], delta[:, :, :-1]], axis=2),  # left
        jnp.concatenate([delta[:, :, 1:], delta[:, :, -1:]], axis=2),  # right
    )
    total = 0.0
    for shifted in shifts:
        total = total + jnp.sum(jnp.sqrt(jnp.sum((delta - shifted) ** 2, -1) + 1e-10), (1, 2))
    return total


@jax.jit
def in_flow_threat(
    x_adv: jax.Array, x: jax.Array, grid: jax.Array, bound: float, tol: float = 1e-5
) -> jax.Array:
    """(B,) bool: x_adv (B, H, W, C) is in [0, 1] and is `grid_sample(x, grid)` (up to tol), and
    grid (B, H, W, 2) is inside [-1, 1] and within `bound` of the identity (up to tol)."""
    if grid.shape != (*x.shape[:3], 2):
        raise ValueError(f"the grid of images {x.shape} must be {(*x.shape[:3], 2)}: {grid.shape}")
    axes = tuple(range(1, x.ndim))
    inside_box = jnp.all((x_adv >= -tol) & (x_adv <= 1 + tol), axis=axes)
    flat = grid.reshape(grid.shape[0], -1)
    valid = jnp.all(jnp.abs(flat) <= 1 + tol, axis=1)
    bounded = flow_linf(grid) <= bound * (1 + tol) + tol
    sampled = jnp.max(jnp.abs(x_adv - grid_sample(x, grid)), axis=axes) <= tol
    return inside_box & valid & bounded & sampled


@eqx.filter_jit
def _stadv(logits_fn, x, y, key, active, bound, n_iter, lr, n_eot, smooth_weight, eot_chunk):
    identity = flow_grid(x.shape)
    opt = optax.adam(lr)  # torch's defaults: betas (0.9, 0.999), eps 1e-8 outside the sqrt
    k_loop, k_check = jax.random.split(key)
    mask = active[:, None, None, None]

    def loss_fn(grid, k):  # what the attack descends: -(margin loss - c * smoothness)
        logits = logits_fn(grid_sample(x, grid), k)
        return margin(logits, y) + smooth_weight * flow_norm(grid), logits

    def body(i, state):
        grid, opt_state = state
        k = jax.random.fold_in(k_loop, i)
        _, grad, _ = eot_value_and_grad(loss_fn, grid, k, n_eot, eot_chunk)
        updates, opt_state = opt.update(grad, opt_state, grid)
        grid = project_flow(optax.apply_updates(grid, updates), bound)
        return jnp.where(mask, grid, identity), opt_state

    grid, _ = jax.lax.fori_loop(0, n_iter, body, (identity, opt.init(identity)))
    x_adv = jnp.where(mask, grid_sample(x, grid), x)
    fooled = active & (jnp.argmax(logits_fn(x_adv, k_check), -1) != y)
    return x_adv, fooled, grid


def stadv(
    logits_fn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    bound: float = 0.05,
    n_iter: int = 100,
    lr: float = 0.01,
    n_eot: int = 20,
    smooth_weight: float | None = None,
    active: jax.Array | None = None,
    eot_chunk: int | None = None,
) -> StAdvResult:
    """DiffPure's StAdv: Adam on a sampling grid, projected into the flow bound, EOT gradients.

    Args:
      logits_fn: (x, key) -> (B, K) logits; may be an equinox Module (its arrays stay traced).
      x: (B, H, W, C) clean images in [0, 1]; y: (B,) int labels.
      bound: Linf bound of grid - identity in normalised grid units (DiffPure: 0.05).
      n_iter, lr: Adam steps and learning rate (DiffPure: 100, 0.01).
      n_eot: draws whose gradients each step averages (`eot_value_and_grad`; DiffPure: 20).
      smooth_weight: weight of `flow_norm` in the loss (default 0.0025 / bound, as DiffPure).
      active: (B,) bool, examples to attack (default all); the others are returned unchanged.
      eot_chunk: draws per vmapped call (None: all n_eot at once); memory of eot_chunk draws,
        the same result up to float32 summation order.
    Returns: StAdvResult(x_adv, fooled, grid): the last iterate, as the official returns it;
      fooled is one draw's misclassification at x_adv, as the official judges it.
    """
    if not bound > 0:
        raise ValueError(f"the StAdv bound must be positive (normalised grid units): {bound}")
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got {x.shape}")
    active = jnp.ones(x.shape[0], bool) if active is None else jnp.asarray(active, bool)
    weight = 0.0025 / bound if smooth_weight is None else smooth_weight
    eot_chunk = check_eot_chunk(eot_chunk, n_eot)
    x_adv, fooled, grid = _stadv(
        logits_fn, x, jnp.asarray(y), key, active, float(bound), n_iter, lr, n_eot, float(weight),
        eot_chunk,
    )  # fmt: skip
    return StAdvResult(x_adv, fooled, grid)
