"""What each argument of ``KerasLightningModule`` accepts, as types.

These are the annotations of the public API; :mod:`~keras_lightning.losses`,
:mod:`~keras_lightning.metrics` and :mod:`~keras_lightning.optimizers` check the values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

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
