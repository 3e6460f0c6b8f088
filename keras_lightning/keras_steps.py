"""A Keras model's own ``train_step`` / ``test_step``, run unchanged under Lightning.

Keras side of custom training logic (Keras' guide "Customizing what happens in fit() with
PyTorch"): when the model overrides ``train_step`` (or ``test_step``), the module hands each
batch to it, once, under Lightning's manual optimization. :class:`KerasSteps` is the step
strategy the module picks for those stages (the other is
:class:`~keras_lightning.builtin_steps.BuiltinSteps`); it logs what the step returns under
Keras' names, resets ``model.metrics`` as ``fit`` does, saves the model's Keras optimizers in
checkpoints and, under DDP, averages their gradients before each ``apply``.
"""

from __future__ import annotations

from keras_lightning import _private, collectives
from keras_lightning.builtin_steps import dataloader_count, ends_dataloader, step_loss_wanted
from keras_lightning.exceptions import ConfigurationError
from keras_lightning.keras_logs import (
    flatten_logs,
    metric_results,
    reset_metrics,
    restore_metrics,
    scalar_logs,
    snapshot_metrics,
    sum_metric_states,
)
from keras_lightning.keras_model import as_keras_data
from keras_lightning.keras_optimizers import (
    CHECKPOINT_KEY,
    keras_optimizer_state,
    load_keras_optimizer_state,
    synchronized_keras_optimizers,
)

import pickle
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from keras_lightning.module import KerasLightningModule

__all__ = ["KerasSteps", "check_picklable", "load_checkpoint"]

def check_picklable(model: Any) -> None:
    """Refuse, clearly, a Keras ``train_step`` model that spawn-based strategies cannot pickle.

    Raises:
        ConfigurationError: ``pickle.dumps(model)`` fails.

    """
    try:
        pickle.dumps(model)
    except Exception as error:  # Keras raises NotImplementedError, TypeError, ...
        raise ConfigurationError(
            f"The Keras model {type(model).__name__} cannot be pickled, which "
            "Trainer(strategy='ddp_spawn') (and other spawn-based strategies) needs: "
            f"{type(error).__name__}: {' '.join(str(error).split())[:160]}... Use "
            "Trainer(strategy='ddp'), which starts each process from your script and "
            "pickles nothing, or pass a factory that builds and compiles the model, "
            "KerasLightningModule(model=make_model), or give the model get_config()."
        ) from error


