"""The lowest supported versions of keras, lightning and torchmetrics, tested.

The declared lower bounds in ``pyproject.toml`` must be the versions this test installs: it
puts exactly those releases (no dependencies: the rest of the environment is reused) in a
folder ahead of the installed ones and runs the core tests against them in a subprocess.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWEST = {"keras": "3.13.0", "lightning": "2.6.0", "torchmetrics": "1.4.0"}
# lightning 2.6.0 runs on the pytorch_lightning package of the same release
PINS = [*(f"{name}=={version}" for name, version in LOWEST.items()), "pytorch-lightning==2.6.0"]
CORE_TESTS = [
    "tests/test_module.py",
    "tests/test_losses.py",
    "tests/test_metrics.py",
    "tests/test_data.py",
    "tests/test_optimizers.py",
    "tests/test_private.py",
    "tests/test_lifecycle.py",
    "tests/test_fit_parity.py",
    "tests/test_finetuning.py",  # BaseFinetuning / SWA internals (test_private.py: the rest)
    "tests/test_checkpoint_files.py",
    "tests/test_performance.py",
    "keras_lightning",
]


def _declared_lower_bounds() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return dict(re.findall(r'"([A-Za-z0-9_-]+)>=([0-9.]+)', dependencies))


def test_declared_lower_bounds_are_the_tested_ones():
    declared = _declared_lower_bounds()
    for name, version in LOWEST.items():
        assert declared[name] == ".".join(version.split(".")[:2]), (name, declared[name])
    # torch's floor is the build this project's machines carry; the suite runs on it.
    assert declared["torch"] == ".".join(importlib.metadata.version("torch").split(".")[:2])


@pytest.mark.lowest
@pytest.mark.timeout(1500)
@pytest.mark.skipif(os.environ.get("KL_LOWEST_RUN") == "1", reason="already the lowest run")
def test_core_tests_pass_on_the_lowest_versions(tmp_path):
    target = tmp_path / "lowest"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         *PINS],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]), KL_LOWEST_RUN="1")
    versions = subprocess.run(
        [sys.executable, "-c", "import keras, lightning, torchmetrics; "
         "print(keras.__version__, lightning.__version__, torchmetrics.__version__)"],
        env=dict(env, KERAS_BACKEND="torch"), capture_output=True, text=True, timeout=300,
    )
    assert versions.stdout.split() == list(LOWEST.values()), versions.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-m", "not lowest", *CORE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-2000:]
