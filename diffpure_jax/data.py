"""Evaluation data: image datasets as (x (N, H, W, C) float32 in [0, 1], y (N,) int32) arrays.

CIFAR-10 and ImageNet come from tensorflow-datasets' random-access `data_source` (no TensorFlow
needed). They are never downloaded at run time: prepare them once (array_record format; ImageNet
from the user's own copy of the validation tar) and point `data_dir` at the copy. Tests use
`tfds.testing.mock_data`.

Fashion-MNIST is read from the four IDX files of Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist/`), with the same interface as a tfds source: a random-access
sequence of {"image": (28, 28, 1) uint8, "label": int} dicts.
"""

from __future__ import annotations

import gzip
import logging
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
INSTALL_FASHION_MNIST = (
    "Fashion-MNIST is not in {data_dir} (missing {missing}). Install it with\n"
    "  apt-get install dataset-fashion-mnist\n"
    "(Debian/Ubuntu; it puts the four IDX .gz files in " + FASHION_MNIST_DIR + "), or pass "
    "--data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)

PREPARE_CIFAR10 = (
    "CIFAR-10 is not prepared in {data_dir}. On a machine with internet access run\n"
    "  python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10', "
    "data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
    "(needs `pip install tensorflow`), copy DIR/cifar10 here and pass --data-dir DIR. "
    "Nothing is downloaded at run time."
)


PREPARE_IMAGENET = (
    "ImageNet (imagenet2012, validation) is not prepared in {data_dir}. tfds cannot download it:\n"
    "  1. get ILSVRC2012_img_val.tar (6.3 GB) from https://image-net.org (login, ILSVRC 2012) and\n"
    "     put it in DIR/downloads/manual/ (the train tar is not needed);\n"
    "  2. run  python -c \"import tensorflow_datasets as tfds; tfds.builder('imagenet2012', "
    "data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
    "     (needs `pip install tensorflow`; it prepares the splits whose tars are present);\n"
    "  3. pass --data-dir DIR. Nothing is downloaded at run time."
)
IMAGENET_RESIZE = 256  # DiffPure's loader: Resize(256), then CenterCrop(224)
IMAGENET_CROP = 224


CELEBAHQ_DIR = "dataset/celebahq"  # DiffPure's default root
CELEBAHQ_SIZE = 256
CELEBAHQ_LAYOUT = (
    "CelebA-HQ is not in {data_dir} ({problem}). The loader reads DiffPure's layout:\n"
    "  DIR/images/*.png or *.jpg   the CelebA-HQ images (any size; resized to 256), named by their "
    "CelebA file names\n"
    "  DIR/list_attr_celeba.txt and DIR/list_eval_partition.txt (CelebA's Anno/ and Eval/)\n"
    "Pass --data-dir DIR. Nothing is downloaded at run time."
)


class DataNotFoundError(FileNotFoundError):
    """A dataset is not available locally; the message says how to get it."""


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """The evaluation subset: n distinct indices of [0, n_total), a deterministic function of seed.

    Chosen with NumPy's RandomState(seed).choice without replacement (DiffPure picks its 512
    CIFAR-10 test images with RandomState(data_seed)); returned in the order drawn.
    """
    if not 0 < n <= n_total:
        raise ValueError(f"cannot choose {n} examples out of {n_total}")
    return np.random.RandomState(seed).choice(n_total, n, replace=False).astype(np.int64)


_PREPARE = {"cifar10": PREPARE_CIFAR10, "imagenet2012": PREPARE_IMAGENET}


def tfds_source(name: str, split: str, data_dir: str | None):
    """A prepared tfds dataset split as a random-access sequence of dicts (never downloads)."""
    import tensorflow_datasets as tfds

    absl = logging.getLogger("absl")  # tfds warns about a missing folder before raising
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing / TFRecord-only dataset
        where = data_dir or "~/tensorflow_datasets"
        if name in _PREPARE:
            raise DataNotFoundError(_PREPARE[name].format(data_dir=where)) from e
        raise DataNotFoundError(f"{name} ({split}) is not prepared in {where}") from e
    finally:
        absl.setLevel(level)


def _open_idx(data_dir: str, stem: str):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path, (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb"))
    return None, None


def read_idx(path: str, f, magic: int, n_expected: int | None) -> np.ndarray:
    """The uint8 array in an IDX file (big-endian header: magic, then one int32 per dimension).

    Checks the magic number, the dimension count, that the payload has exactly the size the
    header promises, and (when given) the number of items.
    """
    with f:
        data = f.read()
    n_dims = magic & 0xFF
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: IDX magic number {found:#010x}, expected {magic:#010x} "
            f"(unsigned bytes, {n_dims} dimensions); the file is corrupt or of another kind."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header promises shape {shape} ({int(np.prod(shape))} bytes) but the file "
            f"holds {len(data) - header} bytes; reinstall dataset-fashion-mnist."
        )
    if n_expected is not None and shape[0] != n_expected:
        raise ValueError(f"{path}: {shape[0]} items, expected {n_expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


class ArraySource:
    """In-memory images and labels with the tfds `data_source` interface.

    `images` (N, H, W, C) uint8, `labels` (N,) int32; `source[i]` is {"image", "label"}.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def fashion_mnist_source(
    split: str, data_dir: str | None = None, check_size: bool = True
) -> ArraySource:
    """Fashion-MNIST `split` ('train' 60000 or 'test' 10000) as an ArraySource of 28x28x1 images.

    Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `data_dir` (default: Debian's
    /usr/share/datasets/fashion-mnist). `check_size=False` accepts any item count (tests).
    """
    if split not in _IDX_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_IDX_FILES)}, got {split!r}")
    data_dir = data_dir or FASHION_MNIST_DIR
    image_stem, label_stem, n = _IDX_FILES[split]
    image_path, image_file = _open_idx(data_dir, image_stem)
    label_path, label_file = _open_idx(data_dir, label_stem)
    if image_file is None or label_file is None:
        missing = [
            s + ".gz" for s, f in ((image_stem, image_file), (label_stem, label_file)) if f is None
        ]
        for f in (image_file, label_file):
            if f is not None:
                f.close()
        raise DataNotFoundError(
            INSTALL_FASHION_MNIST.format(data_dir=data_dir, missing=", ".join(missing))
        )
    n = n if check_size else None
    images = read_idx(image_path, image_file, _IDX_IMAGES_MAGIC, n)
    labels = read_idx(label_path, label_file, _IDX_LABELS_MAGIC, n)
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels"
        )
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {labels.max()} is not a Fashion-MNIST class (0-9)")
    return ArraySource(images[..., None], labels)


def as_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, H, W, C) float32 in [0, 1], y (N,) int32): a whole source, for training."""
    if isinstance(source, ArraySource):
        return source.images.astype(np.float32) / 255.0, source.labels
    return take(source, np.arange(len(source)))


def take(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, H, W, C) float32 in [0, 1], y (n,) int32) for the given indices of a source."""
    examples = [source[int(i)] for i in indices]
    x = np.stack([np.asarray(ex["image"]) for ex in examples]).astype(np.float32) / 255.0
    y = np.asarray([int(ex["label"]) for ex in examples], dtype=np.int32)
    return x, y


def _check_n(n: int, size: int, name: str) -> int:
    if not 1 <= n <= size:
        raise ValueError(f"asked for {n} test images, but the {name} test set has {size}")
    return n


def cifar10_test(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 32, 32, 3) in [0, 1], y (n,), index (n,)): seeded subset of the CIFAR-10 test set."""
    source = tfds_source("cifar10", "test", data_dir)
    index = subset_indices(len(source), _check_n(n, len(source), "CIFAR-10"), seed)
    x, y = take(source, index)
    return x, y, index


def fashion_mnist_test(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 28, 28, 1) in [0, 1], y (n,), index (n,)): a seeded Fashion-MNIST test subset."""
    source = fashion_mnist_source("test", data_dir)
    index = subset_indices(len(source), _check_n(n, len(source), "Fashion-MNIST"), seed)
    x, y = take(source, index)
    return x, y, index


def resize_center_crop(
    image: np.ndarray, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP
) -> np.ndarray:
    """torchvision's Resize(resize) then CenterCrop(crop) on a PIL image, as DiffPure's ImageNet
    loader does: the short side scaled to `resize` (the long one to int(resize * long / short)),
    PIL bilinear (with PIL's antialiasing), then the centred crop x crop window (offsets
    int(round((side - crop) / 2))). image: (H, W, 3) uint8 -> (crop, crop, 3) uint8."""
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    if h <= w:
        size = (int(resize * w / h), resize)  # PIL sizes are (width, height)
    else:
        size = (resize, int(resize * h / w))
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if (w, h) != size:
        pil = pil.resize(size, Image.BILINEAR)
    out = np.asarray(pil)
    top = int(round((out.shape[0] - crop) / 2.0))
    left = int(round((out.shape[1] - crop) / 2.0))
    return out[top : top + crop, left : left + crop]


def imagenet_val(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 224, 224, 3) in [0, 1], y (n,), index (n,)): a seeded subset of the ImageNet
    validation set (50,000 images, labels 0-999 in the sorted-synset order torchvision uses),
    each resized to 256 and centre-cropped to 224 (`resize_center_crop`)."""
    source = tfds_source("imagenet2012", "validation", data_dir)
    index = subset_indices(len(source), _check_n(n, len(source), "ImageNet validation"), seed)
    examples = [source[int(i)] for i in index]
    x = np.stack([resize_center_crop(np.asarray(ex["image"])) for ex in examples])
    y = np.asarray([int(ex["label"]) for ex in examples], dtype=np.int32)
    return x.astype(np.float32) / 255.0, y, index


def _celebahq_name(filename: str) -> str:
    """The list_attr_celeba.txt name of an image file (DiffPure renames .png to .jpg)."""
    stem, ext = os.path.splitext(filename)
    return stem + ".jpg" if ext.lower() == ".png" else filename


def read_celeba_attributes(path: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(attribute names, {file name: (40,) int8 in {-1, 1}}) from CelebA's list_attr_celeba.txt
    (a count line, a names line, then `name v1 ... v40` rows)."""
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and an attribute-names line")
    names = lines[1].split()
    table = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(
                f"{path}:{number}: {len(parts) - 1} values for {len(names)} attributes"
            )
        table[parts[0]] = np.asarray(parts[1:], dtype=np.int8)
    return names, table


class CelebAHQ:
    """CelebA-HQ in DiffPure's layout (`data/datasets.py`): `root/images/` (the images, sorted
    by file name), `list_attr_celeba.txt` and `list_eval_partition.txt` in `root`.

    `partition(name)`: the (N,) int64 positions, in the sorted image list, of the 'train' (0),
    'val' (1) or 'test' (2) partition; `labels(attribute)`: (n_images,) int32, 1 where the
    attribute is present and 0 where CelebA says -1 (DiffPure's `replace(-1, 0)`); `image(i)`:
    (256, 256, 3) uint8 after torchvision's Resize(256) (PIL bilinear on the short side).
    """

    def __init__(self, root: str | None = None):
        root = root or CELEBAHQ_DIR
        images = os.path.join(root, "images")
        missing = [
            p
            for p in (images, *(os.path.join(root, f) for f in _CELEBA_LISTS))
            if not os.path.exists(p)
        ]
        if missing:
            problem = "missing " + ", ".join(os.path.relpath(p, root) for p in missing)
            raise DataNotFoundError(CELEBAHQ_LAYOUT.format(data_dir=root, problem=problem))
        self.root = root
        self.files = sorted(
            f for f in os.listdir(images) if os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS
        )
        if not self.files:
            raise DataNotFoundError(
                CELEBAHQ_LAYOUT.format(data_dir=root, problem="no .png or .jpg in images/")
            )
        self.attribute_names, table = read_celeba_attributes(os.path.join(root, _CELEBA_LISTS[0]))
        names = [_celebahq_name(f) for f in self.files]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(
                f"{len(unknown)} of {len(names)} images of {images} are not in "
                f"{_CELEBA_LISTS[0]} (first: {', '.join(unknown[:3])})"
            )
        self._attributes = np.stack([table[n] for n in names])
        partitions = {}
        with open(os.path.join(root, _CELEBA_LISTS[1])) as f:
            for line in f:
                if line.strip():
                    name, part = line.split()
                    partitions[name] = int(part)
        unknown = [n for n in names if n not in partitions]
        if unknown:
            raise ValueError(
                f"{len(unknown)} images are not in {_CELEBA_LISTS[1]} (first: "
                f"{', '.join(unknown[:3])})"
            )
        self._partition = np.asarray([partitions[n] for n in names])

    def partition(self, name: str) -> np.ndarray:
        if name not in _PARTITIONS:
            raise ValueError(f"partition must be one of {tuple(_PARTITIONS)}, got {name!r}")
        return np.nonzero(self._partition == _PARTITIONS[name])[0].astype(np.int64)

    def labels(self, attribute: str) -> np.ndarray:
        if attribute not in self.attribute_names:
            raise ValueError(
                f"unknown CelebA attribute {attribute!r}; e.g. Eyeglasses, Smiling (one of "
                f"{len(self.attribute_names)} in {_CELEBA_LISTS[0]})"
            )
        column = self._attributes[:, self.attribute_names.index(attribute)]
        return (column == 1).astype(np.int32)

    def image(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(os.path.join(self.root, "images", self.files[int(i)])) as pil:
            pil = pil.convert("RGB")
            w, h = pil.size
            if min(w, h) != CELEBAHQ_SIZE:
                size = (
                    (CELEBAHQ_SIZE, int(CELEBAHQ_SIZE * h / w))
                    if w <= h
                    else (int(CELEBAHQ_SIZE * w / h), CELEBAHQ_SIZE)
                )
                pil = pil.resize(size, Image.BILINEAR)
            return np.asarray(pil)


_CELEBA_LISTS = ("list_attr_celeba.txt", "list_eval_partition.txt")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_PARTITIONS = {"train": 0, "val": 1, "test": 2}


def celebahq_paper_indices(
    val: np.ndarray, n_seeds: int = 64, per_seed: int = 8, fraction: float = 2.0
) -> np.ndarray:
    """The images DiffPure's CelebA-HQ protocol evaluates: for each data seed s < n_seeds, the
    first `per_seed` (its 2 x 4 GPU batch) of RandomState(s).choice(val, int(fraction / 100 *
    len(val)), replace=False), the 2% subset its loader draws. Seeds may pick the same image:
    later copies are dropped (records are per image), so fewer than n_seeds * per_seed remain."""
    n = int(fraction / 100 * len(val))
    chosen = [
        np.random.RandomState(s).choice(val, n, replace=False)[:per_seed] for s in range(n_seeds)
    ]
    flat = np.concatenate(chosen)
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)].astype(np.int64)


def celebahq_val(
    n: int, seed: int, data_dir: str | None = None, attribute: str = "Eyeglasses"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, 256, 256, 3) in [0, 1], y (n,) attribute labels (1 present), index (n,)): CelebA-HQ
    validation images. seed >= 0: a seeded subset of n (`subset_indices` over the val
    partition); seed -1: the first n of DiffPure's own protocol (`celebahq_paper_indices`).
    `index` is the position in the sorted image list (the examples' identity)."""
    data = CelebAHQ(data_dir)
    val = data.partition("val")
    if seed < 0:
        pool = celebahq_paper_indices(val)
        index = pool[: _check_n(n, len(pool), "CelebA-HQ (DiffPure's protocol)")]
    else:
        index = val[subset_indices(len(val), _check_n(n, len(val), "CelebA-HQ validation"), seed)]
    x = np.stack([data.image(i) for i in index]).astype(np.float32) / 255.0
    return x, data.labels(attribute)[index], index
