"""Keras and torch optimizers behind Lightning's optimization.

A Keras optimizer is not a ``torch.optim.Optimizer``; :class:`KerasOptimizer` makes it one, so
Lightning's automatic optimization, gradient clipping and accumulation, torch LR schedulers,
the ``16-mixed`` GradScaler and checkpoints all see an ordinary torch optimizer, while the
update itself is Keras' ``optimizer.apply(grads, variables)``.
"""

from __future__ import annotations

from keras_lightning import _private, collectives, optimizer_state
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


class _Update:
    """One Keras optimizer over some of one param group's variables, and how it applies.

    A :class:`KerasOptimizer` holds one per param group, plus one for each set of variables
    that joined a group later (a Keras optimizer is built once, for fixed variables: those that
    join later get an optimizer of the same class and config, started fresh as torch starts a
    new parameter's state).
    """

    def __init__(self, keras_optimizer: Any, variables: Sequence[Any], group: int) -> None:
        self.keras_optimizer = keras_optimizer
        self.variables = list(variables)
        self.params = [parameter_of(v) for v in self.variables]
        self.group = group
        self.path: str | None = None  # decided once the Keras optimizer is built
        self.direct: DirectUpdate | None = None
        self.lr_is_schedule = isinstance(
            _private.learning_rate_spec(keras_optimizer),
            keras.optimizers.schedules.LearningRateSchedule,
        )
        self.synced_lr: float | None = None if self.lr_is_schedule else self.current_lr()
        self.synced_hyperparameters = _hyperparameters_of(keras_optimizer)

    def current_lr(self) -> float:
        return float(keras.ops.convert_to_numpy(self.keras_optimizer.learning_rate))

    def sync(self, group: dict[str, Any]) -> None:
        """Give the Keras optimizer what a scheduler or callback wrote into its param group."""
        lr = group["lr"]
        if not self.lr_is_schedule and lr != self.synced_lr:
            self.keras_optimizer.learning_rate = float(lr)
            self.synced_lr = lr
        # momentum / betas / weight_decay a scheduler (OneCycleLR's cycle_momentum) wrote
        for key, value in self.synced_hyperparameters.items():
            if group.get(key, value) != value:
                _set_hyperparameter(self.keras_optimizer, key, group[key])
                self.synced_hyperparameters[key] = group[key]

    def step(self) -> None:
        grads, variables = [], []
        for param, variable in zip(self.params, self.variables, strict=True):
            if param.grad is not None:
                grads.append(param.grad)
                variables.append(variable)
        if grads:
            self.apply(grads, variables)

    def decide_path(self) -> None:
        """Pick the update path once the Keras optimizer is built (see :meth:`apply`)."""
        optimizer = self.keras_optimizer
        if self.path is not None or not optimizer.built:
            return
        self.path = update_path_for(optimizer, self.variables)
        if self.path in DirectUpdate.KINDS:
            self.direct = DirectUpdate(optimizer, self.variables, self.path)

    def apply(self, grads: list[torch.Tensor], variables: list[Any]) -> None:
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
        if self.path is None:
            if not optimizer.built:
                optimizer.apply(grads, variables)  # builds the slots; decide next time
                return
            self.decide_path()
        path = self.path if optimizer.loss_scale_factor is None else "apply"
        if path == "apply":
            optimizer.apply(grads, variables)
        elif path != "short" and self.direct is not None and self.direct.applies():
            self.direct(grads, variables)
        else:  # "short", or clipping, EMA or accumulation switched on after "adam" / "sgd"
            _private.backend_apply_gradients(optimizer, grads, variables)


