"""What Lightning's own tools need to see a Keras model as they see a torch one.

Keras' torch backend registers every variable of a layer as a ``torch.nn.Parameter``: the
weights, and also its non-trainable state (``BatchNormalization``'s moving statistics, the
integer states of ``SeedGenerator``). Lightning's tools treat every parameter as a weight.
This module gives them the Keras view: :func:`weights_module` for the fine-tuning callbacks,
:class:`KerasModelSummary` for ``ModelSummary``.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning._private import parameter_of
from keras_lightning.exceptions import KerasLightningTypeError

import math
from collections import OrderedDict
from typing import Any

import keras
import torch
from lightning.pytorch.utilities.model_summary import LayerSummary, ModelSummary

__all__ = ["KerasModelSummary", "KerasWeights", "show_keras_layers_in_summaries", "weights_module"]


class KerasWeights(torch.nn.Module):
    """A torch module whose parameters are exactly a Keras layer's weights.

    See :func:`weights_module`.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.layer_name = layer.name
        self.weights = torch.nn.ParameterList(
            [parameter_of(v) for v in _private.weights_that_can_train(layer)]
        )

    def extra_repr(self) -> str:  # noqa: D102 (torch's)
        return f"layer={self.layer_name!r}, weights={len(self.weights)}"


def weights_module(layer: Any) -> KerasWeights:
    """The weights of a Keras layer (or model) as a ``torch.nn.Module``, for Lightning's
    fine-tuning callbacks.

    Lightning's ``BackboneFinetuning`` and ``BaseFinetuning.freeze`` / ``make_trainable`` set
    ``requires_grad`` on every parameter of a module. On a Keras layer those include its
    ``SeedGenerator`` states (integers: ``requires_grad = True`` raises) and its
    ``BatchNormalization`` moving statistics (which would join the optimizer). This module
    holds the same Parameter objects as the layer's weights, nothing else, so freezing and
    unfreezing it freezes and unfreezes the layer's weights. Return it from a ``backbone``
    property (a property: an attribute would register the layer a second time)::

        class Module(kl.KerasLightningModule):
            @property
            def backbone(self):
                return kl.weights_module(self.model.get_layer("backbone"))

    Args:
        layer: A built Keras layer or model.

    Raises:
        KerasLightningTypeError: ``layer`` is not a Keras layer.

    Example:
        >>> import keras
        >>> import keras_lightning as kl
        >>> layer = keras.layers.BatchNormalization()
        >>> layer.build((None, 3))
        >>> len(list(layer.parameters())), len(list(kl.weights_module(layer).parameters()))
        (4, 2)

    """
    if not isinstance(layer, keras.layers.Layer):
        raise KerasLightningTypeError(
            "weights_module(layer) expects a Keras layer or model, e.g. "
            f"module.model.get_layer('backbone'); received {type(layer).__name__}."
        )
    return KerasWeights(layer)


# ---------------------------------------------------------------------- ModelSummary


def _weight_count(variables: Any) -> int:
    return sum(math.prod(tuple(v.shape)) for v in variables)


class _KerasLayerSummary(LayerSummary):
    """A row of a Keras layer: Keras' class name and Keras' parameter count (its weights)."""

    def __init__(self, layer: Any, training: bool) -> None:
        super().__init__(layer)
        self._layer = layer
        self._training = training

    @property
    def layer_type(self) -> str:
        return type(self._layer).__name__

    @property
    def num_parameters(self) -> int:
        return _weight_count(self._layer.weights)

    @property
    def training(self) -> bool:
        return self._training


def _keras_rows(layer: Any, prefix: str) -> list[tuple[str, Any, bool]]:
    rows = []
    for sub in getattr(layer, "layers", None) or ():
        rows.append((f"{prefix}.{sub.name}", sub, True))
        rows += _keras_rows(sub, f"{prefix}.{sub.name}")
    return rows


