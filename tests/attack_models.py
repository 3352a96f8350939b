"""Small classifiers trained in the tests, for attack tests: synthetic 10-class images.

Each class is a random prototype image in [0.2, 0.8]; examples are the prototype plus small
noise. `trained_linear()` and `trained_mlp()` reach ~100% clean accuracy in a second of training;
prototypes are ~0.2 apart per pixel, so Linf eps = 0.3 breaks every example and eps = 0 none.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

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
