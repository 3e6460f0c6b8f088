"""What Lightning's own tools need to see a Keras model as they see a torch one.

Keras' torch backend registers every variable of a layer as a ``torch.nn.Parameter``: the
weights, and also its non-trainable state (``BatchNormalization``'s moving statistics, the
integer states of ``SeedGenerator``). Lightning's tools treat every parameter as a weight.
This module gives them the Keras view: :func:`weights_module` for the fine-tuning callbacks,
:class:`KerasModelSummary` for ``ModelSummary``, :class:`StochasticWeightAveraging` for SWA.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning._private import parameter_of
from keras_lightning.exceptions import ConfigurationError, KerasLightningTypeError

import math
from collections import OrderedDict
from typing import Any

import keras
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging as _LightningSWA
from lightning.pytorch.utilities.model_summary import LayerSummary, ModelSummary

__all__ = [
    "KerasModelSummary",
    "KerasWeights",
    "StochasticWeightAveraging",
    "check_lightning_callbacks",
    "refresh_swa_copies",
    "show_keras_layers_in_summaries",
    "weights_module",
]


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

    @property
    def in_size(self) -> Any:
        return _symbolic_shape(self._layer, "input")

    @property
    def out_size(self) -> Any:
        return _symbolic_shape(self._layer, "output")


def _symbolic_shape(layer: Any, which: str) -> Any:
    """Keras' own record of a layer's input / output shape (``None`` batch), or ``"?"``."""
    try:
        tensors = getattr(layer, which)
    except (AttributeError, ValueError):  # called several times, or never symbolically
        tensors = getattr(layer, f"{which}s", None)  # a Sequential model's inputs / outputs
        if not tensors:
            return "?"
    shapes = [list(t.shape) for t in keras.tree.flatten(tensors) if hasattr(t, "shape")]
    if not shapes:
        return "?"
    return shapes[0] if len(shapes) == 1 else shapes


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


# ---------------------------------------------------------------------- StochasticWeightAveraging


def _averaged_pairs(average: Any, live: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (averaged, live) parameter pairs SWA averages: weights, not Keras' state.

    For a ``KerasLightningModule``: the Keras model's weights that can train (in
    ``model.variables`` order) and any torch parameters of the module beside it; moving
    statistics are recomputed afterwards and seed states are left alone.
    """
    models: list[Any] = [getattr(module, "model", None) for module in (average, live)]
    if not all(isinstance(m, keras.Model) for m in models):
        return list(zip(average.parameters(), live.parameters(), strict=False))
    pairs = []
    for module, model in zip((average, live), models, strict=True):
        keras_ids = {id(parameter_of(v)) for v in model.variables}
        weights = [parameter_of(v) for v in _private.weights_that_can_train(model)]
        weights += [p for p in module.parameters() if id(p) not in keras_ids]
        pairs.append(weights)
    return list(zip(pairs[0], pairs[1], strict=True))