class KerasModelSummary(ModelSummary):
    """Lightning's ``ModelSummary`` of a ``KerasLightningModule``: one row per Keras layer.

    Lightning's own lists torch submodules, which for a Keras model are Keras' internals
    (``model._functional._torch_params``), and counts every torch parameter, the integer states
    of ``SeedGenerator`` included. This one has a row for the Keras model at depth 1 and one per
    Keras layer below it (``model.dense``, ``model.backbone.conv1`` ...), with Keras' counts:
    the totals are those of Keras' ``model.summary()`` (weights, moving statistics included, no
    seeds), trainable meaning trainable in Keras and requiring gradients. Other submodules of
    the module (torchmetrics, torch layers a subclass adds) keep Lightning's rows.

    The Trainer's ``ModelSummary`` / ``RichModelSummary`` callbacks show this one for a
    ``KerasLightningModule``; ``print(kl.KerasModelSummary(module, max_depth=2))`` prints it.
    """

    def __init__(self, model: Any, max_depth: int = 1) -> None:
        self._host = model  # Lightning's own names for these are private
        self._depth = max_depth
        super().__init__(model, max_depth)

    def _keras_model(self) -> Any:
        model = getattr(self._host, "model", None)
        return model if isinstance(model, keras.Model) else None

    def _rows(self) -> list[tuple[str, Any, bool]]:
        """``(name, module or Keras layer, is_keras)`` for every row, in order, all depths."""
        model = self._keras_model()
        rows: list[tuple[str, Any, bool]] = []
        for name, child in self._host.named_children():
            if child is model:
                rows.append((name, child, True))
                rows += _keras_rows(child, name)
            else:
                rows.append((name, child, False))
                rows += [(f"{name}.{n}", m, False) for n, m in child.named_modules() if n]
        return rows

    def summarize(self) -> dict[str, LayerSummary]:  # noqa: D102 (Lightning's)
        if self._keras_model() is None:
            return super().summarize()
        training = self._host.training
        summary: dict[str, LayerSummary] = OrderedDict()
        for name, module, is_keras in self._rows():
            if self._depth == 0 or (self._depth > 0 and name.count(".") >= self._depth):
                continue
            row = _KerasLayerSummary(module, training) if is_keras else LayerSummary(module)
            summary[name] = row
        for layer in summary.values():
            layer.detach_hook()
        return summary

    def _counts(self) -> tuple[int, int]:
        model = self._keras_model()
        keras_ids = {id(parameter_of(v)) for v in model.variables}
        total = _weight_count(model.weights)
        trainable = _weight_count(
            [v for v in model.trainable_weights if parameter_of(v).requires_grad]
        )
        for param in self._host.parameters():  # torch parameters beside the Keras model
            if id(param) not in keras_ids:
                total += param.numel()
                trainable += param.numel() if param.requires_grad else 0
        return total, trainable

    @property
    def total_parameters(self) -> int:  # noqa: D102 (Lightning's)
        return super().total_parameters if self._keras_model() is None else self._counts()[0]

    @property
    def trainable_parameters(self) -> int:  # noqa: D102 (Lightning's)
        return super().trainable_parameters if self._keras_model() is None else self._counts()[1]

    @property
    def total_training_modes(self) -> dict[str, int]:  # noqa: D102 (Lightning's)
        if self._keras_model() is None:
            return super().total_training_modes
        modes = [
            module.training if not is_keras else self._host.training
            for _, module, is_keras in self._rows()
        ]
        return {"train": modes.count(True), "eval": modes.count(False)}


def show_keras_layers_in_summaries(callbacks: Any) -> None:
    """Make the Trainer's ``ModelSummary`` callbacks (Rich too) use :class:`KerasModelSummary`."""
    from lightning.pytorch.callbacks import ModelSummary as SummaryCallback

    for callback in callbacks:
        if isinstance(callback, SummaryCallback):
            _private.use_summary(callback, KerasModelSummary)
