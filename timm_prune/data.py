"""Image-classification data for training recipes: loading, column detection, timm transforms, loaders.

``load_image_splits`` accepts a Hub dataset id, a local directory (parquet files or an image folder, as
``datasets.load_dataset`` infers it), or a built-in name (``"digits"``: scikit-learn's 1,797 real 8x8
handwritten digits, shipped with the package, so it works offline). Every failure is a ``ValueError``
that names the problem, raised before any training starts.

Training augmentation is a function of ``(seed, epoch, sample index)`` only (``ImageClassificationDataset``),
so a run resumed from a checkpoint, or split over a different number of processes or workers, sees
exactly the same augmented images.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

BUILTIN_DATASETS = ("digits",)
# Recipe settings that suit a dataset, used for flags left unset. Digits are 8x8: upscale to 32 px with no
# centre-crop margin, and never mirror them (a flipped 2 or 7 is not a digit).
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"img_size": 32, "crop_pct": 1.0, "hflip": 0.0, "scale": [0.6, 1.0]},
}
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "y")
_VALIDATION_SPLITS = ("validation", "valid", "val", "test")


@dataclass
class ImageSplits:
    """Train / validation datasets with the resolved column names and class count."""

    train: Any  # datasets.Dataset
    validation: Any  # datasets.Dataset
    image_column: str
    label_column: str
    num_classes: int
    class_names: list[str] | None
    validation_source: str  # the split used for validation, or "train[holdout]"


def _digits_dataset() -> Any:
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to 0..255 grey and store as RGB so timm's transforms (and the
    # ImageNet mean/std of pretrained models) apply unchanged. Transforms upscale the 8x8 images.
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(a, mode="L").convert("RGB") for a in grey]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return datasets.DatasetDict({"train": ds})


def _load_dataset_dict(name: str) -> Any:
    import datasets

    if name in BUILTIN_DATASETS:
        return _digits_dataset()
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(
            f"--dataset {name!r} {problem}: a local dataset is a directory of parquet files or an image folder; "
            f"built-in names are {list(BUILTIN_DATASETS)}"
        )
    try:
        loaded = datasets.load_dataset(str(path) if looks_local else name)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        where = "local directory" if looks_local else "Hub dataset id (is the network reachable / HF_HUB_OFFLINE set?)"
        raise ValueError(
            f"--dataset {name!r} could not be loaded as a {where}; built-in names are {list(BUILTIN_DATASETS)}. "
            f"Cause: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def detect_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Resolve the image and label columns: given names are checked, missing ones are detected."""
    import datasets

    names = list(features)
    for flag, given in (("--image_column", image_column), ("--label_column", label_column)):
        if given is not None and given not in names:
            raise ValueError(f"{flag} {given!r} is not a column of the dataset; its columns are {names}")
    if image_column is None:
        typed = [n for n in names if isinstance(features[n], datasets.Image)]
        named = [n for n in _IMAGE_COLUMN_NAMES if n in names]
        image_column = (typed or named or [None])[0]
        if image_column is None:
            raise ValueError(f"no image column found (columns: {names}); pass --image_column")
    if label_column is None:
        typed = [n for n in names if isinstance(features[n], datasets.ClassLabel)]
        named = [n for n in _LABEL_COLUMN_NAMES if n in names]
        label_column = ([n for n in typed + named if n != image_column] or [None])[0]
        if label_column is None:
            raise ValueError(f"no label column found (columns: {names}); pass --label_column")
    return image_column, label_column


