"""Keras and torch optimizers behind Lightning's optimization.

A Keras optimizer is not a ``torch.optim.Optimizer``; :class:`KerasOptimizer` makes it one, so
Lightning's automatic optimization, gradient clipping and accumulation, torch LR schedulers,
the ``16-mixed`` GradScaler and checkpoints all see an ordinary torch optimizer, while the
update itself is Keras' ``optimizer.apply(grads, variables)``.
"""

from __future__ import annotations

from keras_lightning import _private, optimizer_state
from keras_lightning._private import parameter_of
from keras_lightning.devices import keras_default_device, keras_device, place_variables, same_device
from keras_lightning.exceptions import (
    CheckpointError,
    ConfigurationError,
    KerasLightningTypeError,
    class_given,
    did_you_mean,
)
from keras_lightning.fast_update import DirectUpdate, update_path_for
from keras_lightning.precision import check_keras_optimizer, check_optimizer_dtype

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras
import torch

_KERAS_OPTIMIZER_NAMES = (
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamw",
    "adamax",
    "ftrl",
    "lamb",
    "lion",
    "muon",
    "nadam",
    "rmsprop",
    "sgd",
)


class KerasOptimizer(torch.optim.Optimizer):
    """A Keras optimizer exposed as a real ``torch.optim.Optimizer``.

    ``step()`` reads the gradients that ``backward()`` left on the variables and calls
    ``keras_optimizer.apply(grads, variables)``. ``param_groups[0]["lr"]`` is the learning rate:
    a torch LR scheduler that changes it changes the Keras optimizer's ``learning_rate``; with
    a Keras ``LearningRateSchedule`` it shows the schedule's current value. ``state_dict()``
    holds every Keras optimizer variable (``iterations``, slots such as Adam's moments).

    Args:
        keras_optimizer: The Keras optimizer to drive.
        variables: The Keras variables it updates (usually ``model.trainable_variables``).

    Example:
        >>> import keras, torch
        >>> import keras_lightning as kl
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> opt = kl.KerasOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
        >>> loss = model(torch.ones(2, 3)).sum()
        >>> loss.backward()
        >>> opt.step()
        >>> int(opt.keras_optimizer.iterations)
        1

    """

    def __init__(self, keras_optimizer: Any, variables: Sequence[Any]) -> None:
        if not isinstance(keras_optimizer, keras.optimizers.Optimizer):
            raise KerasLightningTypeError(
                "KerasOptimizer expects a keras.optimizers.Optimizer; received "
                f"{type(keras_optimizer).__name__}."
            )
        check_keras_optimizer(keras_optimizer)
        variables = list(variables)
        if not variables:
            raise ConfigurationError(
                "The Keras optimizer has no variables to train: the model has no trainable "
                "weights. Build the model (give it an Input, or call it once) or unfreeze "
                "some layers."
            )
        if keras_optimizer.built and not _private.optimizer_knows(keras_optimizer, variables):
            raise ConfigurationError(
                f"This Keras optimizer ({type(keras_optimizer).__name__}) was already built for "
                "other variables (another model, or another module given the same optimizer "
                "object), so it cannot update these: a Keras optimizer belongs to one set of "
                "variables. Give each module its own optimizer object "
                "(optimizer=keras.optimizers.Adam(1e-3)) or a name (optimizer='adam')."
            )
        self.keras_optimizer = keras_optimizer
        self.variables = variables
        self._params = [parameter_of(v) for v in variables]
        check_optimizer_dtype(keras_optimizer, self._params[0].dtype)
        # Keras optimizer variables (iterations, learning rate, slots built on the first
        # apply) live on the device of the weights, whatever Keras' default device is.
        self._device = self._params[0].device
        place_variables(keras_optimizer.variables, self._device)
        self._scoped: bool | None = None
        self._update_path: str | None = None  # decided once the Keras optimizer is built
        self._direct_update: DirectUpdate | None = None
        self._lr_is_schedule = isinstance(
            _private.learning_rate_spec(keras_optimizer),
            keras.optimizers.schedules.LearningRateSchedule,
        )
        lr = self._current_keras_lr()
        super().__init__(self._params, {"lr": lr, **_hyperparameters_of(keras_optimizer)})
        self._synced_lr: float | None = None if self._lr_is_schedule else lr
        self._synced_hyperparameters = _hyperparameters_of(keras_optimizer)

    def _current_keras_lr(self) -> float:
        return float(keras.ops.convert_to_numpy(self.keras_optimizer.learning_rate))

    @property
    def lr_is_schedule(self) -> bool:
        """True when the Keras optimizer's learning rate is a ``LearningRateSchedule``."""
        return self._lr_is_schedule

    def _sync_lr_to_keras(self) -> None:
        group = self.param_groups[0]
        lr = group["lr"]
        if not self._lr_is_schedule and lr != self._synced_lr:
            self.keras_optimizer.learning_rate = float(lr)
            self._synced_lr = lr
        # momentum / betas / weight_decay a scheduler (OneCycleLR's cycle_momentum) wrote
        for key, value in self._synced_hyperparameters.items():
            if group.get(key, value) != value:
                _set_hyperparameter(self.keras_optimizer, key, group[key])
                self._synced_hyperparameters[key] = group[key]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward) if given, then apply the Keras update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_lr_to_keras()
        grads, variables = [], []
        for param, variable in zip(self._params, self.variables, strict=True):
            if param.grad is not None:
                grads.append(param.grad)
                variables.append(variable)
        if grads:
            with torch.no_grad(), self._keras_scope():
                self._apply(grads, variables)
        if self._lr_is_schedule:
            self.param_groups[0]["lr"] = self._current_keras_lr()
        return loss

    @property
    def update_path(self) -> str | None:
        """How :meth:`step` runs the Keras update; None until the optimizer is built.

        - ``"adam"`` / ``"sgd"``: Keras' own torch update for ``Adam`` / ``AdamW`` / ``SGD``,
          op for op, without Keras' per-op dispatch (:mod:`keras_lightning.fast_update`);
        - ``"short"``: ``_backend_apply_gradients`` and ``iterations += 1``, without the set-up
          of ``apply`` (clipping, EMA, gradient accumulation and other optimizers);
        - ``"apply"``: ``keras_optimizer.apply(grads, variables)`` (``LossScaleOptimizer``,
          constrained variables, optimizers that override ``apply``).

        All three are bit-identical to ``apply`` (``tests/test_performance.py``).
        """
        return self._update_path

    def _apply(self, grads: list[torch.Tensor], variables: list[Any]) -> None:
        """``keras_optimizer.apply(grads, variables)``, by the shortest exact path.

        Once the optimizer is built, for an optimizer that uses ``BaseOptimizer.apply`` with
        no loss scaling, and variables without constraints or ``overwrite_with_gradient``,
        ``apply`` reduces to ``_backend_apply_gradients`` (the update, with clipping, weight
        decay, EMA and gradient accumulation) and ``iterations += 1``, skipping the name
        scopes, list copies and the variable and empty-gradient filters (``step`` filters
        gradients already). Without clipping, EMA or accumulation, Keras' torch ``Adam`` and
        ``SGD`` updates reduce further to their foreach ops (:mod:`keras_lightning.fast_update`).
        """
        optimizer = self.keras_optimizer
        if self._update_path is None:
            if not optimizer.built:
                optimizer.apply(grads, variables)  # builds the slots; decide next time
                return
            self._update_path = update_path_for(optimizer, self.variables)
            if self._update_path in DirectUpdate.KINDS:
                self._direct_update = DirectUpdate(optimizer, self.variables, self._update_path)
        path = self._update_path if optimizer.loss_scale_factor is None else "apply"
        if path == "apply":
            optimizer.apply(grads, variables)
        elif path != "short" and self._direct_update is not None and self._direct_update.applies():
            self._direct_update(grads, variables)
        else:  # "short", or clipping, EMA or accumulation switched on after "adam" / "sgd"
            _private.backend_apply_gradients(optimizer, grads, variables)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none=True``, the default) or zero them in place.

        The default skips ``torch.optim.Optimizer.zero_grad``'s profiler record and grouping,
        which cost more than the work on small models.
        """
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for param in self._params:
            param.grad = None

    def _keras_scope(self) -> Any:
        """Keras on the weights' device (they may have moved since construction)."""
        device = self._params[0].device
        if device != self._device:
            self._device = device
            place_variables(self.keras_optimizer.variables, device)
            self._scoped = None
        if self._scoped is None:
            self._scoped = not same_device(device, keras_default_device())
        return keras_device(device) if self._scoped else contextlib.nullcontext()

    def _ensure_built(self) -> None:
        if not self.keras_optimizer.built:
            with self._keras_scope():
                self.keras_optimizer.build(self.variables)

    def state_dict(self) -> dict[str, Any]:
        """The Keras optimizer's variables (:mod:`keras_lightning.optimizer_state`) and the
        param groups.
        """
        self._ensure_built()
        return {
            "state": {},
            "param_groups": [
                {key: value for key, value in group.items() if key != "params"}
                | {"params": list(range(len(self._params)))}
                for group in self.param_groups
            ],
            **optimizer_state.capture(self.keras_optimizer),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the Keras optimizer is built if needed.

        Raises:
            CheckpointError: Another optimizer type or model wrote the state; nothing is
                changed then.

        """
        self._ensure_built()
        optimizer_state.restore(self.keras_optimizer, state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=False):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        self._synced_lr = None


def _hyperparameters_of(optimizer: Any) -> dict[str, Any]:
    """The torch names of a Keras optimizer's hyperparameters, for ``param_groups``.

    ``betas`` (Adam-like ``beta_1`` / ``beta_2``), ``momentum`` (SGD, RMSprop) and
    ``weight_decay``: what Lightning's ``LearningRateMonitor(log_momentum=True,
    log_weight_decay=True)`` and momentum-cycling schedulers read and write.
    """
    found: dict[str, Any] = {}
    beta_1, beta_2 = getattr(optimizer, "beta_1", None), getattr(optimizer, "beta_2", None)
    if isinstance(beta_1, float | int) and isinstance(beta_2, float | int):
        found["betas"] = (float(beta_1), float(beta_2))
    momentum = getattr(optimizer, "momentum", None)
    if isinstance(momentum, float | int) and "betas" not in found:
        found["momentum"] = float(momentum)
    found["weight_decay"] = float(getattr(optimizer, "weight_decay", None) or 0.0)
    return found


def _set_hyperparameter(optimizer: Any, key: str, value: Any) -> None:
    if key == "betas":
        optimizer.beta_1, optimizer.beta_2 = float(value[0]), float(value[1])
    elif key == "momentum":
        optimizer.momentum = float(value)
    elif key == "weight_decay":
        optimizer.weight_decay = float(value) or None


def resolve_optimizer(
    spec: Any, model: Any, argument: str = "optimizer"
) -> torch.optim.Optimizer:
    """Build the torch optimizer that trains ``model`` from what the user passed.

    Args:
        spec: A Keras optimizer (object or name such as ``"adam"``), a ``torch.optim.Optimizer``
            class, or a callable ``params -> torch.optim.Optimizer``.
        model: The Keras model whose trainable variables are optimized.
        argument: The argument name shown in error messages.

    """
    if isinstance(spec, type) and issubclass(spec, keras.optimizers.Optimizer):
        example = f"keras.optimizers.{spec.__name__}(1e-3) or '{spec.__name__.lower()}'"
        raise class_given(argument, spec, example)
    if isinstance(spec, str):
        return KerasOptimizer(_keras_optimizer_from_name(spec, argument), model.trainable_variables)
    if isinstance(spec, keras.optimizers.Optimizer):
        return KerasOptimizer(spec, model.trainable_variables)
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec):
        params = [parameter_of(v) for v in model.trainable_variables]
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise KerasLightningTypeError(
                f"`{argument}` was called with the model parameters and returned "
                f"{type(optimizer).__name__}, not a torch.optim.Optimizer. Pass a torch "
                "optimizer class (torch.optim.Adam), a function such as "
                "`lambda params: torch.optim.Adam(params, lr=1e-3)`, or a Keras optimizer."
            )
        return optimizer
    raise KerasLightningTypeError(
        f"`{argument}` must be a Keras optimizer or its name ('adam', 'sgd', ...), a torch "
        "optimizer class (torch.optim.Adam) or a callable params -> torch.optim.Optimizer. "
        f"Received: {argument}={spec!r} of type {type(spec).__name__}."
    )


def _keras_optimizer_from_name(name: str, argument: str) -> Any:
    try:
        return keras.optimizers.get(name)
    except ValueError:
        hint = did_you_mean(name, _KERAS_OPTIMIZER_NAMES)
        raise ConfigurationError(
            f"`{argument}={name!r}` is not a Keras optimizer name.{hint} Known names: "
            f"{', '.join(_KERAS_OPTIMIZER_NAMES)}. Or pass an optimizer object such as "
            "keras.optimizers.Adam(1e-3) or the class torch.optim.Adam."
        ) from None


def configure_builtin(
    spec: Any, lr_scheduler: Any, model: Any, lr_override: float | None = None
) -> Any:
    """What ``configure_optimizers`` returns for the built-in steps: the optimizer ``spec``
    builds over ``model`` (started at ``lr_override`` when set), with its scheduler.

    Raises:
        ConfigurationError: No optimizer, an unbuilt model, or a Keras schedule together with
            ``lr_scheduler``.

    """
    if spec is None:
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
    optimizer = resolve_optimizer(spec, model)
    if lr_override is not None:
        _start_at(optimizer, lr_override)
    if lr_scheduler is None:
        return optimizer
    if isinstance(optimizer, KerasOptimizer) and optimizer.lr_is_schedule:
        raise ConfigurationError(
            "Both a Keras LearningRateSchedule (in the Keras optimizer) and `lr_scheduler` "
            "were given; they would fight over the learning rate. Keep one: a Keras "
            "optimizer with a float learning_rate plus lr_scheduler=..., or the Keras "
            "schedule alone."
        )
    return {
        "optimizer": optimizer,
        "lr_scheduler": build_scheduler(lr_scheduler, optimizer),
    }


def learning_rate_of(spec: Any) -> float | None:
    """The learning rate an optimizer ``spec`` starts at (None: a schedule, or torch's own)."""
    if isinstance(spec, str):
        spec = _keras_optimizer_from_name(spec, "optimizer")
    if isinstance(spec, KerasOptimizer):
        spec = spec.keras_optimizer
    if not isinstance(spec, keras.optimizers.Optimizer) or isinstance(
        _private.learning_rate_spec(spec), keras.optimizers.schedules.LearningRateSchedule
    ):
        return None
    return float(keras.ops.convert_to_numpy(spec.learning_rate))


def _start_at(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Start every param group at ``lr`` (``KerasOptimizer`` passes it to Keras at the step)."""
    if isinstance(optimizer, KerasOptimizer) and optimizer.lr_is_schedule:
        raise ConfigurationError(
            f"learning_rate={lr} was set (by lr_find or by hand), but the Keras optimizer's "
            "learning rate is a LearningRateSchedule, which sets it on every step. Give the "
            "Keras optimizer a float learning_rate to tune it, or leave learning_rate unset."
        )
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, KerasOptimizer):
        optimizer.keras_optimizer.learning_rate = lr  # also before the first step


def check_optimizer_states(states: Sequence[Any], spec: Any) -> None:
    """Check a checkpoint's optimizer states against the optimizer ``spec`` will build.

    Done before anything is loaded, so that resuming with another optimizer fails with the
    module untouched: a Keras optimizer's state records its class (Adam's slots are not
    Adamax's); a torch optimizer's state is not a Keras one, and the other way round.

    Raises:
        CheckpointError: A state was written by another kind or class of optimizer.

    """
    keras_class: str | None
    if isinstance(spec, KerasOptimizer):
        keras_class = type(spec.keras_optimizer).__name__
    elif isinstance(spec, str):
        keras_class = type(_keras_optimizer_from_name(spec, "optimizer")).__name__
    elif isinstance(spec, keras.optimizers.Optimizer):
        keras_class = type(spec).__name__
    else:
        keras_class = None
    for state in states:
        if not isinstance(state, dict):
            continue
        if keras_class is not None:
            optimizer_state.check_class(keras_class, state, "The Keras optimizer")
        elif optimizer_state.VARIABLES in state:
            raise CheckpointError(
                "The checkpoint holds the state of a Keras optimizer "
                f"({state.get(optimizer_state.CLASS, 'of unknown class')}), but this module "
                "trains with a torch optimizer. Resume with the Keras optimizer that wrote it "
                "(optimizer='adam' or a keras.optimizers object), or load the weights only."
            )


def check_optimizers_train(
    optimizers: Sequence[torch.optim.Optimizer], module: torch.nn.Module
) -> None:
    """Refuse an optimizer that owns none of the module's parameters.

    Such an optimizer steps without error and changes nothing: e.g. one built over another
    module's parameters, or over a model that ``load_from_checkpoint`` has since rebuilt.
    Every parameter of the module counts (frozen Keras layers that a callback unfreezes later,
    torch parameters a subclass adds).

    Raises:
        ConfigurationError: One of ``optimizers`` holds none of ``module``'s parameters.

    """
    weights = {id(p) for p in module.parameters()}
    for index, optimizer in enumerate(optimizers):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if params and not any(id(p) in weights for p in params):
            raise ConfigurationError(
                f"Optimizer #{index} ({type(optimizer).__name__}) updates {len(params)} "
                "tensors, none of which is a weight of the Keras model: training would change "
                "nothing. This happens when the optimizer was built over other parameters (for "
                "example before load_from_checkpoint rebuilt the model). Pass what builds it "
                "instead, and the module calls it with its own weights: "
                "optimizer=torch.optim.SGD, or optimizer=lambda params: "
                "torch.optim.SGD(params, lr=0.1)."
            )


def trainable_parameters(variables: Iterable[Any]) -> list[torch.Tensor]:
    """The torch Parameters behind Keras variables."""
    return [parameter_of(v) for v in variables]


def check_lr_scheduler(spec: Any) -> Any:
    """Check ``lr_scheduler=``: a callable ``optimizer -> scheduler`` or a Lightning dict."""
    if spec is None:
        return None
    scheduler = spec.get("scheduler") if isinstance(spec, Mapping) else spec
    if not callable(scheduler):
        raise KerasLightningTypeError(
            "`lr_scheduler` must be a callable optimizer -> scheduler, e.g. "
            "`lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1)`, or a Lightning "
            "dict {'scheduler': that_callable, 'interval': 'step'}; received "
            f"{spec!r}."
        )
    return spec


def build_scheduler(spec: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The scheduler (or Lightning scheduler dict) ``spec`` builds for ``optimizer``."""
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
        raise KerasLightningTypeError(
            "`lr_scheduler` was called with the optimizer and returned "
            f"{type(scheduler).__name__}, not a torch LR scheduler. Return e.g. "
            "torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)."
        )
    return scheduler


def finalize_keras_optimizers(optimizers: Sequence[Any], model: Any, own_step: bool) -> None:
    """End training as Keras' ``fit`` does: ``optimizer.finalize_variable_values(weights)``.

    With ``use_ema=True`` that writes the moving averages into the weights (otherwise it does
    nothing). ``optimizers``: those Lightning stepped; for a model with its own ``train_step``
    (``own_step``), the optimizer of its ``compile()``, as in Keras.
    """
    if own_step:
        pairs = [(getattr(model, "optimizer", None), model.trainable_weights)]
    else:
        pairs = [
            (optimizer.keras_optimizer, optimizer.variables)
            for optimizer in optimizers
            if isinstance(optimizer, KerasOptimizer)
        ]
    for keras_optimizer, variables in pairs:
        if keras_optimizer is None or not getattr(keras_optimizer, "use_ema", False):
            continue
        if not keras_optimizer.built:
            continue
        try:
            keras_optimizer.finalize_variable_values(variables)
        except ValueError as error:  # built over other variables (e.g. before a freeze)
            warnings.warn(
                f"The moving averages of {type(keras_optimizer).__name__}(use_ema=True) were "
                f"not written into the weights ({error}): it was built over other variables "
                "than the ones trained. The weights are the last trained ones.",
                stacklevel=2,
            )

