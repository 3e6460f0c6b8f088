"""Losses from Keras and torch behind one calling convention.

Inside this package every loss is called ``loss(y_pred, y_true, sample_weight=None)`` and
returns a scalar tensor. Keras losses are called ``fn(y_true, y_pred)``; the swap happens in
exactly one place, :meth:`KerasLoss.__call__`. Torch losses are called ``fn(input, target)``
directly, never through Keras' casting (which would turn int64 class labels into floats).
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import (
    ConfigurationError,
    KerasLightningTypeError,
    class_given,
    did_you_mean,
)

import copy
import inspect
from collections.abc import Callable
from typing import Any

import keras
import torch

#: Loss and metric names that Keras resolves from the shapes of the first batch.
CROSSENTROPY_ALIASES = ("crossentropy", "ce")


class KerasLoss:
    """A Keras loss (``fn(y_true, y_pred)``) adapted to ``loss(y_pred, y_true, sample_weight)``.

    Args:
        fn: A ``keras.losses.Loss`` object or a function called ``fn(y_true, y_pred)``.
        name: The name used when the loss is logged per output.

    Example:
        >>> import keras_lightning as kl
        >>> import torch
        >>> loss = kl.keras_loss(lambda y_true, y_pred: (y_true - y_pred) ** 2)
        >>> float(loss(torch.tensor([[1.0]]), torch.tensor([[3.0]])))
        4.0

    """

    convention = "keras"

    def __init__(self, fn: Any, name: str | None = None) -> None:
        if isinstance(fn, keras.losses.Loss):
            self.loss = fn
        else:
            self.loss = _private.loss_function_wrapper(fn, name or _object_name(fn))
        self.name = name or self.loss.name

    def __call__(
        self, y_pred: Any, y_true: Any, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the loss of ``y_pred`` against ``y_true``, in this package's order."""
        # The one place where this package's (y_pred, y_true) order becomes Keras' order.
        return self.loss(y_true, y_pred, sample_weight=sample_weight)

    def __repr__(self) -> str:
        return f"keras_loss({self.loss!r})"


