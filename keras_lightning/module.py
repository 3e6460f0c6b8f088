"""``KerasLightningModule``: a LightningModule that trains a torch-backend Keras model."""

from __future__ import annotations

from keras_lightning import checkpoint as checkpoints
from keras_lightning import distributed, precision
from keras_lightning.compiled import CompiledStep, resolve_compile
from keras_lightning.custom_steps import CustomStepsMixin
from keras_lightning.data import (
    align_targets,
    batch_size_of,
    output_structure,
    unpack_batch,
    validate_class_weight,
)
from keras_lightning.epoch import EpochState
from keras_lightning.exceptions import ArgumentTypeError, ConfigurationError
from keras_lightning.losses import resolve_loss
from keras_lightning.metrics import bind_metrics, check_metric_spec
from keras_lightning.objective import Objective
from keras_lightning.optimizers import KerasOptimizer, resolve_optimizer

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import lightning as L
import torch
import torchmetrics
from typing_extensions import override

_STAGE_PREFIX = {"train": "", "val": "val_", "test": "test_"}


class KerasLightningModule(CustomStepsMixin, L.LightningModule):
    """Train a Keras 3 model (torch backend) with ``lightning.Trainer``.

    Args:
        model: A Keras model (Functional, Sequential or subclassed, built or not), or a
            zero-argument callable returning one; a callable is called in ``configure_model``
            so that variables are created on the device Lightning chose.
        optimizer: A Keras optimizer or its name (``"adam"``), a torch optimizer class
            (``torch.optim.Adam``) or a callable ``params -> torch.optim.Optimizer``. Defaults
            to the optimizer of a compiled Keras model.
        loss: A Keras loss (name, ``keras.losses.Loss``, Keras loss function), a torch loss
            (``torch.nn.CrossEntropyLoss()``, ``torch.nn.functional.mse_loss``), a callable
            marked with :func:`keras_loss` / :func:`torch_loss`, or a list / dict of those
            (one per output). Defaults to the loss of a compiled Keras model.
        metrics: Keras metrics (names or objects) and ``torchmetrics.Metric`` objects; a list,
            or a list / dict per output. Defaults to the metrics of a compiled Keras model.
        weighted_metrics: Like ``metrics``, but these receive ``sample_weight`` and
            ``class_weight``.
        loss_weights: Scalar coefficients for the outputs' losses (list or dict by name).
        class_weight: ``{class_index: weight}`` applied to the loss (and weighted metrics).
        lr_scheduler: A callable ``optimizer -> scheduler``, or a Lightning scheduler dict
            whose ``"scheduler"`` is such a callable (``{"scheduler": fn, "interval":
            "step"}``).
        compile: ``True`` (or a ``torch.compile`` backend name: ``"eager"``,
            ``"aot_eager"``, ``"inductor"``) captures the model's forward pass and loss with
            ``torch.compile`` from the second batch on, which removes Keras' per-layer Python
            overhead; ``True`` means ``"eager"`` (graph capture only, warm-up of a second or
            two). If capturing fails, training goes on eagerly with a warning. See
            ``keras_lightning.compiled``.

    Example:
        >>> import keras, lightning, torch
        >>> import keras_lightning as kl
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> module = kl.KerasLightningModule(model, optimizer="sgd", loss="mse")
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
        >>> trainer = lightning.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
        ...                             enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
        >>> sorted(trainer.callback_metrics)
        ['loss']

    """

    def __init__(
        self,
        model: keras.Model | Callable[[], keras.Model],
        *,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = None,
        weighted_metrics: Any = None,
        loss_weights: Any = None,
        class_weight: Mapping[int, float] | None = None,
        lr_scheduler: Any = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.model: keras.Model | None
        if isinstance(model, keras.Model):
            self.model = model
            self._model_factory: Callable[[], keras.Model] | None = None
        elif isinstance(model, keras.layers.Layer) or not callable(model):
            raise ArgumentTypeError(
                "`model` must be a keras.Model (Functional, Sequential or subclassed) or a "
                f"zero-argument callable that returns one; received {type(model).__name__}. "
                "Wrap a single layer as keras.Sequential([keras.Input(shape), layer])."
            )
        else:
            self.model = None
            self._model_factory = model
        self._optimizer_spec = optimizer
        self._loss_spec = loss
        self._metrics_spec = metrics
        self._weighted_metrics_spec = weighted_metrics
        self._loss_weights_spec = loss_weights
        self._class_weight = validate_class_weight(class_weight)
        self._lr_scheduler_spec = _check_lr_scheduler(lr_scheduler)
        self._compile_backend = resolve_compile(compile)
        self._compiled_step: CompiledStep | None = None
        self._validate_loss_spec(loss)
        check_metric_spec(metrics, "metrics")
        check_metric_spec(weighted_metrics, "weighted_metrics")
        self._objective: Objective | None = None
        self._stages = {stage: EpochState(prefix) for stage, prefix in _STAGE_PREFIX.items()}
        # torchmetrics given by the user are registered so that Lightning moves them.
        self.torchmetrics = torch.nn.ModuleList(_torchmetrics_in(metrics, weighted_metrics))
        if self.model is not None:
            self._adopt_compile_config(self.model)
        checkpoints.register_hooks(self)  # stable state_dict keys (checkpoint.py)

    # ------------------------------------------------------------------ set-up

    def _validate_loss_spec(self, loss: Any) -> None:
        for spec in _leaves(loss):
            if spec is None or (isinstance(spec, str) and spec.lower() in ("crossentropy", "ce")):
                continue
            resolve_loss(spec)

    def _adopt_compile_config(self, model: keras.Model) -> None:
        """Use what ``model.compile()`` was given for every argument left unset."""
        if not getattr(model, "compiled", False):
            return
        config = getattr(getattr(model, "_compile_config", None), "config", {}) or {}
        if self._optimizer_spec is None and getattr(model, "optimizer", None) is not None:
            self._optimizer_spec = model.optimizer
        if self._loss_spec is None and config.get("loss") is not None:
            self._loss_spec = config["loss"]
            if self._loss_weights_spec is None:
                self._loss_weights_spec = config.get("loss_weights")
        if self._metrics_spec is None and self._weighted_metrics_spec is None:
            self._metrics_spec = config.get("metrics")
            self._weighted_metrics_spec = config.get("weighted_metrics")
            self.torchmetrics = torch.nn.ModuleList(
                _torchmetrics_in(self._metrics_spec, self._weighted_metrics_spec)
            )

    @override
    def configure_model(self) -> None:
        if self.model is None:
            assert self._model_factory is not None
            with self.keras_scope():
                model = self._model_factory()
            if not isinstance(model, keras.Model):
                raise ArgumentTypeError(
                    "The `model` factory must return a keras.Model; it returned "
                    f"{type(model).__name__}."
                )
            self.model = model
            self._adopt_compile_config(model)
        if not _is_built(self.model):
            batch = _peek_first_batch(self._trainer)
            if batch is not None:
                self.build_from_batch(batch)
        if self._trainer is not None:  # before Lightning converts the module (precision.py)
            precision.check_precision(self._trainer.precision, self.model)

    def build_from_batch(self, batch: Any) -> None:
        """Create the model's variables by running it once on ``batch``'s ``x``."""
        x, _, _ = unpack_batch(batch)
        with torch.no_grad(), self.keras_scope():
            self.require_model()(x, training=False)

    def require_model(self) -> keras.Model:
        """The Keras model; built from the factory first if needed."""
        if self.model is None:
            self.configure_model()
        assert self.model is not None
        return self.model

    @contextlib.contextmanager
    def keras_scope(self) -> Iterator[None]:
        """Run Keras on the device Lightning assigned to this module."""
        target = self.device
        if distributed.same_device(target, distributed.keras_default_device()):
            yield
            return
        with keras.device(str(target)):
            yield

    # ------------------------------------------------------------------ forward and loss

    @override
    def forward(self, x: Any, training: bool = False) -> Any:
        """Run the Keras model with an explicit ``training`` flag."""
        return self.require_model()(x, training=training)

    def compute_loss(
        self, y_pred: Any, y: Any, sample_weight: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured loss (order handled, ``model.losses`` added) and per-output losses."""
        objective = self._resolve_objective(y_pred, y)
        _, outputs = output_structure(y_pred, self.model)
        total, parts = objective(outputs, y, sample_weight, list(self.model.losses))
        assert objective.names is not None
        named = {
            f"{name}_loss": part
            for name, part in zip(objective.names, parts, strict=True)
            if part is not None
        }
        return total, (named if len(objective.names) > 1 else {})

    def _resolve_objective(self, y_pred: Any, y: Any) -> Objective:
        if self._objective is None or not self._objective.resolved:
            names, outputs = output_structure(y_pred, self.model)
            targets = align_targets(y, names) if y is not None else [None] * len(names)
            objective = Objective(self._loss_spec, self._loss_weights_spec, self._class_weight)
            objective.resolve(names, targets, outputs)
            self._objective = objective
        return self._objective

    def _bind_stage_metrics(self, stage: str, y_pred: Any, y: Any) -> EpochState:
        state = self._stages[stage]
        if state.metrics is None:
            names, outputs = output_structure(y_pred, self.model)
            targets = align_targets(y, names) if y is not None else [None] * len(names)
            if y is None:
                state.metrics = []
            else:
                state.metrics = bind_metrics(
                    self._metrics_spec,
                    self._weighted_metrics_spec,
                    names,
                    targets,
                    outputs,
                    copy=stage != "train",
                )
                for metric in state.metrics:
                    if metric.is_torchmetric:
                        metric.metric.to(self.device)
                    else:  # a Keras metric object may have been built on Keras' default device
                        distributed.place_variables(metric.metric.variables, self.device)
        return state

    def _forward_and_loss(
        self, x: Any, y: Any, sample_weight: Any, training: bool
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The model output, the loss and per-output losses: the part ``compile`` captures."""
        y_pred = self.require_model()(x, training=training)
        loss, output_losses = self.compute_loss(y_pred, y, sample_weight)
        return y_pred, loss, output_losses

    def _step_function(self) -> Callable[..., Any]:
        """Eager on the first batch (it resolves losses and metrics), then compiled if asked."""
        if self._compile_backend is None or self._objective is None:
            return self._forward_and_loss
        if self._compiled_step is None:
            self._compiled_step = CompiledStep(self._forward_and_loss, self._compile_backend)
        return self._compiled_step

    @property
    def compile_stats(self) -> Any:
        """What ``torch.compile`` did (:class:`~keras_lightning.compiled.CompileStats`), or None."""
        return None if self._compiled_step is None else self._compiled_step.stats

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, sample_weight = unpack_batch(batch)
        model = self.require_model()
        with self.keras_scope():
            y_pred, loss, output_losses = self._step_function()(
                x, y, sample_weight, stage == "train"
            )
            count = batch_size_of(x)
            state = self._bind_stage_metrics(stage, y_pred, y)
            state.add_mean("loss", loss, count)
            for name, value in output_losses.items():
                state.add_mean(name, value, count)
            if state.metrics and y is not None:
                names, outputs = output_structure(y_pred, model)
                assert self._objective is not None
                targets = align_targets(y, names)
                weights = (
                    self._objective.sample_weight(targets[0], sample_weight)
                    if len(names) == 1
                    else sample_weight
                )
                with torch.no_grad():
                    state.update_metrics([o.detach() for o in outputs], targets, weights)
        return loss

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.uses_keras_train_step():  # the Keras model's own train_step (custom_steps.py)
            return self.keras_train_step(batch, batch_idx)
        loss = self._shared_step(batch, "train")
        if self._step_loss_wanted(batch_idx):
            self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _step_loss_wanted(self, batch_idx: int) -> bool:
        """Whether this step's ``loss`` is logged: ``self.log`` costs as much as a small model.

        It is logged on every step while a progress bar shows it; otherwise on the steps a
        logger writes (every ``Trainer(log_every_n_steps=...)``) and on the first and last
        batch of each epoch, so that ``trainer.callback_metrics["loss"]`` exists and holds the
        last batch's loss in callbacks' ``on_train_epoch_end``. The epoch's exact mean is
        logged after them, at the module's epoch end.
        """
        trainer = self._trainer
        if trainer is None or batch_idx == 0:
            return True
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled:
            return True
        if batch_idx + 1 >= trainer.num_training_batches:
            return True
        if not trainer.loggers:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.uses_keras_test_step():
            return self.keras_test_step(batch, "val")
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.uses_keras_test_step():
            return self.keras_test_step(batch, "test")
        return self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        x, _, _ = unpack_batch(batch)
        with self.keras_scope():
            return self.require_model()(x, training=False)

    @override
    def on_train_epoch_start(self) -> None:
        with self.keras_scope():  # Keras metric resets create tensors
            self._stages["train"].reset()
        self.keras_epoch_start("train")

    @override
    def on_validation_epoch_start(self) -> None:
        distributed.average_non_trainable(self.model)  # same BatchNorm statistics on every rank
        with self.keras_scope():  # Keras metric resets create tensors
            self._stages["val"].reset()
        self.keras_epoch_start("val")

    @override
    def on_test_epoch_start(self) -> None:
        with self.keras_scope():  # Keras metric resets create tensors
            self._stages["test"].reset()
        self.keras_epoch_start("test")

    @override
    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        self.keras_train_epoch_end()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        self.keras_epoch_end("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self.keras_epoch_end("test")

    def _log_epoch(self, stage: str) -> None:
        with self.keras_scope():  # Keras metric results are computed with Keras ops
            values = self._stages[stage].compute(self._all_reduce())
        prefix = _STAGE_PREFIX[stage]
        for name, value in values.items():
            self.log(name, value, prog_bar=name == f"{prefix}loss", on_epoch=True, on_step=False)

    def _all_reduce(self) -> Callable[[torch.Tensor], None] | None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        if torch.distributed.get_world_size() == 1:
            return None

        def all_reduce(tensor: torch.Tensor) -> None:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

        return all_reduce

    # ------------------------------------------------------------------ processes (distributed.py)

    @override
    def setup(self, stage: str) -> None:
        distributed.move_to_lightning_device(self, self._trainer)  # configure_model builds there
        checkpoints.use_atomic_writes(self._trainer)  # a killed write keeps the last checkpoint

    @override
    def configure_callbacks(self) -> Any:
        # The first hook a forked worker (ddp_notebook) runs: refuse a parent that used CUDA.
        distributed.check_fork(model_given_built=self._model_factory is None)
        return []

    @override
    def on_train_start(self) -> None:
        distributed.start_of_training(self.model)  # per-rank dropout randomness

    @override
    def on_train_end(self) -> None:
        distributed.end_of_training(self.model)  # every rank ends with the same model

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.keras_train_batch_start()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        distributed.sync_checkpoint_state(self.model, checkpoint["state_dict"], self.state_dict)
        self.save_keras_optimizers(checkpoint)  # optimizers a custom compile() created
        checkpoints.on_save_checkpoint(self, checkpoint)  # model config, arguments, RNG states

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_keras_optimizers(checkpoint)
        checkpoints.on_load_checkpoint(self, checkpoint)

    @override
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load stable keys (``checkpoint.py``); a strict mismatch raises ``CheckpointError``."""
        checkpoints.check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        *,
        custom_objects: Mapping[str, Any] | None = None,
        safe_mode: bool = True,
        **kwargs: Any,
    ) -> KerasLightningModule:
        """Rebuild a module from a checkpoint, without the code that built the Keras model.

        The Keras model is rebuilt from the config stored in the checkpoint (unless
        ``model=`` is given) and the wrapper's Keras arguments are restored; torch objects
        (torch optimizers and losses, torchmetrics, ``lr_scheduler``) must be passed again.

        Args:
            checkpoint_path: A ``.ckpt`` written while training a ``KerasLightningModule``.
            map_location: As in ``torch.load``; defaults to the CPU.
            hparams_file: Not supported (the config comes from the checkpoint).
            strict: Require every Keras variable to match (default ``True``).
            weights_only: torch's safe unpickling; ``False`` only for trusted files.
            custom_objects: Custom Keras classes and functions not registered with
                ``keras.saving.register_keras_serializable``.
            safe_mode: Keras' safe mode; ``False`` allows ``Lambda`` layers (runs stored code).
            **kwargs: Constructor arguments that override the stored ones (``model=``,
                ``optimizer=``, ``loss=``...).

        Example:
            >>> module = KerasLightningModule.load_from_checkpoint("last.ckpt")  # doctest: +SKIP

        """
        return checkpoints.load_module(
            cls,
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
            **kwargs,
        )

    @override
    def configure_optimizers(self) -> Any:
        if self.uses_keras_train_step():
            return self.configure_keras_side_optimizers()
        model = self.require_model()
        if self._optimizer_spec is None:
            raise ConfigurationError(
                "KerasLightningModule(optimizer=...) is needed to train: pass a Keras "
                "optimizer or its name (optimizer='adam'), a torch optimizer class "
                "(optimizer=torch.optim.Adam), or compile() the Keras model first."
            )
        if not model.trainable_variables:
            raise ConfigurationError(
                "The Keras model has no trainable variables yet: it is not built. Give it an "
                "keras.Input, call it once on a batch, or let the Trainer build it from the "
                "first batch (pass the dataloaders to trainer.fit)."
            )
        with self.keras_scope():  # Keras optimizer variables on this module's device
            optimizer = resolve_optimizer(self._optimizer_spec, model)
        if self._lr_scheduler_spec is None:
            return optimizer
        if isinstance(optimizer, KerasOptimizer) and optimizer.lr_is_schedule:
            raise ConfigurationError(
                "Both a Keras LearningRateSchedule (in the Keras optimizer) and `lr_scheduler` "
                "were given; they would fight over the learning rate. Keep one: a Keras "
                "optimizer with a float learning_rate plus lr_scheduler=..., or the Keras "
                "schedule alone."
            )
        return {"optimizer": optimizer, "lr_scheduler": _build_scheduler(
            self._lr_scheduler_spec, optimizer
        )}


# ---------------------------------------------------------------------- helpers


def _leaves(spec: Any) -> list[Any]:
    if isinstance(spec, Mapping):
        return [leaf for value in spec.values() for leaf in _leaves(value)]
    if isinstance(spec, list | tuple):
        return [leaf for value in spec for leaf in _leaves(value)]
    return [spec]


def _torchmetrics_in(*specs: Any) -> list[torchmetrics.Metric]:
    leaves = (leaf for spec in specs for leaf in _leaves(spec))
    return [leaf for leaf in leaves if isinstance(leaf, torchmetrics.Metric)]


def _is_built(model: keras.Model) -> bool:
    return bool(model.built) and len(model.variables) > 0


def _peek_first_batch(trainer: Any) -> Any:
    """The first batch of the running stage's dataloader, to build an unbuilt model."""
    if trainer is None:
        return None
    loop = {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }.get(str(trainer.state.fn.value) if trainer.state.fn else "")
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    loaders = source.dataloader()
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()))
    elif isinstance(loaders, list | tuple):
        loaders = loaders[0]
    return next(iter(loaders))


def _check_lr_scheduler(spec: Any) -> Any:
    if spec is None:
        return None
    scheduler = spec.get("scheduler") if isinstance(spec, Mapping) else spec
    if not callable(scheduler):
        raise ArgumentTypeError(
            "`lr_scheduler` must be a callable optimizer -> scheduler, e.g. "
            "`lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1)`, or a Lightning "
            "dict {'scheduler': that_callable, 'interval': 'step'}; received "
            f"{spec!r}."
        )
    return spec


def _build_scheduler(spec: Any, optimizer: torch.optim.Optimizer) -> Any:
    if isinstance(spec, Mapping):
        config = dict(spec)
        config["scheduler"] = _call_scheduler(config["scheduler"], optimizer)
        return config
    return _call_scheduler(spec, optimizer)


def _call_scheduler(factory: Any, optimizer: torch.optim.Optimizer) -> Any:
    scheduler = factory(optimizer)
    if not isinstance(
        scheduler,
        torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
    ):
        raise ArgumentTypeError(
            "`lr_scheduler` was called with the optimizer and returned "
            f"{type(scheduler).__name__}, not a torch LR scheduler. Return e.g. "
            "torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)."
        )
    return scheduler
