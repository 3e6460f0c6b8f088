"""The Keras model config and the module's arguments, stored in a checkpoint's hparams.

The checkpoint's hyperparameters hold the Keras model config (Keras serialization, the same
JSON a ``.keras`` file holds) and the wrapper's arguments as Keras configs, so
``KerasLightningModule.load_from_checkpoint(path)`` rebuilds the module without the code that
built the model. Keras ``safe_mode`` stays on unless the caller opts out.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import CheckpointError
from keras_lightning.keras_model import overrides_step

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import Arguments

#: Version of what this package writes under ``hyper_parameters["keras_lightning"]``.
FORMAT_VERSION = 1
#: Key in ``checkpoint["hyper_parameters"]`` holding the model config and wrapper arguments.
HPARAMS_KEY = "keras_lightning"

_UNSERIALIZABLE = "__unserializable__"
_KERAS_OBJECT = "__keras__"
# The module's arguments (fields of builtin_steps.Arguments) and how each is stored.
_ARGUMENTS = {
    "optimizer": "optimizer",
    "loss": "loss",
    "metrics": "metric",
    "weighted_metrics": "metric",
    "loss_weights": "plain",
    "class_weight": "plain",
    "lr_scheduler": "never",
}
#: What a model's own compute_loss replaces: not stored unless given to the module.
_OBJECTIVE = ("loss", "loss_weights")



def model_config(model: Any) -> dict[str, Any]:
    """The Keras serialization of ``model`` (as in a ``.keras`` file), without compile config.

    Raises:
        CheckpointError: The model cannot be serialized (e.g. a subclassed model whose
            ``get_config`` is not implemented).

    """
    try:
        config = keras.saving.serialize_keras_object(model)
        config = json.loads(json.dumps(config))
    except (NotImplementedError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"The Keras model {type(model).__name__} cannot be serialized ({error}). Implement "
            "get_config() (and register the class with "
            "@keras.saving.register_keras_serializable()), or pass the model again when "
            "loading: KerasLightningModule.load_from_checkpoint(path, model=build_model())."
        ) from error
    config.pop("compile_config", None)
    return config


def _serialize_leaf(value: Any, kind: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if kind == "never" or kind == "plain":
        return {_UNSERIALIZABLE: _describe(value)}
    keras_types = (
        keras.optimizers.Optimizer,
        keras.losses.Loss,
        keras.metrics.Metric,
    )
    is_keras_function = callable(value) and getattr(value, "__module__", "").startswith("keras")
    if not isinstance(value, keras_types) and not is_keras_function:
        return {_UNSERIALIZABLE: _describe(value)}
    try:
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(value)))
    except (NotImplementedError, TypeError, ValueError):
        return {_UNSERIALIZABLE: _describe(value)}
    if "__lambda__" in json.dumps(config):
        return {_UNSERIALIZABLE: _describe(value)}
    return {_KERAS_OBJECT: config}


def _serialize(value: Any, kind: str) -> Any:
    if kind == "never" and value is not None:
        return {_UNSERIALIZABLE: _describe(value)}
    if isinstance(value, Mapping):
        if all(isinstance(key, str | int) for key in value):
            return {key: _serialize(item, kind) for key, item in value.items()}
        return {_UNSERIALIZABLE: _describe(value)}
    if isinstance(value, list | tuple):
        return [_serialize(item, kind) for item in value]
    return _serialize_leaf(value, kind)


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def module_config(model: Any, arguments: Arguments) -> dict[str, Any]:
    """What ``load_from_checkpoint`` needs to rebuild a module: model config and arguments.

    Arguments that Keras cannot serialize (torch optimizers, torch losses, torchmetrics, LR
    scheduler factories, marked callables) are stored as ``{"__unserializable__": type}`` and
    must be passed again to ``load_from_checkpoint``.
    """
    config: dict[str, Any] = {"format": FORMAT_VERSION, "arguments": {}}
    try:
        config["model"] = model_config(model) if model is not None else None
    except CheckpointError as error:
        config["model"] = None
        config["model_error"] = str(error)
    own_objective = model is not None and overrides_step(model, "compute_loss")
    for argument, kind in _ARGUMENTS.items():
        value = getattr(arguments, argument)
        if own_objective and argument in _OBJECTIVE and argument not in arguments.given:
            value = None  # taken from the model's compile(), which its compute_loss uses
        config["arguments"][argument] = _serialize(value, kind)
    return config


def _unserializable_paths(value: Any, path: str) -> list[str]:
    if isinstance(value, Mapping):
        if _UNSERIALIZABLE in value:
            return [f"{path} ({value[_UNSERIALIZABLE]})"]
        if _KERAS_OBJECT in value:
            return []
        return [p for key, item in value.items() for p in _unserializable_paths(item, f"{path}")]
    if isinstance(value, list):
        return [p for item in value for p in _unserializable_paths(item, path)]
    return []


def _deserialize(value: Any, kind: str, custom_objects: Any, safe_mode: bool) -> Any:
    if isinstance(value, Mapping):
        if _KERAS_OBJECT in value:
            deserialize = {
                "optimizer": keras.optimizers.deserialize,
                "loss": keras.losses.deserialize,
                "metric": keras.metrics.deserialize,
            }[kind]
            return _keras_call(
                lambda: deserialize(value[_KERAS_OBJECT]), custom_objects, safe_mode, kind
            )
        return {
            key: _deserialize(item, kind, custom_objects, safe_mode) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_deserialize(item, kind, custom_objects, safe_mode) for item in value]
    return value


def _keras_call(fn: Callable[[], Any], custom_objects: Any, safe_mode: bool, what: str) -> Any:
    """Run a Keras deserialization with ``custom_objects`` and ``safe_mode``; clear errors."""
    try:
        with keras.saving.custom_object_scope(custom_objects or {}), _private.safe_mode_scope(
            safe_mode
        ):
            return fn()
    except (TypeError, ValueError) as error:
        text = str(error)
        if "safe_mode" in text:
            raise CheckpointError(
                f"The checkpoint's Keras {what} contains Python code (e.g. a Lambda layer), and "
                "loading it would run that code, so it was refused. If you trust the file, "
                "pass safe_mode=False (load_from_checkpoint(path, safe_mode=False) or "
                f"kl.export_keras(..., safe_mode=False)). Keras said: {text}"
            ) from error
        if "Could not locate" in text or "register_keras_serializable" in text:
            raise CheckpointError(
                f"The checkpoint's Keras {what} uses a class or function that is not "
                "registered. Import the code that defines it and decorate it with "
                "@keras.saving.register_keras_serializable(), or pass it: "
                f"custom_objects={{'MyLayer': MyLayer}}. Keras said: {text}"
            ) from error
        raise


def rebuild_model(
    config: Mapping[str, Any],
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> keras.Model:
    """Rebuild the Keras model stored by :func:`module_config` (variables freshly initialised)."""
    if config.get("model") is None:
        raise CheckpointError(
            "The checkpoint holds no Keras model config"
            + (f" ({config['model_error']})" if config.get("model_error") else "")
            + ". Pass the model: KerasLightningModule.load_from_checkpoint(path, "
            "model=build_model())."
        )
    return _keras_call(
        lambda: keras.saving.deserialize_keras_object(config["model"]),
        custom_objects,
        safe_mode,
        "model",
    )


def module_arguments(
    config: Mapping[str, Any],
    given: Mapping[str, Any],
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> dict[str, Any]:
    """The wrapper's constructor arguments from the checkpoint, overridden by ``given``.

    Raises:
        CheckpointError: An argument could not be stored and was not given again.

    """
    arguments: dict[str, Any] = {}
    needed = []
    for argument, kind in _ARGUMENTS.items():
        if argument in given:
            continue
        stored = config.get("arguments", {}).get(argument)
        lost = _unserializable_paths(stored, argument)
        if lost:
            needed.extend(lost)
            continue
        arguments[argument] = _deserialize(
            stored, "metric" if kind == "plain" else kind, custom_objects, safe_mode
        )
    if needed:
        names = sorted({entry.split(" ", 1)[0] for entry in needed})
        raise CheckpointError(
            "These arguments of KerasLightningModule are torch objects or plain callables "
            f"that a checkpoint cannot store: {', '.join(needed)}. Pass them again: "
            f"KerasLightningModule.load_from_checkpoint(path, "
            f"{', '.join(f'{name}=...' for name in names)}), or "
            f"{', '.join(f'{name}=None' for name in names)} to only predict or evaluate."
        )
    return arguments
