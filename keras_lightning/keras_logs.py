"""What a Keras ``train_step`` / ``test_step`` returns, made loggable the way Keras' ``fit`` does.

Pure functions: flattening nested logs (``compile_metrics``), keeping scalars, snapshotting
and restoring metric state across a validation, and the exact global value of
``model.metrics`` under DDP (states summed over ranks).
"""

from __future__ import annotations

from keras_lightning import collectives
from keras_lightning.exceptions import ConfigurationError

from collections.abc import Mapping
from typing import Any

import keras
import torch

__all__ = [
    "flatten_logs",
    "metric_results",
    "reset_metrics",
    "restore_metrics",
    "scalar_logs",
    "snapshot_metrics",
    "sum_metric_states",
]


def flatten_logs(logs: Any, step: str = "train_step") -> dict[str, Any]:
    """Flatten the dict a Keras ``train_step`` / ``test_step`` returned, as Keras' ``fit`` does.

    Nested dicts (``{"compile_metrics": {"mae": ...}}``) are merged into the top level under their
    inner keys; keys are visited in sorted order, so a later key wins on a clash, as in Keras.

    Raises:
        ConfigurationError: ``logs`` is not a dict (or ``None``).

    Example:
        >>> sorted(flatten_logs({"loss": 1.0, "compile_metrics": {"mae": 0.5}}))
        ['loss', 'mae']

    """
    if logs is None:
        return {}
    if not isinstance(logs, Mapping):
        raise ConfigurationError(
            f"The Keras model's `{step}` must return a dict of metric names to values (or None), "
            f"as Keras' fit() expects; it returned {type(logs).__name__}. End it with e.g. "
            "`return {m.name: m.result() for m in self.metrics}`."
        )
    result: dict[str, Any] = {}
    for key, value in sorted(logs.items(), key=lambda item: str(item[0])):
        if isinstance(value, Mapping):
            result.update(flatten_logs(value, step))
        else:
            result[str(key)] = value
    return result


def scalar_logs(logs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split flat logs into loggable scalars (detached float tensors) and skipped names.

    Example:
        >>> import torch
        >>> values, skipped = scalar_logs({"loss": torch.tensor(2.0), "cm": torch.ones(2, 2)})
        >>> {k: float(v) for k, v in values.items()}, skipped
        ({'loss': 2.0}, ['cm'])

    """
    values: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, value in logs.items():
        try:
            tensor = torch.as_tensor(keras.ops.convert_to_tensor(value))
        except (TypeError, ValueError, RuntimeError):
            skipped.append(name)
            continue
        if tensor.numel() != 1 or tensor.is_complex():
            skipped.append(name)
            continue
        values[name] = tensor.detach().reshape(()).float()
    return values, skipped


def snapshot_metrics(metrics: list[Any]) -> list[tuple[Any, torch.Tensor]]:
    """Copies of every metric variable, to restore with :func:`restore_metrics`."""
    return [(v, v.value.detach().clone()) for m in metrics for v in m.variables]


def restore_metrics(metrics: list[Any], snapshot: list[tuple[Any, torch.Tensor]]) -> None:
    """Reset ``metrics`` and put back the values of :func:`snapshot_metrics`."""
    for metric in metrics:
        metric.reset_state()
    for variable, value in snapshot:
        variable.assign(value)


def metric_results(metrics: list[Any]) -> dict[str, Any]:
    """``{name: result()}`` of Keras metrics, nested results flattened as Keras' ``fit`` does."""
    return flatten_logs({metric.name: metric.result() for metric in metrics})


def sum_metric_states(metrics: list[Any]) -> None:
    """Sum every Keras metric state variable over all processes, in place.

    A Keras metric's state is totals and counts (``Mean``: total and count; ``MeanAbsoluteError``
    through ``MeanMetricWrapper``: the same; ``AUC``, ``Precision``: confusion counts), so the
    sum over ranks of each state variable is the state of one metric that saw every rank's
    batches, and its ``result()`` is the exact global value, not a mean of per-rank results.
    Each variable is summed once (a metric listed twice is not doubled), through one buffer per
    dtype (:func:`keras_lightning.collectives.all_reduce_sum`).
    Every rank must call this with the same metrics in the same order.
    """
    variables = list({id(v): v for metric in metrics for v in metric.variables}.values())
    summed = collectives.all_reduce_sum([v.value.detach() for v in variables])
    for variable, total in zip(variables, summed, strict=True):
        variable.value.copy_(total)



def reset_metrics(model: Any) -> None:
    """Reset ``model.metrics`` as Keras' ``fit`` / ``evaluate`` do at their start."""
    reset = getattr(model, "reset_metrics", None)
    if callable(reset):
        reset()
    else:
        for metric in model.metrics:
            metric.reset_state()
