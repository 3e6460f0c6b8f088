"""Checkpoints of a Keras model trained by Lightning, one concern per module.

- :mod:`~keras_lightning.checkpoint.keys`: stable ``state_dict`` keys (layer names change per
  process) and the strict, all-or-nothing comparison before loading;
- :mod:`~keras_lightning.checkpoint.config`: the Keras model config and the module's arguments
  in the checkpoint's hyperparameters, so ``load_from_checkpoint`` needs no model code;
- :mod:`~keras_lightning.checkpoint.rng`: random number generator states for exact resumption;
- :mod:`~keras_lightning.checkpoint.files`: the atomic writer and the safe reader;
- :mod:`~keras_lightning.checkpoint.loading`: the checkpoint hooks, ``load_from_checkpoint`` and
  :func:`model_from_checkpoint`;
- :mod:`~keras_lightning.checkpoint.export`: :func:`export_keras` to ``.keras`` / ``.weights.h5``.

Tensors load with ``weights_only=True`` and Keras ``safe_mode`` stays on unless the caller opts
out. The Keras-side optimizers' state (a model's own ``train_step``) uses the one optimizer
state format of :mod:`keras_lightning.optimizer_state`.
"""

from keras_lightning.checkpoint.config import FORMAT_VERSION, HPARAMS_KEY
from keras_lightning.checkpoint.export import export_keras
from keras_lightning.checkpoint.files import (
    AtomicCheckpointIO,
    load_checkpoint_file,
    use_atomic_writes,
)
from keras_lightning.checkpoint.keys import (
    VARIABLES_PREFIX,
    check_state_dict,
    register_hooks,
    stable_keys,
    variable_signature,
)
from keras_lightning.checkpoint.loading import (
    STATE_KEY,
    load_module,
    model_from_checkpoint,
    on_load_checkpoint,
    on_save_checkpoint,
)
from keras_lightning.checkpoint.rng import collect_rng_states, set_rng_states

__all__ = [
    "FORMAT_VERSION",
    "HPARAMS_KEY",
    "STATE_KEY",
    "VARIABLES_PREFIX",
    "AtomicCheckpointIO",
    "check_state_dict",
    "collect_rng_states",
    "export_keras",
    "load_checkpoint_file",
    "load_module",
    "model_from_checkpoint",
    "on_load_checkpoint",
    "on_save_checkpoint",
    "register_hooks",
    "set_rng_states",
    "stable_keys",
    "use_atomic_writes",
    "variable_signature",
]
