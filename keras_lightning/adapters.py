"""Adapter checkpoints: a checkpoint that holds what training changed, not the frozen base.

Fine-tuning with LoRA (``backbone.enable_lora(rank)``) or a frozen backbone trains a small
part of a large model. ``KerasLightningModule(..., checkpoint_weights="trainable")`` writes
checkpoints whose ``state_dict`` holds only:

- the weights that can train (Keras-trainable, or requiring gradients), and
- every other variable whose value changed since training started (moving statistics of a
  layer that trains, seed states),

so that a LoRA checkpoint of a large model is the size of its adapter. The weights left out
are recorded with a fingerprint. Loading fills them from the module's model, which must be
the same base (e.g. ``from_preset(base)`` with the same ``enable_lora`` call): a base whose
weights differ from the fingerprints is refused, and nothing is loaded.
"""

from __future__ import annotations

from keras_lightning._private import parameter_of
from keras_lightning.checkpoint.keys import VARIABLES_PREFIX, stable_keys
from keras_lightning.exceptions import CheckpointError, ConfigurationError

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: Top-level checkpoint key of an adapter checkpoint: the weights it leaves out.
KEY = "keras_lightning_adapter"

#: The values of ``KerasLightningModule(checkpoint_weights=...)``.
CHOICES = ("all", "trainable")

_Fingerprint = tuple[float, float, float]

def check_choice(value: Any) -> str:
    """``checkpoint_weights`` validated.

    Raises:
        ConfigurationError: ``value`` is not one of :data:`CHOICES`.

    """
    if value not in CHOICES:
        raise ConfigurationError(
            f"`checkpoint_weights` must be 'all' (every weight, the default) or 'trainable' "
            f"(the weights that train and the state training changed: an adapter checkpoint); "
            f"received {value!r}."
        )
    return str(value)


#: Elements summed at once in float64 (bounds the transient memory of a fingerprint).
_CHUNK = 1 << 22


def fingerprint(tensor: torch.Tensor) -> _Fingerprint:
    """Sum, sum of squares and a position-weighted sum, in float64.

    Equal for unchanged weights on any device (up to float64 rounding, see :func:`_same`); the
    position weights tell a permuted or transposed weight from the original.
    """
    flat = tensor.detach().reshape(-1)
    totals = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.float64)
        positions = torch.arange(
            start, start + chunk.numel(), dtype=torch.float64, device=chunk.device
        ).remainder_(9973)
        totals += torch.stack([chunk.sum(), chunk.square().sum(), (chunk * positions).sum()])
    first, second, third = totals.tolist()
    return first, second, third


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    # summation order differs between devices: allow float64 rounding, nothing more
    return all(abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def _can_train(variable: Any) -> bool:
    return bool(variable.trainable or parameter_of(variable).requires_grad)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class AdapterState:
    """What training started from, to tell the weights it changed from the frozen base."""

    def __init__(self) -> None:
        self._start: dict[str, _Fingerprint] = {}
        #: Keys an adapter checkpoint that was loaded holds: they stay in later checkpoints.
        self._kept: set[str] = set()

    def start_training(self, model: Any) -> None:
        """Fingerprint every variable as training starts (after a checkpoint was loaded)."""
        self._start = {
            key: fingerprint(parameter_of(variable))
            for key, variable in zip(stable_keys(model), model.variables, strict=True)
            if not _can_train(variable)
        }

    def strip(self, model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Remove the frozen, unchanged weights from ``state_dict`` (in place).

        Returns the checkpoint entry (:data:`KEY`) recording the shapes and fingerprints of
        the weights left out.
        """
        left_out: dict[str, Any] = {}
        for key, variable in zip(stable_keys(model), model.variables, strict=True):
            if _can_train(variable) or key in self._kept:
                continue
            tensor = parameter_of(variable)
            now = fingerprint(tensor)
            start = self._start.get(key)
            if start is not None and start != now:  # same tensor, same device: exact
                continue  # changed in training (moving statistics, seed state): kept
            state_dict.pop(key, None)
            left_out[key] = {
                "shape": tuple(tensor.shape),
                "dtype": _dtype_name(tensor),
                "fingerprint": now,
            }
        return {"format": 1, "left_out": left_out}

    def fill(self, model: Any, checkpoint: Mapping[str, Any]) -> None:
        """Put the base weights an adapter checkpoint left out back into its ``state_dict``.

        Raises:
            CheckpointError: The model's weights are not the base the adapter was trained on.

        """
        entry = checkpoint.get(KEY)
        if not entry:
            return
        state = checkpoint["state_dict"]
        current = dict(zip(stable_keys(model), model.variables, strict=True))
        differ = []
        for key, saved in entry["left_out"].items():
            variable = current.get(key)
            if variable is None:
                continue  # reported as missing when the state dict loads
            tensor = parameter_of(variable)
            dtype = _dtype_name(tensor)
            if tuple(tensor.shape) != tuple(saved["shape"]) or dtype != saved.get("dtype", dtype):
                differ.append(
                    f"{key}: trained on {tuple(saved['shape'])} {saved.get('dtype')}, "
                    f"the model has {tuple(tensor.shape)} {dtype}"
                )
                continue
            if not _same(fingerprint(tensor), tuple(saved["fingerprint"])):
                differ.append(f"{key}: other values")
                continue
            state[key] = tensor.detach()
        if differ:
            shown = "\n  ".join(differ[:10]) + (
                f"\n  ... ({len(differ) - 10} more)" if len(differ) > 10 else ""
            )
            raise CheckpointError(
                "This is an adapter checkpoint (checkpoint_weights='trainable'): it holds the "
                "trained weights only, and the frozen base weights come from the model being "
                f"loaded into. {len(differ)} of those base weights differ from the ones it was "
                f"trained on; nothing was loaded:\n  {shown}\nBuild the module on the same base "
                "model first (e.g. keras_hub's from_preset(base) with the same enable_lora call) "
                "and pass it: KerasLightningModule.load_from_checkpoint(path, model=base_model), "
                "or trainer.fit(module_on_base, ckpt_path=path)."
            )
        left_out = entry["left_out"]
        self._kept = {k for k in state if k.startswith(VARIABLES_PREFIX) and k not in left_out}


def refuse_without_base(checkpoint: Mapping[str, Any], path: Any) -> None:
    """Refuse to rebuild a model from an adapter checkpoint alone (its base is not in it).

    Raises:
        CheckpointError: ``checkpoint`` is an adapter checkpoint.

    """
    if checkpoint.get(KEY):
        raise CheckpointError(
            f"{str(path)!r} is an adapter checkpoint (checkpoint_weights='trainable'): it "
            "holds the trained weights only, not the frozen base weights, so no model can be "
            "rebuilt from it alone. Load it onto its base model: "
            "KerasLightningModule.load_from_checkpoint(path, model=base_model).model"
        )
