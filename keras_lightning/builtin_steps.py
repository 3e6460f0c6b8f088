"""The built-in steps: forward, the configured loss and metrics, exact epoch values.

:class:`BuiltinSteps` is the step strategy the module uses for every stage whose step the
Keras model does not define itself (the other is :class:`~keras_lightning.keras_steps.KerasSteps`).
It owns what a stage accumulates (:class:`~keras_lightning.epoch.EpochState`), the objective
resolved on the first batch, and the ``torch.compile``d forward and loss (``jit_compile=``).
The Lightning-side helpers of the module (``compute_loss``, ``update_metrics``) use it too, so
a hand-written ``training_step`` logs exactly what the built-in one logs.
"""

from __future__ import annotations

from keras_lightning import _private, collectives
from keras_lightning.compiled import WHOLE_STEP_MODES, CompiledStep, CompileStats
from keras_lightning.data import (
    align_targets,
    batch_size_of,
    output_structure,
    unpack_batch,
    weights_per_output,
)
from keras_lightning.devices import place_variables
from keras_lightning.epoch import EpochState
from keras_lightning.keras_logs import (
    metric_results,
    restore_metrics,
    scalar_logs,
    snapshot_metrics,
    sum_metric_states,
)
from keras_lightning.keras_model import (
    check_compute_loss_arguments,
    compute_loss_takes_training,
    model_compute_loss,
    overrides_step,
    own_metrics,
)
from keras_lightning.lightning_side import LightningSideHelpers, running_stage
from keras_lightning.metrics import bind_metrics
from keras_lightning.objective import Objective
from keras_lightning.whole_step import (
    WholeStep,
    WholeStepStats,
    gradient_carrier,
    hosting,
    not_whole_reason,
    write_gradients,
)

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from keras_lightning.module import KerasLightningModule

__all__ = [
    "STAGE_PREFIX",
    "Arguments",
    "BuiltinSteps",
    "dataloader_count",
    "ends_dataloader",
    "log_epoch_value",
    "step_loss_wanted",
]

#: Prefix of every logged name, per stage (Keras' ``val_`` convention).
STAGE_PREFIX = {"train": "", "val": "val_", "test": "test_"}


@dataclass
class Arguments:
    """The module's Keras arguments, after those left unset were taken from ``compile()``."""

    optimizer: Any = None
    loss: Any = None
    metrics: Any = None
    weighted_metrics: Any = None
    loss_weights: Any = None
    class_weight: Mapping[int, float] | None = None
    lr_scheduler: Any = None
    #: The names of the arguments given to the module (the others may come from compile()).
    given: frozenset[str] = frozenset()


def optimizer_built(optimizer: Any) -> bool:
    """Whether the optimizer's state exists (a Keras optimizer builds on its first update)."""
    keras_optimizers = getattr(optimizer, "keras_optimizers", None)
    if keras_optimizers is None:
        return True
    return all(o.built for o in keras_optimizers)


def step_loss_wanted(trainer: Any, batch_idx: int) -> bool:
    """Whether this step's ``loss`` is logged: ``self.log`` costs as much as a small model.

    It is logged on every step while a progress bar shows it; otherwise on the steps a logger
    writes (every ``Trainer(log_every_n_steps=...)``) and on the first and last batch of each
    epoch, so that ``trainer.callback_metrics["loss"]`` exists and holds the last batch's loss
    in callbacks' ``on_train_epoch_end``. The epoch's exact mean is logged after them, at the
    module's epoch end.
    """
    if trainer is None or batch_idx == 0:
        return True
    bar = trainer.progress_bar_callback
    if bar is not None and getattr(bar, "is_enabled", True):  # a custom bar may not say
        return True
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    if not trainer.loggers:
        return False
    return _private.logger_writes_this_step(trainer)


def dataloader_count(trainer: Any, stage: str) -> int:
    """How many dataloaders the ``"val"`` / ``"test"`` stage runs (0 when unknown)."""
    if trainer is None or stage not in ("val", "test"):
        return 0
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if loaders is None:
        return 0
    return len(loaders) if isinstance(loaders, list | tuple | Mapping) else 1


