"""Random number generator states in a checkpoint, for exact resumption.

Keras' ``Dropout`` without a ``seed`` draws its masks from torch's global generator (not from
its SeedGenerator), so exact resumption needs the global generators restored.
"""

from __future__ import annotations

from keras_lightning import _private

import random
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy, Python and Keras' global seed states, as safe types."""
    numpy_state: Any = np.random.get_state()
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
    generator = _private.global_seed_generator(create=False)
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
        generator = _private.global_seed_generator(create=True)
        generator.state.assign(states["keras"])
