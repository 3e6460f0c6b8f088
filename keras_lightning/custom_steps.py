"""Custom training logic, both ways.

Keras side: a Keras model that overrides ``train_step`` / ``test_step`` (torch-backend style, as in
Keras' guide "Customizing what happens in fit() with PyTorch") runs those methods unchanged, one
call per batch, under Lightning's manual optimization. The dict they return is logged under Keras'
names (nested dicts such as ``compile_metrics`` flattened as Keras' ``fit`` does), ``model.metrics``
are reset at each epoch start, the Keras optimizers the model holds (``model.optimizer``, or a GAN's
``d_optimizer`` / ``g_optimizer`` set in a custom ``compile``) are saved in checkpoints, and under
DDP their gradients are averaged across processes before each ``apply``.

Lightning side: a ``KerasLightningModule`` subclass that overrides ``training_step`` gets small
helpers (:meth:`CustomStepsMixin.apply_gradients`, :meth:`CustomStepsMixin.update_metrics`) next
to the existing ``forward(x, training=...)`` and ``compute_loss(y_pred, y, sample_weight)``.

The pure functions at the top can be used and tested without a Trainer; :class:`CustomStepsMixin`
is the thin stateful part that ``KerasLightningModule`` inherits.
"""

from __future__ import annotations

from keras_lightning.data import align_targets, batch_size_of, output_structure, unpack_batch
from keras_lightning.exceptions import CheckpointError, ConfigurationError

import atexit
import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import torch

#: Key under which :func:`keras_optimizer_state` is stored in a Lightning checkpoint.
CHECKPOINT_KEY = "keras_lightning_model_optimizers"

_KERAS_BASE_MODULES = ("keras.", "keras_hub.", "keras_nlp.", "keras_cv.")


# ---------------------------------------------------------------------- pure functions


def overrides_step(model: Any, name: str) -> bool:
    """True when ``model``'s class defines ``name`` (``"train_step"``, ``"test_step"``) itself.

    A method inherited from Keras' own classes (``keras.Model``, ``Sequential``, ...) does not
    count; one defined in any user class does.

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
    return _class_overrides(type(model), name)


@functools.lru_cache(maxsize=256)
def _class_overrides(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            return not klass.__module__.startswith(_KERAS_BASE_MODULES)
    return False


def flatten_logs(logs: Any, step: str = "train_step") -> dict[str, Any]:
    """Flatten the dict a Keras ``train_step`` / ``test_step`` returned, as Keras' ``fit`` does.

    Nested dicts (``{"compile_metrics": {"mae": ...}}``) are merged into the top level under their
    inner keys; keys are visited in sorted order, so a later key wins on a clash, as in Keras.

    Raises:
        ConfigurationError: ``logs`` is not a dict (or ``None``).

    Example:
        >>> sorted(flatten_logs({"loss": 1.0, "compile_metrics": {"mae": 0.5}}))
        ['loss', 'mae']

    """
    if logs is None:
        return {}
    if not isinstance(logs, Mapping):
        raise ConfigurationError(
            f"The Keras model's `{step}` must return a dict of metric names to values (or None), "
            f"as Keras' fit() expects; it returned {type(logs).__name__}. End it with e.g. "
            "`return {m.name: m.result() for m in self.metrics}`."
        )
    result: dict[str, Any] = {}
    for key, value in sorted(logs.items(), key=lambda item: str(item[0])):
        if isinstance(value, Mapping):
            result.update(flatten_logs(value, step))
        else:
            result[str(key)] = value
    return result


def scalar_logs(logs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split flat logs into loggable scalars (detached float tensors) and skipped names.

    Example:
        >>> import torch
        >>> values, skipped = scalar_logs({"loss": torch.tensor(2.0), "cm": torch.ones(2, 2)})
        >>> {k: float(v) for k, v in values.items()}, skipped
        ({'loss': 2.0}, ['cm'])

    """
    values: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, value in logs.items():
        try:
            tensor = torch.as_tensor(keras.ops.convert_to_tensor(value))
        except (TypeError, ValueError, RuntimeError):
            skipped.append(name)
            continue
        if tensor.numel() != 1 or tensor.is_complex():
            skipped.append(name)
            continue
        values[name] = tensor.detach().reshape(()).float()
    return values, skipped


