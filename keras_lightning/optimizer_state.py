"""The one checkpoint format of a Keras optimizer's state, used by every path that saves one.

A Keras optimizer's state is its variables (``iterations``, the learning rate, slots such as
Adam's moments), in the optimizer's own order. :func:`capture` stores them as CPU tensors
(loadable with ``torch.load(weights_only=True)``, which refuses NumPy arrays) with their paths
and the optimizer's class; :func:`restore` checks everything first (class, count, shapes) and
only then assigns, so a mismatch leaves the optimizer as it was. :class:`KerasOptimizer`'s
``state_dict`` and the optimizers of a Keras-side ``train_step`` both use this format.
"""

from __future__ import annotations

from keras_lightning.exceptions import CheckpointError

from collections.abc import Mapping
from typing import Any

__all__ = ["CLASS", "PATHS", "VARIABLES", "capture", "check", "check_class", "restore"]

VARIABLES = "keras_variables"
PATHS = "keras_variable_paths"
CLASS = "keras_class"


def capture(optimizer: Any) -> dict[str, Any]:
    """The state of a built Keras optimizer: ``{keras_variables, keras_variable_paths,
    keras_class}``.

    Example:
        >>> import keras
        >>> optimizer = keras.optimizers.SGD(0.1)
        >>> optimizer.build([keras.Variable([1.0, 2.0])])
        >>> state = capture(optimizer)
        >>> state["keras_class"], [tuple(v.shape) for v in state["keras_variables"]]
        ('SGD', [(), ()])

    """
    variables = optimizer.variables
    return {
        VARIABLES: [v.value.detach().cpu().clone() for v in variables],
        PATHS: [v.path for v in variables],
        CLASS: type(optimizer).__name__,
    }


def restore(optimizer: Any, state: Mapping[str, Any], what: str = "The Keras optimizer") -> None:
    """Assign what :func:`capture` stored, after checking all of it against ``optimizer``.

    Raises:
        CheckpointError: Another optimizer class wrote it, or its variables differ in number
            or shape. Nothing is assigned then.

    """
    check(optimizer, state, what)
    for variable, value in zip(optimizer.variables, state[VARIABLES], strict=True):
        variable.assign(value)


def check_class(class_name: str, state: Mapping[str, Any], what: str) -> None:
    """Refuse a state that a Keras optimizer of another class (or a torch optimizer) wrote.

    Raises:
        CheckpointError: The classes differ, or the state is not a Keras optimizer's.

    """
    if VARIABLES not in state:
        raise CheckpointError(
            "This optimizer state was not written by a KerasOptimizer (no "
            f"{VARIABLES!r}): it cannot be loaded into a Keras optimizer. Resume with "
            "the same optimizer type that wrote the checkpoint."
        )
    saved_class = state.get(CLASS)
    if saved_class is not None and saved_class != class_name:
        raise CheckpointError(
            f"{what} is a {class_name}, but the checkpoint holds the state of a {saved_class}: "
            f"its slots mean other things. Resume with {saved_class}, or start the optimizer "
            "fresh by loading the weights only (KerasLightningModule.load_from_checkpoint, "
            "then trainer.fit without ckpt_path)."
        )


def check(optimizer: Any, state: Mapping[str, Any], what: str = "The Keras optimizer") -> None:
    """Check a captured state against a built ``optimizer`` (class, count, shapes).

    Raises:
        CheckpointError: The first mismatch found; nothing is changed.

    """
    check_class(type(optimizer).__name__, state, what)
    variables = optimizer.variables
    saved = list(state[VARIABLES])
    if len(saved) != len(variables):
        raise CheckpointError(
            f"The checkpoint holds {len(saved)} Keras optimizer variables but this "
            f"optimizer has {len(variables)}: it was written for another optimizer or "
            "model. Resume with the optimizer and model that wrote it."
        )
    paths = list(state.get(PATHS) or [None] * len(saved))
    for variable, value, path in zip(variables, saved, paths, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"Optimizer variable {path or variable.path!r} has shape {tuple(value.shape)} "
                f"in the checkpoint but {tuple(variable.shape)} here."
            )
