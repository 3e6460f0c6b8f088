"""The tooling the style promises, run by the suite: ruff (lint) and mypy (types)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean():
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = _run("mypy")  # the package, as configured in pyproject.toml [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_the_package_s_own_deprecated_calls_fail_the_suite():
    # pyproject's filterwarnings turns DeprecationWarnings raised from keras_lightning's own
    # modules into errors; check that it does.
    from keras_lightning import collectives

    import warnings

    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit(
            "old", DeprecationWarning, collectives.__file__, 1, module="keras_lightning.collectives"
        )
