"""Convert official PyTorch checkpoints into diffpure_jax checkpoints.

    python -m diffpure_jax.convert score-sde checkpoint_8.pth checkpoints/cifar10-ddpmpp-deep-cont
    python -m diffpure_jax.convert robustbench-wrn Standard.pt checkpoints/cifar10-wrn-28-10
    python -m diffpure_jax.convert diffpure-wrn-dropout weights.pt checkpoints/cifar10-wrn-70-16-dp
    python -m diffpure_jax.convert robustbench-dm-wrn weights-best.pt checkpoints/cifar10-dm-wrn
    python -m diffpure_jax.convert guided-diffusion 256x256_diffusion_uncond.pt \\
        checkpoints/imagenet-adm
    python -m diffpure_jax.convert ddpm-celebahq celeba_hq.ckpt checkpoints/celebahq-ddpm-256
    python -m diffpure_jax.convert torchvision-resnet50 resnet50-19c8e357.pth \\
        checkpoints/imagenet-resnet50
    python -m diffpure_jax.convert torchvision-wide-resnet50-2 wide_resnet50_2-95faca4d.pth \\
        checkpoints/imagenet-wrn-50-2
    python -m diffpure_jax.convert deit-s deit_small_patch16_224-cd65a155.pth \\
        checkpoints/imagenet-deit-s
    python -m diffpure_jax.convert celebahq-attribute Eyeglasses/net_best.pth \\
        checkpoints/celebahq-eyeglasses

The sizes (NCSN++ nf, num_channels, num_res_blocks; WRN depth, width, num_classes; ResNet layers,
planes, width_per_group; ViT embed_dim, depth, img_size, ...) are read from the file's shapes;
`--arch key=value` sets an architecture option and wins over what is read (a ResNet's
image_size, 224 by default, and a ViT's num_heads, 6, are not in the file).
Files are read with torch.load(weights_only=True): a pickle that would run code is refused.
A refusal prints `error: ...` and exits with status 2 (DIFFPURE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .classifiers import VARIANTS, convert_classifier
from .common import ConversionError, format_arch
from .ddpm import convert_ddpm
from .guided_diffusion import convert_guided_diffusion
from .score_sde import convert_score_sde

EXIT_REFUSED = 2
DEBUG_ENV = "DIFFPURE_DEBUG"  # set to 1 for tracebacks instead of one-line refusals


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are two lines (the message and where the flags are) instead
    of the generated usage of every flag."""

    def error(self, message):
        self.exit(EXIT_REFUSED, f"error: {message}\n(`{self.prog} --help` lists every flag)\n")


def _parse_arch(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConversionError(f"--arch expects KEY=VALUE (e.g. nf=16), got {item!r}")
        try:
            out[key] = json.loads(value)  # numbers, true/false, [lists]
        except ValueError:
            out[key] = value  # a plain string
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the converter and return 0. A refused input prints `error: ...` (one or two lines) on
    stderr and raises SystemExit(2), without a traceback unless DIFFPURE_DEBUG=1."""
    parser = _Parser(
        prog="python -m diffpure_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        choices=["score-sde", "guided-diffusion", "ddpm-celebahq", *sorted(VARIANTS)],
        help="checkpoint kind",
    )
    parser.add_argument("src", help="official PyTorch checkpoint file")
    parser.add_argument("out_dir", help="output directory (must not hold a checkpoint yet)")
    parser.add_argument(
        "--arch",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="architecture options, e.g. nf=16 num_res_blocks=2 or depth=16 widen_factor=2 "
        "(default: read from the file)",
    )
    parser.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="score-sde only: EMA weights (what DiffPure uses, default) or the raw 'model' entry",
    )
    args = parser.parse_args(argv)
    try:
        arch = _parse_arch(args.arch)
        if args.source == "score-sde":
            config = convert_score_sde(
                args.src, args.out_dir, weights=args.weights, infer=True, **arch
            )
        elif args.source == "guided-diffusion":
            config = convert_guided_diffusion(args.src, args.out_dir, infer=True, **arch)
        elif args.source == "ddpm-celebahq":
            config = convert_ddpm(args.src, args.out_dir, infer=True, **arch)
        else:
            config = convert_classifier(args.src, args.out_dir, args.source, infer=True, **arch)
    except (ConversionError, FileExistsError) as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    print(f"wrote {args.out_dir}: {config['architecture']} {json.dumps(config['kwargs'])}")
    inferred = config["source"].get("inferred")
    if inferred:
        print(
            f"read from the file: {format_arch(inferred)} (set with --arch KEY=VALUE to override)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
