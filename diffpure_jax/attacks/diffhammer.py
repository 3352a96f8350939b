"""DiffHammer (Wang, Fu, Han, Xiang, NeurIPS 2024): EM-selected, gradient-grafted attacks on
diffusion purification, in JAX.

Reference: "DiffHammer: Rethinking the Robustness of Diffusion-Based Adversarial Purification";
their code is Ka1b0/DiffHammer (`attacker.py`: `Attacker.seeds_select`, `EM`, `perturb`,
`APGD`; `defense/diffpure.py`: `gradient`; `config.py`); "theirs" below means that code.

The attack needs the defense itself, not a black-box `logits_fn`: a `defense.DefendedClassifier`
(purifier phi(x; s), s a noise draw, then classifier f) bound to the batch's dataset indices
(`base.bind_index`), as the runner hands it to a suite. Per example, at every iterate x_k:

1. N-evaluation. N = `n_eval` fresh purifications x^_i = phi(x_k; s_i), their logits, the
   per-draw loss L_i and the per-draw *classifier* gradient g_i = grad_{x^} L(f(x^_i), y), taken
   at the purified image (no backpropagation through the purifier: their 'bpda' gradient), and
   success_i = argmax f(x^_i) != y. Draw i of iterate k uses `eot_keys(fold_in(k_eval, k), N)[i]`
   and, per example, `noise.example_keys(that key, index)`: the draws `purifier.eot` makes.
2. E-step (`em_direction`; theirs `seeds_select` and `EM`). The first-order model of draw i's
   loss after a step of size eps along u(r) is L_i + eps <u(r), g_i>, u(g) = sign(g) (Linf) or
   g / ||g||_2 (L2). Seed selection: j* = argmax_j sum_i elu(L_i + eps <u(g_j), g_i>), the draw
   whose gradient direction the most draws would follow. Then r = g_{j*} and, `em_steps` times,
   w_i = sigmoid(em_lam (L_i + eps <u(r), g_i>)), r = sum_i w_i g_i / sum_i w_i: the gradient
   of the draws the first-order model says are broken (or nearly), weighted by how sure it is.
3. Gradient grafting (`grafted_gradient`). The attack gradient at x_k is the vector-Jacobian
   product of ONE purification, that of the selected draw j* of each example, with cotangent r:
   J_{phi(.; s_{j*})}(x_k)^T r. One backpropagation through the purifier per iteration instead
   of N. The purifier's own grad mode (`exact`, `adjoint` or `bpda`) decides what the VJP is
   (`bpda`: r itself); `blind` is refused (its VJP is zero).
4. Gradient momentum (theirs): G_k = v grad_k + (1 - v) G_{k-1}, v = (k + 1)^(-em_alpha).
5. Update, APGD's (`apgd.py`; theirs `APGD.update_adv`): step size eta = 2 eps per example,
   z = P(x_k + eta u(G_k)), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})), a = 0.75
   (1 at the first step), P = `base.project`. At our `apgd.checkpoints(n_iter)`, APGD's two
   conditions on the per-iterate objective "max over the N evaluation draws of the loss" (their
   objective): (1) #{iterations of the window whose objective exceeded the previous iterate's}
   <= 0.75 k, or (2) eta was not halved at the previous checkpoint and the best objective has
   not increased since (off at the first checkpoint); where either holds, eta is halved and the
   run continues from the best point (6) with the E-step result of that point.
6. Best point, per example: the iterate (the start point included) with the highest fraction of
   its N evaluation draws misclassified; ties: the highest mean loss over the draws.
7. Restarts (theirs: 3 x 50 iterations, losses CW, CE, DLR in turn). Restart r uses the loss
   `losses[r % len(losses)]`: "margin" (CW: max_{i != y} z_i - z_y, the negative of
   `losses.margin`), "ce" or "dlr" (`losses.dlr`, K >= 4). Restart 0 attacks every active
   example; restart r > 0 the active ones whose best fraction so far is <= `restart_threshold`,
   from a fresh random start (Linf: x + eps U[-1, 1]^d; L2: x + eps t / ||t||_2, t ~ N(0, I);
   clipped to [0, 1]). A restart's point replaces the kept one where its fraction of draws
   broken is strictly higher (the mean losses of two restarts are of different losses, so they
   do not break ties across restarts: the earlier point stays).

Cost per iteration: N purification forwards (one batched solve of N B images), N classifier
forward and backward passes (one batch of N B), and one purification forward with its VJP.

Metrics. DiffHammer scores an example by its N-evaluations during the attack: Avg.Rob is 1 - the
best fraction of the N draws misclassified at any iterate, and Wor.Rob counts an example broken
if some draw at some iterate was misclassified. The attack returns both per example
(`avg_success`, `any_success`). Our runner's `worst_of_N` and `average_of_N` protocols instead
score the final point x_adv with N fresh draws, and `one_draw` (the suite's robust) with one
(`fooled`): those are the numbers comparable across attacks; `any_success` is the paper's
notion of a break, lenient to the attack (any draw at any iterate, picked after the fact).

Deviations from their public code, on purpose:
* Their EM loop computes w and r but never assigns the new r, so every pass uses r = g_{j*}:
  one step. Ours iterates; `em_steps=1` reproduces theirs.
* Their loop's inner product omits eps (L_i + <u(r), g_i>) while seed selection has it; ours
  uses the same first-order model (loss after a step of size eps along u(r)) in both places.
* Their APGD never updates `x_adv_last`, so the momentum term is always relative to the start
  point, and at a checkpoint every example (halved or not) goes back to the best point. Ours is
  APGD's rule (`apgd.py`): the previous iterate, and only the halved examples go back.
* Their per-restart best point is their `update_batch_metrics` bookkeeping (any draw broken,
  then the mean loss); ours is 6, the criterion their Avg metric ranks by.
* No early stop when every draw of every example is broken (static shapes: the loop runs on).

Correctness of the grafted gradient. DiffBreak (Kassis, Hengartner, Yu) found their public
code's grafted gradient wrong: its forward states came from the fine defense schedule (steps of
10 of 100 DDPM timesteps) while the backward pass assumed the coarse attack surrogate (steps of
20), a relative error of about 1 against the true gradient. Ours is the exact VJP of the very
purification that was run (`purify_with_keys` with the selected draw's keys), checked against
the explicit Jacobian in tests/test_diffhammer.py.

Static shapes: the whole batch always runs; `active` (B,) bool, inactive examples come back as
x with fooled and any_success False and avg_success 0. One jitted program per configuration
(`eqx.filter_jit`, a static hashable config); iterations are a `lax.fori_loop`, restarts another
(the loss a `lax.switch`, so the restarts share one compilation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import noise
from ..defense import DefendedClassifier
from . import losses as _losses
from .apgd import checkpoints
from .base import IndexedModel, Threat, eot_keys, project

LOSSES = ("margin", "ce", "dlr")
NORMS = ("Linf", "L2")
RHO = 0.75  # APGD's checkpoint threshold of condition (1)
MOMENTUM = 0.75  # APGD's weight of the new step


def cw_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """CW loss to maximise, (B,): max_{i != y} z_i - z_y (= -`losses.margin`); > 0 iff broken."""
    return -_losses.margin(logits, y)


_LOSS_FNS = {"margin": cw_loss, "ce": _losses.cross_entropy, "dlr": _losses.dlr}


class DiffHammerResult(NamedTuple):
    """x_adv: (B, H, W, C) the kept best point, inside the threat (x where inactive).
    fooled: (B,) bool, active and one fresh draw at x_adv misclassifies it.
    avg_success: (B,) float, the best fraction of the N evaluation draws misclassified at any
      iterate of any restart (DiffHammer's Avg: 1 - this is its Avg.Rob); 0 where inactive.
    any_success: (B,) bool, some evaluation draw at some iterate was misclassified (DiffHammer's
      Wor.Rob counts the example as broken); False where inactive."""

    x_adv: jax.Array
    fooled: jax.Array
    avg_success: jax.Array
    any_success: jax.Array


def _unit(g: jax.Array, norm: str) -> jax.Array:
    """u(g) along the last axis: sign(g) (Linf) or g / ||g||_2 (L2)."""
    if norm == "Linf":
        return jnp.sign(g)
    if norm == "L2":
        return g / jnp.maximum(jnp.sqrt(jnp.sum(g**2, axis=-1, keepdims=True)), 1e-12)
    raise ValueError(f"DiffHammer supports norms {NORMS}, got {norm!r}")


def em_weights(
    losses: jax.Array, grads: jax.Array, r: jax.Array, eps: float, norm: str, em_lam: float = 5.0
) -> jax.Array:
    """(N, B) normalised E-step weights w_i / sum_i w_i, w_i = sigmoid(em_lam (L_i + eps <u(r),
    g_i>)). losses (N, B), grads (N, B, d), r (B, d). Computed as a softmax of log-sigmoids, so
    draws far from broken (every w_i underflowing) still give finite weights."""
    z = losses + eps * jnp.einsum("bd,ibd->ib", _unit(r, norm), grads)
    return jax.nn.softmax(jax.nn.log_sigmoid(em_lam * z), axis=0)


def em_direction(
    losses: jax.Array,
    grads: jax.Array,
    eps: float,
    norm: str,
    em_steps: int = 5,
    em_lam: float = 5.0,
) -> tuple[jax.Array, jax.Array]:
    """DiffHammer's seed selection and E-step on one N-evaluation (theirs `seeds_select`, `EM`).

    losses (N, B): the per-draw losses L_i; grads (N, B, d): the per-draw classifier gradients
    g_i (at the purified images). Returns (r (B, d), j_star (B,) int32):

      j* = argmax_j sum_i elu(L_i + eps <u(g_j), g_i>),   r_0 = g_{j*},
      r_{t+1} = sum_i w_i g_i / sum_i w_i,  w_i = sigmoid(em_lam (L_i + eps <u(r_t), g_i>)),

    em_steps times (0: r = g_{j*}; 1: their code, which never feeds r back). u as `_unit`.
    """
    inner = jnp.einsum("jbd,ibd->jib", _unit(grads, norm), grads)  # <u(g_j), g_i>
    expected = jnp.sum(jax.nn.elu(losses[None] + eps * inner), axis=1)  # (N_j, B)
    j_star = jnp.argmax(expected, axis=0).astype(jnp.int32)
    r = jnp.take_along_axis(grads, j_star[None, :, None], axis=0)[0]

    def step(_, r):
        w = em_weights(losses, grads, r, eps, norm, em_lam)
        return jnp.einsum("ib,ibd->bd", w, grads)

    return jax.lax.fori_loop(0, int(em_steps), step, r), j_star


def _check_grad_mode(purifier) -> None:
    mode = purifier.config.grad
    if mode == "blind":
        raise ValueError(
            "DiffHammer grafts the gradient through the purification; grad='blind' has none "
            "(use 'exact', 'adjoint' or 'bpda', e.g. defended.replace(grad='exact'))"
        )


def grafted_gradient(purifier, x: jax.Array, keys: jax.Array, cotangent: jax.Array) -> jax.Array:
    """J_{phi(.; keys)}(x)^T cotangent: the VJP of one purification per example.

    purifier: an `AbstractPurifier` (its grad mode decides the VJP: `exact`, `adjoint` or
    `bpda`; `blind` is refused). x (B, H, W, C) in [0, 1]; keys (B,) per-example noise keys
    (row b purified as by `purifier.purify_with_keys`, e.g. the example key of b's selected
    draw); cotangent (B, H, W, C), e.g. the E-step's r. Returns (B, H, W, C)."""
    _check_grad_mode(purifier)
    _, vjp = jax.vjp(lambda v: purifier.purify_with_keys(v, keys), x)
    (g,) = vjp(cotangent.astype(x.dtype))
    return g


@dataclasses.dataclass(frozen=True)
class _Config:
    norm: str
    eps: float
    n_iter: int
    n_restarts: int
    loss_names: tuple[str, ...]  # the distinct losses, in first-use order
    loss_ids: tuple[int, ...]  # restart r's loss: loss_names[loss_ids[r]]
    n_eval: int
    em_steps: int
    em_lam: float
    em_alpha: float
    restart_threshold: float


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _windows(n_iter: int) -> np.ndarray:
    """(n_iter,) int32: the window length k at the 0-based iterations ending in a check, else 0."""
    w = np.zeros(n_iter, np.int32)
    prev = 0
    for c in checkpoints(n_iter):
        w[c - 1] = c - prev
        prev = c
    return w


def _eval_keys(k_eval, it, n_eval, index):
    """(N, B) per-example keys of the N evaluation draws of iterate `it`."""
    draws = eot_keys(jax.random.fold_in(k_eval, it), n_eval)
    return jax.vmap(lambda k: noise.example_keys(k, index))(draws)


def _selected_keys(k_eval, its, js, n_eval, index):
    """(B,) keys: example b's key of draw js[b] of iterate its[b] (as `_eval_keys`)."""

    def one(it, j, i):
        draw = eot_keys(jax.random.fold_in(k_eval, it), n_eval)[j]
        return noise.example_keys(draw, i[None])[0]

    return jax.vmap(one)(its, js, index)


class _Eval(NamedTuple):
    """One N-evaluation of an iterate, reduced to what the loop keeps (per example)."""

    frac: jax.Array  # fraction of the N draws misclassified
    mean_loss: jax.Array
    obj: jax.Array  # max over the draws of the loss (the step-size checkpoints' objective)
    any_wrong: jax.Array  # bool: some draw misclassified
    r: jax.Array  # (B, d) the E-step direction
    j_star: jax.Array  # (B,) int32 the selected draw


def _single_run(purifier, classifier, index, x, y, loss_fn, key, cfg: _Config):
    """One restart on the whole batch. Returns (x_best, frac_best (B,), any_success (B,))."""
    threat = Threat(cfg.norm, cfg.eps)
    eps, n = cfg.eps, cfg.n_eval
    k_start, k_eval = jax.random.split(key)
    bsz = x.shape[0]
    y_flat = jnp.tile(y, n)

    def evaluate(x_cur, it) -> _Eval:
        keys = _eval_keys(k_eval, it, n, index)
        flat = jnp.broadcast_to(x_cur[None], (n, *x.shape)).reshape(n * bsz, *x.shape[1:])
        x_hat = jax.lax.stop_gradient(purifier.purify_with_keys(flat, keys.reshape(-1)))

        def total(v):
            z = classifier(v, check=False)  # purified images may leave [0, 1]
            loss = loss_fn(z, y_flat)
            return jnp.sum(loss), (loss, z)

        g, (loss, z) = jax.grad(total, has_aux=True)(x_hat)
        loss = loss.reshape(n, bsz)
        wrong = (jnp.argmax(z, axis=1) != y_flat).reshape(n, bsz)
        r, j_star = em_direction(
            loss, g.reshape(n, bsz, -1), eps, cfg.norm, cfg.em_steps, cfg.em_lam
        )
        return _Eval(
            frac=jnp.mean(wrong.astype(x.dtype), axis=0),
            mean_loss=jnp.mean(loss, axis=0),
            obj=jnp.max(loss, axis=0),
            any_wrong=jnp.any(wrong, axis=0),
            r=r,
            j_star=j_star,
        )

    if cfg.norm == "Linf":
        x0 = x + eps * jax.random.uniform(k_start, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(k_start, x.shape, x.dtype)
        tn = jnp.sqrt(jnp.sum(t.reshape(bsz, -1) ** 2, axis=1))
        x0 = x + eps * t / _bcast(tn + 1e-12, x)
    x0 = jnp.clip(x0, 0.0, 1.0)
    e0 = evaluate(x0, 0)
    zeros_i = jnp.zeros((bsz,), jnp.int32)
    state = dict(
        x_adv=x0,  # the current iterate x_k
        x_old=x0,  # x_{k-1} (APGD momentum)
        mom=jnp.zeros_like(x),  # G_{k-1}
        r=e0.r,  # the E-step of x_k: cotangent and selected draw (its iterate and index)
        sel_it=zeros_i,
        sel_j=e0.j_star,
        step=jnp.full((bsz,), 2.0 * eps, x.dtype),
        obj_prev=e0.obj,
        n_incr=zeros_i,
        obj_best=e0.obj,
        obj_best_last=e0.obj,
        reduced_last=jnp.ones((bsz,), bool),  # condition (2) is off at the first checkpoint
        x_best=x0,  # the best point (6), with its E-step
        frac_best=e0.frac,
        loss_best=e0.mean_loss,
        r_best=e0.r,
        sel_it_best=zeros_i,
        sel_j_best=e0.j_star,
        any_success=e0.any_wrong,
    )
    windows = jnp.asarray(_windows(cfg.n_iter))

    def body(i, s):
        def pick(mask, a, b):
            return jnp.where(_bcast(mask, a), a, b)

        keys = _selected_keys(k_eval, s["sel_it"], s["sel_j"], n, index)
        grad = grafted_gradient(purifier, s["x_adv"], keys, s["r"].reshape(x.shape))
        v = (i + 1.0) ** (-cfg.em_alpha)
        mom = v * grad + (1.0 - v) * s["mom"]  # G_0 = grad_0 (v = 1)
        x_adv = s["x_adv"]
        direction = _unit(mom.reshape(bsz, -1), cfg.norm).reshape(x.shape)
        z = project(x_adv + _bcast(s["step"], x) * direction, x, threat)
        a = jnp.where(i > 0, MOMENTUM, 1.0)
        x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - s["x_old"]), x, threat)

        e = evaluate(x_new, i + 1)
        it_new = jnp.full((bsz,), i + 1, jnp.int32)
        better = (e.frac > s["frac_best"]) | (
            (e.frac == s["frac_best"]) & (e.mean_loss > s["loss_best"])
        )
        x_best = pick(better, x_new, s["x_best"])
        r_best = pick(better, e.r, s["r_best"])
        sel_it_best = jnp.where(better, it_new, s["sel_it_best"])
        sel_j_best = jnp.where(better, e.j_star, s["sel_j_best"])

        n_incr = s["n_incr"] + (e.obj > s["obj_prev"]).astype(jnp.int32)
        obj_best = jnp.maximum(s["obj_best"], e.obj)
        k = windows[i]
        check = k > 0
        cond1 = n_incr.astype(x.dtype) <= k * RHO
        cond2 = ~s["reduced_last"] & (s["obj_best_last"] >= obj_best)
        reset = check & (cond1 | cond2)
        return dict(
            x_adv=pick(reset, x_best, x_new),
            x_old=x_adv,
            mom=mom,
            r=pick(reset, r_best, e.r),
            sel_it=jnp.where(reset, sel_it_best, it_new),
            sel_j=jnp.where(reset, sel_j_best, e.j_star),
            step=jnp.where(reset, s["step"] / 2, s["step"]),
            obj_prev=e.obj,
            n_incr=jnp.where(check, 0, n_incr),
            obj_best=obj_best,
            obj_best_last=jnp.where(check, obj_best, s["obj_best_last"]),
            reduced_last=jnp.where(check, cond1 | cond2, s["reduced_last"]),
            x_best=x_best,
            frac_best=jnp.where(better, e.frac, s["frac_best"]),
            loss_best=jnp.where(better, e.mean_loss, s["loss_best"]),
            r_best=r_best,
            sel_it_best=sel_it_best,
            sel_j_best=sel_j_best,
            any_success=s["any_success"] | e.any_wrong,
        )

    s = jax.lax.fori_loop(0, cfg.n_iter, body, state)
    return s["x_best"], s["frac_best"], s["any_success"]


