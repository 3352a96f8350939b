"""Certified L2 robustness by (diffusion) denoised smoothing (`python -m experiments.certify`).

One run: the test subset, the classifier, the score model used as a one-shot denoiser (Carlini et
al., ICLR 2023; none: plain randomized smoothing, Cohen et al. 2019), sigma and Cohen et al.'s
CERTIFY settings (n0 selection samples, n estimation samples, alpha). Words of `--config`
(comma-separated):

* the dataset: `cifar10` (default: `checkpoints/cifar10-wrn-28-10` behind the score_sde NCSN++
  `checkpoints/cifar10-ddpmpp-deep-cont`), `fmnist` (the shipped `checkpoints/fmnist-wrn-16-1`
  behind `checkpoints/fmnist-ncsnpp-small`) or `imagenet` (`checkpoints/imagenet-resnet50`
  behind the guided-diffusion 256 x 256 ADM `checkpoints/imagenet-adm-256-uncond`, applied to
  the 224 x 224 crops directly as Carlini et al. apply it);
* the size: `full`, the papers' protocol (n0 100, alpha 0.001 and Carlini et al.'s counts:
  CIFAR-10 n 100,000 on the whole test set (their `--skip 1`), ImageNet n 10,000 on 1,000
  validation images (their `--skip 50`); Fashion-MNIST n 100,000 on 500 test images, Cohen et
  al.'s subset size), the default for cifar10 and imagenet; or `reduced`, what a 2-core CPU
  does (n0 100, n 1,000, 100 images: about 9 minutes for Fashion-MNIST at ~200 denoised noise
  samples per second), the default for fmnist;
* sigma: `sigma0.25` (default), `sigma0.5` or `sigma1.0`, Carlini et al.'s three (or
  `--sigma S` for any other).
"""

from __future__ import annotations

import dataclasses

from diffpure_jax.certify import DEFAULT_RADII
from diffpure_jax.score import SCORE_DTYPES
from experiments.attack import TEST_SETS
from experiments.config import config_words, field