def load_image_splits(
    name: str,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    validation_split: str | None = None,
) -> ImageSplits:
    """Load ``name`` and return train / validation splits with detected columns.

    The validation split is ``validation_split`` when given (a split name, or ``"holdout"``), else the
    dataset's ``validation`` / ``valid`` / ``val`` / ``test`` split; ``"holdout"`` (or a dataset with none of
    those) takes a seeded, stratified (when labels are a ``ClassLabel``) ``validation_fraction`` of ``train``,
    which keeps a test split untouched for the final figures.
    """
    import datasets

    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in (0, 1); got {validation_fraction}")
    splits = _load_dataset_dict(name)
    if "train" not in splits:
        raise ValueError(f"--dataset {name!r} has no 'train' split; its splits are {list(splits)}")
    train = splits["train"]
    image_column, label_column = detect_columns(train.features, image_column, label_column)
    label_feature = train.features[label_column]
    if validation_split not in (None, "holdout") and validation_split not in splits:
        raise ValueError(
            f"--validation_split {validation_split!r}: --dataset {name!r} has splits {list(splits)}; "
            "name one of them, or use 'holdout' to hold out --validation_fraction of train"
        )
    if validation_split is None:
        source = next((s for s in _VALIDATION_SPLITS if s in splits), None)
    else:
        source = None if validation_split == "holdout" else validation_split
    if source is not None:
        validation = splits[source]
        missing = [c for c in (image_column, label_column) if c not in validation.column_names]
        if missing:
            raise ValueError(f"split {source!r} of --dataset {name!r} lacks column(s) {missing}")
    else:
        stratify = label_column if isinstance(label_feature, datasets.ClassLabel) else None
        parts = train.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column=stratify)
        train, validation, source = parts["train"], parts["test"], "train[holdout]"
    # Subsets are seeded random draws: files are often sorted by class, so a prefix would hold one class.
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(validation):
        validation = validation.shuffle(seed=seed).select(range(max_eval_samples))
    train = train.select_columns([image_column, label_column])
    validation = validation.select_columns([image_column, label_column])
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes, class_names = label_feature.num_classes, list(label_feature.names)
    else:
        labels = train[label_column]
        if not all(isinstance(v, (int, np.integer)) for v in labels[:100]):
            raise ValueError(f"--label_column {label_column!r} must hold integer class ids; got e.g. {labels[0]!r}")
        num_classes, class_names = int(max(labels)) + 1, None
    return ImageSplits(train, validation, image_column, label_column, num_classes, class_names, source)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs from a ``datasets.Dataset``, transformed by a timm transform.

    With ``seed`` set, each sample's augmentation draws from RNGs seeded by ``(seed, epoch, index)`` and the
    process's global RNG states are left untouched: the images do not depend on the number of workers,
    processes, or on where a resumed run restarted, and dropout RNG streams are not disturbed.
    """

    def __init__(
        self, dataset: Any, image_column: str, label_column: str, transform: Callable, seed: int | None = None
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # Workers receive a copy of the dataset at each iterator creation, so set this before iterating.
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        if self.seed is None:
            pixels = self.transform(image)
        else:
            # timm's transforms draw from Python's `random` and from torch's global generator.
            sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
            python_state = random.getstate()
            try:
                with torch.random.fork_rng(devices=[]):
                    random.seed(sample_seed)
                    torch.manual_seed(sample_seed % (2**63))
                    pixels = self.transform(image)
            finally:
                random.setstate(python_state)
        return pixels, int(row[self.label_column])


def create_transforms(model: torch.nn.Module, img_size: int | None, crop_pct: float | None, augment: dict) -> tuple:
    """timm's (train, eval) transforms from the model's data config, with recipe overrides.

    ``augment`` holds ``create_transform`` training options (``hflip``, ``scale``, ...); ``None`` values keep
    timm's defaults. With ``augment={"none": True}`` training uses the eval transform (no randomness).
    """
    from timm.data import create_transform, resolve_data_config

    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    data_config = resolve_data_config(overrides, model=model)
    eval_transform = create_transform(**data_config, is_training=False)
    if augment.get("none"):
        return eval_transform, eval_transform, data_config
    options = {k: v for k, v in augment.items() if v is not None and k != "none"}
    train_config = {k: v for k, v in data_config.items() if k != "crop_pct"}
    train_transform = create_transform(**train_config, is_training=True, **options)
    return train_transform, eval_transform, data_config


def create_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    batched = isinstance(dataset, TensorImageDataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        # A tensor dataset augments whole batches in the main process: workers would only copy its images.
        num_workers=0 if batched else num_workers,
        drop_last=drop_last,
        generator=generator,
        collate_fn=_stacked_batch if batched else None,
        # Fresh workers each epoch: they must pick up the dataset's epoch for seeded augmentation.
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def _stacked_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # TensorImageDataset.__getitems__ already returns the stacked batch.
    return batch


# ---------------------------------------------------------------------------------------------------------------
# In-memory tensor pipeline: decode once, augment whole batches.
#
# Per-sample PIL transforms cost as much CPU as the training step of a small model at 32-36 px (issue 13's
# measurement). For datasets that fit in memory, the whole split is decoded once into one uint8 tensor and a batch
# is augmented at once: RandomResizedCrop + horizontal flip as one affine ``grid_sample`` (the crop box mapped onto
# the output grid, pixel centres as PIL places them), ColorJitter's brightness / contrast / saturation as tensor
# arithmetic, then normalisation. Eval images are resized and centre-cropped once, at construction.
# ---------------------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _hash_uniform(seed: int, epoch: int, indices: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) floats that depend only on (seed, epoch, sample index, stream): splitmix64's finaliser."""
    x = np.asarray(indices, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64(((seed * 1_000_003 + epoch) * 10_000_019 + stream * 7_919) & _MASK64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_boxes(
    seed: int,
    epoch: int,
    indices: np.ndarray,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """Crop boxes ``(top, left, h, w)`` per sample, drawn as torchvision's ``RandomResizedCrop.get_params`` does.

    Ten attempts at a box of random area and aspect ratio; the first that fits wins; otherwise a centre crop
    clamped to the ratio range. Every draw is a function of (seed, epoch, index) only.
    """
    n = len(indices)
    area = float(height * width)
    boxes = np.zeros((n, 4), dtype=np.float64)
    done = np.zeros(n, dtype=bool)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(attempts):
        u = [_hash_uniform(seed, epoch, indices, 4 * attempt + k) for k in range(4)]
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[1])
        w = np.round(np.sqrt(target * aspect))
        h = np.round(np.sqrt(target / aspect))
        fits = ~done & (w > 0) & (h > 0) & (w <= width) & (h <= height)
        top = np.floor(u[2] * (height - h + 1))
        left = np.floor(u[3] * (width - w + 1))
        boxes[fits] = np.stack([top, left, h, w], axis=1)[fits]
        done |= fits
    if not done.all():
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        boxes[~done] = [(height - h) // 2, (width - w) // 2, h, w]
    return boxes


def _crop_grid(boxes: np.ndarray, flip: np.ndarray, height: int, width: int, size: tuple[int, int]) -> torch.Tensor:
    """Sampling grids that map each output image onto its crop box (``align_corners=False`` coordinates)."""
    top, left, h, w = (torch.from_numpy(boxes[:, k]).float() for k in range(4))
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = (w / width) * torch.from_numpy(np.where(flip, -1.0, 1.0)).float()
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return torch.nn.functional.affine_grid(theta, [len(boxes), 3, *size], align_corners=False)


def _grey(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class TensorImageDataset(torch.utils.data.Dataset):
    """A whole split held as one uint8 tensor, augmented a batch at a time.

    ``__getitems__`` (what ``DataLoader`` calls for a batch of indices) returns ``(images, labels)`` already
    stacked; use :func:`create_loader`, which passes the batch through. Training augmentation depends on
    ``(seed, epoch, index)`` only, like :class:`ImageClassificationDataset`: resumed runs and any number of
    processes see the same images. Interpolation is bilinear or bicubic ``grid_sample`` without antialiasing
    (crops are upsampled at CIFAR-like sizes; downscaling by more than 2x would alias).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        input_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        train: bool,
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor (N, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        self.train = train
        self.input_size = tuple(input_size)
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.scale, self.ratio, self.hflip, self.color_jitter = tuple(scale), tuple(ratio), hflip, color_jitter
        self.seed = seed
        self.epoch = 0
        self.labels = labels.long()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.images = images if train else self._eval_geometry(images, crop_pct)

    def _eval_geometry(self, images: torch.Tensor, crop_pct: float) -> torch.Tensor:
        # timm's eval transform: resize the shorter side to size / crop_pct, centre-crop to size; done once.
        out_h, out_w = self.input_size
        short = math.floor(max(out_h, out_w) / crop_pct)
        h, w = images.shape[-2:]
        new_h, new_w = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        chunks = []
        for start in range(0, len(images), 1024):
            x = images[start : start + 1024].float()
            if (new_h, new_w) != (h, w):
                x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=self.mode, antialias=True)
            top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
            chunks.append(x[..., top : top + out_h, left : left + out_w].round().clamp(0, 255).to(torch.uint8))
        return torch.cat(chunks)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].float()
        if self.train:
            images = self._augment(images, np.asarray(indices, dtype=np.int64))
        images = (images / 255.0 - self.mean) / self.std
        return images.contiguous(), self.labels[index]

    def _augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        height, width = images.shape[-2:]
        boxes = random_resized_crop_boxes(self.seed, self.epoch, indices, height, width, self.scale, self.ratio)
        flip = _hash_uniform(self.seed, self.epoch, indices, 100) < self.hflip
        grid = _crop_grid(boxes, flip, height, width, self.input_size)
        images = torch.nn.functional.grid_sample(
            images, grid, mode=self.mode, padding_mode="border", align_corners=False
        )
        if self.color_jitter > 0:
            j = self.color_jitter
            factors = [
                torch.from_numpy(1 - j + 2 * j * _hash_uniform(self.seed, self.epoch, indices, 101 + k))
                .float()
                .view(-1, 1, 1, 1)
                for k in range(3)
            ]
            images = images * factors[0]  # brightness
            mean_grey = _grey(images).mean(dim=(1, 2, 3), keepdim=True)
            images = (images - mean_grey) * factors[1] + mean_grey  # contrast
            grey = _grey(images)
            images = (images - grey) * factors[2] + grey  # saturation
        return images.clamp(0, 255)


def decode_images(dataset: Any, image_column: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Every image of ``dataset`` as one uint8 tensor (N, 3, H, W); all must share one size unless ``size`` is set."""
    rows = []
    for image in dataset[image_column]:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BICUBIC)
        rows.append(np.asarray(image))
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:3]}...: pass size= to decode them to one size")
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).contiguous()


