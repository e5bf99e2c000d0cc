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
    dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, num_workers: int, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        # Fresh workers each epoch: they must pick up the dataset's epoch for seeded augmentation.
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
