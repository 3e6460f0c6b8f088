"""Loading: the checkpoint hooks, ``load_from_checkpoint`` and the Keras model of a checkpoint."""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.adapters import refuse_without_base
from keras_lightning.checkpoint.config import (
    FORMAT_VERSION,
    HPARAMS_KEY,
    module_arguments,
    module_config,
    rebuild_model,
)
from keras_lightning.checkpoint.files import load_checkpoint_file
from keras_lightning.checkpoint.keys import mismatch_message, stable_keys
from keras_lightning.checkpoint.rng import collect_rng_states
from keras_lightning.exceptions import CheckpointError, ConfigurationError
from keras_lightning.hparams import KEY as DESCRIPTION_KEY

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import Arguments
    from keras_lightning.module import KerasLightningModule

#: Top-level checkpoint key holding process state (random number generators).
STATE_KEY = "keras_lightning_state"


def on_save_checkpoint(
    model: Any, arguments: Arguments, checkpoint: dict[str, Any], mid_epoch: bool = False
) -> None:
    """Add the model config, the wrapper's arguments and the RNG states to ``checkpoint``.

    ``mid_epoch``: the checkpoint is written between two training batches of an epoch (e.g.
    ``ModelCheckpoint(every_n_train_steps=...)``); its random streams then continue at the
    next batch, not at load (see :func:`on_load_checkpoint`).
    """
    hparams = checkpoint.setdefault("hyper_parameters", {})
    hparams[HPARAMS_KEY] = module_config(model, arguments)
    checkpoint[STATE_KEY] = {
        "format": FORMAT_VERSION,
        "rng": collect_rng_states(),
        "mid_epoch": bool(mid_epoch),
    }


def on_load_checkpoint(trainer: Any, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved random streams to continue when resuming ``trainer.fit``, or None.

    Keras' ``Dropout`` without a ``seed`` draws its masks from torch's global generator (not
    from its SeedGenerator), so exact resumption needs the global generators restored. Only
    while fitting: ``load_from_checkpoint`` leaves the caller's generators alone.

    Nothing is restored here: the caller restores ``{"rng", "mid_epoch"}`` once the
    checkpoint's weights have loaded; for a checkpoint written mid-epoch, just before the next
    training batch (resuming creates the epoch's dataloader iterator
    again, which draws from the global generator: the uninterrupted run drew at the epoch's
    start, before the checkpoint's state was taken).
    """
    state = checkpoint.get(STATE_KEY)
    if not state or not _private.fitting(trainer):
        return None
    return {"rng": dict(state.get("rng", {})), "mid_epoch": bool(state.get("mid_epoch"))}


def _stored_config(checkpoint: Mapping[str, Any], path: Any) -> dict[str, Any]:
    config = checkpoint.get("hyper_parameters", {}).get(HPARAMS_KEY)
    if config is None:
        raise CheckpointError(
            f"{str(path)!r} was not written by a KerasLightningModule (no "
            f"hyper_parameters[{HPARAMS_KEY!r}]), so the Keras model cannot be rebuilt from it. "
            "Pass the model: KerasLightningModule.load_from_checkpoint(path, model=build_model())."
        )
    return dict(config)


def load_module(
    cls: type[KerasLightningModule],
    checkpoint_path: Any,
    *,
    map_location: Any = None,
    hparams_file: Any = None,
    strict: bool | None = None,
    weights_only: bool | None = True,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
    **kwargs: Any,
) -> KerasLightningModule:
    """Rebuild a module from a checkpoint: see ``KerasLightningModule.load_from_checkpoint``."""
    if hparams_file is not None:
        raise ConfigurationError(
            "`hparams_file` is not supported by KerasLightningModule.load_from_checkpoint: the "
            "model config and arguments are read from the checkpoint. Pass overrides as "
            "keyword arguments instead, e.g. load_from_checkpoint(path, loss='mae')."
        )
    checkpoint = load_checkpoint_file(checkpoint_path, map_location, weights_only)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    config = hparams.pop(HPARAMS_KEY, None)
    hparams.pop(DESCRIPTION_KEY, None)  # hparams["keras"]: a description, not an argument
    if "model" not in kwargs:
        refuse_without_base(checkpoint, checkpoint_path)
        kwargs["model"] = rebuild_model(
            _stored_config(checkpoint, checkpoint_path), custom_objects, safe_mode
        )
    if config is not None:
        kwargs.update(module_arguments(config, kwargs, custom_objects, safe_mode))
    checkpoint = dict(checkpoint)
    checkpoint["hyper_parameters"] = hparams
    return _private.restore_module_state(
        cls, checkpoint, strict=True if strict is None else strict, **kwargs
    )


def model_from_checkpoint(
    checkpoint_path: Any,
    *,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
    weights_only: bool | None = True,
    compile: bool = True,
) -> keras.Model:
    """The trained Keras model of a checkpoint, without Lightning.

    With ``compile=True`` the model is compiled with the checkpoint's optimizer, loss and
    metrics when all of them are Keras objects or names (not torch ones), and the Keras
    optimizer gets the checkpoint's state (``iterations``, moments), so that a ``.keras``
    export carries them and ``KerasLightningModule(keras.saving.load_model(path))`` continues
    training with the same set-up.

    Example:
        >>> model = kl.model_from_checkpoint("last.ckpt")  # doctest: +SKIP
        >>> model.predict(x)  # doctest: +SKIP

    """
    checkpoint = load_checkpoint_file(checkpoint_path, "cpu", weights_only)
    refuse_without_base(checkpoint, checkpoint_path)
    config = _stored_config(checkpoint, checkpoint_path)
    model = rebuild_model(config, custom_objects, safe_mode)
    state = checkpoint["state_dict"]
    keys = stable_keys(model)
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(mismatch_message(missing, [], []))
    for key, variable in zip(keys, model.variables, strict=True):
        value = state[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(
                mismatch_message(
                    [],
                    [],
                    [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(variable.shape)}"],
                )
            )
        variable.assign(value)
    if compile and _compile_like(model, config, custom_objects, safe_mode):
        _carry_optimizer_state(model, checkpoint)
    return model


def _carry_optimizer_state(model: keras.Model, checkpoint: Mapping[str, Any]) -> None:
    """Build the compiled optimizer and give it the checkpoint's Keras optimizer variables.

    Done when the checkpoint's first optimizer is a ``KerasOptimizer`` over the same
    variables (same count and shapes); otherwise the optimizer starts fresh.
    """
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    states = checkpoint.get("optimizer_states") or [{}]
    saved = states[0].get("keras_variables") if isinstance(states[0], Mapping) else None
    if saved is None or len(saved) != len(optimizer.variables):
        return
    if any(
        tuple(v.shape) != tuple(s.shape) for v, s in zip(optimizer.variables, saved, strict=True)
    ):
        return
    for variable, value in zip(optimizer.variables, saved, strict=True):
        variable.assign(value)


def _compile_like(
    model: keras.Model, config: Mapping[str, Any], custom_objects: Any, safe_mode: bool
) -> bool:
    """Compile ``model`` as the checkpoint's module was configured, where Keras can say it."""
    try:
        arguments = module_arguments(config, {"lr_scheduler": None}, custom_objects, safe_mode)
    except CheckpointError:
        return False  # torch objects: a Keras compile cannot express them
    if arguments.get("optimizer") is None or arguments.get("loss") is None:
        return False
    model.compile(
        optimizer=arguments["optimizer"],
        loss=arguments["loss"],
        loss_weights=arguments.get("loss_weights"),
        metrics=arguments.get("metrics"),
        weighted_metrics=arguments.get("weighted_metrics"),
    )
    return True