def ends_dataloader(trainer: Any, stage: str, batch_idx: int, dataloader_idx: int) -> bool:
    """True on the last batch of one of several validation / test dataloaders, where known.

    Values logged in that step are the dataloader's, as Lightning treats a plain module's
    step logs: suffixed ``/dataloader_idx_i`` and returned in the ``i``-th dict of
    ``trainer.validate`` / ``trainer.test``. Unknown for dataloaders without a length.
    """
    if dataloader_count(trainer, stage) < 2:
        return False
    if stage == "test":
        counts = trainer.num_test_batches
    elif trainer.sanity_checking:
        counts = trainer.num_sanity_val_batches
    else:
        counts = trainer.num_val_batches
    if dataloader_idx >= len(counts) or counts[dataloader_idx] == float("inf"):
        return False
    return batch_idx + 1 == counts[dataloader_idx]


def log_epoch_value(host: Any, name: str, value: Any, per_step_too: bool, bar: bool) -> None:
    """Log an epoch value; one also logged per step goes to the loggers as ``<name>_epoch``.

    The training ``loss`` is logged per batch (a batch's loss) and per epoch (the exact mean
    of the epoch): ``trainer.callback_metrics[name]`` holds the epoch value (what Keras'
    History holds, what ``EarlyStopping(monitor="loss")`` reads), while the loggers' ``name``
    series keeps only the step values, as for a plain module's ``self.log(name, ...)`` in its
    step, and the epoch values get their own series (``loss_epoch``, as Lightning names them).
    """
    options: dict[str, Any] = {"on_epoch": True, "on_step": False, "add_dataloader_idx": False}
    if not per_step_too:
        host.log(name, value, prog_bar=bar, **options)
        return
    host.log(name, value, prog_bar=bar, logger=False, **options)
    host.log(f"{name}_epoch", value, prog_bar=False, **options)