class TorchLoss:
    """A torch loss (``fn(input, target)``) adapted to ``loss(y_pred, y_true, sample_weight)``.

    Without ``sample_weight`` the loss is called exactly as given. With it, the loss is computed
    per element (``reduction="none"``), averaged to one value per sample, weighted, and divided
    by the batch size: Keras' ``"sum_over_batch_size"`` convention.

    Args:
        fn: A ``torch.nn`` loss module, a ``torch.nn.functional`` loss, or a function called
            ``fn(input, target)``.
        name: The name used when the loss is logged per output.

    Example:
        >>> import keras_lightning as kl
        >>> import torch
        >>> loss = kl.torch_loss(torch.nn.CrossEntropyLoss())
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> labels = torch.tensor([0, 1])
        >>> round(float(loss(logits, labels)), 4)
        0.1269

    """

    convention = "torch"

    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or _object_name(fn)
        self._unreduced: Callable[..., torch.Tensor] | None = None

    def __call__(
        self, y_pred: Any, y_true: Any, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the loss of ``y_pred`` against ``y_true``, in this package's order."""
        if sample_weight is None:
            return self.fn(y_pred, y_true)
        per_element = self._per_element_loss()(y_pred, y_true)
        per_sample = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
        weights = sample_weight.reshape(sample_weight.shape[0], -1).mean(dim=1)
        return (per_sample * weights.to(per_sample.dtype)).sum() / per_sample.shape[0]

    def _per_element_loss(self) -> Callable[..., torch.Tensor]:
        if self._unreduced is not None:
            return self._unreduced
        fn = self.fn
        if isinstance(fn, torch.nn.Module) and hasattr(fn, "reduction"):
            unreduced = copy.copy(fn)
            setattr(unreduced, "reduction", "none")  # noqa: B010 (typed as a tensor)
            self._unreduced = unreduced
        elif _accepts_keyword(fn, "reduction"):
            self._unreduced = lambda y_pred, y_true: fn(y_pred, y_true, reduction="none")
        else:
            raise ConfigurationError(
                f"sample_weight or class_weight was given, but the torch loss {self.name!r} "
                "cannot compute one loss per sample: it has no `reduction` argument. Pass a "
                "torch loss that accepts reduction='none' (e.g. torch.nn.CrossEntropyLoss()), "
                "or drop the sample weights."
            )
        return self._unreduced

    def __repr__(self) -> str:
        return f"torch_loss({self.fn!r})"


LossAdapter = KerasLoss | TorchLoss


def keras_loss(fn: Callable[..., Any], name: str | None = None) -> KerasLoss:
    """Mark ``fn`` as a Keras-style loss, called ``fn(y_true, y_pred)``.

    Example:
        >>> import keras_lightning as kl
        >>> kl.keras_loss(lambda y_true, y_pred: abs(y_true - y_pred)).convention
        'keras'

    """
    _check_callable(fn, "keras_loss")
    return KerasLoss(fn, name=name)


def torch_loss(fn: Callable[..., Any], name: str | None = None) -> TorchLoss:
    """Mark ``fn`` as a torch-style loss, called ``fn(y_pred, y_true)``.

    Example:
        >>> import keras_lightning as kl
        >>> kl.torch_loss(lambda y_pred, y_true: abs(y_pred - y_true)).convention
        'torch'

    """
    _check_callable(fn, "torch_loss")
    return TorchLoss(fn, name=name)


def resolve_loss(
    identifier: Any, y_true: Any = None, y_pred: Any = None, argument: str = "loss"
) -> LossAdapter:
    """Turn what a user passed as a loss into an adapter with the package's convention.

    Args:
        identifier: A Keras loss name, ``keras.losses.Loss``, Keras loss function, torch loss
            module or ``torch.nn.functional`` loss, or an already marked loss.
        y_true: Targets of the first batch, used to resolve ``"crossentropy"`` as Keras does.
        y_pred: Model output of the first batch, likewise.
        argument: The argument name shown in error messages.

    Raises:
        ConfigurationError: Unknown loss name.
        KerasLightningTypeError: A callable whose calling convention cannot be known.

    """
    if isinstance(identifier, KerasLoss | TorchLoss):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, keras.losses.Loss):
        return KerasLoss(identifier())  # as Keras' compile does with a loss class
    if isinstance(identifier, type) and issubclass(identifier, torch.nn.Module):
        raise class_given(argument, identifier, f"torch.nn.{identifier.__name__}()")
    if isinstance(identifier, str):
        return _resolve_loss_name(identifier, y_true, y_pred, argument)
    if isinstance(identifier, keras.losses.Loss):
        return KerasLoss(identifier)
    if _private.is_torch_loss_module(identifier):
        return TorchLoss(identifier)
    if callable(identifier) and _is_torch_functional(identifier):
        return TorchLoss(identifier)
    if callable(identifier) and _module_of(identifier).startswith("keras"):
        return KerasLoss(identifier)
    if callable(identifier):
        raise KerasLightningTypeError(
            f"`{argument}={_object_name(identifier)}` is a plain callable, and its argument order "
            "cannot be known: Keras losses are called fn(y_true, y_pred), torch losses "
            "fn(y_pred, y_true). Mark it: "
            f"`{argument}=kl.keras_loss(fn)` if it is called fn(y_true, y_pred), or "
            f"`{argument}=kl.torch_loss(fn)` if it is called fn(y_pred, y_true)."
        )
    raise KerasLightningTypeError(
        f"`{argument}` must be a Keras loss name (e.g. 'mse'), a keras.losses.Loss, a torch loss "
        "(e.g. torch.nn.CrossEntropyLoss()), or a callable marked with kl.keras_loss / "
        f"kl.torch_loss. Received: {argument}={identifier!r} of type {type(identifier).__name__}."
    )


def _resolve_loss_name(name: str, y_true: Any, y_pred: Any, argument: str) -> KerasLoss:
    if name.lower() in CROSSENTROPY_ALIASES:
        if y_true is None or y_pred is None:
            raise ConfigurationError(
                f"`{argument}={name!r}` is resolved from the shapes of the first batch; "
                "resolve it with y_true and y_pred."
            )
        return KerasLoss(_private.compile_loss(name, y_true, y_pred), name=name)
    try:
        fn = keras.losses.get(name)
    except (ValueError, TypeError):
        fn = None
    if fn is None:
        hint = did_you_mean(name, _private.keras_loss_names())
        raise ConfigurationError(
            f"`{argument}={name!r}` is not a Keras loss name.{hint} Known names include "
            "'mse', 'mae', 'binary_crossentropy', 'categorical_crossentropy', "
            "'sparse_categorical_crossentropy', 'huber'; or pass a loss object such as "
            "keras.losses.MeanSquaredError() or torch.nn.MSELoss()."
        )
    return KerasLoss(fn, name=name)


def _is_torch_functional(fn: Any) -> bool:
    return (
        _module_of(fn) in ("torch.nn.functional", "torch._C._nn")
        or fn in vars(torch.nn.functional).values()
    )


def _module_of(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    if module is None:
        module = type(fn).__module__
    return module or ""


def _object_name(fn: Any) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None)
    return str(name or type(fn).__name__)


def _accepts_keyword(fn: Any, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_callable(fn: Any, marker: str) -> None:
    if not callable(fn):
        raise KerasLightningTypeError(
            f"`kl.{marker}(fn)` expects a callable loss; received {fn!r} of type "
            f"{type(fn).__name__}."
        )
