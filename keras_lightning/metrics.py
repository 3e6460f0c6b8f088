"""Keras metrics and torchmetrics with exact epoch values under Keras' names.

A metric's epoch value is computed from its state accumulated over the whole epoch (and, in
distributed runs, summed over every process), never as a mean of per-batch values.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.data import per_output, weights_for_output
from keras_lightning.exceptions import (
    ConfigurationError,
    KerasLightningTypeError,
    class_given,
    did_you_mean,
)
from keras_lightning.keras_logs import sum_metric_states
from keras_lightning.losses import CROSSENTROPY_ALIASES

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import torch
import torchmetrics


def _snake_case(name: str) -> str:
    """A torchmetrics class name as it is logged: acronyms stay whole.

    Example:
        >>> [_snake_case(n) for n in ("BinaryAUROC", "MulticlassF1Score", "MeanSquaredError")]
        ['binary_auroc', 'multiclass_f1_score', 'mean_squared_error']

    """
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def check_metric_spec(spec: Any, argument: str) -> None:
    """Fail early on metric entries that cannot be a metric (checked again on first batch)."""
    if spec is None:
        return
    entries: list[Any]
    if isinstance(spec, Mapping):
        entries = [v for value in spec.values() for v in _as_list(value)]
    else:
        entries = [v for value in _as_list(spec) for v in _as_list(value)]
    for entry in entries:
        if entry is None:
            continue
        if isinstance(entry, str):
            if entry.lower() in ("accuracy", "acc", *CROSSENTROPY_ALIASES):
                continue
            try:
                keras.metrics.get(entry)
            except (ValueError, TypeError):
                hint = did_you_mean(entry, _private.keras_metric_names())
                raise ConfigurationError(
                    f"`{argument}` contains {entry!r}, which is not a Keras metric name.{hint} "
                    "Use a name such as 'accuracy', 'mae', 'mse', 'auc', or a metric object "
                    "(keras.metrics.AUC(), torchmetrics.Accuracy(...))."
                ) from None
        elif isinstance(entry, torchmetrics.Metric) and argument == "weighted_metrics":
            raise ConfigurationError(
                f"`weighted_metrics` contains {type(entry).__name__}(), but torchmetrics take no "
                "sample weights (their update() is update(preds, target)): it would log the "
                f"unweighted value. Put it in metrics=[{type(entry).__name__}(...)], or use a "
                "Keras metric in weighted_metrics (e.g. 'mse', keras.metrics.MeanSquaredError())."
            )
        elif isinstance(entry, type) and issubclass(entry, torchmetrics.Metric):
            # (a Keras metric class is fine: Keras' compile instantiates it, and so do we)
            raise class_given(argument, entry, f"[torchmetrics.{entry.__name__}(...)]")
        elif not isinstance(entry, keras.metrics.Metric | torchmetrics.Metric) and not callable(
            entry
        ):
            raise KerasLightningTypeError(
                f"`{argument}` entries must be Keras metric names or objects, Keras metric "
                f"functions, or torchmetrics.Metric objects; received {entry!r} of type "
                f"{type(entry).__name__}."
            )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


@dataclass
class BoundMetric:
    """One metric bound to one model output, with the name it is logged under."""

    name: str
    metric: Any
    output_index: int
    weighted: bool

    @property
    def is_torchmetric(self) -> bool:
        """True for a ``torchmetrics.Metric`` (called ``update(y_pred, y_true)``)."""
        return isinstance(self.metric, torchmetrics.Metric)

    def update(self, y_pred: Any, y_true: Any, sample_weight: torch.Tensor | None) -> None:
        """Accumulate one batch."""
        if self.is_torchmetric:
            self.metric.update(y_pred, y_true)
        elif self.weighted and sample_weight is not None:
            weights = weights_for_output(sample_weight, y_pred)  # Keras writes into them
            self.metric.update_state(y_true, y_pred, sample_weight=weights)
        else:
            self.metric.update_state(y_true, y_pred)

    def reset(self) -> None:
        """Forget the accumulated state."""
        if self.is_torchmetric:
            self.metric.reset()
        else:
            self.metric.reset_state()

    def compute(self, distributed: bool = False) -> torch.Tensor:
        """The value over everything accumulated; ``distributed`` sums Keras state over ranks.

        torchmetrics synchronise themselves in ``compute()`` when a process group exists.
        """
        if self.is_torchmetric:
            return self.metric.compute()
        if distributed:
            sum_metric_states([self.metric])
        return self.metric.result()


def _instantiate(identifier: Any, y_true: Any, y_pred: Any) -> tuple[str, Any]:
    if isinstance(identifier, torchmetrics.Metric):
        return _snake_case(type(identifier).__name__), identifier
    metric = _private.compile_metric(identifier, y_true, y_pred)
    return metric.name, metric


def _fresh_copy(metric: Any) -> Any:
    if isinstance(metric, torchmetrics.Metric):
        return metric.clone()
    if isinstance(metric, keras.metrics.Metric):
        return type(metric).from_config(metric.get_config())
    return metric


def bind_metrics(
    metrics: Any,
    weighted_metrics: Any,
    names: list[str],
    y_true: list[Any],
    y_pred: list[Any],
    copy: bool,
) -> list[BoundMetric]:
    """Resolve metric specs against the first batch's outputs (as Keras' compile does).

    Args:
        metrics: The ``metrics`` argument (list, per-output list, or dict by output name).
        weighted_metrics: The ``weighted_metrics`` argument, same structure.
        names: Output names.
        y_true: Targets, one per output.
        y_pred: Outputs, one per output.
        copy: Use fresh copies of metric objects (for validation and test, so that they do not
            share state with training).

    """
    bound: list[BoundMetric] = []
    multi = len(names) > 1
    for spec, weighted, argument in (
        (metrics, False, "metrics"),
        (weighted_metrics, True, "weighted_metrics"),
    ):
        if spec is None:
            continue
        if multi and isinstance(spec, list | tuple) and len(spec) != len(names):
            per = [spec for _ in names]
        else:
            per = per_output(spec, names, argument)
        for index, output_spec in enumerate(per):
            for identifier in _as_list(output_spec):
                if identifier is None:
                    continue
                name, metric = _instantiate(identifier, y_true[index], y_pred[index])
                if copy:
                    metric = _fresh_copy(metric)
                if multi:
                    name = f"{names[index]}_{name}"
                bound.append(BoundMetric(name, metric, index, weighted))
    seen: set[str] = set()
    for item in bound:
        if item.name in seen:
            item.name = f"weighted_{item.name}" if item.weighted else item.name
        seen.add(item.name)
    return bound