def tensor_datasets(
    splits: ImageSplits, data_config: dict, augment: dict, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """(train, eval, BatchNorm re-estimation) tensor datasets for ``splits``, matching :func:`create_transforms`."""
    train_images = decode_images(splits.train, splits.image_column)
    size = tuple(train_images.shape[-2:])
    eval_images = decode_images(splits.validation, splits.image_column, size=size)
    train_labels = torch.as_tensor(splits.train[splits.label_column])
    eval_labels = torch.as_tensor(splits.validation[splits.label_column])
    common = {
        "input_size": tuple(data_config["input_size"][-2:]),
        "mean": tuple(data_config["mean"]),
        "std": tuple(data_config["std"]),
        "crop_pct": data_config.get("crop_pct", 1.0),
        "interpolation": data_config.get("interpolation", "bilinear"),
    }
    if augment.get("none"):
        train = TensorImageDataset(train_images, train_labels, train=False, **common)
    else:
        options = {
            "scale": tuple(augment.get("scale") or (0.08, 1.0)),
            "hflip": 0.5 if augment.get("hflip") is None else augment["hflip"],
            "color_jitter": 0.4 if augment.get("color_jitter") is None else augment["color_jitter"],
        }
        train = TensorImageDataset(train_images, train_labels, train=True, seed=seed, **common, **options)
    evaluation = TensorImageDataset(eval_images, eval_labels, train=False, **common)
    bn = TensorImageDataset(train_images, train_labels, train=False, **common)
    return train, evaluation, bn


# ------------------------------------------------------------------------------------------------ evaluation
_DIGITS_TEST = 360  # the last 360 of scikit-learn's 1797 digits: a fixed, reproducible test split


def _digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N x 8 x 8 floats in [0, 1], labels); ``test`` is the last 360 of the 1,797."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    if split == "test":
        return x[-_DIGITS_TEST:], y[-_DIGITS_TEST:]
    if split == "train":
        return x[:-_DIGITS_TEST], y[:-_DIGITS_TEST]
    if split != "all":
        raise ValueError(f"--split for digits is 'train', 'test' or 'all'; got {split!r}")
    return x, y


