"""``KerasLightningModule``: a LightningModule that trains a torch-backend Keras model.

The class wires the pieces together and holds the public surface; the work lives in the
modules named for it: the step strategies (:mod:`~keras_lightning.builtin_steps`,
:mod:`~keras_lightning.keras_steps`, chosen once per stage), devices
(:mod:`~keras_lightning.devices`), replicas under DDP (:mod:`~keras_lightning.replicas`),
checkpoints (:mod:`~keras_lightning.checkpoint`) and the library part of Lightning's hooks
(:mod:`~keras_lightning.lifecycle`), which runs whether or not a subclass calls ``super()``.
"""

from __future__ import annotations

from keras_lightning import (
    _private,
    adapters,
    checkpoint,
    collectives,
    devices,
    hparams,
    precision,
    replicas,
    sharding,
    whole_step,
)
from keras_lightning.builtin_steps import Arguments, BuiltinSteps
from keras_lightning.callbacks import check_trainer_callbacks
from keras_lightning.compiled import CompileStats, resolve_compile
from keras_lightning.data import first_batch, unpack_batch, validate_class_weight
from keras_lightning.exceptions import KerasLightningTypeError
from keras_lightning.keras_model import adopt_compile_config, as_keras_data, overrides_step
from keras_lightning.keras_steps import KerasSteps, check_picklable, load_checkpoint
from keras_lightning.lifecycle import RUNNING_HOOKS, guard_hooks
from keras_lightning.lightning_side import LightningSideHelpers
from keras_lightning.lightning_tools import (
    check_lightning_callbacks,
    refresh_swa_copies,
    show_keras_layers_in_summaries,
)
from keras_lightning.metrics import check_metric_spec
from keras_lightning.optimizers import (
    LaterTrainable,
    check_lr_scheduler,
    check_optimizer_states,
    check_optimizers_train,
    configure_builtin,
    finalize_keras_optimizers,
    learning_rate_of,
)
from keras_lightning.specs import (
    LossSpec,
    LossWeightsSpec,
    MetricsSpec,
    ModelSpec,
    OptimizerSpec,
    SchedulerSpec,
    torchmetrics_in,
    validate_loss_spec,
)

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import torch
from typing_extensions import override

_UNSET: Any = object()


