"""The Keras optimizers a Keras model holds for its own ``train_step``: found, saved, synced.

A model with its own ``train_step`` applies the optimizers it holds (``model.optimizer``, or a
GAN's ``d_optimizer`` / ``g_optimizer`` set in a custom ``compile``). Their state goes into
checkpoints in the one optimizer-state format (:mod:`keras_lightning.optimizer_state`), with
which of ``model.variables`` each updates (by position, so the state loads into a freshly
built model whose layer names differ); under DDP their ``apply`` averages gradients first.
"""

from __future__ import annotations

from keras_lightning import _private, collectives, optimizer_state
from keras_lightning.exceptions import CheckpointError

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import keras

__all__ = [
    "CHECKPOINT_KEY",
    "average_gradients",
    "keras_optimizer_state",
    "keras_optimizers_of",
    "load_keras_optimizer_state",
    "synchronized_keras_optimizers",
]

#: Key under which :func:`keras_optimizer_state` is stored in a Lightning checkpoint.
CHECKPOINT_KEY = "keras_lightning_model_optimizers"


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
    for variable in _private.optimizer_variables_updated(optimizer):
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
            "variable_positions": _variable_positions(optimizer, model, name),
            **optimizer_state.capture(optimizer),
        }
    return state


def load_keras_optimizer_state(model: Any, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore what :func:`keras_optimizer_state` saved into the model's Keras optimizers.

    Every optimizer is checked before any is assigned. An optimizer that is not built yet is
    built on the variables it updated when saved.

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
        optimizer_state.check(optimizer, _current_format(saved), f"`model.{name}`")
    # every optimizer checked: now assign, all or nothing
    for name, saved in state.items():
        if saved.get("built"):
            optimizer_state.restore(optimizers[name], _current_format(saved), f"`model.{name}`")


def _current_format(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """Checkpoints of version 0.1.0 stored ``values`` / ``paths`` / ``class``."""
    if optimizer_state.VARIABLES in saved or "values" not in saved:
        return saved
    return {
        optimizer_state.VARIABLES: saved["values"],
        optimizer_state.PATHS: saved.get("paths"),
        optimizer_state.CLASS: saved.get("class"),
    }


def average_gradients(grads: list[Any], world_size: int) -> list[Any]:
    """All-reduce ``grads`` (one flat buffer per dtype) and divide by ``world_size``."""
    present = [i for i, grad in enumerate(grads) if grad is not None]
    averaged = list(grads)
    summed = collectives.all_reduce_sum([grads[i] for i in present], divide_by=world_size)
    for index, grad in zip(present, summed, strict=True):
        averaged[index] = grad
    return averaged


@contextlib.contextmanager
def synchronized_keras_optimizers(model: Any) -> Iterator[None]:
    """While active, every Keras optimizer of ``model`` averages gradients across processes.

    Keras' ``train_step`` calls the Keras model directly and runs ``backward`` itself, so DDP's
    reducer never sees its gradients. This wraps each optimizer's ``apply`` (which
    ``apply_gradients`` also goes through) so that the gradients are averaged over the process
    group first; outside a process group (or with one process) it does nothing.
    """
    world_size = collectives.world_size()
    if world_size == 1:
        yield
        return
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
