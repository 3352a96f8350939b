"""The converter command line on bad inputs, through the real entry point: every refusal is
`error: ...` in one or two short lines, exit code 2, no traceback, and never advises an unsafe
load. The small reference checkpoints convert without --arch: the sizes are read from the file,
and an explicit --arch wins."""

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from helpers import max_rel_err, nhwc, refusal

import diffpure_jax
from diffpure_jax import load_classifier, load_score_model
from diffpure_jax.checkpoint import read_config
from diffpure_jax.convert.__main__ import main
from diffpure_jax.convert.common import ConversionError

MAX_CHARS = 600
UNSAFE = ("weights_only=False", "weights_only` set to `False")
SCORE = "score_sde_cifar10_small.pth"
CLASSIFIERS = {
    "robustbench-wrn": ("wrn28_10_cifar10_standard", {"depth": 16, "widen_factor": 2}),
    "diffpure-wrn-dropout": ("wrn70_16_dropout_cifar10", {"depth": 16, "widen_factor": 2}),
    "robustbench-dm-wrn": ("dm_wrn70_16_cifar10", {"depth": 16, "width": 1}),
}


def refused(capsys, argv) -> str:
    """main(argv) must refuse in at most 2 lines, < MAX_CHARS, without unsafe advice."""
    err = refusal(capsys, main, argv, max_lines=2)
    assert len(err) < MAX_CHARS, (len(err), err)
    assert not any(u in err for u in UNSAFE), err
    return err


