"""Train torch-backend Keras 3 models with ``lightning.Trainer``.

Importing this package selects Keras' torch backend when Keras is not imported yet, and
checks it otherwise. Nothing else happens at import.
"""

from keras_lightning._backend import ensure_torch_backend

ensure_torch_backend()

from keras_lightning.callbacks import TerminateOnNaN  # noqa: E402
from keras_lightning.checkpoint import (  # noqa: E402
    AtomicCheckpointIO,
    export_keras,
    model_from_checkpoint,
)
from keras_lightning.exceptions import (  # noqa: E402
    BackendError,
    BatchError,
    CheckpointError,
    ConfigurationError,
    KerasLightningError,
    KerasLightningTypeError,
    ShapeMismatchError,
)
from keras_lightning.keras_logs import flatten_logs  # noqa: E402
from keras_lightning.lightning_tools import (  # noqa: E402
    KerasModelSummary,
    KerasWeights,
    StochasticWeightAveraging,
    weights_module,
)
from keras_lightning.losses import KerasLoss, TorchLoss, keras_loss, torch_loss  # noqa: E402
from keras_lightning.module import KerasLightningModule  # noqa: E402
from keras_lightning.optimizers import KerasOptimizer  # noqa: E402
from keras_lightning.sharding import unshard  # noqa: E402
from keras_lightning.whole_step import WholeStepStats  # noqa: E402

import warnings  # noqa: E402
from typing import Any  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AtomicCheckpointIO",
    "BackendError",
    "BatchError",
    "CheckpointError",
    "ConfigurationError",
    "KerasLightningError",
    "KerasLightningModule",
    "KerasLightningTypeError",
    "KerasLoss",
    "KerasModelSummary",
    "KerasOptimizer",
    "KerasWeights",
    "ShapeMismatchError",
    "StochasticWeightAveraging",
    "TerminateOnNaN",
    "TorchLoss",
    "__version__",
    "export_keras",
    "flatten_logs",
    "keras_loss",
    "model_from_checkpoint",
    "torch_loss",
    "unshard",
    "WholeStepStats",
    "weights_module",
]

#: Names that were documented and renamed: old name -> (new name, object).
_DEPRECATED = {"ArgumentTypeError": ("KerasLightningTypeError", KerasLightningTypeError)}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(
            f"keras_lightning.{name} is deprecated: it is named keras_lightning.{new} (the old "
            "name read like argparse.ArgumentTypeError). Use kl.{new}.".replace("{new}", new),
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'keras_lightning' has no attribute {name!r}")
