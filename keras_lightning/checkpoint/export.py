"""Export a checkpoint's Keras model as a ``.keras`` file or ``.weights.h5`` weights."""

from __future__ import annotations

from keras_lightning.checkpoint.loading import model_from_checkpoint
from keras_lightning.exceptions import ConfigurationError

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