@eqx.filter_jit
def _attack(model, x, y, key, active, cfg: _Config):
    defended = model.model
    purifier, classifier, index = defended.purifier, defended.classifier, model.index
    k_runs, k_check = jax.random.split(key)
    fns = [_LOSS_FNS[name] for name in cfg.loss_names]
    loss_ids = jnp.asarray(cfg.loss_ids, jnp.int32)

    def restart(r, carry):
        x_kept, frac_kept, any_kept = carry
        todo = active & ((r == 0) | (frac_kept <= cfg.restart_threshold))
        if len(fns) == 1:
            loss_fn = fns[0]
        else:
            loss_id = loss_ids[r]

            def loss_fn(z, yy):
                return jax.lax.switch(loss_id, fns, z, yy)

        def run(_):
            return _single_run(
                purifier, classifier, index, x, y, loss_fn, jax.random.fold_in(k_runs, r), cfg
            )

        def skip(_):
            return x, jnp.full(frac_kept.shape, -1.0, frac_kept.dtype), jnp.zeros_like(todo)

        cand, frac, anys = jax.lax.cond(jnp.any(todo), run, skip, None)
        take = todo & ((r == 0) | (frac > frac_kept))
        return (
            jnp.where(_bcast(take, x), cand, x_kept),
            jnp.where(take, frac, frac_kept),
            any_kept | (todo & anys),
        )

    init = (x, jnp.zeros(x.shape[:1], x.dtype), jnp.zeros(x.shape[:1], bool))
    x_adv, frac, anys = jax.lax.fori_loop(0, cfg.n_restarts, restart, init)
    fooled = active & (jnp.argmax(model(x_adv, k_check), axis=1) != y)
    return DiffHammerResult(x_adv, fooled, frac, anys)


