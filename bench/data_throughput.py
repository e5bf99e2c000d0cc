"""Training-data throughput: timm's per-image PIL transforms against the in-memory tensor pipeline, in one run.

    python bench/data_throughput.py                       # CIFAR-10 at 36 px, one thread
    python bench/data_throughput.py --dataset digits --img_size 32

Both pipelines produce the recipe's training batches (RandomResizedCrop, flip, ColorJitter, normalisation) with
``num_workers=0`` on one thread; rounds alternate between them so that drifts of a shared machine hit both alike.
Reports the median images per second of each and their ratio. Writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from timm_prune.data import (
    ImageClassificationDataset,
    create_loader,
    create_transforms,
    load_image_splits,
    tensor_datasets,
)

ROOT = Path(__file__).resolve().parent.parent


def images_per_second(loader: torch.utils.data.DataLoader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # the first batch pays for iterator set-up
    started = time.perf_counter()
    seen = 0
    for _ in range(batches):
        images, _ = next(iterator)
        seen += len(images)
    return seen / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img_size", type=int, default=36)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--batches", type=int, default=10, help="batches timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    splits = load_image_splits(args.dataset, validation_split="holdout", validation_fraction=0.1)
    model = timm.create_model(args.model, num_classes=splits.num_classes)
    augment = {"hflip": 0.5, "scale": (0.35, 1.0), "color_jitter": 0.4}
    train_tf, _, data_config = create_transforms(model, args.img_size, 1.0, augment)
    pil = ImageClassificationDataset(splits.train, splits.image_column, splits.label_column, train_tf, seed=0)
    started = time.perf_counter()
    tensor, _, _ = tensor_datasets(splits, data_config, augment, seed=0)
    decode_s = time.perf_counter() - started
    loaders = {name: create_loader(ds, args.batch_size, True, 0) for name, ds in (("pil", pil), ("tensor", tensor))}
    rates: dict[str, list[float]] = {"pil": [], "tensor": []}
    for round_ in range(args.rounds):
        for name in ("pil", "tensor") if round_ % 2 == 0 else ("tensor", "pil"):
            rates[name].append(images_per_second(loaders[name], args.batches))
    result = {
        "dataset": args.dataset,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "threads": 1,
        "pil_images_per_s": round(statistics.median(rates["pil"])),
        "tensor_images_per_s": round(statistics.median(rates["tensor"])),
        "speedup_median_of_rounds": round(
            statistics.median(t / p for p, t in zip(rates["pil"], rates["tensor"], strict=True)), 1
        ),
        "tensor_decode_once_s": round(decode_s, 1),
        "command": "python bench/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
