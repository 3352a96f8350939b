"""Shared harness of the benchmarks (purify_cpu, throughput, memory_steps, utilization,
solver_overhead): models, inputs, compile-and-time, XLA analyses, environment and JSON output.

Import this module before jax/equinox/diffrax: it sets EQX_ON_ERROR=nan (diffrax FAQ, "how do I
benchmark diffrax?"). By default equinox's runtime checks (`eqx.error_if`, used by diffrax and by
the input range check of `purify`) raise through a host callback, which adds a host round trip and
blocks some XLA optimisations; with `nan` a failed check only turns the result into NaN, so the
timed program is the pure computation. Outputs are checked to be finite instead.

Conventions of every benchmark here:

* models are NCSN++: the reference small weights converted (purify_cpu) or random weights
  (`random_score`, `random_variables`): `small` = nf=16, num_res_blocks=2 (0.62M params); `full`
  = score_sde's cifar10_ddpmpp_deep_continuous (106.6M params). The weights do not change the
  cost;
* models are passed to `jax.jit` as arguments (equinox pytrees), never closed over;
* each case is compiled once (`jit(f).lower(*args).compile()`, timed), run once to warm up, then
  timed `repeats` times with `block_until_ready`; the minimum is reported;
* the CPU time other processes used during the timed runs is recorded (`others_cpu_per_wall`):
  this machine is shared, and a large value means the timing is pessimistic.

Results: benchmarks/README.md.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The reference weights (../shared/reference/README.md); DIFFPURE_REFERENCE_DIR overrides.
REFERENCE = Path(os.environ.get("DIFFPURE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
MODELS = {
    "small": {"nf": 16, "num_res_blocks": 2},
    "full": {},  # CIFAR10_DDPMPP_DEEP_CONTINUOUS as is
    "tiny": {"nf": 8, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": ()},  # 10,883
}
IMAGE_SHAPE = (32, 32, 3)
MB = 1e6


# --------------------------------------------------------------------------------------------
# models


def random_variables(abstract, seed: int = 0):
    """Random weights for an abstract variables tree, drawn like the reference small models
    (../shared/reference/README.md): arrays with ndim >= 2 (kernels, flax layout (..., in, out))
    N(0, 1/fan_in); 1-D `scale` ones; other 1-D arrays 0.1 N(0, 1). Drawn with numpy's seeded
    generator: much faster than a jitted flax `init` of the full model, and unlike
    score_sde's init (init_scale=0 makes the last conv ~1e-10) the network's output is not ~0.
    The cost of a network call does not depend on its weights."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, leaf in paths:
        name = str(getattr(path[-1], "key", path[-1]))
        if len(leaf.shape) >= 2:
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        leaves.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_score(size: str = "small", seed: int = 0, **overrides):
    """A ScoreModel with random NCSN++ weights (`random_variables`): `size` 'small' or 'full'
    (MODELS), `overrides` change the architecture."""
    from diffpure_jax.convert.score_sde import SDE, abstract_variables, architecture
    from diffpure_jax.models.ncsnpp import NCSNpp
    from diffpure_jax.score import ScoreModel, eps_continuous_score_fn
    from diffpure_jax.sde import VPSDE

    kwargs = architecture(**{**MODELS[size], **overrides})
    module = NCSNpp(**kwargs)
    variables = random_variables(abstract_variables(kwargs), seed)
    sde = VPSDE(**SDE)
    return ScoreModel(variables, eps_continuous_score_fn(module.apply, sde), sde, IMAGE_SHAPE)


