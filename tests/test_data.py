"""Which split validates: a dataset's own validation/test split, a named one, or a hold-out of train."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from timm_prune.data import load_image_splits


@pytest.fixture()
def parquet_dir(tmp_path: Path) -> str:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for split, n in (("train", 40), ("test", 10)):
        images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features)
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    return str(tmp_path)


def test_test_split_validates_by_default_and_holdout_keeps_it_untouched(parquet_dir: str) -> None:
    default = load_image_splits(parquet_dir, seed=0)
    assert default.validation_source == "test" and (len(default.train), len(default.validation)) == (40, 10)
    holdout = load_image_splits(parquet_dir, validation_fraction=0.25, seed=0, validation_split="holdout")
    assert holdout.validation_source == "train[holdout]"
    assert (len(holdout.train), len(holdout.validation)) == (30, 10)
    # The hold-out is a part of train: its images are train images, and none is in both parts.
    train_bytes = {img.tobytes() for img in default.train["img"]}
    held = [img.tobytes() for img in holdout.validation["img"]]
    assert all(b in train_bytes for b in held)
    assert not set(held) & {img.tobytes() for img in holdout.train["img"]}
    named = load_image_splits(parquet_dir, seed=0, validation_split="test")
    assert named.validation_source == "test"


def test_unknown_validation_split_names_the_splits(parquet_dir: str) -> None:
    with pytest.raises(ValueError, match=r"--validation_split 'val'.*\['train', 'test'\].*holdout"):
        load_image_splits(parquet_dir, validation_split="val")
