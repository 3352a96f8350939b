"""Quality checks and figures for the Fashion-MNIST models and results.

    python -m experiments.fashion_mnist_report samples    # grid of samples from pure noise (PNG)
    python -m experiments.fashion_mnist_report accuracy   # clean and purified clean accuracy
    python -m experiments.fashion_mnist_report diffused   # accuracy on diffused images x_t*
    python -m experiments.fashion_mnist_report reverse-draws  # one draw vs a vote of reverse draws
    python -m experiments.fashion_mnist_report grid --workdir workdir/fmnist/diffpure-...
                                                          # clean / adversarial / purified (PNG)
    python -m experiments.fashion_mnist_report sweep --workdirs W1 W2 ...
                                                          # clean and robust accuracy vs t* (PNG)

Needs the `figures` extra (matplotlib) for the PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffpure_jax import load_classifier, load_purifier, load_score_model, noise
from diffpure_jax.data import FASHION_MNIST_CLASSES, fashion_mnist_test
from diffpure_jax.evaluate import protocol_scores
from diffpure_jax.sample import sample
from diffpure_jax.train.classifier import diffuse_images
from experiments.purify_train_set import PURIFIED_ROOT, purify_split

SCORE = "checkpoints/fmnist-ncsnpp-small"
CLASSIFIER = "checkpoints/fmnist-wrn-16-1"
ADV_CLASSIFIER = "checkpoints/fmnist-wrn-16-1-pgd"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install -e '.[figures]'") from None
    return plt


def image_grid(rows: list[np.ndarray], path: str, row_labels=None, titles=None) -> None:
    """Save rows of (n, H, W, 1) images in [0, 1] as one PNG; titles: per-row lists of text."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols, 1.25 * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(np.asarray(row[j])[..., 0], cmap="gray", vmin=0, vmax=1)
                if titles is not None:
                    ax.set_title(titles[i][j], fontsize=6)
        if row_labels is not None:
            axes[i][0].text(-4, 14, row_labels[i], ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_samples(args) -> None:
    score = load_score_model(args.score)
    t0 = time.perf_counter()
    x = jax.jit(sample, static_argnums=(2, 3))(score, jax.random.key(args.seed), args.n, args.steps)
    x = np.asarray(x)
    print(f"{args.n} samples, {args.steps} steps, {time.perf_counter() - t0:.0f} s")
    cols = int(np.ceil(np.sqrt(args.n)))
    image_grid([x[i : i + cols] for i in range(0, args.n, cols)], args.out)
    print(f"wrote {args.out}")


def _batched(fn, batch, *arrays):
    """fn over consecutive batches of the (equally long) arrays, outputs concatenated (numpy)."""
    n = len(arrays[0])
    return np.concatenate(
        [np.asarray(fn(*(a[i : i + batch] for a in arrays))) for i in range(0, n, batch)]
    )


def _scores(pred, y) -> dict:
    """Accuracy (%) and per-class [n, correct] of predictions against labels."""
    return _scores_of_correct(pred == y, y)


def _scores_of_correct(correct, y) -> dict:
    """Accuracy (%) and per-class [n, correct] of per-example correctness (bool) with labels."""
    return {
        "accuracy": 100.0 * float(np.mean(correct)),
        "per_class": {
            name: [int(np.sum(y == k)), int(np.sum(correct & (y == k)))]
            for k, name in enumerate(FASHION_MNIST_CLASSES)
        },
    }


def cmd_accuracy(args) -> dict:
    """Clean and purified clean accuracy of each classifier; every classifier sees the same
    purified images (one draw per t*), so their losses under purification compare directly.
    The purified images are kept (and resumed) under --purified-root (`purify_train_set`)."""
    classifiers = {path: load_classifier(path) for path in args.classifier}
    classify = jax.jit(lambda c, xb: c(xb).argmax(-1))
    result = {"n_examples": None, "data_seed": args.data_seed, "dt": args.dt, "seed": args.seed}
    result["score"], result["classifiers"] = args.score, {c: {} for c in classifiers}
    for t_star in args.t_star:
        t0 = time.perf_counter()
        x, y, _, purified = purify_split(
            args.score, "test", args.n, args.data_seed, t_star, args.dt, args.seed,
            args.batch_size, data_dir=args.data_dir, progress=not args.no_progress,
            root=args.purified_root,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        result["n_examples"] = len(x)
        for path, c in classifiers.items():
            scores = result["classifiers"][path]
            if "clean" not in scores:
                pred = _batched(lambda xb, c=c: classify(c, xb), args.batch_size, x)
                scores["clean"] = _scores(pred, y)
            pred = _batched(lambda xb, c=c: classify(c, xb), args.batch_size, purified)
            scores[f"purified_t{t_star}"] = _scores(pred, y)
            print(
                f"{path}: clean {scores['clean']['accuracy']:.2f}%, purified (t* = {t_star}, "
                f"dt = {args.dt}, one draw) {scores[f'purified_t{t_star}']['accuracy']:.2f}% "
                f"(purification {seconds:.0f} s)"
            )
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cmd_diffused(args) -> dict:
    """How much of the label survives the forward diffusion: each classifier on x_t* (the
    diffused test images the reverse solve starts from, with the noise purification draws for
    --seed) and on clean images; the accuracy and the mean probability of the true class.

    Purification is a random function of x_t*, so a classifier behind it is a classifier of x_t*:
    no purifier can make one-draw purified accuracy exceed the best accuracy attainable on x_t*.
    A classifier trained on x_t* (`train_classifier --diffuse-t-star`) gives a lower estimate of
    that ceiling, to hold the purified accuracy against.
    """
    x, y, index = fashion_mnist_test(args.n, args.data_seed, args.data_dir)

    @jax.jit
    def diffused(xb, ib):
        keys = noise.example_keys(jax.random.key(args.seed), ib)
        eps = noise.forward_noise(keys, xb.shape[1:], xb.dtype)
        return diffuse_images(xb, eps, args.t_star)

    x_t = _batched(diffused, args.batch_size, x, index)
    probs = jax.jit(lambda c, xb: jax.nn.softmax(c(xb), -1))
    result = {"n_examples": len(x), "t_star": args.t_star, "seed": args.seed, "classifiers": {}}
    for path in args.classifier:
        c = load_classifier(path)
        scores = {}
        for name, images in (("clean", x), (f"diffused_t{args.t_star}", x_t)):
            p = _batched(lambda xb, c=c: probs(c, xb), args.batch_size, images)
            scores[name] = {
                **_scores(p.argmax(-1), y),
                "mean_true_class_probability": 100.0 * float(np.mean(p[np.arange(len(y)), y])),
            }
            print(
                f"{path}: {name} accuracy {scores[name]['accuracy']:.2f}%, mean true-class "
                f"probability {scores[name]['mean_true_class_probability']:.2f}%"
            )
        result["classifiers"][path] = scores
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cmd_reverse_draws(args) -> dict:
    """How much one draw loses to the reverse SDE's own randomness. Each test image is diffused
    once (the forward noise of the `accuracy` report's draw) and solved back --draws times with
    independent reverse noise (draw 0 is the `accuracy` report's purification). Per classifier:
    the mean one-draw accuracy over the reverse draws, and the accuracy of their majority vote
    (`majority_of_N`'s rule, ties to the lowest class index): a purifier deterministic given x_t*
    would score about the vote, a posterior sampler scores the mean. The purified images are kept
    and resumed like the `accuracy` report's."""
    probs = jax.jit(lambda c, xb: jax.nn.softmax(c(xb), -1))
    classifiers = {path: load_classifier(path) for path in args.classifier}
    p = {c: [] for c in classifiers}  # per classifier: (draws, n, K) probabilities
    for d in range(args.draws):
        x, y, _, purified = purify_split(
            args.score, "test", args.n, args.data_seed, args.t_star, args.dt, args.seed,
            args.batch_size, data_dir=args.data_dir, progress=not args.no_progress,
            root=args.purified_root, reverse_draw=d,
        )  # fmt: skip
        for path, c in classifiers.items():
            p[path].append(_batched(lambda xb, c=c: probs(c, xb), args.batch_size, purified))
    result = {"n_examples": len(y), "t_star": args.t_star, "dt": args.dt, "seed": args.seed}
    result.update(draws=args.draws, score=args.score, classifiers={})
    for path, ps in p.items():
        ps = np.stack(ps)  # (draws, n, K)
        vote = protocol_scores(jnp.asarray(ps.argmax(-1)), jnp.asarray(y), "majority")
        draw_acc = [100.0 * float(np.mean(pd.argmax(-1) == y)) for pd in ps]
        scores = {
            "one_draw_accuracy_per_draw": draw_acc,
            "one_draw_accuracy_mean": float(np.mean(draw_acc)),
            "majority_vote": _scores_of_correct(vote, y),
        }
        result["classifiers"][path] = scores
        print(
            f"{path}: one draw {scores['one_draw_accuracy_mean']:.2f}% (mean of {args.draws} "
            f"reverse draws from the same x_t*), their majority vote "
            f"{scores['majority_vote']['accuracy']:.2f}%"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _read_summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def cmd_grid(args) -> None:
    summary = _read_summary(args.workdir)
    s = summary["settings"]
    adv = np.load(os.path.join(args.workdir, "adv", "batch_00000.npz"))
    index, x_adv, y = adv["index"][: args.n], adv["x_adv"][: args.n], adv["y"][: args.n]
    x_all, y_all, index_all = fashion_mnist_test(s["n_examples"], s["data_seed"], args.data_dir)
    pos = {int(i): k for k, i in enumerate(index_all)}
    x = x_all[[pos[int(i)] for i in index]]
    classifier = load_classifier(s["classifier"])
    purifier = load_purifier(s["score"], t_star=s["t_star"], dt=s["dt"])
    key = jax.random.key(args.seed)
    px = np.asarray(purifier(jnp.asarray(x), key, jnp.asarray(index)))
    pa = np.asarray(purifier(jnp.asarray(x_adv), key, jnp.asarray(index)))

    def names(images):
        pred = np.asarray(classifier(jnp.asarray(np.clip(images, 0, 1))).argmax(-1))
        return [
            FASHION_MNIST_CLASSES[p] + ("" if p == t else " x")
            for p, t in zip(pred, y, strict=True)
        ]

    rows = [x, x_adv, px, pa]
    labels = [
        "clean",
        f"adversarial\n({s['norm']} {s['eps']:g})",
        "purified\nclean",
        "purified\nadv.",
    ]
    image_grid(rows, args.out, labels, [names(r) for r in rows])
    print(f"wrote {args.out}")


def cmd_sweep(args) -> None:
    plt = _pyplot()
    points = []
    for w in args.workdirs:
        summary = _read_summary(w)
        t = summary["settings"]["t_star"]
        points.append((t, summary["clean_accuracy"], summary["robust_accuracy"]))
    points.sort()
    ts = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ts, [p[1] for p in points], "o-", label="clean (one draw)")
    for protocol in points[0][2]:
        ax.plot(ts, [p[2][protocol] for p in points], "s--", label=f"robust ({protocol})")
    ax.set_xlabel("t*")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(args.title, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(json.dumps([{"t_star": t, "clean": c, "robust": r} for t, c, r in points], indent=1))
    print(f"wrote {args.out}")


def _add_purified_test_args(parser) -> None:
    """The flags of the reports that purify test images and keep them (`purify_split`)."""
    parser.add_argument("--score", default=SCORE)
    parser.add_argument("--dt", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=200, help="also the size of a kept chunk")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--purified-root",
        default=PURIFIED_ROOT,
        help="where the purified test images are kept (a rerun reads them back)",
    )
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the numbers as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.fashion_mnist_report", description=__doc__.splitlines()[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples", help="samples from pure noise")
    s.add_argument("--score", default=SCORE)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="experiments/results/fashion_mnist_samples.png")
    a = sub.add_parser("accuracy", help="clean and purified clean accuracy on the test set")
    a.add_argument(
        "--classifier",
        nargs="+",
        default=[CLASSIFIER, ADV_CLASSIFIER],
        help="one or more classifiers, all scored on the same purified images",
    )
    a.add_argument("--n", type=int, default=10_000)
    a.add_argument("--t-star", type=float, nargs="+", default=[0.1])
    _add_purified_test_args(a)
    d = sub.add_parser("diffused", help="accuracy on forward-diffused test images x_t*")
    d.add_argument("--classifier", nargs="+", default=[CLASSIFIER])
    d.add_argument("--n", type=int, default=10_000)
    d.add_argument("--t-star", type=float, default=0.1)
    d.add_argument("--batch-size", type=int, default=500)
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--data-dir", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default=None, help="write the numbers as JSON")
    r = sub.add_parser(
        "reverse-draws", help="one draw against the vote of reverse draws from the same x_t*"
    )
    r.add_argument("--classifier", nargs="+", default=[CLASSIFIER])
    r.add_argument("--n", type=int, default=500)
    r.add_argument("--draws", type=int, default=5)
    r.add_argument("--t-star", type=float, default=0.1)
    _add_purified_test_args(r)
    g = sub.add_parser("grid", help="clean, adversarial and purified examples of an evaluation")
    g.add_argument("--workdir", required=True)
    g.add_argument("--n", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", default=None)
    g.add_argument("--out", default="experiments/results/fashion_mnist_examples.png")
    w = sub.add_parser("sweep", help="accuracy against t* from evaluation workdirs")
    w.add_argument("--workdirs", nargs="+", required=True)
    w.add_argument("--title", default="DiffPure on Fashion-MNIST")
    w.add_argument("--out", default="experiments/results/fashion_mnist_tstar_sweep.png")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"samples": cmd_samples, "accuracy": cmd_accuracy, "diffused": cmd_diffused}
    commands.update({"reverse-draws": cmd_reverse_draws, "grid": cmd_grid, "sweep": cmd_sweep})
    return commands[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