def as_keras_data(batch: Any) -> Any:
    """The ``data`` argument Keras' ``fit`` would pass to ``train_step`` for this batch.

    Keras' adapters hand ``train_step`` tuples; a DataLoader collates ``TensorDataset`` items into
    lists, so lists become tuples. Anything else is passed as it is.
    """
    return tuple(batch) if isinstance(batch, list) else batch


def keras_optimizers_of(model: Any) -> dict[str, Any]:
    """The Keras optimizers a model holds as attributes, by attribute name.

    This finds ``model.optimizer`` (set by ``compile``) and optimizers a custom ``compile`` stored,
    such as a GAN's ``d_optimizer`` and ``g_optimizer``. An optimizer held under two names is
    listed once, under the first name in sorted order.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> model.d_optimizer = keras.optimizers.Adam()
        >>> sorted(keras_optimizers_of(model))
        ['d_optimizer', 'optimizer']

    """
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for name in sorted(vars(model)):
        value = vars(model)[name]
        if isinstance(value, keras.optimizers.Optimizer) and id(value) not in seen:
            seen.add(id(value))
            found[name] = value
    return found


def _variable_positions(optimizer: Any, model: Any, name: str) -> list[int]:
    positions = {id(variable): index for index, variable in enumerate(model.variables)}
    result = []
    for variable in optimizer._trainable_variables:
        index = positions.get(id(variable))
        if index is None:
            raise CheckpointError(
                f"The Keras optimizer `model.{name}` updates the variable {variable.path!r}, "
                "which is not one of the model's variables, so its state cannot be saved with "
                "the model. Keep every model the optimizer trains as an attribute of the "
                "wrapped Keras model (e.g. self.generator = generator)."
            )
        result.append(index)
    return result


def keras_optimizer_state(model: Any) -> dict[str, dict[str, Any]]:
    """The state of every Keras optimizer the model holds, for a checkpoint.

    Each built optimizer stores its variables (``iterations``, learning rate, slots such as
    Adam's moments) as CPU tensors (loadable with ``torch.load(weights_only=True)``), and which
    of ``model.variables`` it updates (by position, so the state loads into a freshly built model
    whose layer names differ). Optimizers not built yet (never applied) are stored as
    ``{"built": False}``.
    """
    state: dict[str, dict[str, Any]] = {}
    for name, optimizer in keras_optimizers_of(model).items():
        if not optimizer.built:
            state[name] = {"built": False}
            continue
        state[name] = {
            "built": True,
            "class": type(optimizer).__name__,
            "variable_positions": _variable_positions(optimizer, model, name),
            "values": [v.value.detach().cpu().clone() for v in optimizer.variables],
            "paths": [v.path for v in optimizer.variables],
        }
    return state