class _MadeOnDemand(type):
    """Unpickling in a fresh process looks the class up before any instance made it."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _named_class(name)


class _ByKerasClass(metaclass=_MadeOnDemand):
    """The :class:`KerasOptimizer` subclasses named after a Keras optimizer class (picklable)."""


class KerasOptimizer(torch.optim.Optimizer):
    """A Keras optimizer exposed as a real ``torch.optim.Optimizer``.

    ``step()`` reads the gradients that ``backward()`` left on the variables and calls
    ``keras_optimizer.apply(grads, variables)``. ``param_groups[0]["lr"]`` is the learning rate:
    a torch LR scheduler that changes it changes the Keras optimizer's ``learning_rate``; with
    a Keras ``LearningRateSchedule`` it shows the schedule's current value. ``state_dict()``
    holds every Keras optimizer variable (``iterations``, slots such as Adam's moments).

    The variable set may change as in torch: ``add_param_group`` (what Lightning's
    ``BackboneFinetuning`` calls) gives the new group a Keras optimizer of the same class and
    config at the group's own ``lr``; a parameter appended to a group later gets one too. Each
    group's ``lr``, ``betas`` / ``momentum`` and ``weight_decay`` reach its Keras optimizers.

    An instance's class is named after the Keras optimizer's (``type(opt).__name__ ==
    "Adam"``), so that Lightning's ``LearningRateMonitor`` logs ``lr-Adam`` as it does for
    ``torch.optim.Adam``; ``isinstance(opt, KerasOptimizer)`` holds.

    Args:
        keras_optimizer: The Keras optimizer to drive.
        variables: The Keras variables it updates (usually ``model.trainable_variables``).
        model_variables: Every Keras variable a param group may be given later (usually
            ``model.variables``); by default only ``variables``.

    Example:
        >>> import keras, torch
        >>> import keras_lightning as kl
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> opt = kl.KerasOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
        >>> loss = model(torch.ones(2, 3)).sum()
        >>> loss.backward()
        >>> opt.step()
        >>> int(opt.keras_optimizer.iterations), type(opt).__name__
        (1, 'SGD')

    """

    def __new__(cls, keras_optimizer: Any = None, *args: Any, **kwargs: Any) -> KerasOptimizer:
        """An instance of the subclass named after the Keras optimizer's class."""
        if cls is KerasOptimizer and isinstance(keras_optimizer, keras.optimizers.Optimizer):
            cls = _named_class(type(keras_optimizer).__name__)
        return super().__new__(cls)

    def __init__(
        self,
        keras_optimizer: Any,
        variables: Sequence[Any],
        model_variables: Sequence[Any] | None = None,
    ) -> None:
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
        self._variable_of = {
            id(parameter_of(v)): v for v in [*(model_variables or ()), *variables]
        }
        check_optimizer_dtype(keras_optimizer, self._params[0].dtype)
        # Keras optimizer variables (iterations, learning rate, slots built on the first
        # apply) live on the device of the weights, whatever Keras' default device is.
        self._device = self._params[0].device
        place_variables(keras_optimizer.variables, self._device)
        self._scoped: bool | None = None
        self._updates = [_Update(keras_optimizer, variables, 0)]
        lr = self._updates[0].current_lr()
        super().__init__(self._params, {"lr": lr, **_hyperparameters_of(keras_optimizer)})
        self._layout = self._current_layout()

    @property
    def lr_is_schedule(self) -> bool:
        """True when the Keras optimizer's learning rate is a ``LearningRateSchedule``."""
        return self._updates[0].lr_is_schedule

    @property
    def keras_updates(self) -> list[tuple[Any, list[Any]]]:
        """Each Keras optimizer with the variables it updates (for ``finalize_variable_values``)."""
        return [(update.keras_optimizer, list(update.variables)) for update in self._updates]

    @property
    def keras_optimizers(self) -> list[Any]:
        """Every Keras optimizer this one drives: the given one first, then one per later set."""
        return [update.keras_optimizer for update in self._updates]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward) if given, then apply the Keras update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._each_synced_update(_Update.step)
        self.after_captured()
        return loss

    # ------------------------------------------------------------ jit_compile="step"

    def can_apply_captured(self) -> bool:
        """Whether ``jit_compile="step"`` may capture this update in its graph.

        Every Keras optimizer is built and updates through ``_backend_apply_gradients``
        (``"adam"`` / ``"sgd"`` / ``"short"``): its state lives in variables the graph updates
        in place. ``"apply"`` optimizers (their own ``apply``, loss scaling, constraints) are
        updated outside the graph, from the gradients it returns.
        """
        self.prepare_captured()
        return all(
            update.keras_optimizer.built and update.path in ("adam", "sgd", "short")
            for update in self._updates
        )

    def prepare_captured(self) -> None:
        """What :meth:`step` does in Python before the update, done before the graph runs."""
        self._each_synced_update(_Update.decide_path)

    def _each_synced_update(self, action: Callable[[_Update], None]) -> None:
        """Follow ``param_groups``, give each Keras optimizer its group's settings, then act."""
        if self._current_layout() != self._layout:
            self._follow_param_groups()
        groups = self.param_groups
        with torch.no_grad(), self._keras_scope():
            for update in self._updates:
                update.sync(groups[update.group])
                action(update)

    def trained_params(self) -> list[torch.Tensor]:
        """The parameters the Keras optimizers update that train now (``requires_grad``)."""
        return [p for update in self._updates for p in update.params if p.requires_grad]

    def captured_layout(self) -> tuple[Any, ...]:
        """What the captured update's structure depends on: groups and each update's path."""
        return (self._layout, tuple((update.path, len(update.params)) for update in self._updates))

    def apply_captured(self, params: list[torch.Tensor], grads: list[Any]) -> None:
        """The update of ``params`` by ``grads`` (None: no gradient), inside the graph."""
        by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
        for update in self._updates:
            pairs = [
                (by_param[id(p)], v)
                for p, v in zip(update.params, update.variables, strict=True)
                if by_param.get(id(p)) is not None
            ]
            if pairs:
                update.apply([g for g, _ in pairs], [v for _, v in pairs])

    def after_captured(self) -> None:
        """After the update (in :meth:`step` or the graph): a schedule's current ``lr`` in its
        param group.
        """
        groups = self.param_groups
        for update in self._updates:
            if update.lr_is_schedule:
                groups[update.group]["lr"] = update.current_lr()

    def _current_layout(self) -> tuple[int, ...]:
        return (id(self.param_groups), *(len(group["params"]) for group in self.param_groups))

    def _follow_param_groups(self) -> None:
        """Match the Keras optimizers to ``param_groups`` after a group was added or changed.

        Variables that stay in their group keep their Keras optimizer and its state; those that
        left a group are dropped from its optimizers; each group's new variables get a Keras
        optimizer of the first one's class and config at the group's ``lr`` (or the first one
        itself, where it already holds slots for all of them).
        """
        kept: list[_Update] = []
        for group_index, group in enumerate(self.param_groups):
            ids = [id(p) for p in group["params"]]
            present = set(ids)
            covered: set[int] = set()
            for update in self._updates:
                if update.group != group_index:
                    continue
                pairs = [
                    (v, p)
                    for v, p in zip(update.variables, update.params, strict=True)
                    if id(p) in present
                ]
                if pairs or update is self._updates[0]:
                    update.variables = [v for v, _ in pairs]
                    update.params = [p for _, p in pairs]
                    update.path, update.direct = None, None
                    kept.append(update)
                    covered.update(id(p) for _, p in pairs)
            new = [p for p in group["params"] if id(p) not in covered]
            if new:
                update = self._update_for(group_index, group, new)
                if update not in kept:
                    kept.append(update)
        self._updates = kept
        self._layout = self._current_layout()

    def _update_for(
        self, group_index: int, group: dict[str, Any], params: list[Any], extend: bool = True
    ) -> _Update:
        variables = []
        for param in params:
            variable = self._variable_of.get(id(param))
            if variable is None:
                raise ConfigurationError(
                    f"A tensor of shape {tuple(param.shape)} was added to param group "
                    f"#{group_index} of the Keras optimizer "
                    f"({type(self.keras_optimizer).__name__}), but it is not a variable of the "
                    "Keras model, so a Keras optimizer cannot update it. Train torch "
                    "parameters with a torch optimizer (optimizer=torch.optim.Adam), or add "
                    "only the Keras model's weights (module.model.<layer>.parameters())."
                )
            variables.append(variable)
        first = self._updates[0]
        if (
            extend
            and group_index == 0
            and first.keras_optimizer.built
            and _private.optimizer_knows(first.keras_optimizer, variables)
        ):
            first.variables += variables
            first.params += [parameter_of(v) for v in variables]
            return first
        with self._keras_scope():
            keras_optimizer = _same_kind(self.keras_optimizer, float(group["lr"]))
            place_variables(keras_optimizer.variables, self._device)
        return _Update(keras_optimizer, variables, group_index)

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
        return self._updates[0].path

    def _apply(self, grads: list[torch.Tensor], variables: list[Any]) -> None:
        """The first Keras optimizer's update of ``variables`` (used by the tests)."""
        self._updates[0].apply(grads, variables)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none=True``, the default) or zero them in place.

        The default skips ``torch.optim.Optimizer.zero_grad``'s profiler record and grouping,
        which cost more than the work on small models.
        """
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def _keras_scope(self) -> Any:
        """Keras on the weights' device (they may have moved since construction)."""
        device = self._params[0].device
        if device != self._device:
            self._device = device
            for update in self._updates:
                place_variables(update.keras_optimizer.variables, device)
            self._scoped = None
        if self._scoped is None:
            self._scoped = not same_device(device, keras_default_device())
        return keras_device(device) if self._scoped else contextlib.nullcontext()

    def _ensure_built(self) -> None:
        with self._keras_scope():
            for update in self._updates:
                if not update.keras_optimizer.built:
                    update.keras_optimizer.build(update.variables)

    def _positions(self) -> dict[int, int]:
        params = [p for group in self.param_groups for p in group["params"]]
        return {id(p): index for index, p in enumerate(params)}

    def state_dict(self) -> dict[str, Any]:
        """The Keras optimizers' variables (:mod:`keras_lightning.optimizer_state`) and the
        param groups.

        The first Keras optimizer's state is at the top level; every later one's is under
        ``"keras_lightning_updates"`` with its group and the positions of its parameters.
        """
        if self._current_layout() != self._layout:
            self._follow_param_groups()
        self._ensure_built()
        positions = self._positions()
        state: dict[str, Any] = {"state": {}, "param_groups": []}
        start = 0
        for group in self.param_groups:
            count = len(group["params"])
            state["param_groups"].append(
                {key: value for key, value in group.items() if key != "params"}
                | {"params": list(range(start, start + count))}
            )
            start += count
        state.update(optimizer_state.capture(self.keras_optimizer))
        state[_UPDATES] = [
            {
                "group": update.group,
                "params": [positions[id(p)] for p in update.params],
                **({} if index == 0 else optimizer_state.capture(update.keras_optimizer)),
            }
            for index, update in enumerate(self._updates)
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the Keras optimizers are built if needed.

        Raises:
            CheckpointError: Another optimizer type or model wrote the state, or its param
                groups hold other numbers of parameters; nothing is changed then.

        """
        saved_groups = state_dict["param_groups"]
        sizes = [len(group["params"]) for group in self.param_groups]
        saved_sizes = [len(group["params"]) for group in saved_groups]
        if _UPDATES in state_dict and sizes != saved_sizes:
            raise CheckpointError(
                f"The checkpoint's {type(self.keras_optimizer).__name__} has param groups of "
                f"{saved_sizes} parameters, this one {sizes}: the weights that train differ "
                "(a layer frozen or unfrozen, or a param group added by a callback such as "
                "BackboneFinetuning, which must be passed again to resume). Resume with the "
                "same callbacks and the same layers trainable."
            )
        if self._current_layout() != self._layout:
            self._follow_param_groups()
        updates = self._updates
        saved_updates = state_dict.get(_UPDATES)
        if saved_updates is not None:
            updates = self._updates_like(saved_updates)
        self._updates = updates
        self._ensure_built()
        pairs = [(updates[0], state_dict)]
        pairs += [(u, s) for u, s in zip(updates[1:], (saved_updates or [])[1:], strict=True)]
        for update, saved in pairs:
            optimizer_state.check(update.keras_optimizer, saved, "The Keras optimizer")
        for update, saved in pairs:
            optimizer_state.restore(update.keras_optimizer, saved)
            update.synced_lr = None
        for group, saved_group in zip(self.param_groups, saved_groups, strict=False):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        self._layout = self._current_layout()

    def _updates_like(self, saved_updates: Sequence[Mapping[str, Any]]) -> list[_Update]:
        """Keras optimizers laid out over the parameters as in the saved state."""
        params = [p for group in self.param_groups for p in group["params"]]
        first = self._updates[0]
        updates = []
        for index, saved in enumerate(saved_updates):
            chosen = [params[i] for i in saved["params"]]
            group_index = int(saved["group"])
            if index == 0:
                first.variables = [self._variable_of[id(p)] for p in chosen]
                first.params = list(chosen)
                first.path, first.direct = None, None
                updates.append(first)
            else:
                group = self.param_groups[group_index]
                updates.append(self._update_for(group_index, group, chosen, extend=False))
        return updates


_UPDATES = "keras_lightning_updates"


def _named_class(name: str) -> type[KerasOptimizer]:
    """The :class:`KerasOptimizer` subclass named ``name`` (made once, picklable)."""
    found = _ByKerasClass.__dict__.get(name)
    if found is None:
        found = type(name, (KerasOptimizer,), {"__module__": __name__})
        found.__qualname__ = f"_ByKerasClass.{name}"
        found.__doc__ = f"A KerasOptimizer driving a Keras {name}."
        setattr(_ByKerasClass, name, found)
    return found


def _same_kind(keras_optimizer: Any, lr: float) -> Any:
    """A new Keras optimizer of ``keras_optimizer``'s class and config, at learning rate ``lr``."""
    config = dict(keras_optimizer.get_config())
    config["learning_rate"] = lr
    try:
        return type(keras_optimizer).from_config(config)
    except Exception as error:  # noqa: BLE001 (a user's class may raise anything)
        raise ConfigurationError(
            f"Parameters were added to the {type(keras_optimizer).__name__} optimizer (a new "
            "param group, or layers unfrozen during training); they need a second Keras "
            f"optimizer of the same class, built from get_config(), which failed: {error}. "
            "Give the optimizer class a get_config() that from_config() accepts, or use a "
            "built-in Keras optimizer."
        ) from error


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
    trainable = training_variables(model)
    if isinstance(spec, str):
        spec = _keras_optimizer_from_name(spec, argument)
    if isinstance(spec, keras.optimizers.Optimizer):
        return KerasOptimizer(spec, trainable, model.variables)
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec):
        params = [parameter_of(v) for v in trainable]
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


