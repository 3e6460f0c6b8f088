"""The training objective: per-output losses, loss weights, class and sample weights, and
``model.losses``, combined as Keras' ``compile`` defines it.
"""

from __future__ import annotations

from keras_lightning.data import (
    align_targets,
    class_weight_tensor,
    class_weights_for,
    per_output,
    weights_for_output,
    weights_per_output,
)
from keras_lightning.exceptions import BatchError, ConfigurationError, ShapeMismatchError
from keras_lightning.losses import LossAdapter, resolve_loss

from collections.abc import Mapping
from typing import Any

import torch


class Objective:
    """Computes ``sum_i w_i * loss_i(y_pred_i, y_i, sample_weight) + sum(model.losses)``.

    Loss specs are resolved on the first batch (Keras resolves ``"crossentropy"`` from the
    shapes it sees); after that each call is a loop over the outputs.

    Args:
        loss: One loss for every output, a list (one per output) or a dict by output name.
        loss_weights: Scalar coefficients, as a list or a dict by output name.
        class_weight: ``{class_index: weight}``, for single-output models.

    """

    def __init__(
        self,
        loss: Any,
        loss_weights: Any = None,
        class_weight: Mapping[int, float] | None = None,
    ) -> None:
        self.loss_spec = loss
        self.loss_weights_spec = loss_weights
        self.class_weight = class_weight
        self._class_table = class_weight_tensor(class_weight) if class_weight else None
        self.names: list[str] | None = None
        self.losses: list[LossAdapter | None] = []
        self.weights: list[float] = []
        self._expects: list[bool] = []  # fixed by resolve(): read on every batch

    @property
    def resolved(self) -> bool:
        """True once the first batch fixed the output names and losses."""
        return self.names is not None

    def resolve(self, names: list[str], y: Any, y_pred: list[Any]) -> None:
        """Bind the loss specs to the model's outputs (``y``: the first batch's targets)."""
        specs = (
            per_output(self.loss_spec, names, "loss")
            if self.loss_spec is not None
            else [None for _ in names]
        )
        if y is None:
            y_true: list[Any] = [None for _ in names]
        else:
            y_true = align_targets(y, names, expects=[spec is not None for spec in specs])
        self.losses = [
            None if spec is None else resolve_loss(spec, y_true[i], y_pred[i])
            for i, spec in enumerate(specs)
        ]
        if self.loss_weights_spec is None:
            self.weights = [1.0 for _ in names]
        else:
            weights = per_output(self.loss_weights_spec, names, "loss_weights")
            self.weights = [1.0 if w is None else float(w) for w in weights]
        if self.class_weight is not None and len(names) > 1:
            raise ConfigurationError(
                f"`class_weight` applies to single-output models; this model has outputs "
                f"{names}. Pass per-sample weights as the third batch element instead: "
                "(x, y, sample_weight)."
            )
        self._expects = [loss is not None for loss in self.losses]
        self.names = names

    @property
    def expects_targets(self) -> list[bool]:
        """Which outputs take a target: those with a loss (Keras' ``loss=["mse", None]``)."""
        return self._expects

    def targets(self, y: Any) -> list[Any]:
        """``y`` ordered like the outputs (``None`` for outputs that take no target)."""
        assert self.names is not None
        if y is None:
            return [None for _ in self.names]
        return align_targets(y, self.names, expects=self.expects_targets)

    def sample_weight(self, y_true: Any, sample_weight: Any, training: bool = True) -> Any:
        """Fold ``class_weight`` into the per-sample weights of training batches.

        As in Keras' ``fit``, class weights weigh the training data only: validation and
        test losses (and weighted metrics) see the batch's own ``sample_weight``.
        """
        if self._class_table is None or not training:
            return sample_weight
        weights = class_weights_for(torch.as_tensor(y_true), self._class_table)
        if sample_weight is None:
            return weights
        sample_weight = torch.as_tensor(sample_weight, device=weights.device)
        return sample_weight * weights.reshape((-1,) + (1,) * (sample_weight.ndim - 1)).to(
            sample_weight.dtype
        )

    def __call__(
        self,
        y_pred: list[Any],
        y: Any,
        sample_weight: Any,
        extra_losses: list[torch.Tensor],
        training: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Total loss and the loss of each output (``None`` where an output has no loss)."""
        assert self.names is not None
        targets = self.targets(y)
        per_output_weights = weights_per_output(sample_weight, self.names)
        total: torch.Tensor | None = None
        parts: list[torch.Tensor | None] = []
        for index, loss_fn in enumerate(self.losses):
            if loss_fn is None:
                parts.append(None)
                continue
            y_true = targets[index]
            if y_true is None:
                raise ShapeMismatchError(
                    f"The loss {loss_fn.name!r} for output {self.names[index]!r} needs targets, "
                    "but the batch has no y. Yield (x, y) batches, or pass loss=None for a "
                    "model that only uses add_loss()."
                )
            weights = self.sample_weight(y_true, per_output_weights[index], training)
            value = _call_loss(loss_fn, y_pred[index], y_true, weights, self.names[index])
            parts.append(value)
            weighted = value * self.weights[index] if self.weights[index] != 1.0 else value
            total = weighted if total is None else total + weighted
        for extra in extra_losses:
            total = extra if total is None else total + extra
        if total is None:
            raise ConfigurationError(
                "There is no loss to minimize: `loss` is None and the model added no losses "
                "(add_loss / regularizers). Pass loss=... to KerasLightningModule, e.g. "
                "loss='mse' or loss=torch.nn.CrossEntropyLoss()."
            )
        return total, parts


def _call_loss(
    loss_fn: LossAdapter, y_pred: Any, y_true: Any, sample_weight: Any, output: str
) -> torch.Tensor:
    pred_shape = tuple(getattr(y_pred, "shape", ()))
    true_shape = tuple(getattr(y_true, "shape", ()))
    if pred_shape and true_shape and pred_shape[0] != true_shape[0]:
        raise ShapeMismatchError(
            f"Output {output!r} has batch size {pred_shape[0]} (shape {pred_shape}) but its "
            f"targets y have {true_shape[0]} (shape {true_shape}). Yield x and y with the "
            "same number of samples."
        )
    _check_sample_weight(sample_weight, pred_shape, output)
    try:
        return loss_fn(y_pred, y_true, weights_for_output(sample_weight, y_pred))
    except (ValueError, RuntimeError, IndexError) as error:
        hint = _diagnose(loss_fn.name, pred_shape, y_true)
        raise ShapeMismatchError(
            f"The loss {loss_fn.name!r} ({loss_fn.convention} convention) could not compare "
            f"output {output!r} of shape {pred_shape} (dtype {getattr(y_pred, 'dtype', '?')}) "
            f"with targets y of shape {true_shape} (dtype {getattr(y_true, 'dtype', '?')}).{hint}"
            f" The loss said: {error}"
        ) from error


def _check_sample_weight(sample_weight: Any, pred_shape: tuple[int, ...], output: str) -> None:
    """A ``sample_weight`` that cannot weigh this batch, named before the loss fails on it."""
    shape = tuple(getattr(sample_weight, "shape", ()))
    if sample_weight is None or not pred_shape or not shape:
        return
    if shape[0] != pred_shape[0] or len(shape) > len(pred_shape):
        raise BatchError(
            f"sample_weight has shape {shape}, but output {output!r} has shape {pred_shape}: "
            f"expected one weight per sample, shape ({pred_shape[0]},) (or a shape that starts "
            f"with {pred_shape[0]} and has at most {len(pred_shape)} dimensions, for temporal "
            "weights). Yield (x, y, sample_weight) with a weight per sample of the batch."
        )


def _integer_valued(y_true: Any) -> bool:
    tensor = torch.as_tensor(y_true)
    if not tensor.is_floating_point():
        return not tensor.is_complex() and tensor.dtype != torch.bool
    return bool(torch.all(tensor == torch.round(tensor)))


def _diagnose(loss_name: str, pred_shape: tuple[int, ...], y_true: Any) -> str:
    """A hint from what is actually wrong with ``y_true``, or ``""`` when nothing is known."""
    true_shape = tuple(getattr(y_true, "shape", ()))
    classes = pred_shape[-1] if pred_shape else None
    sparse = "sparse" in loss_name.lower() or "crossentropyloss" in loss_name.lower()
    looks_one_hot = true_shape == pred_shape and classes not in (None, 1)
    if sparse and looks_one_hot:
        return (
            f" y has the output's shape {pred_shape}, like one-hot targets, but a sparse loss "
            "wants integer class labels of shape (batch,): use 'categorical_crossentropy' "
            "for one-hot y, or pass y.argmax(-1)."
        )
    labels_shape = len(true_shape) + 1 == len(pred_shape) or (
        len(true_shape) == len(pred_shape) and true_shape[-1:] == (1,) != pred_shape[-1:]
    )
    if classes == 1 and len(true_shape) + 1 == len(pred_shape):
        return (
            f" The output has one column (shape {pred_shape}) and y has shape {true_shape}: a "
            f"binary or regression loss compares them element by element, so yield y of shape "
            f"{true_shape + (1,)} (y[:, None], as floats for a torch loss)."
        )
    if labels_shape and classes and _integer_valued(y_true):
        labels = torch.as_tensor(y_true)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            return (
                f" y holds class labels from {low} to {high}, but the output has {classes} "
                f"columns (classes 0 to {classes - 1}): a label is out of range. Fix the labels "
                "or give the model's last layer one unit per class."
            )
        if not sparse:
            return (
                " y looks like integer class labels while the output has one column per "
                "class: use 'sparse_categorical_crossentropy' (Keras) or "
                "torch.nn.CrossEntropyLoss(), or one-hot encode y."
            )
    if len(true_shape) == len(pred_shape) and true_shape != pred_shape:
        return " Make y the same shape as the model output."
    return ""
