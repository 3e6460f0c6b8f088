"""What Lightning's own tools need to see a Keras model as they see a torch one.

Keras' torch backend registers every variable of a layer as a ``torch.nn.Parameter``: the
weights, and also its non-trainable state (``BatchNormalization``'s moving statistics, the
integer states of ``SeedGenerator``). Lightning's tools treat every parameter as a weight.
This module gives them the Keras view: :func:`weights_module` for the fine-tuning callbacks.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning._private import parameter_of
from keras_lightning.exceptions import KerasLightningTypeError

from typing import Any

import keras
import torch

__all__ = ["KerasWeights", "weights_module"]


class KerasWeights(torch.nn.Module):
    """A torch module whose parameters are exactly a Keras layer's weights.

    See :func:`weights_module`.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.layer_name = layer.name
        self.weights = torch.nn.ParameterList(
            [parameter_of(v) for v in _private.weights_that_can_train(layer)]
        )

    def extra_repr(self) -> str:  # noqa: D102 (torch's)
        return f"layer={self.layer_name!r}, weights={len(self.weights)}"


def weights_module(layer: Any) -> KerasWeights:
    """The weights of a Keras layer (or model) as a ``torch.nn.Module``, for Lightning's
    fine-tuning callbacks.

    Lightning's ``BackboneFinetuning`` and ``BaseFinetuning.freeze`` / ``make_trainable`` set
    ``requires_grad`` on every parameter of a module. On a Keras layer those include its
    ``SeedGenerator`` states (integers: ``requires_grad = True`` raises) and its
    ``BatchNormalization`` moving statistics (which would join the optimizer). This module
    holds the same Parameter objects as the layer's weights, nothing else, so freezing and
    unfreezing it freezes and unfreezes the layer's weights. Return it from a ``backbone``
    property (a property: an attribute would register the layer a second time)::

        class Module(kl.KerasLightningModule):
            @property
            def backbone(self):
                return kl.weights_module(self.model.get_layer("backbone"))

    Args:
        layer: A built Keras layer or model.

    Raises:
        KerasLightningTypeError: ``layer`` is not a Keras layer.

    Example:
        >>> import keras
        >>> import keras_lightning as kl
        >>> layer = keras.layers.BatchNormalization()
        >>> layer.build((None, 3))
        >>> len(list(layer.parameters())), len(list(kl.weights_module(layer).parameters()))
        (4, 2)

    """
    if not isinstance(layer, keras.layers.Layer):
        raise KerasLightningTypeError(
            "weights_module(layer) expects a Keras layer or model, e.g. "
            f"module.model.get_layer('backbone'); received {type(layer).__name__}."
        )
    return KerasWeights(layer)