def load_keras_optimizer_state(model: Any, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore what :func:`keras_optimizer_state` saved into the model's Keras optimizers.

    An optimizer that is not built yet is built on the variables it updated when saved.

    Raises:
        CheckpointError: The checkpoint names an optimizer the model does not hold, or its
            variables do not match.

    """
    optimizers = keras_optimizers_of(model)
    variables = list(model.variables)
    for name, saved in state.items():
        if name not in optimizers:
            raise CheckpointError(
                f"The checkpoint holds the state of the Keras optimizer `model.{name}`, but the "
                f"model has no such optimizer (it has {sorted(optimizers)}). Call the model's "
                "compile(...) with the same optimizers before resuming."
            )
        if not saved.get("built"):
            continue
        optimizer = optimizers[name]
        positions = list(saved["variable_positions"])
        if max(positions, default=-1) >= len(variables):
            raise CheckpointError(
                f"The checkpoint's `model.{name}` updated variable #{max(positions)}, but the "
                f"model has only {len(variables)} variables: it was written for another "
                "architecture. Resume with the model that wrote it."
            )
        if not optimizer.built:
            optimizer.build([variables[i] for i in positions])
        values = saved["values"]
        if len(values) != len(optimizer.variables):
            raise CheckpointError(
                f"The checkpoint holds {len(values)} variables for `model.{name}` "
                f"({saved.get('class')}) but that optimizer has {len(optimizer.variables)} "
                f"({type(optimizer).__name__}). Resume with the same optimizer type."
            )
        for variable, value in zip(optimizer.variables, values, strict=True):
            if tuple(variable.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"Variable {variable.path!r} of `model.{name}` has shape "
                    f"{tuple(variable.shape)} here but {tuple(value.shape)} in the checkpoint."
                )
            variable.assign(value)


def snapshot_metrics(metrics: list[Any]) -> list[tuple[Any, torch.Tensor]]:
    """Copies of every metric variable, to restore with :func:`restore_metrics`."""
    return [(v, v.value.detach().clone()) for m in metrics for v in m.variables]


def restore_metrics(metrics: list[Any], snapshot: list[tuple[Any, torch.Tensor]]) -> None:
    """Reset ``metrics`` and put back the values of :func:`snapshot_metrics`."""
    for metric in metrics:
        metric.reset_state()
    for variable, value in snapshot:
        variable.assign(value)


def _world_size() -> int:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return int(torch.distributed.get_world_size())


def metric_results(metrics: list[Any]) -> dict[str, Any]:
    """``{name: result()}`` of Keras metrics, nested results flattened as Keras' ``fit`` does."""
    return flatten_logs({metric.name: metric.result() for metric in metrics})


def sum_metric_states(metrics: list[Any], device: torch.device) -> None:
    """Sum every Keras metric state variable over all processes, in place.

    A Keras metric's state is totals and counts (``Mean``: total and count; ``MeanAbsoluteError``
    through ``MeanMetricWrapper``: the same; ``AUC``, ``Precision``: confusion counts), so the
    sum over ranks of each state variable is the state of one metric that saw every rank's
    batches, and its ``result()`` is the exact global value, not a mean of per-rank results.
    Each variable is summed once (a metric listed twice is not doubled), through one buffer per
    dtype on ``device`` (the process group's device, whatever device a metric was built on).
    Every rank must call this with the same metrics in the same order.
    """
    variables = list({id(v): v for metric in metrics for v in metric.variables}.values())
    summed = _all_reduce_sum([v.value.detach() for v in variables], device=device)
    for variable, total in zip(variables, summed, strict=True):
        variable.value.copy_(total.to(variable.value.device))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


def average_gradients(grads: list[Any], world_size: int) -> list[Any]:
    """All-reduce ``grads`` (one flat buffer per dtype) and divide by ``world_size``."""
    present = [i for i, grad in enumerate(grads) if grad is not None]
    averaged = list(grads)
    summed = _all_reduce_sum([grads[i] for i in present], divide_by=world_size)
    for index, grad in zip(present, summed, strict=True):
        averaged[index] = grad
    return averaged


def _all_reduce_sum(
    tensors: list[torch.Tensor], device: torch.device | None = None, divide_by: int = 1
) -> list[torch.Tensor]:
    """``tensors`` summed over all processes (divided by ``divide_by``), one collective per
    dtype through a flat buffer (on ``device`` when given). Every rank must pass tensors of the
    same dtypes and sizes in the same order.
    """
    result = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1).to(device or tensors[i].device) for i in indices])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if divide_by != 1:
            flat /= divide_by
        parts = torch.split(flat, [tensors[i].numel() for i in indices])
        for index, part in zip(indices, parts, strict=True):
            result[index] = part.view_as(tensors[index])
    return result


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@functools.lru_cache(maxsize=1)
def _destroy_process_group_at_exit() -> None:
    """Register (once) a clean gloo shutdown at interpreter exit.

    Seen on CPU/gloo: after collectives issued from a Keras ``train_step``, a process that exits
    with its process group still alive sometimes aborts during interpreter shutdown ("terminate
    called without an active exception", exit code 134) although training finished; destroying
    the group first avoided it.
    """
    atexit.register(_destroy_process_group)


