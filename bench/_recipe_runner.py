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
