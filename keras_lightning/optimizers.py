"""Keras and torch optimizers behind Lightning's optimization.

A Keras optimizer is not a ``torch.optim.Optimizer``; :class:`KerasOptimizer` makes it one, so
Lightning's automatic optimization, gradient clipping and accumulation, torch LR schedulers,
the ``16-mixed`` GradScaler and checkpoints all see an ordinary torch optimizer, while the
update itself is Keras' ``optimizer.apply(grads, variables)``.
"""

from __future__ import annotations

from keras_lightning.distributed import (
    keras_default_device,
    keras_device,
    place_variables,
    same_device,
)
from keras_lightning.exceptions import ArgumentTypeError, CheckpointError, ConfigurationError
from keras_lightning.precision import check_keras_optimizer

import contextlib
import difflib
from collections.abc import Callable, Iterable, Sequence
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


def _parameter_of(variable: Any) -> torch.Tensor:
    """The ``torch.nn.Parameter`` behind a Keras variable (never an autocast copy)."""
    return getattr(variable, "_value", None) if hasattr(variable, "_value") else variable.value


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
            raise ArgumentTypeError(
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
        self.keras_optimizer = keras_optimizer
        self.variables = variables
        self._params = [_parameter_of(v) for v in variables]
        # Keras optimizer variables (iterations, learning rate, slots built on the first
        # apply) live on the device of the weights, whatever Keras' default device is.
        self._device = self._params[0].device
        place_variables(keras_optimizer.variables, self._device)
        self._scoped: bool | None = None
        self._update_path: str | None = None  # decided once the Keras optimizer is built
        self._direct_update: _DirectUpdate | None = None
        self._lr_is_schedule = isinstance(
            keras_optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule
        )
        lr = self._current_keras_lr()
        super().__init__(self._params, {"lr": lr})
        self._synced_lr: float | None = None if self._lr_is_schedule else lr

    def _current_keras_lr(self) -> float:
        return float(keras.ops.convert_to_numpy(self.keras_optimizer.learning_rate))

    @property
    def lr_is_schedule(self) -> bool:
        """True when the Keras optimizer's learning rate is a ``LearningRateSchedule``."""
        return self._lr_is_schedule

    def _sync_lr_to_keras(self) -> None:
        lr = self.param_groups[0]["lr"]
        if self._lr_is_schedule or lr == self._synced_lr:
            return
        self.keras_optimizer.learning_rate = float(lr)
        self._synced_lr = lr

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
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
          op for op, without Keras' per-op dispatch (:class:`_DirectUpdate`);
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
        ``SGD`` updates reduce further to their ``torch._foreach`` ops (:class:`_DirectUpdate`).
        """
        optimizer = self.keras_optimizer
        if self._update_path is None:
            if not optimizer.built:
                optimizer.apply(grads, variables)  # builds the slots; decide next time
                return
            self._update_path = _update_path_for(optimizer, self.variables)
            if self._update_path in _DirectUpdate.KINDS:
                self._direct_update = _DirectUpdate(optimizer, self.variables, self._update_path)
        path = self._update_path if optimizer.loss_scale_factor is None else "apply"
        if path == "apply":
            optimizer.apply(grads, variables)
        elif path == "short":
            optimizer._backend_apply_gradients(grads, variables)
            optimizer._iterations.assign_add(1)
        elif self._direct_update is not None and self._direct_update.applies():
            self._direct_update(grads, variables)
        else:  # clipping, EMA or accumulation switched on after the path was chosen
            optimizer._backend_apply_gradients(grads, variables)
            optimizer._iterations.assign_add(1)

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
        """Keras optimizer variables (by position and path) and the param groups."""
        self._ensure_built()
        keras_vars = self.keras_optimizer.variables
        return {
            "state": {},
            "param_groups": [
                {key: value for key, value in group.items() if key != "params"}
                | {"params": list(range(len(self._params)))}
                for group in self.param_groups
            ],
            # torch tensors, not NumPy arrays: torch.load(weights_only=True) refuses NumPy.
            "keras_variables": [v.value.detach().clone() for v in keras_vars],
            "keras_variable_paths": [v.path for v in keras_vars],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the Keras optimizer is built if needed."""
        if "keras_variables" not in state_dict:
            raise CheckpointError(
                "This optimizer state was not written by a KerasOptimizer (no "
                "'keras_variables'): it cannot be loaded into a Keras optimizer. Resume with "
                "the same optimizer type that wrote the checkpoint."
            )
        self._ensure_built()
        keras_vars = self.keras_optimizer.variables
        saved = state_dict["keras_variables"]
        if len(saved) != len(keras_vars):
            raise CheckpointError(
                f"The checkpoint holds {len(saved)} Keras optimizer variables but this "
                f"optimizer has {len(keras_vars)}: it was written for another optimizer or "
                "model. Resume with the optimizer and model that wrote it."
            )
        for variable, value, path in zip(
            keras_vars, saved, state_dict.get("keras_variable_paths", [None] * len(saved)),
            strict=True,
        ):
            if tuple(variable.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"Optimizer variable {path or variable.path!r} has shape {tuple(value.shape)} "
                    f"in the checkpoint but {tuple(variable.shape)} here."
                )
            variable.assign(value)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=False):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        self._synced_lr = None


