"""What a Keras model brings with it, adopted as Keras' own ``fit()`` adopts it.

The one place where the module reads a Keras model's training contract: which of ``fit``'s
methods the model's class overrides (``train_step``, ``test_step``, ``compute_loss``), how its
``compute_loss`` is called, the ``data`` Keras hands a ``train_step``, and the arguments its
``compile()`` received (optimizer, loss, loss weights, metrics), which fill every argument the
module was not given.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import ConfigurationError
from keras_lightning.losses import KerasLoss, TorchLoss
from keras_lightning.specs import torchmetrics_in

import functools
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torchmetrics

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import Arguments

__all__ = [
    "adopt_compile_config",
    "as_keras_data",
    "check_compute_loss_arguments",
    "compute_loss_takes_training",
    "model_compute_loss",
    "overrides_step",
    "own_metrics",
]

#: Where Keras defines the default ``train_step``, ``compute_loss``, ``predict_step``...: a
#: method defined anywhere else (a user class, ``keras.distillation.Distiller``, a keras_hub
#: task such as ``RetinaNetObjectDetector``) is the model's own, which Keras' ``fit`` calls.
_KERAS_BASE_MODULES = ("keras.src.trainers.", "keras.src.backend.", "keras.src.models.")


def overrides_step(model: Any, name: str) -> bool:
    """True when ``model``'s class defines ``name`` (``"train_step"``, ``"compute_loss"``) itself.

    A method inherited from Keras' base classes (``keras.Model``, ``Sequential``,
    ``Functional``) does not count; one defined in any other class does, as Keras' ``fit``
    calls it: a user's, ``keras.distillation.Distiller``'s, a keras_hub task's.

    Example:
        >>> import keras
        >>> class MyModel(keras.Model):
        ...     def train_step(self, data):
        ...         return {}
        >>> overrides_step(MyModel(), "train_step"), overrides_step(MyModel(), "test_step")
        (True, False)
        >>> overrides_step(keras.Sequential(), "train_step")
        False

    """
    cls: Any = type(model)
    return bool(_class_overrides(cls, name))


@functools.lru_cache(maxsize=256)
def _class_overrides(cls: Any, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            return not klass.__module__.startswith(_KERAS_BASE_MODULES)
    return False


def check_compute_loss_arguments(model: Any, arguments: Arguments) -> None:
    """Refuse module arguments a model's own ``compute_loss`` would silently ignore.

    Raises:
        ConfigurationError: ``loss=`` or ``loss_weights=`` was given to the module for a
            model whose class overrides ``compute_loss``.

    """
    given = [name for name in ("loss", "loss_weights") if name in arguments.given]
    if given and overrides_step(model, "compute_loss"):
        raise ConfigurationError(
            f"KerasLightningModule({given[0]}=...) is not used: the Keras model "
            f"{type(model).__name__} overrides compute_loss, which defines the training "
            "objective, as in Keras' fit(). Drop `" + given[0] + "=` from the module; a "
            "compute_loss that calls super().compute_loss(...) uses what model.compile("
            f"{given[0]}=...) was given."
        )


def own_metrics(model: Any) -> list[Any]:
    """The Keras metrics the model updates itself, which Keras' ``fit`` logs: ``model.metrics``
    without the trackers ``compile()`` made for Keras' own loop.

    A tracker set as an attribute and updated in ``compute_loss`` or ``call``, or what a
    ``metrics`` property override lists (Keras' ``compute_loss`` example).
    """
    skip = {id(metric) for metric in _private.keras_fit_trackers(model)}
    return [metric for metric in model.metrics if id(metric) not in skip]


def model_compute_loss(
    model: Any,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    training: bool,
    pass_training: bool,
) -> torch.Tensor:
    """Call the model's own ``compute_loss`` as Keras' ``train_step`` / ``test_step`` do.

    Keras calls ``compute_loss(x, y, y_pred, sample_weight, training=...)``, leaving out
    ``training`` for an override without that parameter (written before Keras 3.3):
    ``pass_training`` is :func:`compute_loss_takes_training`, decided once.

    Raises:
        ConfigurationError: ``compute_loss`` returned None, or needs ``x`` and got None.

    """
    if x is None:
        raise ConfigurationError(
            f"{type(model).__name__} overrides compute_loss(x, y, y_pred, sample_weight), "
            "which Keras calls with the batch's inputs x; this call gave none. Pass them: "
            "self.compute_loss(y_pred, y, sample_weight, x=x)."
        )
    if pass_training:
        loss = model.compute_loss(x, y, y_pred, sample_weight, training=training)
    else:
        loss = model.compute_loss(x, y, y_pred, sample_weight)
    if loss is None:
        raise ConfigurationError(
            f"{type(model).__name__}.compute_loss(x, y, y_pred, sample_weight) returned None, "
            "so there is no loss to minimize. Return the scalar loss tensor."
        )
    return loss


def compute_loss_takes_training(model: Any) -> bool:
    """Whether Keras passes ``training=`` to this model's ``compute_loss``: Keras' own test,
    a parameter named ``training`` (``**kwargs`` does not count).
    """
    try:
        return "training" in inspect.signature(type(model).compute_loss).parameters
    except (TypeError, ValueError):
        return True


def as_keras_data(batch: Any) -> Any:
    """The ``data`` Keras' ``fit`` would pass to ``train_step`` / ``test_step`` for this batch.

    A DataLoader collates ``TensorDataset`` items into lists, where Keras' adapters give
    tuples: lists become tuples. A batch of one element is that element, as ``fit(x)``
    hands ``train_step`` its ``x`` unwrapped (Keras packs a lone ``x`` without a tuple).
    Anything else (a tensor, a dict) is passed as it is.

    Example:
        >>> as_keras_data(["x"]), as_keras_data(["x", "y"]), as_keras_data({"a": 1})
        ('x', ('x', 'y'), {'a': 1})

    """
    if isinstance(batch, list | tuple):
        return batch[0] if len(batch) == 1 else tuple(batch)
    return batch


def adopt_compile_config(model: Any, arguments: Arguments) -> list[torchmetrics.Metric] | None:
    """Fill the arguments the module was not given from ``model.compile()``'s.

    A plain function given to ``compile(loss=...)`` is a Keras loss (Keras calls it
    ``fn(y_true, y_pred)``), so it is adopted marked as one; a plain callable passed to the
    module itself is still refused as ambiguous.

    Returns:
        The torchmetrics among adopted metrics (to register), or ``None`` when the metrics
        were not adopted.

    """
    if not getattr(model, "compiled", False):
        return None
    config = _private.compile_config(model)
    if arguments.optimizer is None and getattr(model, "optimizer", None) is not None:
        arguments.optimizer = model.optimizer
    if arguments.loss is None and config.get("loss") is not None:
        arguments.loss = _as_keras_losses(config["loss"])
        if arguments.loss_weights is None:
            arguments.loss_weights = config.get("loss_weights")
    if arguments.metrics is not None or arguments.weighted_metrics is not None:
        return None
    arguments.metrics = config.get("metrics")
    arguments.weighted_metrics = config.get("weighted_metrics")
    return torchmetrics_in(arguments.metrics, arguments.weighted_metrics)


def _as_keras_losses(spec: Any) -> Any:
    """``compile(loss=...)``'s plain callables marked as Keras losses; the rest unchanged."""
    if isinstance(spec, Mapping):
        return {key: _as_keras_losses(value) for key, value in spec.items()}
    if isinstance(spec, list | tuple):
        return type(spec)(_as_keras_losses(value) for value in spec)
    if spec is None or isinstance(spec, str | KerasLoss | TorchLoss | type):
        return spec
    if isinstance(spec, torch.nn.Module) or not callable(spec):
        return spec
    module = getattr(spec, "__module__", None) or type(spec).__module__ or ""
    if module.startswith("keras"):  # Keras' own losses: resolved (and stored) as they are
        return spec
    return KerasLoss(spec)
