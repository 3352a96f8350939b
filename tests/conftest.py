"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

_CANDIDATES = [
    os.environ.get("DIFFPURE_REFERENCE_DIR", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "reference"),
    "/work/shared/reference",
]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The golden reference data from the official PyTorch code (../shared/reference).

    Missing reference data is a failure, not a skip: parity is what these tests prove.
    """
    for candidate in _CANDIDATES:
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    pytest.fail(
        "reference data not found; set DIFFPURE_REFERENCE_DIR to the folder holding "
        f"score_sde_cifar10_small.pth etc. (looked in {[c for c in _CANDIDATES if c]})"
    )


@pytest.fixture(scope="session")
def small_score_dir(reference_dir, tmp_path_factory) -> str:
    """The reference small NCSN++ (nf=16, 2 res blocks) converted from its .pth (EMA weights)."""
    from diffpure_jax.convert.score_sde import convert_score_sde

    out = str(tmp_path_factory.mktemp("ckpt") / "score-small")
    convert_score_sde(
        str(reference_dir / "score_sde_cifar10_small.pth"), out, nf=16, num_res_blocks=2
    )
    return out


@pytest.fixture(scope="session")
def small_score(small_score_dir):
    from diffpure_jax import load_score_model

    return load_score_model(small_score_dir)


@pytest.fixture(scope="session")
def score_io(reference_dir):
    import numpy as np

    return np.load(reference_dir / "score_sde_cifar10_small_io.npz")