def _update_path_for(optimizer: Any, variables: Sequence[Any]) -> str:
    """The :attr:`KerasOptimizer.update_path` that does exactly what ``apply`` does."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    if getattr(type(optimizer), "apply", None) is not BaseOptimizer.apply:
        return "apply"  # e.g. LossScaleOptimizer: its own apply
    if not hasattr(optimizer, "_backend_apply_gradients") or not hasattr(optimizer, "_iterations"):
        return "apply"
    known = getattr(optimizer, "_trainable_variables_indices", {})
    if not all(
        optimizer._var_key(v) in known
        and getattr(v, "constraint", None) is None
        and not getattr(v, "overwrite_with_gradient", False)
        for v in variables
    ):
        return "apply"
    return _DirectUpdate.kind_for(optimizer) or "short"


class _DirectUpdate:
    """Keras' torch ``Adam`` / ``SGD`` update, op for op, without Keras' per-op dispatch.

    Keras' torch backend already updates with ``torch._foreach`` ops
    (``keras/src/backend/torch/optimizers/torch_adam.py`` and ``torch_sgd.py``); around them,
    each step converts and casts the learning rate, step count and betas through Keras ops and
    looks up every slot by variable: on the guides' MLP that dispatch cost more than the
    update itself. This runs the same torch ops in the same order on the same dtypes (so the
    result is bit-identical), with the slots looked up once. Used only when
    ``_backend_apply_gradients`` would do nothing else: no clipping, no EMA, no gradient
    accumulation, and none of the methods involved overridden by a subclass.
    """

    KINDS = ("adam", "sgd")

    @staticmethod
    def kind_for(optimizer: Any) -> str | None:
        try:
            from keras.src.backend.torch.optimizers import (
                torch_adam,
                torch_optimizer,
                torch_parallel_optimizer,
                torch_sgd,
            )
            from keras.src.optimizers.base_optimizer import BaseOptimizer
        except ImportError:  # another Keras layout: keep the short path
            return None
        cls = type(optimizer)
        untouched = (
            cls._backend_apply_gradients is BaseOptimizer._backend_apply_gradients
            and cls._backend_update_step
            is torch_parallel_optimizer.TorchParallelOptimizer._backend_update_step
            and cls._clip_gradients is BaseOptimizer._clip_gradients
            and cls._apply_weight_decay is torch_optimizer.TorchOptimizer._apply_weight_decay
            and cls._get_current_learning_rate is BaseOptimizer._get_current_learning_rate
        )
        if not (untouched and _DirectUpdate.plain(optimizer)):
            return None
        if cls._parallel_update_step is torch_adam.Adam._parallel_update_step:
            return "adam"
        if cls._parallel_update_step is torch_sgd.SGD._parallel_update_step:
            return "sgd"
        return None

    @staticmethod
    def plain(optimizer: Any) -> bool:
        """No clipping, EMA or gradient accumulation: the update is the optimizer's alone."""
        return not (
            optimizer.gradient_accumulation_steps
            or optimizer.use_ema
            or optimizer.clipnorm
            or optimizer.clipvalue
            or optimizer.global_clipnorm
        )

    def applies(self) -> bool:
        """Checked on every step: a callback may set ``clipnorm`` (...) mid-training."""
        return self.plain(self.optimizer)

    def __init__(self, optimizer: Any, variables: Sequence[Any], kind: str) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.count = len(variables)
        self._constants: dict[Any, torch.Tensor] = {}
        if kind == "adam":
            self._all_slots = self._adam_slots(variables)
        else:
            self._all_slots = self._sgd_slots(variables)

    def _adam_slots(self, variables: Sequence[Any]) -> tuple[list[Any], ...]:
        optimizer = self.optimizer
        index = [optimizer._get_variable_index(v) for v in variables]
        hats = [optimizer._velocity_hats[i] for i in index] if optimizer.amsgrad else []
        return (
            [optimizer._momentums[i] for i in index],
            [optimizer._velocities[i] for i in index],
            hats,
        )

    def _sgd_slots(self, variables: Sequence[Any]) -> tuple[list[Any], ...]:
        optimizer = self.optimizer
        if optimizer.momentum == 0:
            return ([],)
        return ([optimizer.momentums[optimizer._get_variable_index(v)] for v in variables],)

    def _constant(self, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # keras.ops.cast(python_float, dtype): a tensor made once, not on every step.
        key = (value, dtype, device)
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = self._constants[key] = torch.as_tensor(value, dtype=dtype, device=device)
        return tensor

    def __call__(self, grads: list[torch.Tensor], variables: list[Any]) -> None:
        optimizer = self.optimizer
        if len(variables) == self.count:
            slots = self._all_slots
        elif self.kind == "adam":  # some variables got no gradient this step
            slots = self._adam_slots(variables)
        else:
            slots = self._sgd_slots(variables)
        if optimizer.weight_decay is not None:
            optimizer._apply_weight_decay(variables)
        values = [_parameter_of(v) for v in variables]
        if self.kind == "adam":
            self._adam(grads, values, *slots)
        else:
            self._sgd(grads, values, *slots)
        optimizer._iterations._value.add_(1)

    def _learning_rate(self, dtype: torch.dtype) -> torch.Tensor:
        # keras.ops.cast(optimizer.learning_rate, dtype)
        lr = self.optimizer._get_current_learning_rate()
        if isinstance(lr, keras.Variable):
            lr = _parameter_of(lr)
        if isinstance(lr, torch.Tensor):
            return lr if lr.dtype == dtype else lr.to(dtype)
        return keras.ops.cast(lr, dtype)

    def _adam(
        self,
        grads: list[torch.Tensor],
        values: list[torch.Tensor],
        momentums: list[Any],
        velocities: list[Any],
        velocity_hats: list[Any],
    ) -> None:
        # torch_adam.Adam._parallel_update_step, with Keras ops replaced by the torch ops they run.
        optimizer = self.optimizer
        dtype, device = values[0].dtype, values[0].device
        lr = self._learning_rate(dtype)
        local_step = (_parameter_of(optimizer._iterations) + 1).to(dtype)
        beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
        beta_1_power = torch.pow(self._constant(beta_1, dtype, device), local_step)
        beta_2_power = torch.pow(self._constant(beta_2, dtype, device), local_step)
        alpha = lr * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m_list = [_parameter_of(m) for m in momentums]
        v_list = [_parameter_of(v) for v in velocities]
        torch._foreach_mul_(m_list, beta_1)
        torch._foreach_add_(m_list, grads, alpha=1 - beta_1)
        torch._foreach_mul_(v_list, beta_2)
        torch._foreach_add_(v_list, torch._foreach_mul(grads, grads), alpha=1 - beta_2)
        if optimizer.amsgrad:
            v_hat_list = [_parameter_of(v) for v in velocity_hats]
            torch._foreach_maximum_(v_hat_list, v_list)
            v_list = v_hat_list
        torch._foreach_add_(
            values,
            torch._foreach_div(
                torch._foreach_mul(m_list, alpha),
                torch._foreach_add(torch._foreach_sqrt(v_list), optimizer.epsilon),
            ),
            alpha=-1,
        )

    def _sgd(
        self, grads: list[torch.Tensor], values: list[torch.Tensor], momentums: list[Any]
    ) -> None:
        # torch_sgd.SGD._parallel_update_step; Keras passes the learning-rate variable itself.
        optimizer = self.optimizer
        learning_rate = optimizer.learning_rate
        if optimizer.momentum == 0:
            torch._foreach_add_(values, grads, alpha=-learning_rate)
            return
        bufs = [_parameter_of(m) for m in momentums]
        torch._foreach_mul_(bufs, optimizer.momentum)
        torch._foreach_add_(bufs, grads, alpha=-learning_rate)
        if optimizer.nesterov:
            torch._foreach_add_(values, grads, alpha=-learning_rate)
            torch._foreach_add_(values, bufs, alpha=optimizer.momentum)
        else:
            torch._foreach_add_(values, bufs)


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
    if isinstance(spec, str):
        return KerasOptimizer(_keras_optimizer_from_name(spec, argument), model.trainable_variables)
    if isinstance(spec, keras.optimizers.Optimizer):
        return KerasOptimizer(spec, model.trainable_variables)
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec):
        params = [_parameter_of(v) for v in model.trainable_variables]
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                f"`{argument}` was called with the model parameters and returned "
                f"{type(optimizer).__name__}, not a torch.optim.Optimizer. Pass a torch "
                "optimizer class (torch.optim.Adam), a function such as "
                "`lambda params: torch.optim.Adam(params, lr=1e-3)`, or a Keras optimizer."
            )
        return optimizer
    raise ArgumentTypeError(
        f"`{argument}` must be a Keras optimizer or its name ('adam', 'sgd', ...), a torch "
        "optimizer class (torch.optim.Adam) or a callable params -> torch.optim.Optimizer. "
        f"Received: {argument}={spec!r} of type {type(spec).__name__}."
    )


def _keras_optimizer_from_name(name: str, argument: str) -> Any:
    try:
        return keras.optimizers.get(name)
    except ValueError:
        close = difflib.get_close_matches(name.lower(), _KERAS_OPTIMIZER_NAMES, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigurationError(
            f"`{argument}={name!r}` is not a Keras optimizer name.{hint} Known names: "
            f"{', '.join(_KERAS_OPTIMIZER_NAMES)}. Or pass an optimizer object such as "
            "keras.optimizers.Adam(1e-3) or the class torch.optim.Adam."
        ) from None


def trainable_parameters(variables: Iterable[Any]) -> list[torch.Tensor]:
    """The torch Parameters behind Keras variables."""
    return [_parameter_of(v) for v in variables]
