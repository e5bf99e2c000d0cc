"""Running ``recipes/train.py`` from the benchmarks: flags to a command line, one run per subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def recipe_command(flags: dict[str, Any]) -> list[str]:
    """The recipe's command line for ``flags`` (flag name -> value; ``None`` values are left out)."""
    command = [sys.executable, str(ROOT / "recipes" / "train.py")]
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, list):
            # --scale takes two numbers; list-valued method fields take one JSON value.
            command += [f"--{key}", *[str(v) for v in value]] if key == "scale" else [f"--{key}", json.dumps(value)]
        else:
            command += [f"--{key}", str(value)]
    return command


def train_one(job: tuple[list[str], str, int, dict[str, str]]) -> tuple[str, float]:
    """Run one recipe command (``threads`` torch threads, extra environment), log to ``log_path``; seconds taken."""
    command, log_path, threads, extra_env = job
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra_env}
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"recipe run failed (exit {code}): {' '.join(command)}\n--- {log_path} (tail) ---\n{tail}")
    return log_path, time.time() - started


def recipe_prune_config(config_path: str | Path) -> dict[str, Any]:
    """The PruneConfig fields (``method`` included) a recipe YAML describes, as ``recipes/train.py`` resolves them:
    benchmarks that time a recipe's settings read them here instead of repeating them."""
    sys.path.insert(0, str(ROOT / "recipes"))
    from recipe_args import parse_args, prune_config_from_args

    return prune_config_from_args(parse_args(["--config", str(config_path)])).to_dict()
