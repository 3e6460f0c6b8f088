"""Checkpoints of a Keras model trained by Lightning: stable keys, rebuilding, export.

Keras names layers per process (``dense``, ``dense_1``, ...), so the raw torch
``state_dict`` keys of a Keras model (``model._torch_params.sequential_1/dense_3/kernel``)
change when the same architecture is built twice. Checkpoints written through
:class:`~keras_lightning.KerasLightningModule` use stable keys instead::

    model.variables.<position in model.variables>.<owner>/<variable name>

for example ``model.variables.0.dense/kernel``, where the owner (the layer or seed generator
that created the variable) loses its per-process number (``dense_3`` -> ``dense``). Enclosing
scopes are left out: they differ between a model built in code and the same model rebuilt
from its config (``sequential/dense/kernel`` vs ``dense/kernel``). Loading is strict: a missing,
unexpected or mis-shaped variable raises :class:`~keras_lightning.CheckpointError` that lists
them all; nothing is loaded partially.

The checkpoint's hyperparameters hold the Keras model config (Keras serialization, the same
JSON a ``.keras`` file holds) and the wrapper's arguments as Keras configs, so
``KerasLightningModule.load_from_checkpoint(path)`` rebuilds the module without the code that
built the model. Keras ``safe_mode`` stays on and tensors load with ``weights_only=True``
unless the caller opts out.

Everything here is a function; ``KerasLightningModule`` only calls them from its hooks.
"""

from __future__ import annotations

from keras_lightning.exceptions import CheckpointError, ConfigurationError

import contextlib
import glob
import io
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

if TYPE_CHECKING:
    from keras_lightning.module import KerasLightningModule

#: Version of what this module writes under ``hyper_parameters["keras_lightning"]``.
FORMAT_VERSION = 1
#: Key in ``checkpoint["hyper_parameters"]`` holding the model config and wrapper arguments.
HPARAMS_KEY = "keras_lightning"
#: Top-level checkpoint key holding process state (random number generators).
STATE_KEY = "keras_lightning_state"
#: Prefix (after the module's own prefix) of the stable variable keys.
VARIABLES_PREFIX = "model.variables."

_AUTO_NUMBER = re.compile(r"_\d+$")
_UNSERIALIZABLE = "__unserializable__"
_KERAS_OBJECT = "__keras__"
# The wrapper arguments stored in the checkpoint, and the module attribute holding each.
_ARGUMENTS = {
    "optimizer": ("_optimizer_spec", "optimizer"),
    "loss": ("_loss_spec", "loss"),
    "metrics": ("_metrics_spec", "metric"),
    "weighted_metrics": ("_weighted_metrics_spec", "metric"),
    "loss_weights": ("_loss_weights_spec", "plain"),
    "class_weight": ("_class_weight", "plain"),
    "lr_scheduler": ("_lr_scheduler_spec", "never"),
}


# ---------------------------------------------------------------------- stable keys


def variable_signature(path: str) -> str:
    """The owner and name of a Keras variable, without per-process auto-numbering.

    Example:
        >>> variable_signature("sequential_1/dense_3/kernel")
        'dense/kernel'

    """
    return "/".join(_AUTO_NUMBER.sub("", part) for part in path.split("/")[-2:])


def stable_keys(model: Any) -> list[str]:
    """The stable ``state_dict`` key of each variable of ``model``, in ``model.variables`` order.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="out")])
        >>> stable_keys(model)
        ['model.variables.0.out/kernel', 'model.variables.1.out/bias']

    """
    return [
        f"{VARIABLES_PREFIX}{index}.{variable_signature(variable.path)}"
        for index, variable in enumerate(model.variables)
    ]


def _raw_aliases(model: Any) -> list[list[str]]:
    """For each variable of ``model``, every raw torch key (relative to ``model.``) naming it.

    A Sequential model registers its parameters twice (``_torch_params`` and
    ``_functional._torch_params``); both names point at the same Parameter.
    """
    index_of = {id(_parameter(v)): i for i, v in enumerate(model.variables)}
    aliases: list[list[str]] = [[] for _ in index_of]
    for name, param in model.named_parameters(remove_duplicate=False):
        index = index_of.get(id(param))
        if index is not None:
            aliases[index].append(name)
    return aliases


