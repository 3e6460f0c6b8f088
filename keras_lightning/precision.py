"""Which ``Trainer(precision=...)`` settings a Keras model can train under.

Lightning implements precision by converting the module (``"64-true"``, ``"16-true"``,
``"bf16-true"``: ``module.double()`` / ``.half()``) or by autocast (``"16-mixed"``,
``"bf16-mixed"``). A Keras layer computes in its dtype policy's compute dtype and casts its
inputs to it, and Keras keeps each variable's declared dtype whatever torch does to the tensor.
Keras losses and metrics compute in ``keras.config.floatx()``, layers in the dtype policy
(``keras.config.set_dtype_policy``; once any layer exists, ``set_floatx`` alone no longer
changes the default policy): a true float64 run sets both. So the rules are:

=================  ==============================================================
precision          what the Keras model needs
=================  ==============================================================
``"32-true"``      nothing: Keras' dtype policy decides (Lightning converts nothing)
``"16-mixed"``     float32 variables (policy ``"float32"`` or ``"mixed_float16"``);
                   Lightning's GradScaler scales the loss and unscales the gradients
                   before the Keras optimizer applies them
``"bf16-mixed"``   float32 variables (policy ``"float32"`` or ``"mixed_bfloat16"``)
``"64-true"``      refused while Keras maps float64 to float32 in its type promotion on
                   torch (Keras 3.15: ``keras.ops.matmul`` of two float64 tensors computes
                   in float32); if Keras keeps float64, float64 variables:
                   ``set_dtype_policy("float64")``, ``set_floatx("float64")``
``"16-true"``      float16 variables: ``set_dtype_policy("float16")``, ``set_floatx("float16")``
``"bf16-true"``    bfloat16 variables: ``set_dtype_policy("bfloat16")``, ``set_floatx(...)``
=================  ==============================================================

A ``"mixed_float16"`` Keras policy computes in float16 and needs loss scaling, which only
``"16-mixed"`` provides here; Keras' own ``LossScaleOptimizer`` is refused everywhere, since
this package never calls its ``scale_loss`` (its ``apply`` would divide unscaled gradients).
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import ConfigurationError

from typing import Any

import keras
import torch

_TRUE_DTYPES = {"64-true": "float64", "16-true": "float16", "bf16-true": "bfloat16"}
_MIXED = ("16-mixed", "bf16-mixed")
SUPPORTED = ("32-true", *_MIXED, *_TRUE_DTYPES)


def _float_variable_dtypes(model: Any) -> set[str]:
    return {str(v.dtype) for v in model.variables if "float" in str(v.dtype)}


def _float16_compute_layers(model: Any) -> list[str]:
    """Layers computing in float16 on float32 variables (the ``mixed_float16`` policy)."""
    names = []
    for layer in _private.flatten_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        if (
            policy is not None
            and policy.compute_dtype == "float16"
            and policy.variable_dtype == "float32"
        ):
            names.append(layer.name)
    return names


def check_precision(precision: str, model: Any) -> None:
    """Refuse a Trainer precision that the Keras model's dtypes cannot follow.

    Args:
        precision: ``trainer.precision`` (``"32-true"``, ``"bf16-mixed"``, ...).
        model: The built Keras model.

    Raises:
        ConfigurationError: The precision is unsupported, or the model's variable dtypes do
            not match it; the message names the dtype policy that fixes it.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> check_precision("bf16-mixed", model)
        >>> check_precision("bf16-true", model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        keras_lightning.exceptions.ConfigurationError: Trainer(precision='bf16-true') ...

    """
    precision = str(precision)
    if precision == "32":
        precision = "32-true"
    if precision not in SUPPORTED:
        raise ConfigurationError(
            f"Trainer(precision={precision!r}) is not supported for Keras models. Expected one "
            f"of {', '.join(repr(p) for p in SUPPORTED)}. Received: precision={precision!r}."
        )
    if precision == "64-true" and not keras_computes_in_float64():
        raise ConfigurationError(
            "Trainer(precision='64-true') is not supported for Keras models on the torch "
            f"backend with Keras {keras.__version__}: Keras' type promotion maps float64 to "
            "float32 on this backend (keras.backend.result_type('float64', 'float64') == "
            "'float32'), so keras.ops.matmul and the Keras layers built on it compute float64 "
            "weights and inputs in float32. The run would store float64 weights without "
            "float64 math. Use precision='32-true'."
        )
    if model is None:
        return
    found = _float_variable_dtypes(model)
    if precision in _TRUE_DTYPES:
        need = _TRUE_DTYPES[precision]
        if found - {need}:
            raise ConfigurationError(
                f"Trainer(precision={precision!r}) converts the module to {need}, but the "
                f"Keras model's variables are {', '.join(sorted(found))}: Keras would keep "
                f"declaring them {', '.join(sorted(found - {need}))} and cast layer inputs to "
                f"that dtype. Build the model and its loss in that dtype: call "
                f"keras.config.set_dtype_policy({need!r}) (the layers' dtype) and "
                f"keras.config.set_floatx({need!r}) (the dtype Keras losses and metrics "
                f"compute in) before building them, or pass dtype={need!r} to every layer; "
                f"or use precision='32-true'."
            )
    if precision in _MIXED and found - {"float32"}:
        raise ConfigurationError(
            f"Trainer(precision={precision!r}) autocasts float32 weights, but the Keras model's "
            f"variables are {', '.join(sorted(found))}. Build the model with float32 variables "
            "(keras.config.set_dtype_policy('float32'), or 'mixed_float16' / 'mixed_bfloat16'), "
            "or use the matching '-true' precision."
        )
    layers = _float16_compute_layers(model)
    if layers and precision != "16-mixed":
        raise ConfigurationError(
            f"Layers {', '.join(layers[:3])}{'...' if len(layers) > 3 else ''} use the "
            "'mixed_float16' Keras dtype policy (float16 compute), which needs loss scaling; "
            f"Trainer(precision={precision!r}) does none. Use Trainer(precision='16-mixed') "
            "(Lightning's GradScaler scales the loss), or build the model under "
            "keras.config.set_dtype_policy('mixed_bfloat16') with precision='bf16-mixed'."
        )


def keras_computes_in_float64() -> bool:
    """True when Keras' type promotion keeps float64 (it maps it to float32 on torch)."""
    return str(keras.backend.result_type("float64", "float64")) == "float64"


#: Keras optimizer hyperparameters that must stay below 1 in the variables' dtype.
_DECAY_RATES = ("beta_1", "beta_2", "rho")


def check_optimizer_dtype(optimizer: Any, dtype: torch.dtype) -> None:
    """Refuse a Keras optimizer whose update is zero in ``dtype`` (the weights' dtype).

    Keras computes the update in the variables' dtype. In bfloat16, ``0.999`` rounds to
    ``1.0``: Adam's bias correction ``1 - beta_2 ** t`` is then 0 and every update is 0, so
    the weights never change (Keras' own ``fit`` does the same, silently).

    Raises:
        ConfigurationError: A decay rate of ``optimizer`` rounds to 1 in ``dtype``.

    Example:
        >>> import keras, torch
        >>> check_optimizer_dtype(keras.optimizers.Adam(), torch.float16)
        >>> check_optimizer_dtype(keras.optimizers.Adam(), torch.bfloat16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        keras_lightning.exceptions.ConfigurationError: The Keras optimizer Adam has beta_2=0.999...

    """
    if dtype not in (torch.float16, torch.bfloat16):
        return
    for name in _DECAY_RATES:
        value = getattr(optimizer, name, None)
        if not isinstance(value, float) or not 0.0 < value < 1.0:
            continue
        if float(torch.tensor(value, dtype=dtype)) == 1.0:
            raise ConfigurationError(
                f"The Keras optimizer {type(optimizer).__name__} has {name}={value}, which "
                f"rounds to 1.0 in {str(dtype).removeprefix('torch.')}, the dtype of the "
                "weights it updates: its update would be 0 on every step and the weights would "
                "never change. Train with Trainer(precision='bf16-mixed') (float32 weights, "
                "bfloat16 compute), or use an optimizer without that decay (keras.optimizers."
                "SGD) or a torch optimizer (optimizer=torch.optim.AdamW)."
            )


def check_keras_optimizer(optimizer: Any, argument: str = "optimizer") -> None:
    """Refuse Keras' ``LossScaleOptimizer``: Lightning does the loss scaling.

    Raises:
        ConfigurationError: ``optimizer`` is a ``keras.optimizers.LossScaleOptimizer``.

    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ConfigurationError(
            f"`{argument}` is a keras.optimizers.LossScaleOptimizer, but Lightning does the "
            "loss scaling (Trainer(precision='16-mixed') runs a GradScaler that unscales the "
            "gradients before the Keras optimizer applies them); the Keras one would scale "
            "twice or divide unscaled gradients. Pass the inner optimizer instead: "
            f"{argument}=opt.inner_optimizer (for a model compiled under 'mixed_float16': "
            f"{argument}=model.optimizer.inner_optimizer), with Trainer(precision='16-mixed'). "
            f"Received: {argument}={type(optimizer).__name__}."
        )
