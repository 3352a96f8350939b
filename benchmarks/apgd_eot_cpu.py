"""Cost of one APGD-EOT iteration through the DiffPure purifier (small NCSN++), per example.

    python -m benchmarks.apgd_eot_cpu --batch 2 --eot 2 --grad exact
    python -m benchmarks.apgd_eot_cpu --batch 2 --eot 2 --grad adjoint

The defense is the reference small NCSN++ (nf=16, 2 res blocks, random EMA weights) at t* = 0.1, dt
= 1e-3 (100 Euler steps), in front of the reference small WRN-16-2. APGD-CE (Linf 8/255) runs with
n_iter = 2 and n_iter = 2 + `--extra` in compiled form. The difference of the two steady-state
times, divided by `--extra`, is the cost of one iteration. (Not from n_iter = 1: XLA inlines a one-
trip loop and drops the unused backward pass of its last iteration, so a difference from 1 counts
an extra backward pass; the results committed before 2026-12-01 used n_iter = 1.) Dividing that by
batch x eot gives the cost per example and EOT draw; times 20 gives AutoAttack-rand's EOT 20, a
linear extrapolation (draws are one vmapped batch, so the cost is linear on a saturated CPU).
Writes JSON.

Results: benchmarks/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("EQX_ON_ERROR", "nan")  # benchmark hygiene, see common.py

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffpure_jax import DefendedClassifier, load_classifier, load_purifier  # noqa: E402
from diffpure_jax.attacks.apgd import apgd  # noqa: E402
from diffpure_jax.attacks.base import Threat, bind_index  # noqa: E402
from diffpure_jax.convert.classifiers import convert_classifier  # noqa: E402
from diffpure_jax.convert.score_sde import convert_score_sde  # noqa: E402

REFERENCE = Path(os.environ.get("DIFFPURE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def build(grad: str) -> DefendedClassifier:
    tmp = tempfile.mkdtemp()
    convert_score_sde(
        str(REFERENCE / "score_sde_cifar10_small.pth"), f"{tmp}/s", nf=16, num_res_blocks=2
    )
    convert_classifier(
        str(REFERENCE / "wrn28_10_cifar10_standard_small.pth"),
        f"{tmp}/c",
        "robustbench-wrn",
        depth=16,
        widen_factor=2,
    )
    return DefendedClassifier(load_purifier(f"{tmp}/s", grad=grad), load_classifier(f"{tmp}/c"))


def steady_time(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, min(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eot", type=int, default=2)
    p.add_argument("--grad", choices=["exact", "adjoint", "bpda"], default="exact")
    p.add_argument("--extra", type=int, default=2, help="extra iterations timed")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model = bind_index(build(args.grad), jnp.arange(args.batch))
    x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
    threat = Threat("Linf", 8 / 255)
    key = jax.random.key(1)
    # Labels = the prediction of APGD's own clean pass (its first key split), so that every
    # example is attacked: with random weights most labels would otherwise be wrong already.
    y = jnp.argmax(model(x, jax.random.split(key, 3)[0]), -1)
    results = {}
    for n_iter in (2, 2 + args.extra):

        def run(n_iter=n_iter):
            return apgd(model, x, y, key, threat=threat, n_iter=n_iter, n_eot=args.eot).x_adv

        first, steady = steady_time(run, args.repeats)
        results[n_iter] = {"first_call_s": first, "steady_s": steady}
    per_iter = (results[2 + args.extra]["steady_s"] - results[2]["steady_s"]) / args.extra
    per_example_draw = per_iter / (args.batch * args.eot)
    out = {
        "device": str(jax.devices()[0]),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "config": vars(args) | {"t_star": 0.1, "dt": 1e-3, "n_steps": 100},
        "runs": results,
        "seconds_per_iteration": per_iter,
        "seconds_per_example_per_draw": per_example_draw,
        "seconds_per_example_per_iteration_eot20_extrapolated": 20 * per_example_draw,
    }
    print(json.dumps(out, indent=1))
    path = Path(args.out or REPO / "benchmarks" / "results" / f"apgd_eot_cpu_{args.grad}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