def _parameter(variable: Any) -> Any:
    value = getattr(variable, "_value", None)
    return value if value is not None else variable.value


def state_dict_post_hook(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Replace the Keras model's raw keys in ``state_dict`` by stable keys (in place)."""
    model = getattr(module, "model", None)
    if model is None or not model.variables:
        return
    variables = model.variables
    for index, (key, aliases) in enumerate(
        zip(stable_keys(model), _raw_aliases(model), strict=True)
    ):
        value = None
        for alias in aliases:
            value = state_dict.pop(f"{prefix}model.{alias}", value)
        if value is None:  # a variable torch does not see as a parameter: save it anyway
            value = _parameter(variables[index]).detach()
        state_dict[prefix + key] = value


def check_state_dict(
    module: Any, state_dict: Mapping[str, Any], strict: bool, prefix: str = ""
) -> None:
    """Compare a state dict's stable keys with ``module.model`` before anything is loaded.

    Raises:
        CheckpointError: A variable has another shape or dtype; or, with ``strict=True``, a
            variable is missing or unexpected; or the model has no variables to load into.

    """
    missing, unexpected, misshaped = _compare(module, state_dict, prefix)
    if misshaped or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(missing, unexpected, misshaped))


def _compare(
    module: Any, state_dict: Mapping[str, Any], prefix: str
) -> tuple[list[str], list[str], list[str]]:
    saved = [key for key in state_dict if key.startswith(prefix + VARIABLES_PREFIX)]
    if not saved:
        return [], [], []
    model = _model_with_variables(module)
    variables = list(model.variables)
    wanted = {prefix + key: i for i, key in enumerate(stable_keys(model))}
    missing = [key for key in wanted if key not in state_dict]
    unexpected = [key for key in saved if key not in wanted]
    misshaped = []
    for key, index in wanted.items():
        value = state_dict.get(key)
        if value is None:
            continue
        variable = variables[index]
        saved_dtype = str(value.dtype).removeprefix("torch.")
        if tuple(value.shape) != tuple(variable.shape) or saved_dtype != variable.dtype:
            misshaped.append(
                f"{key}: checkpoint {tuple(value.shape)} {saved_dtype}, "
                f"model {tuple(variable.shape)} {variable.dtype}"
            )
    return missing, unexpected, misshaped