def random_classifier(depth: int = 28, widen: int = 10, seed: int = 1, abstract: bool = False):
    """A CIFAR-10 WideResNet-depth-widen `Classifier` with random weights (`random_variables`,
    batch-norm variances 1), or abstract ones (`jax.ShapeDtypeStruct`, nothing allocated)."""
    from diffpure_jax import Classifier
    from diffpure_jax.models import build_model

    wrn = build_model("wideresnet", {"depth": depth, "widen_factor": widen, "num_classes": 10})
    cvars = jax.eval_shape(wrn.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
    if not abstract:
        cvars = random_variables(cvars, seed)
        # Batch-norm variances must be positive (random_variables draws 1-D arrays ~ N(0, .01)).
        cvars = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.ones_like(v) if getattr(path[-1], "key", None) == "var" else v,
            cvars,
        )
    return Classifier(cvars, wrn.apply, IMAGE_SHAPE)


def default_checkpoints(n: int) -> int:
    """equinox.internal.checkpointed_while_loop's own default number of stored states
    (floor(sqrt(2 n + 1/4) - 1/2); the library's default until 2026-12, now n)."""
    import math

    return 1 if n == 1 else min(n, math.floor(-1.5 + math.sqrt(2 * n + 0.25)) + 1)


def n_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def inputs(batch: int, seed: int = 0, shape: tuple[int, ...] = IMAGE_SHAPE):
    """(x in [0, 1], cotangent weights w, noise key) for a batch of images (CIFAR-sized)."""
    kx, kw, key = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.uniform(kx, (batch, *shape), jnp.float32)
    w = jax.random.normal(kw, x.shape, jnp.float32)
    return x, w, key


def purify_fn(config):
    """jit-able (score, x, key) -> purified x."""
    from diffpure_jax.purify import purify

    def f(score, x, key):
        return purify(score, config, x, key)

    return f


def grad_fn(config):
    """jit-able (x, score, w, key) -> d sum(w * purify(x)) / dx."""
    from diffpure_jax.purify import purify

    def loss(x, score, w, key):
        return jnp.sum(w * purify(score, config, x, key))

    return jax.grad(loss)


# --------------------------------------------------------------------------------------------
# measurement


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


def memory_analysis(compiled) -> dict:
    """XLA's compiled memory analysis as a dict of byte counts (empty fields left out)."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # not implemented on some backends
        return {"error": f"{type(e).__name__}: {e}"}
    if stats is None:
        return {"error": "memory_analysis() returned None"}
    out = {}
    for field in (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
        "peak_memory_in_bytes",
    ):
        value = getattr(stats, field, None)
        if value is not None:
            out[field] = int(value)
    return out


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis as one dict (older jax returns a list with one dict per computation:
    the counts are summed)."""
    try:
        cost = compiled.cost_analysis()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if cost is None:
        return {"error": "cost_analysis() returned None"}
    if isinstance(cost, dict):
        cost = [cost]
    out: dict[str, float] = {}
    for part in cost:
        for k, v in (part or {}).items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0.0) + float(v)
    return out