def test_score_sde_without_arch_reads_the_sizes(reference_dir, tmp_path, capsys, score_io):
    out = tmp_path / "score"
    assert main(["score-sde", str(reference_dir / SCORE), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "read from the file: nf=16, num_channels=3, num_res_blocks=2" in printed
    config = read_config(str(out))
    assert config["kwargs"]["nf"] == 16 and config["kwargs"]["num_res_blocks"] == 2
    assert config["source"]["inferred"] == {"nf": 16, "num_channels": 3, "num_res_blocks": 2}
    score = load_score_model(str(out))
    t = jax.numpy.asarray(score_io["t"])
    ours = np.asarray(score(nhwc(score_io["x"]), t)).transpose(0, 3, 1, 2)
    assert max_rel_err(ours, score_io["score"]) <= 1e-5


@pytest.mark.parametrize("variant", list(CLASSIFIERS))
def test_classifier_without_arch_reads_the_sizes(variant, reference_dir, tmp_path, capsys):
    name, sizes = CLASSIFIERS[variant]
    out = tmp_path / "clf"
    assert main([variant, str(reference_dir / f"{name}_small.pth"), str(out)]) == 0
    assert "read from the file: depth=16" in capsys.readouterr().out
    config = read_config(str(out))
    assert config["source"]["inferred"] == {**sizes, "num_classes": 10}
    io = np.load(reference_dir / f"{name}_small_io.npz")
    assert max_rel_err(load_classifier(str(out))(nhwc(io["x"])), io["logits"]) <= 1e-5


def test_explicit_arch_wins_and_a_wrong_one_is_short(reference_dir, tmp_path, capsys):
    out = tmp_path / "o"
    err = refused(capsys, ["score-sde", str(reference_dir / SCORE), str(out), "--arch", "nf=32"])
    assert err.startswith("error: the checkpoint 'score_sde_cifar10_small.pth' does not match")
    assert "367 misshaped keys (all_modules.0.bias: expected (128,), got (64,);" in err
    assert "pass --arch nf=16" in err
    err = refused(
        capsys,
        ["score-sde", str(reference_dir / SCORE), str(out), "--arch", "num_res_blocks=3"],
    )
    assert "180 missing keys" in err and "82 unexpected keys" in err and "76 misshaped" in err
    assert "pass --arch num_res_blocks=2" in err
    src = reference_dir / "wrn28_10_cifar10_standard_small.pth"
    argv = ["robustbench-wrn", str(src), str(out), "--arch", "depth=28", "widen_factor=10"]
    err = refused(capsys, argv)
    assert "60 missing keys" in err and "64 misshaped keys" in err
    assert "pass --arch depth=16 widen_factor=2" in err
    # a file whose sizes fit but whose layout does not (ch_mult) names the other options
    argv = ["score-sde", str(reference_dir / SCORE), str(out), "--arch", "ch_mult=[1,2,2]"]
    assert "set it with --arch (ch_mult, attn_resolutions, image_size)" in refused(capsys, argv)
    assert not out.exists()


def test_wrong_kind_of_checkpoint(reference_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    err = refused(
        capsys, ["robustbench-wrn", str(reference_dir / "resnet50_imagenet_small.pth"), out]
    )
    assert "missing keys" in err and "is this the right checkpoint kind?" in err
    src = str(reference_dir / "wrn28_10_cifar10_standard_small.pth")
    assert "expected a dict with 'model' and 'ema'" in refused(capsys, ["score-sde", src, out])


def _write(path: Path, kind: str, reference_dir: Path) -> None:
    if kind == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "html":
        path.write_text(
            "<!DOCTYPE html><html><body>Google Drive - virus scan warning</body></html>"
        )
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    elif kind.startswith("truncated-zip"):
        data = (reference_dir / "wrn28_10_cifar10_standard_small.pth").read_bytes()
        keep = {"truncated-zip-head": 300, "truncated-zip-half": len(data) // 2}.get(kind)
        path.write_bytes(data[: keep or len(data) - 10])
    elif kind == "truncated-legacy":
        torch.save({"w": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "runs-code":
        torch.save({"state_dict": _RunsCode()}, path)
    else:
        raise AssertionError(kind)


class _RunsCode:
    """Unpickling this would call print(...): a weights-only loader must refuse it."""

    def __reduce__(self):
        return (print, ("UNPICKLED-CODE-RAN",))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "'x.pth' is not a PyTorch checkpoint: it is neither a zip file (torch.save) nor "
         "a pickle (it is a text file starting with b'hello, this is n')"),
        ("empty", "'x.pth' is empty (0 bytes)"),
        ("html", "'x.pth' is an HTML page"),
        ("lfs", "'x.pth' is a Git LFS pointer"),
        ("plain-pickle", "'x.pth' cannot be read: it is a pickle but not one that torch.save"),
        ("truncated-zip-head", "'x.pth' is truncated or damaged"),
        ("truncated-zip-half", "'x.pth' is truncated or damaged"),
        ("truncated-zip-tail", "'x.pth' is truncated or damaged"),
        ("truncated-legacy", "'x.pth' is truncated"),
        ("runs-code", "'x.pth' is refused: its pickle calls print"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("source", ["score-sde", "robustbench-wrn"])
def test_unreadable_file_is_refused(source, kind, message, reference_dir, tmp_path, capsys):
    src = tmp_path / "x.pth"
    _write(src, kind, reference_dir)
    err = refused(capsys, [source, str(src), str(tmp_path / "o")])
    assert err.startswith(f"error: {message}"), err
    assert "UNPICKLED-CODE-RAN" not in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_usage_and_output_problems(reference_dir, tmp_path, capsys):
    src = str(reference_dir / "wrn28_10_cifar10_standard_small.pth")
    out = tmp_path / "o"
    assert "does not exist" in refused(
        capsys, ["robustbench-wrn", str(tmp_path / "no.pth"), str(out)]
    )
    err = refused(capsys, ["robustbench-wrn", src, str(out), "--arch", "depth"])
    assert "--arch expects KEY=VALUE" in err
    err = refused(capsys, ["robustbench-wrn", src, str(out), "--arch", "nf=16"])
    assert "unknown option(s) ['nf']" in err
    err = refused(capsys, ["robustbench-wrn", src, str(out), "--arch", "depth=17"])
    assert "do not make a model (WideResNet depth must be 6n+4, got 17)" in err
    err = refused(capsys, ["score-sde", str(reference_dir / SCORE), str(out), "--arch", "nf=x"])
    assert 'nf="x" do not make a model' in err
    assert "required: out_dir" in refused(capsys, ["robustbench-wrn", src])
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "is a file" in refused(capsys, ["robustbench-wrn", src, str(afile)])
    assert main(["robustbench-wrn", src, str(out)]) == 0
    assert "already holds a checkpoint" in refused(capsys, ["robustbench-wrn", src, str(out)])


def test_debug_env_shows_the_exception(tmp_path, monkeypatch):
    src = tmp_path / "x.pth"
    src.write_text("not a checkpoint")
    monkeypatch.setenv("DIFFPURE_DEBUG", "1")
    with pytest.raises(ConversionError, match="is not a PyTorch checkpoint"):
        main(["robustbench-wrn", str(src), str(tmp_path / "o")])


def test_no_message_advises_an_unsafe_load():
    package = Path(diffpure_jax.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert not any(u in text for u in UNSAFE), path