@contextlib.contextmanager
def synchronized_keras_optimizers(model: Any) -> Iterator[None]:
    """While active, every Keras optimizer of ``model`` averages gradients across processes.

    Keras' ``train_step`` calls the Keras model directly and runs ``backward`` itself, so DDP's
    reducer never sees its gradients. This wraps each optimizer's ``apply`` (which
    ``apply_gradients`` also goes through) so that the gradients are averaged over the process
    group first; outside a process group (or with one process) it does nothing.
    """
    world_size = _world_size()
    if world_size == 1:
        yield
        return
    _destroy_process_group_at_exit()
    patched = []
    for optimizer in keras_optimizers_of(model).values():
        original = optimizer.apply

        def apply(grads: Any, trainable_variables: Any = None, _original: Any = original) -> Any:
            return _original(average_gradients(list(grads), world_size), trainable_variables)

        object.__setattr__(optimizer, "apply", apply)
        patched.append(optimizer)
    try:
        yield
    finally:
        for optimizer in patched:
            object.__delattr__(optimizer, "apply")


# ---------------------------------------------------------------------- the mixin


class CustomStepsMixin:
    """Custom-step support for :class:`~keras_lightning.KerasLightningModule`.

    Keras side: runs the Keras model's own ``train_step`` / ``test_step`` when it overrides them.
    Lightning side: :meth:`apply_gradients` and :meth:`update_metrics` for subclasses that write
    their own ``training_step``.
    """

    _custom_logs: dict[str, dict[str, torch.Tensor]]
    _custom_metric_snapshot: list[tuple[Any, torch.Tensor]] | None
    _custom_warned: set[str]

    # ------------------------------------------------------------ detection

    def uses_keras_train_step(self) -> bool:
        """True when the wrapped Keras model overrides ``train_step`` (it then runs per batch)."""
        model = getattr(self, "model", None)
        return model is not None and overrides_step(model, "train_step")

    def uses_keras_test_step(self) -> bool:
        """True when the wrapped Keras model overrides ``test_step`` (validation and test)."""
        model = getattr(self, "model", None)
        return model is not None and overrides_step(model, "test_step")

    @property  # type: ignore[override]
    def automatic_optimization(self) -> bool:
        """False when the Keras model's own ``train_step`` optimizes (manual optimization)."""
        if self.uses_keras_train_step():
            return False
        return bool(self.__dict__.get("_automatic_optimization", True))

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.__dict__["_automatic_optimization"] = value

    def _custom_state(self) -> None:
        if not hasattr(self, "_custom_logs"):
            self._custom_logs = {}
            self._custom_metric_snapshot = None
            self._custom_warned = set()

    # ------------------------------------------------------------ Keras side: steps

    def keras_train_step(self, batch: Any, batch_idx: int = 0) -> None:
        """Run the Keras model's ``train_step`` on ``batch`` and log what it returns.

        The values are logged per step when the module's step-logging policy wants them (every
        step with a progress bar), and always at epoch end (Keras' History value).
        """
        self._custom_state()
        module: Any = self
        model = module.require_model()
        with module.keras_scope(), synchronized_keras_optimizers(model):
            logs = model.train_step(as_keras_data(batch))
        _count_optimizer_step(module)
        values = self._loggable(flatten_logs(logs, "train_step"))
        self._custom_logs["train"] = values
        wanted = getattr(module, "_step_loss_wanted", None)
        if wanted is not None and not wanted(batch_idx):
            return
        for name, value in values.items():
            module.log(name, value, prog_bar=True, on_step=True, on_epoch=False)

    def keras_test_step(self, batch: Any, stage: str) -> None:
        """Run the Keras model's ``test_step`` on ``batch``; its last logs are the epoch's."""
        self._custom_state()
        module: Any = self
        model = module.require_model()
        # Lightning evaluates under inference_mode; Keras metrics built here must stay usable
        # by training later, so build and update them as normal (no-grad) tensors.
        with torch.inference_mode(False), torch.no_grad(), module.keras_scope():
            logs = model.test_step(as_keras_data(batch))
        self._custom_logs[stage] = self._loggable(flatten_logs(logs, "test_step"))

    def _loggable(self, logs: dict[str, Any]) -> dict[str, torch.Tensor]:
        values, skipped = scalar_logs(logs)
        for name in skipped:
            if name not in self._custom_warned:
                self._custom_warned.add(name)
                warnings.warn(
                    f"The Keras step returned {name!r}, which is not a scalar: Lightning can "
                    "only log scalars, so it is not logged. Return scalars (e.g. a metric's "
                    "result()) to log them.",
                    stacklevel=3,
                )
        module: Any = self
        return {name: value.to(module.device) for name, value in values.items()}

    # ------------------------------------------------------------ Keras side: epochs

    def keras_epoch_start(self, stage: str) -> None:
        """Reset ``model.metrics`` as Keras' fit / evaluate do (validation keeps train state)."""
        self._custom_state()
        module: Any = self
        uses = self.uses_keras_train_step() if stage == "train" else self.uses_keras_test_step()
        if not uses:
            return
        model = module.require_model()
        self._custom_logs.pop(stage, None)
        trainer = module._trainer
        fitting = trainer is not None and trainer.state.fn is not None and str(
            trainer.state.fn.value
        ) == "fit"
        if stage == "val" and fitting:
            # Keras shares model.metrics between train and evaluation; keep the training
            # epoch's running values intact across a (possibly mid-epoch) validation.
            self._custom_metric_snapshot = snapshot_metrics(list(model.metrics))
        _reset_metrics(model)

    def keras_epoch_end(self, stage: str) -> None:
        """Log the last values a Keras ``test_step`` returned (Keras' evaluate result)."""
        self._custom_state()
        module: Any = self
        if stage == "train" or not self.uses_keras_test_step():
            return
        prefix = {"val": "val_", "test": "test_"}[stage]
        distributed = _world_size() > 1
        for name, value in self._epoch_values(stage).items():
            module.log(
                prefix + name,
                value,
                prog_bar=name == "loss",
                on_step=False,
                on_epoch=True,
                sync_dist=distributed,
            )
        if stage == "val" and self._custom_metric_snapshot is not None:
            restore_metrics(list(module.require_model().metrics), self._custom_metric_snapshot)
            self._custom_metric_snapshot = None

    def keras_train_epoch_end(self) -> None:
        """Log the train step's last values at epoch level (Keras' History value)."""
        self._custom_state()
        if not self.uses_keras_train_step():
            return
        module: Any = self
        distributed = _world_size() > 1
        for name, value in self._epoch_values("train").items():
            module.log(
                name, value, prog_bar=True, on_step=False, on_epoch=True, sync_dist=distributed
            )

    def _epoch_values(self, stage: str) -> dict[str, torch.Tensor]:
        """The last logs of ``stage``'s Keras step, exact over all processes where possible.

        With one process they are logged as returned. Under DDP, a returned value that is the
        current ``result()`` of one of ``model.metrics`` (the guides' ``{m.name: m.result()
        for m in self.metrics}``) is replaced by the result of the metrics' states summed over
        ranks (:func:`sum_metric_states`), the same on every rank; any other value (a raw
        batch loss, even under a metric's name) stays, and is logged with ``sync_dist`` as a
        mean over ranks like the rest (the mean of equal values is that value).
        """
        values = dict(self._custom_logs.get(stage, {}))
        if _world_size() == 1:
            return values
        module: Any = self
        metrics = list(module.require_model().metrics)
        with torch.no_grad(), module.keras_scope():
            local = metric_results(metrics)
            sum_metric_states(metrics, module.device)
            exact = metric_results(metrics)
        for name, value in values.items():
            mine, merged = local.get(name), exact.get(name)
            if not (_is_scalar(mine) and _is_scalar(merged)):
                continue
            mine = mine.detach().float().reshape(()).to(value.device)
            if torch.equal(value.float().reshape(()), mine):
                values[name] = merged.detach().float().reshape(()).to(module.device)
        return values

    # ------------------------------------------------------------ Keras side: set-up

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``ddp_spawn``); a Keras train_step model that cannot be pickled fails clearly."""
        state: dict[str, Any] = super().__getstate__()  # type: ignore[misc]
        if self.uses_keras_train_step():
            import pickle

            model = getattr(self, "model", None)
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
        return state

    def configure_keras_side_optimizers(self) -> list[Any]:
        """What ``configure_optimizers`` returns when the Keras ``train_step`` optimizes: nothing.

        The Keras model applies its own optimizers (``self.optimizer``, ``self.d_optimizer``...);
        their state reaches checkpoints through :meth:`save_keras_optimizers`.
        """
        module: Any = self
        model = module.require_model()
        if not getattr(model, "compiled", False):
            raise ConfigurationError(
                f"The Keras model {type(model).__name__} overrides train_step, which uses what "
                "compile() sets (self.optimizer, self.compute_loss, ...), but it is not "
                "compiled. Call model.compile(...) before training, as for Keras' fit(), e.g. "
                "model.compile(optimizer='adam', loss='mse')."
            )
        spec = getattr(module, "_optimizer_spec", None)
        if spec is not None and spec is not getattr(model, "optimizer", None):
            raise ConfigurationError(
                f"KerasLightningModule(optimizer={spec!r}) is not used: the Keras model "
                f"{type(model).__name__} overrides train_step, which applies the optimizers "
                "given to its compile(). Drop `optimizer=` and pass the optimizer to "
                "model.compile(optimizer=...) instead."
            )
        if getattr(module, "_lr_scheduler_spec", None) is not None:
            raise ConfigurationError(
                "KerasLightningModule(lr_scheduler=...) is not used: the Keras model overrides "
                "train_step, which applies its own Keras optimizers. Give the Keras optimizer a "
                "keras.optimizers.schedules.LearningRateSchedule as learning_rate instead."
            )
        trainer = module._trainer
        if trainer is not None and trainer.gradient_clip_val:
            raise ConfigurationError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) cannot act on a Keras "
                "train_step, which applies its optimizers itself. Remove it and give the Keras "
                "optimizer clipnorm=... or clipvalue=... instead."
            )
        self._check_ddp_strategy()
        return []

    def _check_ddp_strategy(self) -> None:
        module: Any = self
        trainer = module._trainer
        if trainer is None or _world_size() == 1:
            return
        from lightning.pytorch.strategies import DDPStrategy

        if not isinstance(trainer.strategy, DDPStrategy):
            raise ConfigurationError(
                "A Keras model that overrides train_step runs in several processes only with "
                f"DDP; this Trainer uses {type(trainer.strategy).__name__}. Use "
                "Trainer(strategy='ddp') (or 'ddp_spawn' for a model that pickles, or a model "
                "factory)."
            )

    def keras_train_batch_start(self) -> None:
        """Keep DDP's reducer out of a Keras ``train_step`` (gradients are averaged in apply)."""
        if not self.uses_keras_train_step():
            return
        module: Any = self
        trainer = module._trainer
        wrapper = getattr(getattr(trainer, "strategy", None), "model", None)
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            wrapper.require_backward_grad_sync = False

    def save_keras_optimizers(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoint hook: store the state of the Keras optimizers a custom train_step uses."""
        module: Any = self
        if self.uses_keras_train_step():
            checkpoint[CHECKPOINT_KEY] = keras_optimizer_state(module.require_model())

    def load_keras_optimizers(self, checkpoint: Mapping[str, Any]) -> None:
        """Checkpoint hook: restore what :meth:`save_keras_optimizers` stored."""
        module: Any = self
        state = checkpoint.get(CHECKPOINT_KEY)
        if state:
            load_keras_optimizer_state(module.require_model(), state)

    # ------------------------------------------------------------ Lightning side: helpers

    def apply_gradients(self, loss: torch.Tensor, optimizer: Any = None) -> None:
        """Backward ``loss`` and step one configured optimizer (Keras or torch).

        Zeroes that optimizer's gradients, runs ``self.manual_backward(loss)`` (so precision
        plugins and DDP gradient averaging apply) and steps it. Use it in a ``training_step`` of
        a subclass that sets ``self.automatic_optimization = False``.

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
            ...         self.apply_gradients(loss)
            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
            >>> trainer = lightning.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
            ...                             enable_checkpointing=False, enable_model_summary=False)
            >>> trainer.fit(Module(model), torch.utils.data.DataLoader(data, batch_size=4))
            >>> trainer.global_step
            2

        """
        module: Any = self
        if module.automatic_optimization:
            raise ConfigurationError(
                "apply_gradients() runs the backward pass and the optimizer step itself, which "
                "needs Lightning's manual optimization. Set `self.automatic_optimization = "
                "False` in your module's __init__ (after super().__init__(...))."
            )
        if optimizer is None:
            optimizers = module.optimizers()
            if isinstance(optimizers, list | tuple):
                if len(optimizers) != 1:
                    raise ConfigurationError(
                        f"configure_optimizers returned {len(optimizers)} optimizers, so "
                        "apply_gradients(loss) does not know which one to step. Pass it: "
                        "`opt_d, opt_g = self.optimizers(); self.apply_gradients(loss, opt_d)`."
                    )
                optimizers = optimizers[0]
            optimizer = optimizers
        optimizer.zero_grad()
        module.manual_backward(loss)
        optimizer.step()

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

        """
        module: Any = self
        stage = stage or _running_stage(module)
        if stage not in ("train", "val", "test"):
            raise ConfigurationError(
                f"update_metrics(stage={stage!r}): expected one of 'train', 'val', 'test'."
            )
        model = module.require_model()
        state = module._bind_stage_metrics(stage, y_pred, y)
        if loss is not None:
            state.add_mean("loss", loss, batch_size_of(y_pred))
        if not state.metrics or y is None:
            return
        names, outputs = output_structure(y_pred, model)
        targets = align_targets(y, names)
        objective = module._objective
        if objective is not None and objective.resolved and len(names) == 1:
            sample_weight = objective.sample_weight(targets[0], sample_weight)
        with torch.no_grad(), module.keras_scope():
            state.update_metrics([o.detach() for o in outputs], targets, sample_weight)

    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Any, Any, Any]:
        """Split a batch into ``(x, y, sample_weight)`` as Keras' ``fit`` does."""
        return unpack_batch(batch)


def _reset_metrics(model: Any) -> None:
    reset = getattr(model, "reset_metrics", None)
    if callable(reset):
        reset()
    else:
        for metric in model.metrics:
            metric.reset_state()


def _running_stage(module: Any) -> str:
    trainer = module._trainer
    if trainer is None or trainer.training:
        return "train"
    if trainer.testing:
        return "test"
    return "val"


def _count_optimizer_step(module: Any) -> None:
    """Advance ``trainer.global_step`` for a step Lightning did not see.

    A Keras ``train_step`` applies its updates with Keras optimizers directly, so Lightning's
    manual-optimization step counter would stay at 0: ``max_steps`` would never stop training
    and ``ModelCheckpoint`` would skip every save. Counting one step per batch fixes both.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()
