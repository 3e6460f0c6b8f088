"""Hyperparameters that describe the Keras arguments, for loggers and checkpoints.

Lightning logs ``module.hparams`` with every logger (TensorBoard's HParams tab, MLflow params,
the CSV logger's ``hparams.yaml``) and stores them in checkpoints. A ``KerasLightningModule``
takes a model object and Keras objects, which ``save_hyperparameters()`` cannot describe, so
the module fills ``hparams["keras"]`` itself, with plain values: the model (class, name,
parameter counts), the optimizer (class, learning rate and scalar settings), the losses, the
metrics and the module's other arguments. It is refreshed when the Trainer has built the model
and the optimizers, before Lightning logs it; a subclass's own ``save_hyperparameters()``
entries are kept beside it.
"""

from __future__ import annotations

from keras_lightning._private import parameter_of

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import torch

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import Arguments

__all__ = ["KEY", "describe"]

#: The key of ``module.hparams`` this package writes.
KEY = "keras"


def describe(
    model: Any,
    arguments: Arguments,
    jit_compile: str | None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Plain values describing the module's Keras arguments (see the module docstring).

    Example:
        >>> import keras
        >>> from keras_lightning.builtin_steps import Arguments
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="mlp")
        >>> info = describe(model, Arguments(optimizer="adam", loss="mse"), None)
        >>> info["model_class"], info["model_params"], info["optimizer"], info["loss"]
        ('Sequential', 8, 'Adam', 'mse')

    """
    found: dict[str, Any] = {}
    if isinstance(model, keras.Model):
        found["model_class"] = type(model).__name__
        found["model_name"] = model.name
        found["model_params"] = _count(model.weights)
        found["model_trainable_params"] = _count(
            [v for v in model.trainable_weights if parameter_of(v).requires_grad]
        )
        found["dtype_policy"] = model.dtype_policy.name
    found.update(_optimizer(arguments.optimizer, optimizers))
    found["loss"] = _names(arguments.loss)
    found["metrics"] = _names(arguments.metrics)
    found["weighted_metrics"] = _names(arguments.weighted_metrics)
    found["loss_weights"] = _names(arguments.loss_weights)
    found["class_weight"] = _names(arguments.class_weight)
    found["lr_scheduler"] = ", ".join(type(s).__name__ for s in schedulers) or _names(
        arguments.lr_scheduler
    )
    found["jit_compile"] = jit_compile or False
    return found


def _count(variables: Sequence[Any]) -> int:
    return sum(math.prod(tuple(v.shape)) for v in variables)


def _optimizer(spec: Any, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    from keras_lightning.optimizers import KerasOptimizer

    keras_optimizer = None
    if optimizers and isinstance(optimizers[0], KerasOptimizer):
        keras_optimizer = optimizers[0].keras_optimizer
    elif isinstance(spec, keras.optimizers.Optimizer):
        keras_optimizer = spec
    elif isinstance(spec, str):
        return {"optimizer": _keras_name(spec)}
    if keras_optimizer is not None:
        found: dict[str, Any] = {"optimizer": type(keras_optimizer).__name__}
        try:  # reads the learning rate's value: not where it has none (a meta device)
            config = keras_optimizer.get_config()
            rate = float(keras.ops.convert_to_numpy(keras_optimizer.learning_rate))
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            return found
        for key, value in config.items():
            if key in ("name", "learning_rate"):
                continue
            if isinstance(value, bool | int | float | str):
                found[f"optimizer_{key}"] = value
        found["learning_rate"] = rate
        return found
    if optimizers:  # a torch optimizer: its class and the first group's settings
        optimizer = optimizers[0]
        found = {"optimizer": type(optimizer).__name__}
        for key, value in optimizer.param_groups[0].items():
            if key == "lr":
                found["learning_rate"] = float(value)
            elif key == "initial_lr":  # a scheduler's bookkeeping
                continue
            elif isinstance(value, bool | int | float | str):
                found[f"optimizer_{key}"] = value
            elif isinstance(value, tuple) and all(isinstance(v, float | int) for v in value):
                found[f"optimizer_{key}"] = str(value)
        return found
    return {"optimizer": _names(spec)}


def _keras_name(name: str) -> str:
    try:
        return type(keras.optimizers.get(name)).__name__
    except ValueError:
        return name


def _names(value: Any) -> str:
    """A short readable description: names for objects, keys kept for dicts."""
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_names(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_names(item) for item in value)
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, torch.nn.Module):  # torch losses, torchmetrics
        return type(value).__name__
    name = getattr(value, "name", None)  # Keras losses and metrics
    if isinstance(name, str):
        return name
    for attribute in ("fn", "function"):  # kl.keras_loss / kl.torch_loss, functools.partial
        inner = getattr(value, attribute, None)
        if callable(inner) and isinstance(getattr(inner, "__name__", None), str):
            return str(inner.__name__)
    if isinstance(getattr(value, "__name__", None), str):
        return str(value.__name__)
    return type(value).__name__
