"""Lightning side of custom training logic: the helpers a hand-written ``training_step`` uses.

A ``KerasLightningModule`` subclass that overrides ``training_step`` (a GAN, a custom
objective) calls :meth:`LightningSideHelpers.compute_loss` (the configured loss, order
handled), :meth:`LightningSideHelpers.backward_and_step` (backward and one optimizer step,
Keras or torch) and :meth:`LightningSideHelpers.update_metrics` (the configured metrics, exact
epoch values under the built-in step's names). They use only Lightning's public API and the
module's built-in step strategy.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.data import standard_batch, unpack_batch
from keras_lightning.exceptions import ConfigurationError

import warnings
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import BuiltinSteps

__all__ = ["LightningSideHelpers", "running_stage"]


class LightningSideHelpers(L.LightningModule):
    """The helpers of :class:`~keras_lightning.KerasLightningModule` for custom steps."""

    _builtin: BuiltinSteps

    def compute_loss(
        self, y_pred: Any, y: Any, sample_weight: Any = None, *, x: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured loss (order handled, ``model.losses`` added) and per-output losses.

        ``x`` (the batch's inputs) is needed only for a Keras model that overrides
        ``compute_loss(x, y, y_pred, sample_weight)``, whose objective this then is.
        """
        return self._builtin.compute_loss(y_pred, y, sample_weight, x=x)

    def backward_and_step(self, loss: torch.Tensor, optimizer: Any = None) -> None:
        """Backward ``loss`` and step one configured optimizer (Keras or torch).

        Zeroes that optimizer's gradients, runs ``self.manual_backward(loss)`` (so precision
        plugins and DDP gradient averaging apply) and steps it. Use it in a ``training_step`` of
        a subclass that sets ``self.automatic_optimization = False``. (Keras' own
        ``apply_gradients`` takes gradients; this takes the loss.)

        Args:
            loss: The scalar to minimize.
            optimizer: One of ``self.optimizers()``; may be left out when
                ``configure_optimizers`` returns a single optimizer.

        Raises:
            ConfigurationError: Automatic optimization is on, or several optimizers are
                configured and none was chosen.

        Example:
            >>> import keras, lightning, torch
            >>> import keras_lightning as kl
            >>> class Module(kl.KerasLightningModule):
            ...     def __init__(self, model):
            ...         super().__init__(model, optimizer="sgd", loss="mse")
            ...         self.automatic_optimization = False
            ...     def training_step(self, batch, batch_idx):
            ...         x, y = batch
            ...         loss, _ = self.compute_loss(self(x, training=True), y)
            ...         self.backward_and_step(loss)
            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
            >>> trainer = lightning.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
            ...                             enable_checkpointing=False, enable_model_summary=False)
            >>> trainer.fit(Module(model), torch.utils.data.DataLoader(data, batch_size=4))
            >>> trainer.global_step
            2

        """
        if self.automatic_optimization:
            raise ConfigurationError(
                "backward_and_step() runs the backward pass and the optimizer step itself, "
                "which needs Lightning's manual optimization. Set `self.automatic_optimization "
                "= False` in your module's __init__ (after super().__init__(...))."
            )
        if optimizer is None:
            optimizers = self.optimizers()
            if isinstance(optimizers, list | tuple):
                if len(optimizers) != 1:
                    raise ConfigurationError(
                        f"configure_optimizers returned {len(optimizers)} optimizers, so "
                        "backward_and_step(loss) does not know which one to step. Pass it: "
                        "`opt_d, opt_g = self.optimizers(); self.backward_and_step(loss, opt_d)`."
                    )
                optimizers = optimizers[0]
            optimizer = optimizers
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def apply_gradients(self, loss: torch.Tensor, optimizer: Any = None) -> None:
        """Deprecated name of :meth:`backward_and_step` (Keras' method of this name takes
        gradients, not a loss).
        """
        warnings.warn(
            "KerasLightningModule.apply_gradients(loss) is deprecated: it is named "
            "backward_and_step(loss), since Keras' apply_gradients takes gradients. Call "
            "self.backward_and_step(loss, optimizer).",
            DeprecationWarning,
            stacklevel=2,
        )
        self.backward_and_step(loss, optimizer)

    def update_metrics(
        self,
        y_pred: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        loss: torch.Tensor | None = None,
        stage: str | None = None,
    ) -> None:
        """Accumulate the configured metrics (and the mean ``loss``) for this epoch's logs.

        The epoch values are logged under Keras' names (``loss``, ``mae``, ``val_mae``...) at
        epoch end, exactly as the built-in steps do: computed from the state accumulated over
        the whole epoch (and all processes), not averaged per batch.

        Args:
            y_pred: The model output for the batch.
            y: The targets.
            sample_weight: Per-sample weights (reach ``weighted_metrics`` only, as in Keras).
            loss: The batch loss, averaged into the epoch's ``loss`` by batch size.
            stage: ``"train"``, ``"val"`` or ``"test"``; by default the running stage.

        Raises:
            ConfigurationError: ``stage`` is not one of the three.

        """
        stage = stage or running_stage(_private.attached_trainer(self))
        if stage not in ("train", "val", "test"):
            raise ConfigurationError(
                f"update_metrics(stage={stage!r}): expected one of 'train', 'val', 'test'."
            )
        self._builtin.update_metrics(stage, y_pred, y, sample_weight, loss)

    def _standard_batch(self, batch: Any) -> Any:
        """NumPy arrays as tensors on this device, an ``{"x", "y"}`` dict as its parts."""
        return standard_batch(batch, self.device, getattr(self, "model", None))

    def unpack_batch(self, batch: Any) -> tuple[Any, Any, Any]:
        """Split a batch into ``(x, y, sample_weight)`` as Keras' ``fit`` does.

        NumPy arrays become tensors on the module's device and an ``{"x", "y"}`` dict gives
        its parts, as for the built-in steps (:func:`~keras_lightning.data.standard_batch`).
        """
        return unpack_batch(self._standard_batch(batch))


def running_stage(trainer: Any) -> str:
    """``"train"``, ``"val"`` or ``"test"``: the stage the Trainer runs (``"train"`` outside)."""
    if trainer is None or trainer.training:
        return "train"
    if trainer.testing:
        return "test"
    return "val"
