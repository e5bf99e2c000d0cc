"""The real data beside the project (``../shared/datasets``), for the tests that need it; they skip without it."""

from pathlib import Path

import pytest

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"
requires_cifar10 = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 (parquet) not found at {CIFAR10}")
