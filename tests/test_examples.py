"""The README's main example runs to the accuracy it claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_digits_example_reaches_95_percent_validation_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_SAVE", str(tmp_path / "digits.keras"))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import train_digits

    results = train_digits.main()
    assert set(results) == {"torch", "keras", "add_loss"}
    assert min(results.values()) >= 0.95, results
    assert (tmp_path / "digits.keras").exists()


@pytest.mark.parametrize(
    "script",
    [
        "train_digits.py",
        "loop_torch.py",
        "loop_keras.py",
        "loop_metrics.py",
        "loop_add_loss.py",
        "compiled_model.py",
    ],
)
def test_example_runs_as_a_script_in_fast_mode(tmp_path, script):
    env = dict(os.environ, KL_FAST="1", KL_SAVE=str(tmp_path / "m.keras"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training loss (for 1 batch) at step 0" in result.stdout