class KerasLightningModule(LightningSideHelpers):
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
        jit_compile: ``True`` (or a ``torch.compile`` backend name: ``"eager"``,
            ``"aot_eager"``, ``"inductor"``) captures the model's forward pass and loss with
            ``torch.compile`` from the second batch on, which removes Keras' per-layer Python
            overhead; ``True`` means ``"eager"`` (graph capture only, warm-up of a second or
            two). If capturing fails, training goes on eagerly with a warning. Named after
            Keras' ``compile(jit_compile=...)``; see ``keras_lightning.compiled``.
        checkpoint_weights: ``"all"`` (the default) or ``"trainable"``: checkpoints hold only
            the weights that train and the state training changed, not the frozen base weights
            (an adapter checkpoint for LoRA fine-tuning); load one onto the same base model.
            See ``keras_lightning.adapters``.
        compile: Deprecated name of ``jit_compile``.

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
        ['loss', 'loss_epoch']

    """

    def __init__(
        self,
        model: ModelSpec,
        *,
        optimizer: OptimizerSpec = None,
        loss: LossSpec = None,
        metrics: MetricsSpec = None,
        weighted_metrics: MetricsSpec = None,
        loss_weights: LossWeightsSpec = None,
        class_weight: Mapping[int, float] | None = None,
        lr_scheduler: SchedulerSpec = None,
        jit_compile: bool | str = False,
        checkpoint_weights: str = "all",
        compile: bool | str = _UNSET,
    ) -> None:
        super().__init__()
        self.model: keras.Model | None
        if isinstance(model, keras.Model):
            self.model = model
            self._model_factory: Callable[[], keras.Model] | None = None
        elif isinstance(model, keras.layers.Layer) or not callable(model):
            raise KerasLightningTypeError(
                "`model` must be a keras.Model (Functional, Sequential or subclassed) or a "
                f"zero-argument callable that returns one; received {type(model).__name__}. "
                "Wrap a single layer as keras.Sequential([keras.Input(shape), layer])."
            )
        else:
            self.model = None
            self._model_factory = model
        if compile is not _UNSET:
            warnings.warn(
                "KerasLightningModule(compile=...) is deprecated: it is named jit_compile=..., "
                "after Keras' model.compile(jit_compile=...). Pass jit_compile="
                f"{compile!r}.",
                DeprecationWarning,
                stacklevel=2,
            )
            jit_compile = compile
        self._arguments = Arguments(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            loss_weights=loss_weights,
            class_weight=validate_class_weight(class_weight),
            lr_scheduler=check_lr_scheduler(lr_scheduler),
            given=frozenset(
                name
                for name, value in (
                    ("optimizer", optimizer),
                    ("loss", loss),
                    ("metrics", metrics),
                    ("weighted_metrics", weighted_metrics),
                    ("loss_weights", loss_weights),
                )
                if value is not None
            ),
        )
        validate_loss_spec(loss)
        check_metric_spec(metrics, "metrics")
        check_metric_spec(weighted_metrics, "weighted_metrics")
        self._builtin = BuiltinSteps(self, self._arguments, resolve_compile(jit_compile))
        self._keras_steps = KerasSteps(self)
        # the random states of a resumed checkpoint, restored once its weights have loaded (or,
        # for a mid-epoch checkpoint, just before the next batch): {"rng": ..., "mid_epoch": ...}
        self._pending_rng: dict[str, Any] | None = None
        self._lr_override: float | None = None  # learning_rate set by the user or lr_find
        self._later_trainable = LaterTrainable()  # weights unfrozen after configure_optimizers
        self._checkpoint_weights = adapters.check_choice(checkpoint_weights)
        self._adapter = adapters.AdapterState()  # what an adapter checkpoint leaves out
        # torchmetrics given by the user are registered so that Lightning moves them.
        self.torchmetrics = torch.nn.ModuleList(torchmetrics_in(metrics, weighted_metrics))
        if self.model is not None:
            self._adopt_compile_config(self.model)
        checkpoint.register_hooks(self)  # stable state_dict keys (checkpoint/keys.py)
        self._describe_hyperparameters()  # hparams["keras"], refreshed once the Trainer builds

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_hooks(cls)  # library behaviour survives overrides without super() (lifecycle.py)

    # ------------------------------------------------------------------ the Keras model

    def _adopt_compile_config(self, model: keras.Model) -> None:
        """Use what ``model.compile()`` was given for every argument left unset."""
        adopted_torchmetrics = adopt_compile_config(model, self._arguments)
        if adopted_torchmetrics is not None:
            self.torchmetrics = torch.nn.ModuleList(adopted_torchmetrics)

    def require_model(self) -> keras.Model:
        """Deprecated: ``module.model`` once built (``configure_model`` builds a factory's)."""
        warnings.warn(
            "KerasLightningModule.require_model() is deprecated: use module.model, which "
            "configure_model (run by the Trainer) builds from a factory.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._require_model()

    def _require_model(self) -> keras.Model:
        """The Keras model; built from the factory first if needed."""
        if self.model is None:
            self._build_model()
        assert self.model is not None
        return self.model

    def _build_model(self) -> None:
        if self.model is None:
            assert self._model_factory is not None
            with self.keras_scope():
                model = self._model_factory()
            if not isinstance(model, keras.Model):
                raise KerasLightningTypeError(
                    "The `model` factory must return a keras.Model; it returned "
                    f"{type(model).__name__}."
                )
            self.model = model
            self._adopt_compile_config(model)

    def build_from_batch(self, batch: Any) -> None:
        """Create the model's variables from one batch, as Keras' ``fit`` does.

        Keras traces the model on symbolic tensors shaped like the batch's ``x`` (its
        compiled loss and metrics too): nothing is computed and no random state advances,
        so the run that follows draws what Keras' ``fit`` draws. A model that cannot be traced
        is called once on ``x`` instead, its ``SeedGenerator`` states put back afterwards.
        """
        model = self._require_model()
        batch = self._standard_batch(batch)
        with torch.no_grad(), self.keras_scope():
            try:
                own_step = overrides_step(model, "train_step") or overrides_step(
                    model, "test_step"
                )
                _private.symbolic_build(model, as_keras_data(batch), with_compiled=own_step)
            except Exception:  # noqa: BLE001 (Keras raises anything a model's call raises)
                x, _, _ = unpack_batch(batch)
                with replicas.seed_states_kept(model):
                    model(x, training=False)

    @contextlib.contextmanager
    def keras_scope(self) -> Iterator[None]:
        """Run Keras on the device Lightning assigned to this module."""
        with devices.keras_device(self.device):
            yield

    @property
    def learning_rate(self) -> float | None:
        """The learning rate the next ``fit`` starts at; Lightning's ``lr_find`` reads and sets it.

        By default the configured optimizer's (a Keras optimizer's ``learning_rate``; None
        for a Keras ``LearningRateSchedule`` or a torch optimizer class, whose own default
        applies). Setting it (``Tuner(trainer).lr_find(module)`` does) makes the next
        ``configure_optimizers`` start every param group at that value.
        """
        if self._lr_override is not None:
            return self._lr_override
        return learning_rate_of(self._arguments.optimizer)

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self._lr_override = float(value)

    @property
    def compile_stats(self) -> CompileStats | whole_step.WholeStepStats | None:
        """What ``torch.compile`` did (:class:`~keras_lightning.compiled.CompileStats`, or
        :class:`~keras_lightning.WholeStepStats` for ``jit_compile="step"``), or None.
        """
        return self._builtin.compile_stats

    def _steps(self, stage: str) -> BuiltinSteps | KerasSteps:
        """The step strategy of ``stage``: the model's own step where it defines one."""
        model = self._require_model()
        method = "train_step" if stage == "train" else "test_step"
        return self._keras_steps if overrides_step(model, method) else self._builtin

    def _uses_keras_train_step(self) -> bool:
        return self.model is not None and overrides_step(self.model, "train_step")

    @property
    def automatic_optimization(self) -> bool:
        """False when the Keras model's own ``train_step`` optimizes (manual optimization)."""
        if self._uses_keras_train_step():
            return False
        if "_user_automatic_optimization" not in self.__dict__ and self._builtin.whole:
            trainer = _private.attached_trainer(self)  # jit_compile="step" (whole_step.py)
            return whole_step.hosting(self, trainer) != "manual"
        return bool(self.__dict__.get("_automatic_optimization", True))

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.__dict__["_automatic_optimization"] = value
        self.__dict__["_user_automatic_optimization"] = value  # a user's choice wins

    # ------------------------------------------------------------------ forward, loss, helpers

    @override
    def forward(self, x: Any, training: bool = False) -> Any:
        """Run the Keras model with an explicit ``training`` flag."""
        return self._require_model()(x, training=training)

    # ------------------------------------------------------------------ steps

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._steps("train").training_step(self._standard_batch(batch), batch_idx)

    @override
    def validation_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor | None:
        batch = self._standard_batch(batch)
        return self._steps("val").evaluation_step(batch, "val", batch_idx, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        batch = self._standard_batch(batch)
        return self._steps("test").evaluation_step(batch, "test", batch_idx, dataloader_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The model output (``training=False``), or what its own ``predict_step`` returns."""
        model = self._require_model()
        batch = self._standard_batch(batch)
        with self.keras_scope():
            if overrides_step(model, "predict_step"):
                return model.predict_step(as_keras_data(batch))
            x, _, _ = unpack_batch(batch)
            return model(x, training=False)

    # ------------------------------------------------------------------ hooks
    # Each hook below is for users; its library part is the `_library_<hook>` method after it,
    # which runs before the hook's body whatever a subclass overrides (lifecycle.py).

    @override
    def configure_model(self) -> None:
        pass

    def _library_configure_model(self) -> None:
        self._build_model()
        assert self.model is not None
        if not _is_built(self.model):
            batch = _peek_first_batch(_private.attached_trainer(self))
            if batch is not None:
                self.build_from_batch(batch)
        _private.track_variables(self.model)  # every variable a parameter Lightning sees
        trainer = _private.attached_trainer(self)
        if trainer is not None:  # FSDP2 under ModelParallelStrategy, where the model lives
            sharding.check_strategy(
                trainer.strategy,
                optimizer=self._arguments.optimizer,
                own_train_step=self._uses_keras_train_step(),
                checkpoint_weights=self._checkpoint_weights,
                model=self.model,
                fitting=_private.fitting(trainer),
                own_optimizers=_overrides(self, "configure_optimizers"),
            )
            if sharding.is_model_parallel(trainer.strategy) and self.device_mesh is not None:
                sharding.shard(self.model, self.device_mesh["data_parallel"])
        self._describe_hyperparameters()  # for loggers: the model, before the optimizers
        if trainer is not None:  # before Lightning converts the module (precision.py)
            precision.check_precision(trainer.precision, self.model)
            check_lightning_callbacks(trainer.callbacks, self)
            refresh_swa_copies(trainer.callbacks, self)  # SWA copied a factory's module unbuilt

    def _describe_hyperparameters(self) -> None:
        """``hparams["keras"]``: the Keras arguments as plain values (``hparams.py``)."""
        trainer = _private.attached_trainer(self)
        optimizers = list(trainer.optimizers) if trainer is not None else []
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs] if trainer else []
        description = hparams.describe(
            self.model, self._arguments, self._builtin.compile_backend, optimizers, schedulers
        )
        self.save_hyperparameters({**dict(self.hparams), hparams.KEY: description})

    @override
    def on_fit_start(self) -> None:
        pass

    def _library_on_fit_start(self) -> None:
        self._describe_hyperparameters()  # the optimizers are built now; Lightning logs next

    @override
    def setup(self, stage: str) -> None:
        pass

    def _library_setup(self, stage: str) -> None:
        self._pending_rng = None  # only a checkpoint loaded by this run may set it
        trainer = _private.attached_trainer(self)
        devices.move_to_lightning_device(self, trainer)  # configure_model builds there
        checkpoint.use_atomic_writes(trainer)  # a killed write keeps the last checkpoint

    @override
    def configure_callbacks(self) -> Any:
        return []

    def _library_configure_callbacks(self) -> None:
        # The first hook a forked worker (ddp_notebook) runs: refuse a parent that used CUDA.
        devices.check_fork(model_given_built=self._model_factory is None)
        trainer = _private.attached_trainer(self)
        if trainer is not None:  # before Lightning calls any callback hook
            check_trainer_callbacks(trainer.callbacks)
            show_keras_layers_in_summaries(trainer.callbacks)  # rows per Keras layer

    @override
    def on_train_start(self) -> None:
        pass

    def _library_on_train_start(self) -> None:
        trainer = _private.attached_trainer(self)
        if trainer is not None and not self._uses_keras_train_step():
            check_optimizers_train(trainer.optimizers, self)
        self._restore_pending_rng(at="load")  # if the strategy loaded weights another way
        if trainer is not None and not self.automatic_optimization and self._builtin.whole:
            _private.align_step_counters(trainer)  # an eager run's checkpoint, resumed fast
        replicas.start_of_training(self.model)  # per-rank dropout randomness, after the restore
        if self._checkpoint_weights == "trainable":
            self._adapter.start_training(self.model)  # to tell frozen weights from changed ones

    @override
    def on_train_end(self) -> None:
        pass

    def _library_on_train_end(self) -> None:
        self._pending_rng = None  # a resume that never reached a batch leaves nothing behind
        trainer = _private.attached_trainer(self)
        if trainer is not None and self.model is not None:  # EMA weights in, as fit() ends
            with self.keras_scope():
                finalize_keras_optimizers(
                    trainer.optimizers, self.model, self._uses_keras_train_step()
                )
        replicas.end_of_training(self.model)  # every rank ends with the same model

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return None

    def _library_on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._restore_pending_rng(at="batch")  # resumed mid-epoch: the streams go on here
        optimizer = self._builtin_optimizer()
        if optimizer is not None:  # a layer unfrozen since configure_optimizers trains too
            assert self.model is not None
            self._later_trainable.adopt(optimizer, self.model)
        self._steps("train").train_batch_start()

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def _library_on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._later_trainable.average_late_gradients(self)  # unfrozen after DDP wrapped

    @override
    def on_train_epoch_start(self) -> None:
        pass

    def _library_on_train_epoch_start(self) -> None:
        self._steps("train").epoch_start("train")

    @override
    def on_validation_epoch_start(self) -> None:
        pass

    def _library_on_validation_epoch_start(self) -> None:
        replicas.average_non_trainable(self.model)  # same BatchNorm statistics on every rank
        self._steps("val").epoch_start("val")

    @override
    def on_test_epoch_start(self) -> None:
        pass

    def _library_on_test_epoch_start(self) -> None:
        self._steps("test").epoch_start("test")

    @override
    def on_train_epoch_end(self) -> None:
        pass

    def _library_on_train_epoch_end(self) -> None:
        self._steps("train").epoch_end("train")

    @override
    def on_validation_epoch_end(self) -> None:
        pass

    def _library_on_validation_epoch_end(self) -> None:
        self._steps("val").epoch_end("val")

    @override
    def on_test_epoch_end(self) -> None:
        pass

    def _library_on_test_epoch_end(self) -> None:
        self._steps("test").epoch_end("test")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass

    def _library_on_save_checkpoint(self, ckpt: dict[str, Any]) -> None:
        replicas.sync_checkpoint_state(self.model, ckpt["state_dict"], self.state_dict)
        if self._uses_keras_train_step():  # optimizers a custom compile() created
            self._keras_steps.save_checkpoint(ckpt)
        trainer = _private.attached_trainer(self)
        checkpoint.on_save_checkpoint(
            self.model, self._arguments, ckpt, mid_epoch=_private.mid_epoch(trainer)
        )
        if self._later_trainable.positions:
            ckpt[_LATER_TRAINABLE] = list(self._later_trainable.positions)
        if self._checkpoint_weights == "trainable" and self.model is not None:
            ckpt[adapters.KEY] = self._adapter.strip(self.model, ckpt["state_dict"])

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass

    def _library_on_load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        # Lightning calls this before it loads the weights (load_state_dict checks those, with
        # the strictness Lightning passes, before anything is assigned) and the optimizers:
        # refuse another optimizer class here, so that a mismatch leaves the module as it was.
        # The random generators are restored once the weights have loaded (_pending_rng).
        model = self._require_model()
        trainer = _private.attached_trainer(self)
        if _private.fitting(trainer) and not self._uses_keras_train_step() and not _overrides(
            self, "configure_optimizers"
        ):
            check_optimizer_states(ckpt.get("optimizer_states") or [], self._arguments.optimizer)
        self._adapter.fill(model, ckpt)  # an adapter checkpoint: the base weights it left out
        load_checkpoint(model, ckpt)  # the Keras train_step's optimizers: checked, then assigned
        self._later_trainable.positions = list(ckpt.get(_LATER_TRAINABLE, []))
        self._pending_rng = checkpoint.on_load_checkpoint(trainer, ckpt)

    # ------------------------------------------------------------------ optimizers

    def _library_configure_optimizers(self) -> None:
        # Lightning calls this right after DDP wrapped the module: what its reducer averages
        trainer = _private.attached_trainer(self)
        ddp = trainer is not None and collectives.world_size() > 1 and _is_ddp(trainer.strategy)
        self._later_trainable.wrapped_by_ddp(self, ddp)  # layers unfrozen later: averaged here

    @override
    def configure_optimizers(self) -> Any:
        arguments = self._arguments
        if self._uses_keras_train_step():
            return self._keras_steps.configure_optimizers(
                arguments.optimizer, arguments.lr_scheduler
            )
        with self.keras_scope():  # Keras optimizer variables on this module's device
            configured = configure_builtin(
                arguments.optimizer, arguments.lr_scheduler, self._require_model(),
                self._lr_override,
            )
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        self._later_trainable.restore(optimizer, self._require_model())  # resumed: same groups
        return configured

    def _builtin_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer the module built (None under a user's own configure_optimizers)."""
        trainer = _private.attached_trainer(self)
        if (
            trainer is None
            or self.model is None
            or not trainer.optimizers
            or self._uses_keras_train_step()
            or _overrides(self, "configure_optimizers")
        ):
            return None
        return trainer.optimizers[0]

    # ------------------------------------------------------------------ state and pickling

    @override
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load stable keys (``checkpoint/keys.py``); a strict mismatch raises CheckpointError."""
        checkpoint.check_state_dict(self, state_dict, strict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._restore_pending_rng(at="load")  # a resume whose weights loaded: streams go on
        return result

    def _restore_pending_rng(self, at: str) -> None:
        """Restore a resumed checkpoint's random generators once its weights have loaded.

        ``at="load"``: right after the weights (an epoch-end checkpoint: nothing draws from
        the generators between there and the next epoch's dataloader, as in the uninterrupted
        run); ``at="batch"``: just before the next training batch (a mid-epoch checkpoint: the
        resumed epoch's dataloader iterator is created again, and draws, before it).
        """
        pending = self._pending_rng
        if pending is None or (at == "load") == bool(pending["mid_epoch"]):
            return
        self._pending_rng = None
        checkpoint.set_rng_states(pending["rng"])
        if at == "batch":
            replicas.fork_torch_rng_for_this_rank()  # as at training start (a no-op alone)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``ddp_spawn``); a Keras train_step model that cannot be pickled fails clearly."""
        state: dict[str, Any] = super().__getstate__()
        state.pop(RUNNING_HOOKS, None)  # a copy made inside a hook must not think it runs one
        if self._uses_keras_train_step():
            check_picklable(self.model)
        return state

    @classmethod
    def load_from_checkpoint(
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
        return checkpoint.load_module(
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


guard_hooks(KerasLightningModule)


# ---------------------------------------------------------------------- helpers


_LATER_TRAINABLE = "keras_lightning_later_trainable"


def _is_ddp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def _overrides(module: KerasLightningModule, name: str) -> bool:
    return getattr(type(module), name) is not getattr(KerasLightningModule, name)


def _is_built(model: keras.Model) -> bool:
    return bool(model.built) and len(model.variables) > 0


def _peek_first_batch(trainer: Any) -> Any:
    """The first batch of the running stage's dataloader, to build an unbuilt model."""
    loaders = None if trainer is None else _private.stage_dataloaders(trainer)
    return None if loaders is None else first_batch(loaders)
