"""Devices: where Keras creates tensors, where the module lives, and forked workers.

Keras' torch backend picks one device at import (``KERAS_TORCH_DEVICE``, else CUDA when
available, else the CPU) and puts every new tensor there. Lightning chooses the device per
process. Everything that reconciles the two is here: running Keras under the module's device
(:func:`keras_device`), moving Keras variables (:func:`place_variables`), putting the module on
its strategy's device before ``configure_model`` builds a model from a factory
(:func:`move_to_lightning_device`), and refusing a ``ddp_notebook`` fork whose parent used
CUDA (:func:`check_fork`).
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning._private import parameter_of
from keras_lightning.exceptions import ConfigurationError

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import torch

__all__ = [
    "check_fork",
    "fork_error",
    "keras_default_device",
    "keras_device",
    "move_to_lightning_device",
    "parameter_of",
    "place_variables",
    "same_device",
]


def place_variables(variables: Iterable[Any], device: torch.device) -> None:
    """Move Keras variables to ``device`` in place (same Parameter objects, new storage)."""
    for variable in variables:
        param = parameter_of(variable)
        if param.device != device:
            param.data = param.data.to(device)


def move_to_lightning_device(module: torch.nn.Module, trainer: Any) -> None:
    """Put ``module`` on its strategy's device before ``configure_model`` builds Keras there.

    Lightning moves the module only after ``configure_model``; until then its ``device`` is
    the CPU, so a factory would build the Keras model on the CPU (and tensors a layer keeps
    outside its variables would stay there). Only for the strategies that move the whole
    module anyway (single device, DDP and its spawn / fork variants).
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
        module.to(strategy.root_device)


@contextlib.contextmanager
def keras_device(device: torch.device | None) -> Iterator[None]:
    """Run Keras under ``device`` (no scope when it is Keras' default device already).

    Example:
        >>> import torch
        >>> with keras_device(torch.device("cpu")):
        ...     keras.ops.ones(2).device.type
        'cpu'

    """
    if device is None or same_device(device, keras_default_device()):
        yield
        return
    name = str(device) if device.index is not None or device.type == "cpu" else device.type
    with keras.device(name):
        yield


def keras_default_device() -> torch.device:
    """The device Keras would place new tensors on, outside any ``keras.device`` scope."""
    device = torch.device(_private.keras_default_device_name())
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` are the same device (``cuda`` means ``cuda:0``).

    Example:
        >>> same_device(torch.device("cuda"), torch.device("cuda", 0))
        True

    """
    if a.type != b.type:
        return False
    return a.type == "cpu" or (a.index or 0) == (b.index or 0)


def fork_error(model_given_built: bool, bad_fork: bool) -> ConfigurationError | None:
    """The error to raise in a forked worker whose parent initialized CUDA, or None.

    Args:
        model_given_built: The module was given a Keras model object (not a factory).
        bad_fork: Whether this process was forked from a CUDA-initialized parent.

    """
    if not bad_fork:
        return None
    if model_given_built:
        return ConfigurationError(
            "CUDA was initialized in the notebook (parent) process before "
            "Trainer(strategy='ddp_notebook') forked, so the forked workers cannot use the GPU. "
            "Building a Keras model in the notebook does that: Keras creates its variables on "
            "the GPU. Pass a factory instead of a built model, so that each worker builds the "
            "model on its own GPU: KerasLightningModule(lambda: build_model(), ...) or "
            "KerasLightningModule(build_model, ...); then restart the kernel."
        )
    return ConfigurationError(
        "CUDA was initialized in the notebook (parent) process before "
        "Trainer(strategy='ddp_notebook') forked, so the forked workers cannot use the GPU. "
        "Remove every CUDA call made before trainer.fit (torch.cuda.*, .cuda(), building Keras "
        "models or tensors in the notebook) and restart the kernel."
    )


def check_fork(model_given_built: bool) -> None:
    """Raise :func:`fork_error` when this is a forked worker of a CUDA-initialized parent."""
    error = fork_error(model_given_built, _private.in_bad_cuda_fork())
    if error is not None:
        raise error