def training_variables(model: Any) -> list[Any]:
    """The variables an optimizer built now trains: Keras-trainable, and requiring gradients.

    Lightning's fine-tuning callbacks freeze by ``requires_grad`` (``BaseFinetuning.freeze``)
    before ``configure_optimizers`` and add the frozen weights as a new param group when they
    unfreeze them, as a plain module's ``Adam(filter(lambda p: p.requires_grad, ...))`` expects.
    """
    return [v for v in model.trainable_variables if parameter_of(v).requires_grad]


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
    if not training_variables(model):
        raise ConfigurationError(
            "Every trainable variable of the Keras model has requires_grad=False (frozen "
            "with torch, e.g. by a fine-tuning callback's freeze_before_training), so the "
            "optimizer would have nothing to train. Leave some weights (the head) unfrozen."
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
        kind = "an optimizer, " if isinstance(scheduler, torch.optim.Optimizer) else ""
        raise KerasLightningTypeError(
            "`lr_scheduler` was called with the optimizer and returned "
            f"{kind}{type(scheduler).__name__}, not a torch LR scheduler. Return e.g. "
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
            pair
            for optimizer in optimizers
            if isinstance(optimizer, KerasOptimizer)
            for pair in optimizer.keras_updates
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



class LaterTrainable:
    """Weights that start to train after the optimizer was built join its first param group.

    The module's optimizer is built over the weights that train when ``configure_optimizers``
    runs. A weight unfrozen later by anything but a new param group (``layer.trainable = True``
    in a callback, ``requires_grad_(True)``) would otherwise get gradients and never be
    updated; before each training batch, such weights are appended to the first optimizer's
    first param group (a Keras optimizer gives them their own Keras optimizer of the same
    class), as in a plain module whose optimizer was built over ``self.parameters()``. Their
    positions go into checkpoints, so a resumed run's param groups match the saved ones.
    """

    def __init__(self) -> None:
        self.positions: list[int] = []  # in model.variables
        self._layout: tuple[Any, ...] | None = None
        self._unowned: list[torch.Tensor] = []  # weights no param group holds
        self._late_candidates: list[torch.Tensor] | None = None  # not in DDP's reducer

    def wrapped_by_ddp(self, module: torch.nn.Module, ddp: bool) -> None:
        """Right after DDP wrapped the module (``configure_optimizers``): what DDP averages.

        DDP's reducer takes the parameters that require gradients when it wraps the module;
        one unfrozen later (even in a callback's ``on_fit_start``) gets local gradients
        only, and the ranks would drift apart.
        """
        self._late_candidates = (
            [p for p in module.parameters() if not p.requires_grad] if ddp else None
        )

    def average_late_gradients(self, module: torch.nn.Module) -> None:
        """Under DDP, average the gradients of parameters DDP's reducer does not know.

        Called before every optimizer step (before clipping); every rank unfreezes the same
        layers at the same step, so every rank reduces the same tensors.
        """
        candidates = self._late_candidates
        if not candidates:
            return
        late = [p for p in candidates if p.grad is not None]
        if not late:
            return
        grads = [p.grad for p in late if p.grad is not None]
        averaged = collectives.all_reduce_sum(grads, divide_by=collectives.world_size())
        for param, grad in zip(late, averaged, strict=True):
            param.grad = grad

    def adopt(self, optimizer: torch.optim.Optimizer, model: Any) -> None:
        """Append to ``optimizer``'s first group the float weights that need it (cheap if none)."""
        groups = optimizer.param_groups
        layout = (id(optimizer), id(groups), *(len(group["params"]) for group in groups))
        if layout != self._layout:
            owned = {id(p) for group in groups for p in group["params"]}
            self._unowned = [
                parameter_of(v)
                for v in model.variables
                if parameter_of(v).is_floating_point() and id(parameter_of(v)) not in owned
            ]
            self._layout = layout
        new = [p for p in self._unowned if p.requires_grad]
        if not new:
            return
        from keras_lightning.sharding import refuse_later_trainable

        refuse_later_trainable(model, len(new))
        self._append(optimizer, model, new)
        names = {id(parameter_of(v)): v.path for v in model.variables}
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info(
            f"{len(new)} weights of the Keras model started to train after the optimizer was "
            f"built ({', '.join(names[id(p)] for p in new[:4])}{', ...' if len(new) > 4 else ''}); "
            f"they join param group 0 of {type(optimizer).__name__}, at its learning rate. To "
            "give them their own, add them as a param group (what Lightning's "
            "BackboneFinetuning does)."
        )

    def restore(self, optimizer: torch.optim.Optimizer, model: Any) -> None:
        """Append the weights a resumed run had appended, so the param groups match."""
        variables = model.variables
        params = [parameter_of(variables[i]) for i in self.positions if i < len(variables)]
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in params if id(p) not in owned]
        if params:
            self._append(optimizer, model, params, record=False)

    def _append(
        self, optimizer: torch.optim.Optimizer, model: Any, params: list[Any], record: bool = True
    ) -> None:
        optimizer.param_groups[0]["params"].extend(params)
        if record:
            index_of = {id(parameter_of(v)): i for i, v in enumerate(model.variables)}
            self.positions += [index_of[id(p)] for p in params]
        self._layout = None
