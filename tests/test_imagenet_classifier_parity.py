"""ImageNet classifiers (torchvision ResNet-50, WideResNet-50-2, DeiT-S): parity of the small
reference models with the official PyTorch outputs, the ImageNet normalisation inside, full-size
key lists, size inference and refusal of wrong sizes or wrappers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import max_rel_err, nhwc, refusal

from diffpure_jax import load_classifier, models
from diffpure_jax.checkpoint import read_config
from diffpure_jax.convert.__main__ import main
from diffpure_jax.convert.classifiers import (
    VARIANTS,
    classifier_state_dict,
    convert_classifier,
    expected_torch_keys,
    infer_architecture,
)
from diffpure_jax.convert.common import ConversionError, load_torch_file
from diffpure_jax.models.imagenet import normalize_imagenet

torch = pytest.importorskip("torch")

_SMALL_RESNET = {"layers": [2, 1, 1, 1], "planes": [8, 16, 32, 64], "num_classes": 10}
# reference name -> (variant, the small model's sizes read from its file, options not in a file)
CASES = {
    "resnet50_imagenet": (
        "torchvision-resnet50",
        {**_SMALL_RESNET, "width_per_group": 64, "stem_channels": 64},
        {"image_size": 64},
    ),
    "wide_resnet50_2_imagenet": (
        "torchvision-wide-resnet50-2",
        {**_SMALL_RESNET, "width_per_group": 128, "stem_channels": 64},
        {"image_size": 64},
    ),
    "deit_small_patch16_224": (
        "deit-s",
        {
            "embed_dim": 48,
            "patch_size": 16,
            "img_size": 64,
            "mlp_ratio": 4.0,
            "depth": 2,
            "num_classes": 10,
        },
        {"num_heads": 3},
    ),
}
MAX_CHARS = 600  # a refusal's length, as in test_convert_errors


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory):
    """Each small reference checkpoint converted once with explicit sizes: name -> directory."""
    out = {}
    for name, (variant, sizes, options) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        src = str(reference_dir / f"{name}_small.pth")
        convert_classifier(src, str(d), variant, **sizes, **options)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_small_parity(name, converted, reference_dir):
    variant, sizes, options = CASES[name]
    config = read_config(str(converted[name]))
    assert config["source"] == {"file": f"{name}_small.pth", "variant": variant}
    assert config["input_shape"] == [64, 64, 3]
    assert config["kwargs"] == {**VARIANTS[variant][1], **sizes, **options}
    io = np.load(reference_dir / f"{name}_small_io.npz")
    logits = np.asarray(load_classifier(str(converted[name]))(nhwc(io["x"])))
    assert logits.shape == io["logits"].shape and logits.dtype == np.float32
    err = max_rel_err(logits, io["logits"])
    assert err <= 1e-5, f"{name}: max relative error {err:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_normalization_inside(name, reference_dir):
    """The normalisation matches the tensor that enters the official network."""
    io = np.load(reference_dir / f"{name}_small_io.npz")
    got = np.asarray(normalize_imagenet(nhwc(io["x"])))
    np.testing.assert_allclose(got, io["x_normalized"].transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_normalize_false_takes_normalized_input(converted, reference_dir):
    """normalize=False is the bare network: fed x_normalized it gives the official logits."""
    name = "deit_small_patch16_224"
    config = read_config(str(converted[name]))
    module = models.build_model("vit", {**config["kwargs"], "normalize": False})
    variables = load_classifier(str(converted[name])).variables
    io = np.load(reference_dir / f"{name}_small_io.npz")
    logits = jax.jit(module.apply)(variables, nhwc(io["x_normalized"]))
    assert max_rel_err(logits, io["logits"]) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_full_size_keys(name, reference_dir):
    variant = CASES[name][0]
    full = json.loads((reference_dir / f"{name}_full_keys.json").read_text())
    want = {
        k: tuple(shape)
        for k, shape, _ in full["state_dict"]
        if not k.endswith("num_batches_tracked")
    }
    got = expected_torch_keys(variant)
    assert sorted(set(want) - set(got)) == [], "missing from the Flax model"
    assert sorted(set(got) - set(want)) == [], "unused by the Flax model"
    assert got == want
    n_params = sum(int(np.prod(s)) for k, s in got.items() if "running_" not in k)
    assert n_params == full["n_params"]


@pytest.mark.parametrize("name", list(CASES))
def test_sizes_are_read_from_the_file(name, reference_dir):
    variant, sizes, _ = CASES[name]
    sd = classifier_state_dict(load_torch_file(str(reference_dir / f"{name}_small.pth")), variant)
    assert infer_architecture(variant, sd) == sizes


def test_cli_reads_the_sizes(reference_dir, tmp_path, capsys):
    src = str(reference_dir / "wide_resnet50_2_imagenet_small.pth")
    argv = ["torchvision-wide-resnet50-2", src, str(tmp_path / "o"), "--arch", "image_size=64"]
    assert main(argv) == 0
    assert "read from the file: layers=[2,1,1,1], planes=[8,16,32,64]" in capsys.readouterr().out
    config = read_config(str(tmp_path / "o"))
    assert config["kwargs"]["width_per_group"] == 128 and config["input_shape"] == [64, 64, 3]


def _short(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert len(msg.splitlines()) <= 2 and len(msg) < MAX_CHARS, msg
    return msg


def test_wrong_size_is_refused(reference_dir, tmp_path):
    src = str(reference_dir / "resnet50_imagenet_small.pth")
    with pytest.raises(ConversionError, match="missing keys") as e:
        convert_classifier(src, str(tmp_path / "o"), "torchvision-resnet50")
    assert "pass --arch layers=[2,1,1,1] planes=[8,16,32,64] num_classes=10" in _short(e)
    src = str(reference_dir / "deit_small_patch16_224_small.pth")
    with pytest.raises(ConversionError, match="misshaped keys") as e:
        convert_classifier(src, str(tmp_path / "o"), "deit-s", img_size=64, depth=2)
    assert "pass --arch embed_dim=48 num_classes=10" in _short(e)
    assert not (tmp_path / "o").exists()


def test_old_torchvision_file_without_num_batches_tracked(reference_dir, tmp_path):
    sd = torch.load(reference_dir / "resnet50_imagenet_small.pth", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    config = convert_classifier(
        str(tmp_path / "old.pth"), str(tmp_path / "o"), "torchvision-resnet50", infer=True
    )
    assert config["kwargs"]["layers"] == [2, 1, 1, 1]


def test_wrappers(reference_dir, tmp_path):
    t = torch.zeros(2)
    assert set(classifier_state_dict({"model": {"a.weight": t}}, "deit-s")) == {"a.weight"}
    assert set(classifier_state_dict({"a.weight": t}, "torchvision-resnet50")) == {"a.weight"}
    with pytest.raises(ConversionError, match=r"expects a dict with a 'model' entry") as e:
        classifier_state_dict({"cls_token": t, "pos_embed": t}, "deit-s")
    assert "'cls_token', 'pos_embed'" in _short(e)
    with pytest.raises(ConversionError, match=r"nested dicts under \['model'\]") as e:
        classifier_state_dict({"model": {"a.weight": t}}, "torchvision-wide-resnet50-2")
    _short(e)
    # the real files given as the other kind
    out = str(tmp_path / "o")
    with pytest.raises(ConversionError, match="'model' entry"):
        convert_classifier(str(reference_dir / "resnet50_imagenet_small.pth"), out, "deit-s")
    with pytest.raises(ConversionError, match="nested dicts"):
        convert_classifier(
            str(reference_dir / "deit_small_patch16_224_small.pth"), out, "torchvision-resnet50"
        )


def test_cli_refusal_is_short(reference_dir, tmp_path, capsys):
    src = str(reference_dir / "resnet50_imagenet_small.pth")
    err = refusal(capsys, main, ["deit-s", src, str(tmp_path / "o")], max_lines=2)
    assert len(err) < MAX_CHARS and "'model' entry" in err
