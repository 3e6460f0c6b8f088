"""Stable ``state_dict`` keys for a Keras model, independent of per-process layer names.

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
"""

from __future__ import annotations

from keras_lightning._private import parameter_of
from keras_lightning.exceptions import CheckpointError
from keras_lightning.sharding import is_sharded

import re
from collections.abc import Mapping
from typing import Any

import torch

#: Prefix (after the module's own prefix) of the stable variable keys.
VARIABLES_PREFIX = "model.variables."

_AUTO_NUMBER = re.compile(r"_\d+$")


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
    index_of = {id(parameter_of(v)): i for i, v in enumerate(model.variables)}
    aliases: list[list[str]] = [[] for _ in index_of]
    for name, param in model.named_parameters(remove_duplicate=False):
        index = index_of.get(id(param))
        if index is not None:
            aliases[index].append(name)
    return aliases


def state_dict_post_hook(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Replace the Keras model's raw keys in ``state_dict`` by stable keys (in place)."""
    model = getattr(module, "model", None)
    if model is None or not model.variables or is_sharded(model):
        return  # a sharded model: torch.distributed.checkpoint needs the raw names
    variables = model.variables
    for index, (key, aliases) in enumerate(
        zip(stable_keys(model), _raw_aliases(model), strict=True)
    ):
        value = None
        for alias in aliases:
            value = state_dict.pop(f"{prefix}model.{alias}", value)
        if value is None:  # a variable torch does not see as a parameter: save it anyway
            value = parameter_of(variables[index]).detach()
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
        raise CheckpointError(mismatch_message(missing, unexpected, misshaped))


def _compare(
    module: Any, state_dict: Mapping[str, Any], prefix: str
) -> tuple[list[str], list[str], list[str]]:
    saved = [key for key in state_dict if key.startswith(prefix + VARIABLES_PREFIX)]
    if not saved or is_sharded(getattr(module, "model", None)):
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
        raise CheckpointError(mismatch_message(missing, unexpected, misshaped))
    if not any(key.startswith(prefix + VARIABLES_PREFIX) for key in state_dict):
        return
    if is_sharded(getattr(module, "model", None)):
        raise CheckpointError(
            "This checkpoint was written by an unsharded module (stable keys); the module is "
            "sharded (ModelParallelStrategy). Load it into the unsharded module first "
            "(KerasLightningModule.load_from_checkpoint(path)), then train that one sharded."
        )
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
        model = module._require_model()
    if model is None or not model.variables:
        raise CheckpointError(
            "The checkpoint holds Keras model variables, but the Keras model has none yet: it "
            "is not built. Build it before loading (give it a keras.Input, or call it once on "
            "a batch: module.build_from_batch(batch)), then load the checkpoint again."
        )
    return model


def mismatch_message(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """The error text listing every mismatched key, with the fix."""
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
    if model is None or not incompatible_keys.missing_keys or is_sharded(model):
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
