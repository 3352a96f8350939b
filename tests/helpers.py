"""Shared test helpers: tiny models and data, a random "defense", and the kill helper.

`synthetic_data`: synthetic 10-class images; each class is a random prototype image in
[0.2, 0.8], examples are the prototype plus small noise. `trained_linear()` and `trained_mlp()`
reach ~100% clean accuracy in a second of training; prototypes are ~0.2 apart per pixel, so Linf
eps = 0.3 breaks every example and eps = 0 none. `NoisyModel` wraps a model into a random
classifier (logits plus noise drawn from the key and the dataset index). `gaussian_score` is an
analytic score model; the tiny NCSN++ is the library's `models.ncsnpp.tiny_score_model`.
`Killed` and `kill_at(n)` simulate a kill after a durable step of a resumable job. `problem` is
the runner problem shared by the sharding and multi-process checks. `nhwc` and `max_rel_err`
serve the parity tests.

Test modules import these with `from helpers import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import collections
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from diffpure_jax import VPSDE, ScoreModel
from diffpure_jax.attacks.base import Threat
from diffpure_jax.attacks.suites import pgd_suite
from diffpure_jax.defense import AbstractRandomClassifier
from diffpure_jax.runner import Evaluation

SHAPE = (8, 8, 1)
N_CLASSES = 10


def synthetic_data(n: int, seed: int = 0):
    """(x (n, 8, 8, 1) in [0, 1], y (n,) int32)."""
    kp, ky, kn = jax.random.split(jax.random.key(1234), 3)
    prototypes = jax.random.uniform(kp, (N_CLASSES, *SHAPE), minval=0.2, maxval=0.8)
    ky, kn = jax.random.split(jax.random.fold_in(ky, seed))
    y = jax.random.randint(ky, (n,), 0, N_CLASSES)
    x = prototypes[y] + 0.05 * jax.random.normal(kn, (n, *SHAPE))
    return jnp.clip(x, 0.0, 1.0), y.astype(jnp.int32)


class MLP(eqx.Module):
    """logits = W2 relu(W1 x + b1) + b2 (hidden=0: linear). `model(x, key)`; key unused."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array | None
    b2: jax.Array | None

    def __call__(self, x, key=None):
        h = x.reshape(x.shape[0], -1) @ self.w1 + self.b1
        if self.w2 is None:
            return h
        return jax.nn.relu(h) @ self.w2 + self.b2


def _init(hidden: int, key):
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    k1, k2 = jax.random.split(key)
    if hidden == 0:
        return MLP(jax.random.normal(k1, (d, N_CLASSES)) * 0.01, jnp.zeros(N_CLASSES), None, None)
    return MLP(
        jax.random.normal(k1, (d, hidden)) / jnp.sqrt(d),
        jnp.zeros(hidden),
        jax.random.normal(k2, (hidden, N_CLASSES)) / jnp.sqrt(hidden),
        jnp.zeros(N_CLASSES),
    )


@functools.cache
def _train(hidden: int, steps: int = 300) -> MLP:
    model = _init(hidden, jax.random.key(hidden))
    x, y = synthetic_data(512, seed=1)
    opt = optax.adam(1e-2)
    state = opt.init(model)

    @jax.jit
    def step(model, state):
        loss, grad = jax.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        )(model)
        updates, state = opt.update(grad, state, model)
        return optax.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = step(model, state)
    return model


def trained_linear() -> MLP:
    return _train(0)


def trained_mlp() -> MLP:
    return _train(32)


# Traces of NoisyModel (calls on tracers: inside jit), to check that batches do not recompile.
TRACES = collections.Counter()


class NoisyModel(AbstractRandomClassifier):
    """A random 'defense': logits plus Gaussian noise drawn from (key, dataset index)."""

    model: eqx.Module
    scale: float = 1.0

    def __call__(self, x, key, index=None):
        if isinstance(x, jax.core.Tracer):
            TRACES["model"] += 1
        index = jnp.arange(x.shape[0]) if index is None else index
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (10,)))(index)
        return self.model(x) + self.scale * noise


