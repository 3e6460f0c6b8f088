"""What each argument of ``KerasLightningModule`` accepts, as types.

These are the annotations of the public API; :mod:`~keras_lightning.losses`,
:mod:`~keras_lightning.metrics` and :mod:`~keras_lightning.optimizers` check the values.
"""

from __future__ import annotations

from keras_lightning.losses import CROSSENTROPY_ALIASES, resolve_loss

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import keras
import torch
import torchmetrics

__all__ = [
    "LossSpec",
    "LossWeightsSpec",
    "MetricsSpec",
    "ModelSpec",
    "OptimizerSpec",
    "SchedulerSpec",
    "torchmetrics_in",
    "validate_loss_spec",
]

#: A Keras model, or a zero-argument factory that builds one in ``configure_model``.
ModelSpec: TypeAlias = keras.Model | Callable[[], keras.Model]

#: A Keras optimizer or its name, a torch optimizer class, or ``params -> torch optimizer``.
OptimizerSpec: TypeAlias = (
    str
    | keras.optimizers.Optimizer
    | type[torch.optim.Optimizer]
    | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    | None
)

_OneLoss: TypeAlias = (
    str | keras.losses.Loss | torch.nn.Module | Callable[..., torch.Tensor] | None
)
#: One loss for every output, a list (one per output) or a dict keyed by output name.
LossSpec: TypeAlias = _OneLoss | Sequence[_OneLoss] | Mapping[str, _OneLoss]

_OneMetric: TypeAlias = (
    str | keras.metrics.Metric | torchmetrics.Metric | Callable[..., torch.Tensor]
)
#: Metrics for every output, a list per output, or a dict keyed by output name.
MetricsSpec: TypeAlias = (
    Sequence[_OneMetric]
    | Sequence[Sequence[_OneMetric]]
    | Mapping[str, _OneMetric | Sequence[_OneMetric]]
    | None
)

#: Scalar weights of the outputs' losses: a list in output order or a dict by output name.
LossWeightsSpec: TypeAlias = float | Sequence[float] | Mapping[str, float] | None

_SchedulerFactory: TypeAlias = Callable[[torch.optim.Optimizer], object]
#: ``optimizer -> torch LR scheduler``, or a Lightning scheduler dict holding such a callable.
SchedulerSpec: TypeAlias = _SchedulerFactory | Mapping[str, object] | None


def _leaves(spec: Any) -> list[Any]:
    if isinstance(spec, Mapping):
        return [leaf for value in spec.values() for leaf in _leaves(value)]
    if isinstance(spec, list | tuple):
        return [leaf for value in spec for leaf in _leaves(value)]
    return [spec]


def validate_loss_spec(loss: Any) -> None:
    """Resolve every loss given (a bad name or a plain callable fails at construction)."""
    for spec in _leaves(loss):
        if spec is None or (isinstance(spec, str) and spec.lower() in CROSSENTROPY_ALIASES):
            continue
        resolve_loss(spec)


def torchmetrics_in(*specs: Any) -> list[torchmetrics.Metric]:
    """The ``torchmetrics.Metric`` objects among metric specs (registered as submodules)."""
    leaves = (leaf for spec in specs for leaf in _leaves(spec))
    return [leaf for leaf in leaves if isinstance(leaf, torchmetrics.Metric)]
