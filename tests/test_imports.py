"""Import rules of the package (pyproject.toml ``[tool.importlinter]``), enforced by import-linter on every run."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    # The console script beside this interpreter (the dev extra installs it), run from the repository root so
    # that it reads pyproject.toml.
    script = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    assert os.path.isfile(script), "import-linter is missing: pip install -e '.[dev]'"
    result = subprocess.run([script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