def load_state_dict_pre_hook(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Turn stable keys back into the model's raw keys (in place), for torch to load.

    Strictness is checked before, by :func:`check_state_dict` (torch does not tell hooks
    whether the load is strict). A stable key this model lacks is reported as unexpected.
    """
    missing, unexpected, misshaped = _compare(module, state_dict, prefix)
    if misshaped:
        raise CheckpointError(_mismatch_message(missing, unexpected, misshaped))
    if not any(key.startswith(prefix + VARIABLES_PREFIX) for key in state_dict):
        return
    model = _model_with_variables(module)
    for key in unexpected:
        unexpected_keys.append(key)
        del state_dict[key]
    variables = model.variables
    for index, (key, aliases) in enumerate(
        zip(stable_keys(model), _raw_aliases(model), strict=True)
    ):
        value = state_dict.pop(prefix + key, None)
        if value is None:
            continue
        if not aliases:  # not a torch parameter (see state_dict_post_hook)
            variables[index].assign(value)
        for alias in aliases:
            state_dict[f"{prefix}model.{alias}"] = value


def _model_with_variables(module: Any) -> Any:
    model = getattr(module, "model", None)
    if model is None and getattr(module, "_model_factory", None) is not None:
        model = module.require_model()
    if model is None or not model.variables:
        raise CheckpointError(
            "The checkpoint holds Keras model variables, but the Keras model has none yet: it "
            "is not built. Build it before loading (give it a keras.Input, or call it once on "
            "a batch: module.build_from_batch(batch)), then load the checkpoint again."
        )
    return model


def _mismatch_message(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = ["The checkpoint does not match this Keras model; nothing was loaded."]
    for title, keys in (
        ("Missing from the checkpoint", missing),
        ("Unexpected in the checkpoint", unexpected),
        ("Different shape or dtype", misshaped),
    ):
        if keys:
            shown = "\n  ".join(keys[:20]) + (
                f"\n  ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
            )
            parts.append(f"{title} ({len(keys)}):\n  {shown}")
    parts.append(
        "Keys are model.variables.<position>.<owner>/<name>: build the same architecture "
        "(same layers, order and sizes) that wrote the checkpoint, or rebuild it from the "
        "checkpoint with KerasLightningModule.load_from_checkpoint(path) and no model. To load "
        "the matching variables only, pass strict=False."
    )
    return "\n".join(parts)


def load_state_dict_post_hook(module: torch.nn.Module, incompatible_keys: Any) -> None:
    """Report missing Keras variables under their stable keys (once, not once per alias)."""
    model = getattr(module, "model", None)
    if model is None or not incompatible_keys.missing_keys:
        return
    stable_of = {
        f"model.{alias}": key
        for key, aliases in zip(stable_keys(model), _raw_aliases(model), strict=True)
        for alias in aliases
    }
    missing = list(dict.fromkeys(stable_of.get(k, k) for k in incompatible_keys.missing_keys))
    incompatible_keys.missing_keys[:] = missing


def register_hooks(module: torch.nn.Module) -> None:
    """Make ``module.state_dict()`` and ``module.load_state_dict()`` use stable keys."""
    module.register_state_dict_post_hook(state_dict_post_hook)
    module.register_load_state_dict_pre_hook(load_state_dict_pre_hook)
    module.register_load_state_dict_post_hook(load_state_dict_post_hook)


# ---------------------------------------------------------------------- configs


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


def module_config(module: KerasLightningModule) -> dict[str, Any]:
    """What ``load_from_checkpoint`` needs to rebuild ``module``: model config and arguments.

    Arguments that Keras cannot serialize (torch optimizers, torch losses, torchmetrics, LR
    scheduler factories, marked callables) are stored as ``{"__unserializable__": type}`` and
    must be passed again to ``load_from_checkpoint``.
    """
    config: dict[str, Any] = {"format": FORMAT_VERSION, "arguments": {}}
    model = module.model
    try:
        config["model"] = model_config(model) if model is not None else None
    except CheckpointError as error:
        config["model"] = None
        config["model_error"] = str(error)
    for argument, (attribute, kind) in _ARGUMENTS.items():
        config["arguments"][argument] = _serialize(getattr(module, attribute, None), kind)
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
    from keras.src.saving.serialization_lib import SafeModeScope

    try:
        with keras.saving.custom_object_scope(custom_objects or {}), SafeModeScope(safe_mode):
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
    for argument, (_, kind) in _ARGUMENTS.items():
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


# ---------------------------------------------------------------------- hooks


def on_save_checkpoint(module: KerasLightningModule, checkpoint: dict[str, Any]) -> None:
    """Add the model config, the wrapper's arguments and the RNG states to ``checkpoint``."""
    hparams = checkpoint.setdefault("hyper_parameters", {})
    hparams[HPARAMS_KEY] = module_config(module)
    checkpoint[STATE_KEY] = {"format": FORMAT_VERSION, "rng": collect_rng_states()}


def on_load_checkpoint(module: KerasLightningModule, checkpoint: dict[str, Any]) -> None:
    """When resuming ``trainer.fit``, continue the saved random streams.

    Keras' ``Dropout`` without a ``seed`` draws its masks from torch's global generator (not
    from its SeedGenerator), so exact resumption needs the global generators restored. This
    happens only while fitting: ``load_from_checkpoint`` leaves the caller's RNGs alone.
    """
    trainer = getattr(module, "_trainer", None)
    state = checkpoint.get(STATE_KEY)
    if trainer is None or not state or str(getattr(trainer.state.fn, "value", "")) != "fit":
        return
    set_rng_states(state.get("rng", {}))


def collect_rng_states() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy, Python and Keras' global seed states, as safe types."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    generator = _keras_global_seed_generator(create=False)
    if generator is not None:
        states["keras"] = torch.as_tensor(keras.ops.convert_to_numpy(generator.state.value))
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "numpy" in states:
        saved = states["numpy"]
        np.random.set_state(
            (
                "MT19937",
                np.asarray(saved["keys"].cpu().numpy(), dtype=np.uint32),
                saved["pos"],
                saved["has_gauss"],
                saved["cached_gaussian"],
            )
        )
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    if "keras" in states:
        generator = _keras_global_seed_generator(create=True)
        generator.state.assign(states["keras"])


def _keras_global_seed_generator(create: bool) -> Any:
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    if not create:
        return global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    return seed_generator.global_seed_generator()


def _portable_modules(config: Any) -> Any:
    """``keras.src.backend.torch.optimizers.torch_adam`` -> ``keras.optimizers`` (recursively).

    Keras on torch serializes its optimizers under their torch-only module, which Keras on
    another backend cannot import; ``keras.optimizers`` resolves to each backend's own class.
    """
    if isinstance(config, dict):
        config = {key: _portable_modules(value) for key, value in config.items()}
        module = config.get("module")
        if isinstance(module, str) and module.startswith("keras.src.backend.torch.optimizers"):
            config["module"] = "keras.optimizers"
        return config
    if isinstance(config, list):
        return [_portable_modules(item) for item in config]
    return config


def _make_backend_portable(path: Path) -> None:
    """Rewrite the ``config.json`` of a ``.keras`` file with :func:`_portable_modules`."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    config = json.loads(entries["config.json"])
    portable = _portable_modules(config)
    if portable == config:
        return
    entries["config.json"] = json.dumps(portable).encode()
    temp = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(temp, "w") as archive:
        for filename, data in entries.items():
            archive.writestr(filename, data)
    os.replace(temp, path)


# ---------------------------------------------------------------------- files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on every local filesystem.

    ``KerasLightningModule`` puts it in place of Lightning's default writer when training
    starts (:func:`use_atomic_writes`); pass it as a plugin to any other module.

    Lightning writes a checkpoint to a temporary file in the system temp directory and moves
    it into place. When that directory is on another filesystem than the checkpoints (``/tmp``
    on tmpfs, checkpoints on a disk or a network mount), the move is a copy onto the target
    file, and a process killed during the copy leaves a truncated checkpoint where the
    previous good one was. This writer puts the temporary file next to the target, flushes it
    to disk and renames it (``os.replace``), so the target is always either the previous or
    the new complete checkpoint. A kill during a write leaves a hidden
    ``.<name>.<random>.partial`` file beside it, removed by the next write of that file. Remote
    paths (``s3://`` ...) use Lightning's writer unchanged.

    Example:
        >>> import lightning
        >>> import keras_lightning as kl
        >>> trainer = lightning.Trainer(plugins=[kl.AtomicCheckpointIO()], logger=False,
        ...                             enable_progress_bar=False, enable_model_summary=False)

    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` through a same-directory temporary file."""
        from lightning.fabric.utilities.cloud_io import get_filesystem

        if storage_options is not None or not _is_local(get_filesystem(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        descriptor, temp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".partial", dir=target.parent
        )
        try:
            # mkstemp makes the file owner-only; give it the mode open() would (Lightning's).
            os.chmod(temp, 0o666 & ~_umask())
            with open(descriptor, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_directory(target.parent)
        # what an earlier killed write of this same file left behind
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
            with contextlib.suppress(OSError):
                stale.unlink()


def use_atomic_writes(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` where it would use Lightning's default.

    Only when no checkpoint writer was chosen (``Trainer(plugins=[...])`` or the strategy's
    ``checkpoint_io``) and the strategy's default is Lightning's ``TorchCheckpointIO``: a
    writer the user passed, including Lightning's own ``TorchCheckpointIO()``, and a
    strategy's own default (``XLACheckpointIO``) are kept. Called from
    ``KerasLightningModule.setup``, before any checkpoint is written or read.
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or getattr(strategy, "_checkpoint_io", False) is not None:
        return
    # A strategy's own default (XLA's XLACheckpointIO) is kept: only Lightning's plain one.
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint_file(
    path: Any, map_location: Any = None, weights_only: bool | None = True
) -> dict[str, Any]:
    """Read a Lightning checkpoint; with ``weights_only=True`` no pickled code runs.

    Raises:
        CheckpointError: The file holds objects that ``weights_only`` loading refuses.

    """
    from lightning.fabric.utilities.cloud_io import _load

    try:
        checkpoint = _load(path, map_location=map_location or "cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler" in line), str(error))
        raise CheckpointError(
            f"{str(path)!r} holds Python objects that safe loading (weights_only=True) "
            "refuses: loading them could run code. If you trust the file, pass "
            f"weights_only=False. torch said: {reason}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'). Expected a .ckpt "
            "file written by ModelCheckpoint or trainer.save_checkpoint()."
        )
    return checkpoint


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
    from lightning.pytorch.core.saving import _load_state

    if hparams_file is not None:
        raise ConfigurationError(
            "`hparams_file` is not supported by KerasLightningModule.load_from_checkpoint: the "
            "model config and arguments are read from the checkpoint. Pass overrides as "
            "keyword arguments instead, e.g. load_from_checkpoint(path, loss='mae')."
        )
    checkpoint = load_checkpoint_file(checkpoint_path, map_location, weights_only)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    config = hparams.pop(HPARAMS_KEY, None)
    if "model" not in kwargs:
        kwargs["model"] = rebuild_model(
            _stored_config(checkpoint, checkpoint_path), custom_objects, safe_mode
        )
    if config is not None:
        kwargs.update(module_arguments(config, kwargs, custom_objects, safe_mode))
    checkpoint = dict(checkpoint)
    checkpoint["hyper_parameters"] = hparams
    return _load_state(cls, checkpoint, strict=True if strict is None else strict, **kwargs)


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
    config = _stored_config(checkpoint, checkpoint_path)
    model = rebuild_model(config, custom_objects, safe_mode)
    state = checkpoint["state_dict"]
    keys = stable_keys(model)
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(_mismatch_message(missing, [], []))
    for key, variable in zip(keys, model.variables, strict=True):
        value = state[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(
                _mismatch_message(
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


def export_keras(
    checkpoint_path: Any,
    filepath: str | Path,
    *,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
    weights_only: bool | None = True,
) -> Path:
    """Write a checkpoint's Keras model as a ``.keras`` file or ``.weights.h5`` weights.

    Plain Keras (any backend) loads the result: ``keras.saving.load_model(path)`` or
    ``model.load_weights(path)`` on the same architecture. A ``.keras`` file is compiled with
    the checkpoint's Keras optimizer, loss and metrics where they are Keras objects or names.

    Args:
        checkpoint_path: A ``.ckpt`` written by a ``KerasLightningModule``.
        filepath: Ends with ``.keras`` (model, config and weights) or ``.weights.h5``.
        custom_objects: Custom layers and functions not registered with
            ``keras.saving.register_keras_serializable``.
        safe_mode: Keras' safe mode: ``False`` allows Lambda layers (runs stored code).
        weights_only: torch's safe loading of the checkpoint file.

    Returns:
        The path written.

    Example:
        >>> import keras_lightning as kl
        >>> kl.export_keras("epoch=3-step=40.ckpt", "model.keras")  # doctest: +SKIP

    """
    target = Path(filepath)
    name = target.name
    if not (name.endswith(".keras") or name.endswith(".weights.h5")):
        raise ConfigurationError(
            f"`filepath={str(filepath)!r}` must end with '.keras' (a whole model) or "
            "'.weights.h5' (weights only), e.g. export_keras(ckpt, 'model.keras')."
        )
    model = model_from_checkpoint(
        checkpoint_path,
        custom_objects=custom_objects,
        safe_mode=safe_mode,
        weights_only=weights_only,
        compile=name.endswith(".keras"),
    )
    if name.endswith(".keras"):
        model.save(target)
        _make_backend_portable(target)
    else:
        model.save_weights(target)
    return target