def compile_fn(fn, args) -> tuple[object, dict]:
    """jit, lower and compile `fn` for `args`; returns (compiled, timings in s)."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_lower_s": t1 - t0, "compile_s": t2 - t0}


def time_compiled(compiled, args, repeats: int = 3, budget_s: float = 60.0) -> dict:
    """One warm-up run, then `repeats` timed runs (fewer if they would exceed `budget_s`).

    Returns steady_s (the minimum), all run times, and the contention measures.
    """
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warmup = time.perf_counter() - t
    repeats = max(1, min(repeats, int(budget_s // max(warmup, 1e-9))))
    cpu0, machine0 = _cpu_seconds(), _machine_cpu_seconds()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    own = _cpu_seconds() - cpu0
    machine1 = _machine_cpu_seconds()
    others = None if machine0 is None or machine1 is None else machine1 - machine0 - own
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
    return {
        "warmup_s": warmup,
        "run_s": times,
        "steady_s": min(times),
        "repeats": repeats,
        "cpu_per_wall": own / sum(times),
        "others_cpu_per_wall": None if others is None else max(0.0, others / sum(times)),
        "finite": finite,
    }


def measure(fn, args, repeats: int = 3, budget_s: float = 60.0, analyses: bool = True) -> dict:
    """compile_fn + time_compiled (+ XLA memory and cost analyses)."""
    args = jax.block_until_ready(args)
    compiled, res = compile_fn(fn, args)
    if analyses:
        res["xla_memory"] = memory_analysis(compiled)
        res["xla_cost"] = {
            k: v
            for k, v in cost_analysis(compiled).items()
            if k in ("flops", "transcendentals", "bytes accessed", "error")
        }
    res.update(time_compiled(compiled, args, repeats, budget_s))
    return res


def busy_fraction(sample_s: float = 1.0) -> float | None:
    """Fraction of all cores busy over `sample_s` (all processes)."""

    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(max_wait_s: float, threshold: float = 0.15) -> tuple[float | None, float]:
    """Wait (up to `max_wait_s`) until all processes together keep < `threshold` of the cores
    busy; returns (the last busy fraction, seconds waited)."""
    start = time.perf_counter()
    busy = busy_fraction()
    while busy is not None and busy > threshold and time.perf_counter() - start < max_wait_s:
        time.sleep(4.0)
        busy = busy_fraction()
    return busy, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# reporting


def environment() -> dict:
    import diffrax
    import equinox
    import flax
    import jaxlib

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def git(*cmd):
        return subprocess.run(
            ["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "n_devices": jax.device_count(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
        "busy_fraction_at_start": busy_fraction(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
        "flax": flax.__version__,
        "EQX_ON_ERROR": os.environ.get("EQX_ON_ERROR"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "commit": git("rev-parse", "HEAD") or None,
        "diffpure_jax_dirty": bool(git("status", "--porcelain", "--", "diffpure_jax")),
    }


def header(name: str, config: dict) -> dict:
    env = environment()
    print(f"== {name}")
    print("environment:", json.dumps(env, indent=1))
    print("config:", json.dumps(config, indent=1))
    return env


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


def command(module: str, argv) -> str:
    return " ".join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:.1f}"


def fmt_load(r: dict) -> str:
    o = r.get("others_cpu_per_wall")
    return "-" if o is None else f"{o:.2f}"


# --------------------------------------------------------------------------------------------
# a minimal reference solver


def scan_purify(score, config, x, key, remat: bool = True, unroll: int | bool = 1):
    """DiffPure's Euler-Maruyama purification as a bare `lax.scan`, with the same noise as
    `diffpure_jax.purify.purify(score, config, x, key)` (index = arange(B), draw 0) and the same
    time grid, so the two agree to float round-off. `remat`: `jax.checkpoint` every step (the
    backward pass stores the n states and recomputes each step's network once: the same schedule
    as diffrax with checkpoints=n_steps). Euler, reverse SDE, grid noise only.
    """
    from diffpure_jax import noise

    sde, shape = score.sde, x.shape[1:]
    keys = noise.example_keys(key, jnp.arange(x.shape[0]), 0)
    eps = noise.forward_noise(keys, shape, x.dtype)
    x_t = sde.diffuse(2.0 * x - 1.0, eps, config.t_star, config.forward_schedule)
    ts = jnp.asarray(config.time_grid(), x.dtype)
    sqrt_dt = jnp.sqrt(ts[:-1] - ts[1:])

    def step(y, k):
        t = ts[k]
        drift = sde.reverse_drift(score.score_fn(score.variables, y, t), y, t)
        dw = sqrt_dt[k] * noise.step_noise(keys, k, shape, x.dtype)
        return y + drift * (ts[k + 1] - t) + sde.diffusion(t) * dw, None

    if remat:
        step = jax.checkpoint(step)
    y, _ = jax.lax.scan(step, x_t, jnp.arange(config.n_steps), unroll=unroll)
    return (y + 1.0) / 2.0


def scan_grad_fn(config, remat: bool = True):
    """jit-able (x, score, w, key) -> d sum(w * scan_purify(x)) / dx."""

    def loss(x, score, w, key):
        return jnp.sum(w * scan_purify(score, config, x, key, remat=remat))

    return jax.grad(loss)
