"""What one stage (train, val, test) accumulates over an epoch: loss means and metric state."""

from __future__ import annotations

from keras_lightning import collectives
from keras_lightning.metrics import BoundMetric

from typing import Any

import torch


class EpochState:
    """Loss totals and bound metrics of one stage, reset at every epoch start.

    Args:
        prefix: Prepended to every logged name (``""``, ``"val_"``, ``"test_"``).

    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.metrics: list[BoundMetric] | None = None
        self._sums: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        """Start a new epoch."""
        self._sums = {}
        for metric in self.metrics or ():
            metric.reset()

    def add_mean(self, name: str, value: torch.Tensor, count: int) -> None:
        """Accumulate ``value`` (a batch mean over ``count`` samples) into the mean ``name``."""
        value = value.detach()
        entry = self._sums.get(name)
        if entry is None:
            self._sums[name] = [value * count, torch.tensor(float(count), device=value.device)]
        else:
            entry[0] = entry[0] + value * count
            entry[1] = entry[1] + count

    def update_metrics(
        self, y_pred: list[Any], y_true: list[Any], sample_weight: list[Any]
    ) -> None:
        """Accumulate every metric on its output (``sample_weight``: one entry per output)."""
        for metric in self.metrics or ():
            index = metric.output_index
            metric.update(y_pred[index], y_true[index], sample_weight[index])

    def compute(self, distributed: bool = False) -> dict[str, torch.Tensor]:
        """Epoch values under their logged names, reduced across processes if asked."""
        values: dict[str, torch.Tensor] = {}
        for name, (total, count) in self._sums.items():
            if distributed:
                pair = torch.stack([total.float(), count.to(total.device).float()])
                (pair,) = collectives.all_reduce_sum([pair])
                total, count = pair[0], pair[1]
            values[self.prefix + name] = total / count
        for metric in self.metrics or ():
            values[self.prefix + metric.name] = torch.as_tensor(metric.compute(distributed))
        return values
