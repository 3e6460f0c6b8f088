"""Make sure Keras runs on the torch backend, before anything imports it."""

from keras_lightning.exceptions import BackendError

import os
import sys
import warnings


def ensure_torch_backend() -> None:
    """Select the torch backend if Keras is not imported yet, else check that it uses torch.

    Raises:
        BackendError: Keras was already imported with another backend.

    """
    keras_module = sys.modules.get("keras")
    if keras_module is None:
        requested = os.environ.get("KERAS_BACKEND")
        if requested not in (None, "", "torch"):
            warnings.warn(
                f"KERAS_BACKEND={requested!r} was set, but keras_lightning trains Keras models "
                "with torch: using KERAS_BACKEND='torch' for this process.",
                stacklevel=3,
            )
        os.environ["KERAS_BACKEND"] = "torch"
        return
    backend = keras_module.backend.backend()
    if backend != "torch":
        raise BackendError(
            f"Keras is already imported with the {backend!r} backend, but keras_lightning needs "
            "the 'torch' backend. Import keras_lightning before keras, or set "
            "KERAS_BACKEND=torch in the environment (e.g. `KERAS_BACKEND=torch python train.py`, "
            "or `os.environ['KERAS_BACKEND'] = 'torch'` before the first `import keras`)."
        )
