"""Convert official PyTorch checkpoints into diffpure_jax checkpoints.

    python -m diffpure_jax.convert score-sde checkpoint_8.pth checkpoints/cifar10-ddpmpp-deep-cont
    python -m diffpure_jax.convert robustbench-wrn Standard.pt checkpoints/cifar10-wrn-28-10
    python -m diffpure_jax.convert diffpure-wrn-dropout weights.pt checkpoints/cifar10-wrn-70-16-dp
    python -m diffpure_jax.convert robustbench-dm-wrn weights-best.pt checkpoints/cifar10-dm-wrn

`--arch key=value` overrides an architecture option (e.g. nf=16 num_res_blocks=2 for a reduced
model). Files are read with torch.load(weights_only=True): a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import json
import sys

from .classifiers import VARIANTS, convert_classifier
from .common import ConversionError
from .score_sde import convert_score_sde


def _parse_arch(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arch expects key=value, got {item!r}")
        out[key] = json.loads(value) if value[:1] in "[{0123456789-tf" else value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffpure_jax.convert", description=__doc__)
    parser.add_argument("source", choices=["score-sde", *sorted(VARIANTS)], help="checkpoint kind")
    parser.add_argument("src", help="official PyTorch checkpoint file")
    parser.add_argument("out_dir", help="output directory (must not hold a checkpoint yet)")
    parser.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="score-sde only: EMA weights (what DiffPure uses, default) or the raw 'model' entry",
    )
    args = parser.parse_args(argv)
    arch = _parse_arch(args.arch)
    try:
        if args.source == "score-sde":
            config = convert_score_sde(args.src, args.out_dir, weights=args.weights, **arch)
        else:
            config = convert_classifier(args.src, args.out_dir, args.source, **arch)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}: {config['architecture']} {json.dumps(config['kwargs'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