def _positive_int(name, v, minimum=1):
    if isinstance(v, bool) or int(v) != v or v < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    return int(v)


def diffhammer(
    model: IndexedModel,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    threat: Threat,
    n_iter: int = 50,
    n_restarts: int = 3,
    losses: tuple[str, ...] = ("margin", "ce", "dlr"),
    n_eval: int = 10,
    em_steps: int = 5,
    em_lam: float = 5.0,
    em_alpha: float = 0.5,
    restart_threshold: float = 0.5,
    active: jax.Array | None = None,
) -> DiffHammerResult:
    """DiffHammer (see the module docstring), Linf or L2.

    Args:
      model: a `defense.DefendedClassifier` bound to the batch's dataset indices
        (`base.bind_index`, as the runner gives a suite); its purifier's grad mode must be
        `exact`, `adjoint` or `bpda`.
      x: (B, H, W, C) in [0, 1]; y: (B,) int labels; key: PRNG key.
      threat: Linf or L2 ball intersected with [0, 1].
      n_iter: iterations per restart; n_restarts: restarts (r > 0: on the examples whose best
        fraction of draws broken is <= restart_threshold).
      losses: per-restart losses ("margin" = CW, "ce", "dlr"), cycled when shorter.
      n_eval: N, purification draws evaluated per iterate (E-step and metrics).
      em_steps: E-step iterations (0: r = g_{j*}; 1: their code); em_lam: its sigmoid's slope.
      em_alpha: gradient momentum v = (k + 1)^(-em_alpha).
      active: (B,) bool; inactive examples come back as x (fooled, any_success False).

    Returns:
      DiffHammerResult(x_adv, fooled, avg_success, any_success), see its docstring.
    """
    if not isinstance(model, IndexedModel) or not isinstance(model.model, DefendedClassifier):
        raise ValueError(
            "diffhammer needs the defense itself: a defense.DefendedClassifier (purifier + "
            f"classifier) bound to dataset indices with base.bind_index, got {type(model).__name__}"
            + (f" of {type(model.model).__name__}" if isinstance(model, IndexedModel) else "")
        )
    _check_grad_mode(model.model.purifier)
    if not isinstance(threat, Threat):
        raise TypeError(f"threat must be a base.Threat, got {type(threat).__name__}")
    if threat.norm not in NORMS:
        raise ValueError(f"diffhammer supports the {' and '.join(NORMS)} threats, got {threat}")
    y = jnp.asarray(y).astype(jnp.int32)
    if x.ndim < 2 or y.shape != x.shape[:1]:
        raise ValueError(f"x must be (B, ...) and y (B,), got {x.shape} and {y.shape}")
    n_iter = _positive_int("n_iter", n_iter)
    n_restarts = _positive_int("n_restarts", n_restarts)
    n_eval = _positive_int("n_eval", n_eval)
    em_steps = _positive_int("em_steps", em_steps, minimum=0)
    for name, v in (("em_lam", em_lam), ("em_alpha", em_alpha)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not 0.0 <= restart_threshold <= 1.0:
        raise ValueError(f"restart_threshold must be in [0, 1], got {restart_threshold!r}")
    losses = (losses,) if isinstance(losses, str) else tuple(losses)
    if not losses or any(name not in LOSSES for name in losses):
        raise ValueError(f"losses must be a non-empty sequence of {LOSSES}, got {losses!r}")
    per_restart = [losses[r % len(losses)] for r in range(n_restarts)]
    names = tuple(dict.fromkeys(per_restart))
    if active is None:
        active = jnp.ones(x.shape[:1], bool)
    active = jnp.asarray(active)
    if active.shape != x.shape[:1] or active.dtype != jnp.bool_:
        raise ValueError(f"active must be bool {x.shape[:1]}, got {active.dtype} {active.shape}")
    if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key: the same bits, typed
    cfg = _Config(
        norm=threat.norm,
        eps=float(threat.eps),
        n_iter=n_iter,
        n_restarts=n_restarts,
        loss_names=names,
        loss_ids=tuple(names.index(name) for name in per_restart),
        n_eval=n_eval,
        em_steps=em_steps,
        em_lam=float(em_lam),
        em_alpha=float(em_alpha),
        restart_threshold=float(restart_threshold),
    )
    return _attack(model, x, y, key, active, cfg)