def load_eval_tensors(
    dataset: str, split: str, size: int, in_chans: int, mean: Any, std: Any, limit: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A whole evaluation split as tensors: ``(normalised images N x C x size x size, labels, display name)``.

    What ``eval_loader`` streams, gathered in memory (calibration images for the one-shot methods). ``dataset``:
    ``"digits"`` (scikit-learn's 8x8 digits, upscaled bilinearly and replicated to ``in_chans``; its ``test`` split
    is the last 360 of the 1,797) or anything ``datasets.load_dataset`` reads. ``limit``: a seeded sample of that many
    rows, stratified by label, so that a split sorted by class still gives every class its share.
    """
    loader, name = eval_loader(dataset, split, size, in_chans, mean, std, limit, batch_size=256, seed=seed)
    batches = list(loader)
    if not batches:
        raise ValueError(f"split {split!r} of {dataset!r} has no rows")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), name


# ================================================================================================ streaming eval
def sample_indices(labels: Any, limit: int | None, seed: int = 0) -> np.ndarray:
    """Row indices to evaluate: all of them, or (``limit`` < rows) a seeded random sample stratified by label.

    Each class contributes in proportion to its size (a dataset sorted by label gives every class its share,
    not the first one's rows); the indices come back sorted, so reading them stays sequential."""
    labels = np.asarray(labels)
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1; got {limit}")
    rng = np.random.default_rng(seed)
    key = np.empty(n)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        # Evenly spaced keys per class (random order within it, a random phase per class): the `limit`
        # smallest keys take about limit * class_size / n rows of each class.
        key[rows[rng.permutation(len(rows))]] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.sort(np.argsort(key, kind="stable")[:limit])


class _EvalImages(torch.utils.data.Dataset):
    """Rows ``indices`` of an image dataset, each decoded, resized and normalised when the loader asks for it."""

    def __init__(self, read: Callable[[int], tuple[torch.Tensor, int]], indices: np.ndarray) -> None:
        self.read, self.indices = read, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(int(self.indices[i]))


def eval_loader(
    dataset: str,
    split: str,
    size: int,
    in_chans: int,
    mean: Any,
    std: Any,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[torch.utils.data.DataLoader, str]:
    """``(DataLoader of (images, labels), display name)`` over an evaluation split, decoded batch by batch (the
    memory is one batch, whatever the split's size). ``limit``: a seeded, label-stratified random sample of that
    many rows (``sample_indices``). Images are resized to ``size`` x ``size`` as ``load_eval_tensors`` does."""
    mean_t = torch.tensor(list(mean)[:in_chans] or [0.0], dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(list(std)[:in_chans] or [1.0], dtype=torch.float32).view(-1, 1, 1)
    if dataset == "digits":
        x, y = _digits_split(split)

        def read(i: int) -> tuple[torch.Tensor, int]:
            image = torch.nn.functional.interpolate(
                x[i][None, None], size=(size, size), mode="bilinear", align_corners=False
            )[0]
            return (image.expand(in_chans, -1, -1) - mean_t) / std_t, int(y[i])

        indices, name = sample_indices(y.numpy(), limit, seed), "digits (scikit-learn load_digits)"
    else:
        import datasets
        from torchvision.transforms import functional as TF

        try:
            data = datasets.load_dataset(dataset, split=split)
        except ValueError as e:  # unknown split: datasets names the available ones
            raise ValueError(f"cannot load split {split!r} of {dataset!r}: {e}") from e
        features = data.features
        image_col = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        label_col = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        label_col = label_col or next((k for k in ("label", "labels", "fine_label") if k in features), None)
        if image_col is None or label_col is None:
            raise ValueError(f"dataset {dataset!r} needs an Image column and a label column; it has {sorted(features)}")
        mode = {1: "L", 3: "RGB"}.get(in_chans, "RGB")

        def read(i: int) -> tuple[torch.Tensor, int]:
            row = data[i]
            image = TF.to_tensor(row[image_col].convert(mode).resize((size, size)))
            return (image - mean_t[: image.shape[0]]) / std_t[: image.shape[0]], int(row[label_col])

        indices = sample_indices(data[label_col], limit, seed)
        name = os.path.basename(os.path.normpath(dataset)) if os.path.isdir(dataset) else dataset
    loader = torch.utils.data.DataLoader(_EvalImages(read, indices), batch_size=batch_size, shuffle=False)
    return loader, name
