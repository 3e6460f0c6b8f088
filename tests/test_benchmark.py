"""benchmarks/benchmark.py --quick runs end to end (a smoke test; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402


@pytest.mark.slow
def test_quick_benchmark_writes_every_configuration(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick", "--device", "cpu",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=540, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert (tmp_path / "benchmark_cpu.png").stat().st_size > 0
    assert report["quick"] is True
    workloads = report["devices"]["cpu"]["workloads"]
    assert set(workloads) == {"mlp", "conv"}
    for name, workload in workloads.items():
        configs = workload["configs"]
        assert set(configs) == set(benchmark.CONFIGS), name
        for config, row in configs.items():
            if "skipped" in row:  # Keras' own jit_compile=True (the conv net, quick mode),
                # and the fast mode's variants in quick mode
                if config in benchmark.QUICK_SKIPS:
                    continue
                assert config == "c_keras_fit_jit", row["skipped"]
                assert row["skipped"] in (benchmark.CONV_JIT_SKIPPED, benchmark.QUICK_JIT_SKIPPED)
                continue
            assert "error" not in row, (name, config, row.get("error"))
            assert row["steps_per_s"] > 0 and row["ms_per_step"] > 0, (name, config)
            assert row["first_warmup_s"] > 0 and row["peak_memory_mb"] >= 0
            assert row["vs_keras_fit"] > 0 and row["vs_torch_loop"] > 0
        compiled = configs["f_kl_compiled"]["compile_stats"]
        assert compiled["fallback"] is None and compiled["graph_breaks"] == 0, name
        fast = configs["g_kl_step"]["compile_stats"]  # the whole step, as one graph
        assert (fast["mode"], fast["fallback"], fast["captures"]) == ("fused", None, 1), name
    assert set(report["devices"]["cpu"]["targets"]) >= {"mlp.eager_vs_keras_fit"}


def test_unknown_configuration_is_refused():
    with pytest.raises(SystemExit, match="unknown configurations"):
        benchmark.main(["--quick", "--configs", "z_nothing", "--out", "/nonexistent/never"])
