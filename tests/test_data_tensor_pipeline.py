"""The in-memory tensor pipeline: the same geometry as timm's transforms, deterministic batched augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from timm_prune.data import (
    ImageClassificationDataset,
    TensorImageDataset,
    create_loader,
    create_transforms,
    decode_images,
    load_image_splits,
    random_resized_crop_boxes,
    tensor_datasets,
)


@pytest.fixture(scope="module")
def digits():
    splits = load_image_splits("digits", max_train_samples=96, max_eval_samples=48)
    model = timm.create_model("test_resnet", num_classes=10)
    return splits, model


def test_eval_images_match_timms_eval_transform(digits):
    splits, model = digits
    _, eval_tf, data_config = create_transforms(model, 32, 1.0, {"none": True})
    _, evaluation, _ = tensor_datasets(splits, data_config, {"none": True}, seed=0)
    reference = ImageClassificationDataset(splits.validation, splits.image_column, splits.label_column, eval_tf)
    expected = torch.stack([reference[i][0] for i in range(16)])
    images, labels = evaluation.__getitems__(list(range(16)))
    assert images.shape == expected.shape == (16, 3, 32, 32)
    # Bicubic 8 -> 32 px by torch and by PIL: the same picture up to rounding of the interpolation.
    assert (images - expected).abs().mean() < 0.02
    assert labels.tolist() == [reference[i][1] for i in range(16)]


def _dataset(images: torch.Tensor, **kwargs) -> TensorImageDataset:
    labels = torch.arange(len(images))
    return TensorImageDataset(images, labels, (8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, **kwargs)


def test_identity_crop_reproduces_the_image_and_flip_mirrors_it():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    identity = _dataset(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out, _ = identity.__getitems__([0, 1, 2, 3])
    torch.testing.assert_close(out * 255, images.float(), atol=1e-3, rtol=0)
    flipped = _dataset(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    out, _ = flipped.__getitems__([0, 1, 2, 3])
    torch.testing.assert_close(out * 255, images.float().flip(-1), atol=1e-3, rtol=0)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    data = _dataset(images, scale=(0.3, 1.0), color_jitter=0.4, seed=7)
    a, _ = data.__getitems__([0, 1, 2, 3])
    b, _ = data.__getitems__([3, 2, 1, 0])
    torch.testing.assert_close(a, b.flip(0))  # a sample's image does not depend on its batch
    again, _ = _dataset(images, scale=(0.3, 1.0), color_jitter=0.4, seed=7).__getitems__([0, 1, 2, 3])
    torch.testing.assert_close(a, again)
    data.set_epoch(1)
    c, _ = data.__getitems__([0, 1, 2, 3])
    assert not torch.allclose(a, c)
    other_seed, _ = _dataset(images, scale=(0.3, 1.0), color_jitter=0.4, seed=8).__getitems__([0, 1, 2, 3])
    assert not torch.allclose(a, other_seed)


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    boxes = random_resized_crop_boxes(0, 0, np.arange(2000), 32, 32, (0.35, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / (32 * 32)
    # Rounding the sides to whole pixels moves the area a little outside the range; never far.
    assert area.min() > 0.3 and area.max() <= 1.0
    assert 0.55 < area.mean() < 0.75  # uniform in [0.35, 1] has mean 0.675
    # Wide and tall boxes both occur.
    assert (w > h).any() and (h > w).any()


def test_loader_yields_stacked_batches_and_decode_checks_sizes(digits):
    splits, model = digits
    _, _, data_config = create_transforms(model, 16, 1.0, {"none": True})
    train, _, _ = tensor_datasets(splits, data_config, {"hflip": 0.5, "scale": (0.5, 1.0)}, seed=0)
    images, labels = next(iter(create_loader(train, batch_size=8, shuffle=True, num_workers=2)))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and labels.shape == (8,)
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(images, labels, (16, 16), (0, 0, 0), (1, 1, 1), train=False)
    decoded = decode_images(splits.train.select(range(3)), splits.image_column, size=(10, 12))
    assert decoded.shape == (3, 3, 10, 12) and decoded.dtype == torch.uint8
