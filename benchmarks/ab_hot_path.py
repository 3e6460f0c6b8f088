"""A/B of the wrapper's hot-path changes, in one process: (e) as shipped vs (e) with them undone.

"undone" restores the earlier behaviour: ``self.log`` of the step loss on every step, and
``keras_optimizer.apply`` on every step instead of the short update paths. Same interleaving
and CPU-time basis as ``benchmark.py``. Then the Keras Adam update of the MLP alone, through
each :attr:`KerasOptimizer.update_path` ("apply", "short", "adam"), interleaved the same way.

    python benchmarks/ab_hot_path.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import keras_lightning as kl  # noqa: E402

import benchmark  # noqa: E402
import keras  # noqa: E402
import torch  # noqa: E402


class Undone(kl.KerasLightningModule):
    """KerasLightningModule with the hot-path changes undone."""

    def _step_loss_wanted(self, batch_idx: int) -> bool:
        return True

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if isinstance(optimizer, kl.KerasOptimizer):
            optimizer._update_path = "apply"  # always keras_optimizer.apply(...)
        return optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark.quiet_logging()
    workload = benchmark.mlp_workload(batches=64)
    device = torch.device("cpu")
    runners = {
        name: benchmark.Runner(config, workload, device)
        for name, config in (("fit", "c_keras_fit"), ("shipped", "e_kl_eager"),
                             ("undone", "e_kl_eager"))
    }
    original = kl.KerasLightningModule
    for _ in range(args.repeats):
        for name, runner in runners.items():
            benchmark.kl.KerasLightningModule = Undone if name == "undone" else original
            runner.run(10, args.steps)
    benchmark.kl.KerasLightningModule = original
    fit = runners["fit"].cpu_rates
    for name, runner in runners.items():
        rates = runner.cpu_rates
        ratio = statistics.median(r / f for r, f in zip(rates, fit, strict=True))
        print(f"{name:8s} {statistics.median(rates):7.1f} steps per CPU-s   {ratio:.2f}x Keras fit")
    shipped, undone = runners["shipped"].cpu_rates, runners["undone"].cpu_rates
    gain = statistics.median(s / u for s, u in zip(shipped, undone, strict=True))
    print(f"shipped / undone: {gain:.2f}x (median of per-round ratios)")
    update_paths(workload, args.repeats)


def update_paths(workload: benchmark.Workload, repeats: int, calls: int = 500) -> None:
    """CPU time of one Keras Adam update of the workload's model, by update path."""
    model = workload.keras_model()
    adapters = {}
    for path in ("apply", "short", "adam"):
        adapter = kl.KerasOptimizer(keras.optimizers.Adam(benchmark.LR), model.trainable_variables)
        for param in adapter.param_groups[0]["params"]:
            param.grad = torch.randn_like(param) * 1e-3
        adapter.step()  # builds the slots
        adapter.step()  # picks the path
        assert adapter.update_path == "adam"
        adapter._update_path = path
        adapters[path] = adapter
    times: dict[str, list[float]] = {path: [] for path in adapters}
    for _ in range(repeats):
        for path, adapter in adapters.items():
            started = time.process_time()
            for _ in range(calls):
                adapter.step()
            times[path].append((time.process_time() - started) / calls * 1e6)
    apply = times["apply"]
    for path, values in times.items():
        ratio = statistics.median(a / v for a, v in zip(apply, values, strict=True))
        print(f"update path {path:6s} {statistics.median(values):7.1f} us per update   "
              f"{ratio:.2f}x faster than apply")


if __name__ == "__main__":
    main()