class BuiltinSteps:
    """Forward, loss and metrics of the configured arguments, for every stage.

    Args:
        host: The module: what this uses of it is its Keras model, device, Keras device
            scope, ``host.log`` and the attached Trainer.
        arguments: The module's Keras arguments (shared: the module completes them from
            ``compile()`` when a factory builds the model).
        compile_backend: The ``torch.compile`` backend for forward and loss, or None.

    """

    automatic_optimization = True

    def __init__(
        self, host: KerasLightningModule, arguments: Arguments, compile_backend: str | None
    ) -> None:
        self.host = host
        self.arguments = arguments
        self.compile_backend = compile_backend
        self.compiled_step: CompiledStep | None = None
        # jit_compile="step": the whole step captured (whole_step.py)
        self.whole = None
        if compile_backend in WHOLE_STEP_MODES:
            backend = "aot_eager" if compile_backend.endswith("aot_eager") else "inductor"
            self.whole = WholeStep(self, backend)
        self.objective: Objective | None = None
        self.stages = {stage: EpochState(prefix) for stage, prefix in STAGE_PREFIX.items()}
        # several validation / test dataloaders: the states of dataloader 1, 2, ... of a stage
        self.more_loaders: dict[str, dict[int, EpochState]] = {"val": {}, "test": {}}
        self._loader = {"val": 0, "test": 0}  # the dataloader the stage runs now
        self._logged_loaders: dict[str, set[int]] = {"val": set(), "test": set()}
        self._loss_logged_per_step = False  # by the built-in training_step, this epoch
        self._own_snapshot: list[tuple[Any, torch.Tensor]] | None = None
        # None: the configured objective; else the model's compute_loss, True when it takes
        # `training` (decided on the first batch, outside any compiled region)
        self._own_compute_loss: bool | None = None

    @property
    def compile_stats(self) -> CompileStats | WholeStepStats | None:
        """What ``torch.compile`` did, or None before the first compiled call."""
        if self.whole is not None:
            return self.whole.stats
        return None if self.compiled_step is None else self.compiled_step.stats

    # ------------------------------------------------------------ loss

    def compute_loss(
        self,
        y_pred: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        x: Any = None,
        training: bool | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured loss (order handled, ``model.losses`` added) and per-output losses.

        A Keras model that overrides ``compute_loss`` defines its objective itself, as in
        Keras' ``fit``: it is called ``compute_loss(x, y, y_pred, sample_weight, training)``
        (Keras' loss-customization contract), and there are no per-output losses to log.
        ``class_weight`` weighs training batches only (``training`` defaults to the running
        stage).
        """
        model = self.host._require_model()
        if training is None:
            training = running_stage(_private.attached_trainer(self.host)) == "train"
        objective = self._resolve_objective(y_pred, y)
        if self._own_compute_loss is not None:  # decided once, on the first batch
            weights = sample_weight
            if objective.class_weight is not None and y is not None:  # one output (resolve)
                target = align_targets(y, objective.names or [])[0]
                weights = objective.sample_weight(target, sample_weight, training)
            return model_compute_loss(
                model, x, y, y_pred, weights, training, self._own_compute_loss
            ), {}
        _, outputs = output_structure(y_pred, model)
        total, parts = objective(outputs, y, sample_weight, list(model.losses), training)
        assert objective.names is not None
        named = {
            f"{name}_loss": part
            for name, part in zip(objective.names, parts, strict=True)
            if part is not None
        }
        # per-output losses are logged when there are several, as Keras' compile loss does
        return total, (named if len(named) > 1 else {})

    def _resolve_objective(self, y_pred: Any, y: Any) -> Objective:
        if self.objective is None or not self.objective.resolved:
            model = self.host._require_model()
            names, outputs = output_structure(y_pred, model)
            arguments = self.arguments
            check_compute_loss_arguments(model, arguments)
            if overrides_step(model, "compute_loss"):
                # the model's objective: its y may be shaped unlike its outputs (RetinaNet)
                self._own_compute_loss = compute_loss_takes_training(model)
                objective = Objective(None, None, arguments.class_weight)
                objective.resolve(names, None, outputs)
            else:
                self._own_compute_loss = None
                objective = Objective(
                    arguments.loss, arguments.loss_weights, arguments.class_weight
                )
                objective.resolve(names, y, outputs)
            self.objective = objective
        return self.objective

    def _forward_and_loss(
        self, x: Any, y: Any, sample_weight: Any, training: bool
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The model output, the loss and per-output losses: the part ``jit_compile`` captures."""
        y_pred = self.host._require_model()(x, training=training)
        host_compute_loss = getattr(type(self.host), "compute_loss", None)
        if host_compute_loss is not LightningSideHelpers.compute_loss:
            # a module subclass overriding compute_loss(y_pred, y, sample_weight) trains its own
            loss, output_losses = self.host.compute_loss(y_pred, y, sample_weight)
        else:
            loss, output_losses = self.compute_loss(
                y_pred, y, sample_weight, x=x, training=training
            )
        return y_pred, loss, output_losses

    def _step_function(self) -> Callable[..., Any]:
        """Eager on the first batch (it resolves losses and metrics), then compiled if asked."""
        if self.compile_backend is None or self.objective is None:
            return self._forward_and_loss
        if self.compiled_step is None:
            backend = self.compile_backend
            if backend in WHOLE_STEP_MODES:
                backend = "aot_eager" if backend.endswith("aot_eager") else "inductor"
            self.compiled_step = CompiledStep(self._forward_and_loss, backend)
        return self.compiled_step

    # ------------------------------------------------------------ metrics

    def stage_state(self, stage: str, y_pred: Any, y: Any) -> EpochState:
        """The stage's epoch state, its metrics bound to the outputs on the first batch.

        Each validation / test dataloader has its own (its metrics are copies of the
        configured ones), as Lightning keeps each dataloader's logged values apart.
        """
        state = self._current_state(stage)
        if state.metrics is not None:
            return state
        arguments = self.arguments
        if y is None or (arguments.metrics is None and arguments.weighted_metrics is None):
            state.metrics = []
            return state
        names, outputs = output_structure(y_pred, self.host._require_model())
        targets = self._metric_targets(y, names)
        arguments = self.arguments
        # Lightning evaluates under inference_mode (trainer.validate); the metrics' variables
        # made here must stay usable by a later fit, so they are made as normal tensors.
        with torch.inference_mode(False):
            state.metrics = bind_metrics(
                arguments.metrics,
                arguments.weighted_metrics,
                names,
                targets,
                outputs,
                copy=stage != "train",
            )
            device = self.host.device
            for metric in state.metrics:
                if metric.is_torchmetric:
                    metric.metric.to(device)
                else:  # a Keras metric object may have been built on Keras' default device
                    place_variables(metric.metric.variables, device)
                # bound after this epoch's reset ran: a metric object that saw data before (an
                # evaluate() of the user's) starts the epoch empty, as fit() resets it
                with self.host.keras_scope():
                    metric.reset()
        return state

    def update_metrics(
        self, stage: str, y_pred: Any, y: Any, sample_weight: Any, loss: torch.Tensor | None
    ) -> None:
        """Accumulate ``loss`` (a batch mean) and the stage's metrics for this batch.

        ``class_weight`` is folded into the weights of ``weighted_metrics`` of training
        batches for a single-output model, as Keras does; plain ``metrics`` never see
        weights. Keras metrics see each output's Keras mask (``Embedding(mask_zero=True)``),
        as in Keras' ``fit``.
        """
        state = self.stage_state(stage, y_pred, y)
        if loss is not None:
            state.add_mean("loss", loss, batch_size_of(y_pred))
        if not state.metrics or y is None:
            return
        names, outputs = output_structure(y_pred, self.host._require_model())
        targets = self._metric_targets(y, names)
        weights = weights_per_output(sample_weight, names)
        objective = self.objective
        if objective is not None and objective.resolved and len(names) == 1:
            weights = [objective.sample_weight(targets[0], weights[0], stage == "train")]
        detached = [
            _private.with_keras_mask(output.detach(), _private.keras_mask_of(output))
            for output in outputs
        ]
        with torch.no_grad(), self.host.keras_scope():
            state.update_metrics(detached, targets, weights)

    def _metric_targets(self, y: Any, names: list[str]) -> list[Any]:
        """``y`` ordered like the outputs, as the loss sees it (outputs without a loss: None)."""
        objective = self.objective
        if objective is not None and objective.resolved and objective.names == names:
            return objective.targets(y)
        return align_targets(y, names)

    # ------------------------------------------------------------ steps

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, sample_weight = unpack_batch(batch)
        with self.host.keras_scope():
            if self.whole is not None and stage != "train" and self.objective is not None:
                y_pred, loss, output_losses = self.whole.evaluate(x, y, sample_weight)
            else:
                y_pred, loss, output_losses = self._step_function()(
                    x, y, sample_weight, stage == "train"
                )
            self._account(stage, x, y, sample_weight, y_pred, loss, output_losses)
        return loss

    def _account(
        self,
        stage: str,
        x: Any,
        y: Any,
        sample_weight: Any,
        y_pred: Any,
        loss: torch.Tensor,
        output_losses: Mapping[str, torch.Tensor],
    ) -> None:
        state = self.stage_state(stage, y_pred, y)
        count = batch_size_of(x)
        for name, value in output_losses.items():
            state.add_mean(name, value, count)
        self.update_metrics(stage, y_pred, y, sample_weight, loss)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Forward, loss and metrics on ``batch``; Lightning does backward and the update.

        Under ``jit_compile="step"`` the captured graph computes the gradients too, and
        applies the update or hands the gradients to the optimizer (:meth:`_whole_step`).
        """
        trainer = _private.attached_trainer(self.host)
        host_mode = hosting(self.host, trainer) if self.whole is not None else None
        if host_mode is not None:
            loss = self._whole_step(batch, trainer, host_mode)
        else:
            if self.whole is not None:
                self.whole.stats.not_whole = not_whole_reason(self.host, trainer)
            loss = self._shared_step(batch, "train")
        if step_loss_wanted(trainer, batch_idx):
            self.host.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
            self._loss_logged_per_step = True
        return loss  # manual hosting: the batch's loss, for on_train_batch_end's outputs

    def _whole_step(self, batch: Any, trainer: Any, host_mode: str) -> torch.Tensor:
        """The step captured whole; returns the batch's loss (no graph behind it)."""
        assert self.whole is not None
        whole = self.whole
        whole.stats.hosting = host_mode
        optimizer = trainer.optimizers[0]
        x, y, sample_weight = unpack_batch(batch)
        first = self.objective is None or not optimizer_built(optimizer)
        with self.host.keras_scope():
            y_pred, loss, output_losses, grads = whole.train(
                x, y, sample_weight, optimizer, first=first, fuse=host_mode == "manual"
            )
            if host_mode == "automatic":
                assert grads is not None
                # Lightning's backward of this puts the graph's gradients in .grad (divided by
                # the accumulation count), then clips, accumulates and steps as it always does
                loss = gradient_carrier(loss, whole.params, grads)
            elif grads is not None:
                write_gradients(whole.params, grads)
                optimizer.step()
                optimizer.zero_grad()
            if host_mode == "manual":
                _private.count_whole_step(trainer)
            self._account("train", x, y, sample_weight, y_pred, loss.detach(), output_losses)
        return loss

    def evaluation_step(
        self, batch: Any, stage: str, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor:
        """Forward (``training=False``), loss and metrics on ``batch`` of that dataloader.

        With several dataloaders, the last batch of each logs that dataloader's epoch values
        (:func:`ends_dataloader`).
        """
        self._loader[stage] = dataloader_idx
        loss = self._shared_step(batch, stage)
        trainer = _private.attached_trainer(self.host)
        if ends_dataloader(trainer, stage, batch_idx, dataloader_idx):
            state = self._current_state(stage)
            with self.host.keras_scope():
                values = state.compute(collectives.is_distributed())
            for name, value in values.items():  # Lightning adds /dataloader_idx_<i>
                bar = name == f"{STAGE_PREFIX[stage]}loss"
                self.host.log(name, value.to(self.host.device), prog_bar=bar, on_epoch=True)
            self._logged_loaders[stage].add(dataloader_idx)
        return loss

    def _current_state(self, stage: str) -> EpochState:
        index = self._loader.get(stage, 0)
        if index == 0:
            return self.stages[stage]
        states = self.more_loaders[stage]
        if index not in states:
            states[index] = EpochState(STAGE_PREFIX[stage])
        return states[index]

    # ------------------------------------------------------------ epochs

    def epoch_start(self, stage: str) -> None:
        """Start the stage's epoch: loss sums and metric state reset.

        The model's own metrics (:func:`~keras_lightning.keras_model.own_metrics`) are reset
        too, as Keras' ``fit`` / ``evaluate`` reset ``model.metrics``; a validation inside
        ``fit`` keeps the training epoch's running values, restored at its end.
        """
        model = self.host._require_model()
        with self.host.keras_scope():  # Keras metric resets create tensors
            self.stages[stage].reset()
            if stage == "train":
                self._loss_logged_per_step = False
            if stage in self._loader:  # dataloaders 1, 2, ... get their states anew
                self._loader[stage] = 0
                self._logged_loaders[stage] = set()
                self.more_loaders[stage] = {}
            own = own_metrics(model)
            if own:
                if stage == "val" and _private.fitting(_private.attached_trainer(self.host)):
                    self._own_snapshot = snapshot_metrics(own)
                for metric in own:  # only these: compile's own trackers may be the user's
                    metric.reset_state()

    def epoch_end(self, stage: str) -> None:
        """Log the epoch's values, reduced over every process: means and metric results.

        The model's own metrics are logged under their names, as Keras' History holds them
        (one of the same name as a value of the module's, a ``loss`` tracker, wins, as in
        Keras' logs). With several validation / test dataloaders, each one's values are logged
        with Lightning's suffix (``val_loss/dataloader_idx_1``): at the dataloader's last batch
        where its length is known (:func:`ends_dataloader`), else here. The model's own
        metrics are pooled over them.
        """
        model = self.host._require_model()
        prefix = STAGE_PREFIX[stage]
        distributed = collectives.is_distributed()
        loaders = {0: self.stages[stage], **self.more_loaders.get(stage, {})}
        trainer = _private.attached_trainer(self.host)
        several = len(loaders) > 1 or dataloader_count(trainer, stage) > 1
        logged = self._logged_loaders.get(stage, set())
        values: dict[str, torch.Tensor] = {}
        with self.host.keras_scope():  # Keras metric results are computed with Keras ops
            for index, state in sorted(loaders.items()):
                if index in logged:  # logged at its last batch
                    continue
                suffix = f"/dataloader_idx_{index}" if several else ""
                for name, value in state.compute(distributed).items():
                    values[name + suffix] = value
            own = own_metrics(model)
            if own:
                if distributed:
                    sum_metric_states(own)
                logs, _ = scalar_logs(metric_results(own))
                values.update({prefix + name: value for name, value in logs.items()})
        for name, value in values.items():
            bar = name.split("/")[0] == f"{prefix}loss"
            value = value.to(self.host.device)
            per_step_too = stage == "train" and name == "loss" and self._loss_logged_per_step
            log_epoch_value(self.host, name, value, per_step_too, bar)
        if stage == "val" and self._own_snapshot is not None:
            with self.host.keras_scope():
                restore_metrics(own, self._own_snapshot)
            self._own_snapshot = None

    def train_batch_start(self) -> None:
        """Nothing to do before a built-in training step."""

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Nothing beyond Lightning's optimizer states: the optimizers are Lightning's."""