def gaussian_score(shape=(4, 4, 3)) -> ScoreModel:
    """Score of N(mu, s2) data diffused by the VP-SDE, plus a smooth nonlinearity."""
    sde = VPSDE()

    def score_fn(p, x, t):
        t = jnp.broadcast_to(t, x.shape[:1])[:, None, None, None]
        ab = sde.alpha_bar(t)
        return -(x - jnp.sqrt(ab) * p["mu"]) / (ab * p["s2"] + 1 - ab) + p["c"] * jnp.tanh(x)

    params = {"s2": jnp.asarray(0.3), "mu": jnp.asarray(0.1), "c": jnp.asarray(0.5)}
    return ScoreModel(params, score_fn, sde, shape)


def defended_mlp(grad: str = "exact", t_star: float = 0.05, dt: float = 0.01):
    """A small trained defended model: DiffPure with the analytic `gaussian_score` on the
    synthetic (8, 8, 1) images in front of `trained_mlp()` (5 Euler-Maruyama steps by default).
    Its clean accuracy on `synthetic_data` is about 100%, and its gradient modes are the
    purifier's."""
    from diffpure_jax import DefendedClassifier, Purifier, PurifyConfig
    from diffpure_jax.classifier import Classifier

    mlp = trained_mlp()
    classifier = Classifier(mlp, lambda m, x: m(x), SHAPE)
    config = PurifyConfig(t_star=t_star, dt=dt, grad=grad, forward_schedule="continuous")
    return DefendedClassifier(Purifier(gaussian_score(SHAPE), config), classifier)


def square_images(n: int, size: int = 8, seed: int = 0):
    """(x (n, size, size, 1) in [0, 1], y (n,)): bright squares of random brightness on black,
    labelled by brightness (10 classes)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 1), np.float32)
    x[:, 2:-2, 2:-2] = rng.uniform(0.5, 1.0, (n, 1, 1, 1))
    y = (x[:, size // 2, size // 2, 0] * 20).astype(np.int32) % 10
    return x, y


class Killed(Exception):
    """Raised by `kill_at` to simulate a kill."""


def kill_at(n: int):
    """An `after_batch` / `after_step` callback that raises Killed once step or batch n is done."""

    def callback(i):
        if i == n:
            raise Killed

    return callback


def problem(n: int = 10, batch_size: int = 3):
    """(evaluation, model, x, y, index): PGD-EOT on a noisy trained MLP, n synthetic examples."""
    threat = Threat("Linf", 0.06)
    evaluation = Evaluation(
        attack=pgd_suite(threat, n_iter=3, n_eot=2),
        threat=threat,
        protocols=("one_draw", "majority_of_3"),
        batch_size=batch_size,
        seed=5,
        description={"test": "multihost", "n": n, "batch_size": batch_size},
    )
    x, y = synthetic_data(n, seed=11)
    return evaluation, NoisyModel(trained_mlp()), np.asarray(x), np.asarray(y), np.arange(n) + 200


def nhwc(a):
    """NCHW numpy (official layout) -> NHWC jax array."""
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (ours NHWC or any layout matching ref)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def refusal(capsys, main, argv, max_lines: int = 4) -> str:
    """Run an entry point's `main(argv)` that must refuse: exit code 2, an `error: ...` message
    of at most max_lines lines on stderr and no traceback. Returns the message."""
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    else:
        raise AssertionError(f"{argv} was not refused")
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) <= max_lines, err
    return err


CELEBA_NAMES = ["Eyeglasses", "Male", "Smiling"]


def make_celebahq(root, n=12, size=64):
    """n images named like CelebA's (000001.png, ...), a third of them in val, written out of
    order; attributes: Eyeglasses on every third, Smiling on even numbers."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, parts = [], []
    for k in reversed(range(n)):
        name = f"{k + 1:06d}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.png"
        )
    for k in range(n):
        values = [1 if k % 3 == 0 else -1, -1, 1 if k % 2 == 0 else -1]
        rows.append(f"{k + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in values))
        parts.append(f"{k + 1:06d}.jpg {1 if k % 3 == 1 else 0}")
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(CELEBA_NAMES) + "\n" + "\n".join(rows)
    )
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root