@dataclasses.dataclass(frozen=True)
class CertifyRun:
    """One certification. Fields with `identity=False` do not change its records."""

    dataset: str = field("cifar10", choices=("cifar10", "fashion_mnist", "imagenet"), cli=False)
    classifier: str = field("checkpoints/cifar10-wrn-28-10", help="classifier checkpoint")
    score: str | None = field(
        "checkpoints/cifar10-ddpmpp-deep-cont",
        help="score checkpoint of the one-shot denoiser (a VP-SDE or DDPM model); none: plain "
        "randomized smoothing of the classifier",
    )
    sigma: float = field(0.25, help="the smoothing noise's std, in [0, 1] pixel units")
    n0: int = field(100, help="selection samples (CERTIFY's guess of the top class)")
    n: int = field(100_000, help="estimation samples (the bound on pA)")
    alpha: float = field(0.001, help="failure probability of each certificate")
    n_examples: int = field(10_000, help="test images, a seeded subset")
    data_seed: int = field(0, help="seed of the test subset")
    seed: int = field(0, help="seed of the smoothing (and DensePure) noise")
    n_reverse: int = field(
        0,
        help="0: the one-shot x0 prediction; R > 0: DensePure's majority vote over R "
        "reverse-SDE solves of --n-steps steps (VP-SDE score models)",
    )
    n_steps: int = field(10, help="reverse steps of each DensePure solve (with --n-reverse)")
    clip: bool = field(True, help="clip the denoised image to the data range (Carlini et al.'s)")
    input_size: int | None = field(
        None,
        help="side of the images the denoiser runs on when the score model's differs (no "
        "resizing: imagenet runs the 256 ADM on the 224 crops, as Carlini et al. do)",
    )
    score_dtype: str = field(
        "float32", choices=SCORE_DTYPES, help="the score network's compute dtype"
    )
    batch: int = field(
        200, identity=False, help="noise samples per example in one classifier call (memory)"
    )
    examples_per_batch: int = field(
        4, identity=False, help="images certified together; their records are written together"
    )
    radii: tuple[float, ...] = field(
        DEFAULT_RADII, identity=False, help="L2 radii of the summary table"
    )
    data_dir: str | None = field(None, identity=False, help="where the dataset is")
    workdir: str = field("workdir/cifar10_certify", identity=False, help="runs go in here")
    progress: bool = field(True, identity=False, help="progress bar")
    coordinator: str | None = field(
        None, identity=False, help="HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS)"
    )
    num_processes: int | None = field(None, identity=False, help="(JAX_NUM_PROCESSES)")
    process_id: int | None = field(None, identity=False, help="(JAX_PROCESS_ID)")

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"--sigma must be positive, got {self.sigma:g}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"--alpha must be in (0, 0.5), got {self.alpha:g}")
        for name in ("n0", "n", "batch", "examples_per_batch", "n_steps", "input_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.n_reverse < 0:
            raise ValueError(f"--n-reverse must be 0 or more, got {self.n_reverse}")
        if self.score is None and (self.n_reverse or self.input_size):
            raise ValueError("--n-reverse and --input-size need a denoiser: pass --score")
        if any(r < 0 for r in self.radii):
            raise ValueError(f"--radii must be >= 0, got {' '.join(map(str, self.radii))}")
        size = TEST_SETS[self.dataset].size
        if not 1 <= self.n_examples <= size:
            label = TEST_SETS[self.dataset].label
            raise ValueError(f"--n-examples must be in [1, {size}] ({label}): {self.n_examples}")


DATASETS = {"cifar10": "cifar10", "fmnist": "fashion_mnist", "imagenet": "imagenet"}
SIGMAS = {"sigma0.25": 0.25, "sigma0.5": 0.5, "sigma1.0": 1.0}
SIZES = ("reduced", "full")
REDUCED = dict(n0=100, n=1000, n_examples=100)


def _dataset(name: str, full: bool) -> dict:
    """The settings of one dataset at one size (what differs from `CertifyRun()`)."""
    if name == "cifar10":
        return {} if full else REDUCED
    if name == "fmnist":
        models = dict(
            classifier="checkpoints/fmnist-wrn-16-1",
            score="checkpoints/fmnist-ncsnpp-small",
            workdir="workdir/fmnist_certify",
            batch=100,  # ~200 samples/s on 2 CPU cores either way; a batch of 4 in ~20 s
        )
        return dict(models, n_examples=500) if full else dict(models, **REDUCED)
    if name == "imagenet":
        models = dict(
            classifier="checkpoints/imagenet-resnet50",
            score="checkpoints/imagenet-adm-256-uncond",
            input_size=224,
            workdir="workdir/imagenet_certify",
            batch=32,
            examples_per_batch=1,
        )
        return dict(models, n=10_000, n_examples=1000) if full else dict(models, **REDUCED)
    raise AssertionError(name)


def get_config(arg: str = "") -> CertifyRun:
    """a dataset (cifar10, fmnist, imagenet), a size (full: the papers' protocol, default for
    cifar10 and imagenet; reduced: n 1000 on 100 images, default for fmnist) and a sigma
    (sigma0.25, sigma0.5, sigma1.0); default cifar10,full,sigma0.25."""
    words = config_words(arg, (*DATASETS, *SIZES, *SIGMAS))
    name = ([w for w in words if w in DATASETS] or ["cifar10"])[-1]
    size = ([w for w in words if w in SIZES] or ["reduced" if name == "fmnist" else "full"])[-1]
    sigma = SIGMAS[([w for w in words if w in SIGMAS] or ["sigma0.25"])[-1]]
    changes = dict(_dataset(name, size == "full"), dataset=DATASETS[name], sigma=sigma)
    return dataclasses.replace(CertifyRun(), **changes)