def _keras_batchnorms(module: Any) -> list[Any]:
    model = getattr(module, "model", None)
    if not isinstance(model, keras.Model):
        return []
    return [
        layer
        for layer in _private.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def has_keras_state(module: Any) -> bool:
    """True when the module's Keras model holds variables that are not weights (SWA's concern)."""
    model = getattr(module, "model", None)
    if not isinstance(model, keras.Model):
        return False
    weights = {id(v) for v in _private.weights_that_can_train(model)}
    return any(id(v) not in weights for v in model.variables)


class StochasticWeightAveraging(_LightningSWA):
    """Lightning's ``StochasticWeightAveraging`` for a Keras model (same arguments).

    Lightning's averages every torch parameter and recomputes the statistics of torch
    ``BatchNorm`` modules only. On a Keras model that would average the integer
    ``SeedGenerator`` states and the ``BatchNormalization`` moving statistics as if they
    were weights, and never recompute the statistics: the module refuses it there, naming
    this class. This one averages the weights only, and in the extra epoch Lightning adds
    for batch norm it recomputes each Keras ``BatchNormalization`` layer's moving mean and
    variance as the plain average over that epoch's batches (the statistics of the
    averaged weights, as ``torch.optim.swa_utils.update_bn`` does for torch).

    It also ends at the average: Lightning's own SWA, on a plain module with ``BatchNorm``,
    applies the last training batch's stale gradients once at the end of the statistics
    epoch, so its final weights are not the average (``tests/test_finetuning.py``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keras_momenta: dict[int, tuple[Any, float]] = {}
        self._keras_batches: int | None = None  # batches seen in the statistics epoch

    @staticmethod
    def pl_module_contains_batch_norm(pl_module: Any) -> bool:  # noqa: D102 (Lightning's)
        return bool(_keras_batchnorms(pl_module)) or _LightningSWA.pl_module_contains_batch_norm(
            pl_module
        )

    @staticmethod
    def update_parameters(  # noqa: D102 (Lightning's)
        average_model: Any, model: Any, n_averaged: torch.Tensor, avg_fn: Any
    ) -> None:
        for p_swa, p_model in _averaged_pairs(average_model, model):
            device = p_swa.device
            p_swa_, p_model_ = p_swa.detach(), p_model.detach().to(device)
            src = p_model_ if n_averaged == 0 else avg_fn(p_swa_, p_model_, n_averaged.to(device))
            p_swa_.copy_(src)
        n_averaged += 1

    @staticmethod
    def transfer_weights(src_pl_module: Any, dst_pl_module: Any) -> None:  # noqa: D102
        for src, dst in _averaged_pairs(src_pl_module, dst_pl_module):
            dst.detach().copy_(src.to(dst.device))

    def reset_batch_norm_and_save_state(self, pl_module: Any) -> None:  # noqa: D102
        # The statistics epoch skips backward and zero_grad, then steps once at its end:
        # the last training batch's gradients, still there, would move the averaged
        # weights (Lightning's own SWA does so on a plain module too). Drop them.
        for param in pl_module.parameters():
            param.grad = None
        super().reset_batch_norm_and_save_state(pl_module)
        self._keras_momenta = {}
        for layer in _keras_batchnorms(pl_module):
            layer.moving_mean.assign(keras.ops.zeros_like(layer.moving_mean))
            layer.moving_variance.assign(keras.ops.ones_like(layer.moving_variance))
            self._keras_momenta[id(layer)] = (layer, layer.momentum)
        self._keras_batches = 0

    def on_train_batch_start(  # noqa: D102 (Lightning's)
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._keras_batches is None:
            return
        # the k-th batch weighs 1/k: moving = moving * (k-1)/k + batch / k, a plain mean
        for layer, _ in self._keras_momenta.values():
            layer.momentum = self._keras_batches / (self._keras_batches + 1)
        self._keras_batches += 1

    def reset_momenta(self) -> None:  # noqa: D102 (Lightning's)
        super().reset_momenta()
        for layer, momentum in self._keras_momenta.values():
            layer.momentum = momentum
        self._keras_momenta = {}
        self._keras_batches = None


def check_lightning_callbacks(callbacks: Any, module: Any) -> None:
    """Refuse the Lightning callbacks that would do nothing, or the wrong thing, on a Keras model.

    Raises:
        ConfigurationError: ``StochasticWeightAveraging`` (Lightning's class itself) on a
            model with ``BatchNormalization`` statistics or ``SeedGenerator`` states;
            ``ModelPruning`` (its masks act through torch modules' forward hooks, and Keras
            layers are not called as torch modules: a pruned weight would still be used).

    """
    from lightning.pytorch.callbacks import ModelPruning

    for callback in callbacks:
        if isinstance(callback, ModelPruning) and getattr(module, "model", None) is not None:
            raise ConfigurationError(
                "Lightning's ModelPruning cannot prune a Keras model: it masks a torch "
                "module's weight through a forward pre-hook, and Keras layers are not called "
                "as torch modules, so the forward would keep using the unpruned weights (and "
                "it finds no torch layer to prune). Remove the callback; to zero weights, "
                "write them from a callback (layer.kernel.assign(layer.kernel * mask)) "
                "after each optimizer step."
            )
        if type(callback) is _LightningSWA and has_keras_state(module):
            raise ConfigurationError(
                "Lightning's StochasticWeightAveraging averages every torch parameter and "
                "recomputes torch BatchNorm statistics only; this Keras model holds other "
                "state as parameters (BatchNormalization moving statistics, SeedGenerator "
                "states), which it would average as weights and never recompute. Use "
                "kl.StochasticWeightAveraging(...) with the same arguments."
            )


def refresh_swa_copies(callbacks: Any, module: Any) -> None:
    """Give SWA callbacks a copy of the module with its model, once a factory built it.

    Lightning's SWA copies the module in ``setup``, before ``configure_model`` runs: a module
    built from a factory has no model yet there, and averaging would then do nothing.
    """
    for callback in callbacks:
        if isinstance(callback, _LightningSWA):
            _private.refresh_average_model(callback, module)