class KerasSteps:
    """Run the Keras model's own ``train_step`` / ``test_step`` for the module's stages.

    Args:
        host: The module: what this uses of it is its Keras model (``host.model``), its
            device and Keras device scope, ``host.log`` and the attached Trainer.

    """

    automatic_optimization = False

    def __init__(self, host: KerasLightningModule) -> None:
        self.host = host
        self.logs: dict[str, dict[str, torch.Tensor]] = {}
        self._loader: dict[str, int] = {}  # the dataloader a stage runs now
        self._loader_values: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self._logged_loaders: dict[str, set[int]] = {}  # logged at their last batch
        self._metric_snapshot: list[tuple[Any, torch.Tensor]] | None = None
        self._warned: set[str] = set()

    @property
    def _model(self) -> Any:
        return self.host._require_model()

    # ------------------------------------------------------------ steps

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Run ``train_step`` on ``batch`` and log what it returns.

        The values are logged per step when the step-logging policy wants them (every step
        with a progress bar), and always at epoch end (Keras' History value).
        """
        host, model = self.host, self._model
        with host.keras_scope(), synchronized_keras_optimizers(model):
            logs = model.train_step(as_keras_data(batch))
        trainer = _private.attached_trainer(host)
        if trainer is not None:
            _private.count_manual_optimizer_step(trainer)
        values = self._loggable(flatten_logs(logs, "train_step"))
        self.logs["train"] = values
        if not step_loss_wanted(trainer, batch_idx):
            return
        for name, value in values.items():
            host.log(name, value, prog_bar=True, on_step=True, on_epoch=False)

    def evaluation_step(
        self, batch: Any, stage: str, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> None:
        """Run ``test_step`` on ``batch``; its last logs are the epoch's (per dataloader).

        Lightning runs several dataloaders one after the other: each one's last logs are
        logged at its last batch where its length is known (``ends_dataloader``), and
        ``model.metrics`` are reset when the next one starts, as for a new ``evaluate()``.
        """
        model = self._model
        current = self._loader.get(stage, 0)
        if dataloader_idx != current:
            if current not in self._logged_loaders.setdefault(stage, set()):
                self._loader_values.setdefault(stage, {})[current] = self._epoch_values(stage)
            self._loader[stage] = dataloader_idx
            with torch.inference_mode(False), self.host.keras_scope():
                reset_metrics(model)
        # Lightning evaluates under inference_mode; Keras metrics built here must stay usable
        # by training later, so build and update them as normal (no-grad) tensors.
        with torch.inference_mode(False), torch.no_grad(), self.host.keras_scope():
            logs = model.test_step(as_keras_data(batch))
        self.logs[stage] = self._loggable(flatten_logs(logs, "test_step"))
        trainer = _private.attached_trainer(self.host)
        if ends_dataloader(trainer, stage, batch_idx, dataloader_idx):
            prefix = {"val": "val_", "test": "test_"}[stage]
            for name, value in self._epoch_values(stage).items():  # + /dataloader_idx_<i>
                self.host.log(
                    prefix + name, value, prog_bar=name == "loss", on_epoch=True,
                    sync_dist=collectives.is_distributed(),
                )
            self._logged_loaders.setdefault(stage, set()).add(dataloader_idx)

    def _loggable(self, logs: dict[str, Any]) -> dict[str, torch.Tensor]:
        values, skipped = scalar_logs(logs)
        for name in skipped:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"The Keras step returned {name!r}, which is not a scalar: Lightning can "
                    "only log scalars, so it is not logged. Return scalars (e.g. a metric's "
                    "result()) to log them.",
                    stacklevel=4,
                )
        return {name: value.to(self.host.device) for name, value in values.items()}

    # ------------------------------------------------------------ epochs

    def epoch_start(self, stage: str) -> None:
        """Reset ``model.metrics`` as Keras' fit / evaluate do (validation keeps train state)."""
        model = self._model
        self.logs.pop(stage, None)
        self._loader[stage] = 0
        self._loader_values[stage] = {}
        self._logged_loaders[stage] = set()
        trainer = _private.attached_trainer(self.host)
        if stage == "val" and _private.fitting(trainer):
            # Keras shares model.metrics between train and evaluation; keep the training
            # epoch's running values intact across a (possibly mid-epoch) validation.
            self._metric_snapshot = snapshot_metrics(list(model.metrics))
        reset_metrics(model)

    def epoch_end(self, stage: str) -> None:
        """Log the step's last values at epoch level (Keras' History / evaluate value)."""
        prefix = {"train": "", "val": "val_", "test": "test_"}[stage]
        distributed = collectives.is_distributed()
        loaders = dict(self._loader_values.get(stage, {}))
        current = self._loader.get(stage, 0)
        if current not in self._logged_loaders.get(stage, set()):
            loaders[current] = self._epoch_values(stage)
        trainer = _private.attached_trainer(self.host)
        several = len(loaders) > 1 or dataloader_count(trainer, stage) > 1
        for index, values in sorted(loaders.items()):
            suffix = f"/dataloader_idx_{index}" if several else ""
            for name, value in values.items():
                # a train value: the last step's running value, already in the step series
                self.host.log(
                    prefix + name + suffix,
                    value,
                    prog_bar=stage == "train" or name == "loss",
                    on_step=False,
                    on_epoch=True,
                    sync_dist=distributed,
                    add_dataloader_idx=False,
                )
        if stage == "val" and self._metric_snapshot is not None:
            restore_metrics(list(self._model.metrics), self._metric_snapshot)
            self._metric_snapshot = None

    def _epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        """The last logs of ``stage``'s Keras step, exact over all processes where possible.

        With one process they are logged as returned. Under DDP, a returned value that is the
        current ``result()`` of one of ``model.metrics`` (the guides' ``{m.name: m.result()
        for m in self.metrics}``) is replaced by the result of the metrics' states summed over
        ranks (:func:`~keras_lightning.keras_logs.sum_metric_states`), the same on every rank;
        any other value (a raw batch loss, even under a metric's name) stays, and is logged
        with ``sync_dist`` as a mean over ranks like the rest.
        """
        values = dict(self.logs.get(stage, {}))
        if not collectives.is_distributed():
            return values
        metrics = list(self._model.metrics)
        with torch.no_grad(), self.host.keras_scope():
            local = metric_results(metrics)
            sum_metric_states(metrics)
            exact = metric_results(metrics)
        for name, value in values.items():
            mine, merged = local.get(name), exact.get(name)
            if not isinstance(mine, torch.Tensor) or not isinstance(merged, torch.Tensor):
                continue
            if mine.numel() != 1 or merged.numel() != 1:
                continue
            mine = mine.detach().float().reshape(()).to(value.device)
            if torch.equal(value.float().reshape(()), mine):
                values[name] = merged.detach().float().reshape(()).to(self.host.device)
        return values

    # ------------------------------------------------------------ set-up and checkpoints

    def configure_optimizers(self, optimizer_spec: Any, lr_scheduler_spec: Any) -> list[Any]:
        """Nothing for Lightning to step: the Keras ``train_step`` applies its own optimizers.

        Raises:
            ConfigurationError: The model is not compiled, or the module was given an
                optimizer, a scheduler or ``gradient_clip_val`` the ``train_step`` would ignore,
                or the strategy is not DDP.

        """
        model = self._model
        if not getattr(model, "compiled", False):
            raise ConfigurationError(
                f"The Keras model {type(model).__name__} overrides train_step, which uses what "
                "compile() sets (self.optimizer, self.compute_loss, ...), but it is not "
                "compiled. Call model.compile(...) before training, as for Keras' fit(), e.g. "
                "model.compile(optimizer='adam', loss='mse')."
            )
        if optimizer_spec is not None and optimizer_spec is not getattr(model, "optimizer", None):
            raise ConfigurationError(
                f"KerasLightningModule(optimizer={optimizer_spec!r}) is not used: the Keras "
                f"model {type(model).__name__} overrides train_step, which applies the "
                "optimizers given to its compile(). Drop `optimizer=` and pass the optimizer to "
                "model.compile(optimizer=...) instead."
            )
        if lr_scheduler_spec is not None:
            raise ConfigurationError(
                "KerasLightningModule(lr_scheduler=...) is not used: the Keras model overrides "
                "train_step, which applies its own Keras optimizers. Give the Keras optimizer a "
                "keras.optimizers.schedules.LearningRateSchedule as learning_rate instead."
            )
        trainer = _private.attached_trainer(self.host)
        if trainer is not None and trainer.gradient_clip_val:
            raise ConfigurationError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) cannot act on a Keras "
                "train_step, which applies its optimizers itself. Remove it and give the Keras "
                "optimizer clipnorm=... or clipvalue=... instead."
            )
        if trainer is not None and collectives.is_distributed():
            from lightning.pytorch.strategies import DDPStrategy

            if not isinstance(trainer.strategy, DDPStrategy):
                raise ConfigurationError(
                    "A Keras model that overrides train_step runs in several processes only "
                    f"with DDP; this Trainer uses {type(trainer.strategy).__name__}. Use "
                    "Trainer(strategy='ddp') (or 'ddp_spawn' for a model that pickles, or a "
                    "model factory)."
                )
        return []

    def train_batch_start(self) -> None:
        """Keep DDP's reducer out of a Keras ``train_step`` (gradients are averaged in apply)."""
        trainer = _private.attached_trainer(self.host)
        wrapper = getattr(getattr(trainer, "strategy", None), "model", None)
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            wrapper.require_backward_grad_sync = False

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the state of the Keras optimizers the ``train_step`` applies."""
        checkpoint[CHECKPOINT_KEY] = keras_optimizer_state(self._model)


def load_checkpoint(model: Any, checkpoint: Mapping[str, Any]) -> None:
    """Restore what :meth:`KerasSteps.save_checkpoint` stored, if the checkpoint has it."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if state:
        load_keras_optimizer_state(model, state)

