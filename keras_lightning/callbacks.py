"""Lightning callbacks for the habits Keras users bring, and the check that names them.

Keras callbacks (``keras.callbacks.*``) are not Lightning callbacks: passed to a ``Trainer``
they fail inside Lightning with an ``AttributeError``. :func:`check_trainer_callbacks` refuses
them up front and names the Lightning way for each; :class:`TerminateOnNaN` is the one Keras
habit Lightning has no callback for.
"""

from __future__ import annotations

from keras_lightning.exceptions import KerasLightningTypeError

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import lightning as L
import torch

__all__ = ["TerminateOnNaN", "check_trainer_callbacks"]

#: The Lightning way to do what each Keras callback does.
LIGHTNING_EQUIVALENTS = {
    "TerminateOnNaN": "kl.TerminateOnNaN()",
    "EarlyStopping": "lightning.pytorch.callbacks.EarlyStopping(monitor='val_loss', patience=...)",
    "ModelCheckpoint": "lightning.pytorch.callbacks.ModelCheckpoint(monitor='val_loss')",
    "ReduceLROnPlateau": (
        "KerasLightningModule(lr_scheduler={'scheduler': lambda opt: "
        "torch.optim.lr_scheduler.ReduceLROnPlateau(opt), 'monitor': 'val_loss'})"
    ),
    "LearningRateScheduler": (
        "KerasLightningModule(lr_scheduler=...) or a Keras LearningRateSchedule"
    ),
    "CSVLogger": "Trainer(logger=lightning.pytorch.loggers.CSVLogger('logs'))",
    "TensorBoard": "Trainer(logger=lightning.pytorch.loggers.TensorBoardLogger('logs'))",
    "ProgbarLogger": "Lightning's progress bar (on by default)",
    "History": "trainer.callback_metrics, or a logger",
}


def check_trainer_callbacks(callbacks: Sequence[Any]) -> None:
    """Refuse Keras callbacks given to a Lightning ``Trainer``, naming the Lightning way.

    The Keras callbacks are removed from ``callbacks`` (the Trainer's list) first, so that
    Lightning's error handling, which calls every callback, does not fail on them instead.

    Raises:
        KerasLightningTypeError: One of ``callbacks`` is a ``keras.callbacks.Callback``.

    """
    keras_callbacks = [c for c in callbacks if isinstance(c, keras.callbacks.Callback)]
    for callback in keras_callbacks:
        # Lightning calls every callback's on_exception as this error propagates: the Keras
        # one has none, and its AttributeError would hide this message. It is taken out.
        if isinstance(callbacks, list):
            callbacks.remove(callback)
    for callback in keras_callbacks:
        if isinstance(callback, keras.callbacks.Callback):
            name = type(callback).__name__
            instead = LIGHTNING_EQUIVALENTS.get(
                name, "a lightning.pytorch.Callback with the same hooks"
            )
            raise KerasLightningTypeError(
                f"Trainer(callbacks=[keras.callbacks.{name}(...)]) is a Keras callback, which "
                "Lightning's Trainer cannot call (it has Keras' hooks, not Lightning's). Use "
                f"{instead} instead."
            )


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class TerminateOnNaN(L.Callback):
    """Stop training at the first batch whose loss is NaN or infinite (Keras' ``TerminateOnNaN``).

    As in Keras, the batch that produced the non-finite loss has been applied: the weights
    may be non-finite too. A checkpoint written after it says so with a warning
    (:class:`~keras_lightning.AtomicCheckpointIO`); keep the last good one with
    ``ModelCheckpoint(save_top_k=...)`` or ``save_last=False``.

    Attributes:
        stopped_at: ``(epoch, batch_idx, global_step)`` of the batch that stopped training.

    Example:
        >>> import lightning
        >>> import keras_lightning as kl
        >>> trainer = lightning.Trainer(callbacks=[kl.TerminateOnNaN()], logger=False,
        ...                             enable_progress_bar=False, enable_model_summary=False)

    """

    def __init__(self) -> None:
        self.stopped_at: tuple[int, int, int] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Check the batch's loss; stop the Trainer if it is not finite."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:  # manual optimization (a Keras train_step): the logged loss
            loss = _last_step_loss(pl_module)
        if loss is None or _finite(loss):
            return
        self.stopped_at = (trainer.current_epoch, batch_idx, trainer.global_step)
        warnings.warn(
            f"TerminateOnNaN: the loss of batch {batch_idx} (epoch {trainer.current_epoch}, "
            f"step {trainer.global_step}) is {float(loss)}; training stops.",
            RuntimeWarning,
            stacklevel=2,
        )
        trainer.should_stop = True


def _last_step_loss(module: Any) -> Any:
    steps = getattr(module, "_keras_steps", None)
    logs = getattr(steps, "logs", {}) if steps is not None else {}
    return logs.get("train", {}).get("loss")
