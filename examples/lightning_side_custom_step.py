"""The guide's custom ``train_step``, written the Lightning way: a ``training_step`` override.

Start from Lightning instead of Keras: subclass ``KerasLightningModule``, turn on manual
optimization and use its helpers, so the guide's hand-written loop is four lines:

* ``self(x, training=True)``: the Keras forward pass with an explicit ``training`` flag;
* ``self.compute_loss(y_pred, y, sample_weight)``: the configured loss (Keras or torch; argument
  order handled; ``model.losses`` added) and the per-output losses;
* ``self.backward_and_step(loss)``: zero_grad, ``manual_backward``, step the configured optimizer
  (Keras or torch; pass one of ``self.optimizers()`` when there are several);
* ``self.update_metrics(y_pred, y, sample_weight, loss=loss)``: accumulate the configured metrics,
  logged per epoch under Keras' names (``loss``, ``mae``) exactly as the built-in step logs them.

``examples/gan.py --way lightning`` shows two optimizers (a GAN) the same way.

Run: python examples/lightning_side_custom_step.py   (KL_FAST=1 or --fast: a smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _custom_common
import keras
import numpy as np
import torch


class CustomStep(kl.KerasLightningModule):
    def __init__(self, model: keras.Model, **kwargs):
        super().__init__(model, **kwargs)
        self.automatic_optimization = False  # we call the optimizer ourselves

    def training_step(self, batch, batch_idx):
        x, y, sample_weight = self.unpack_batch(batch)  # (x, y) or (x, y, sample_weight)
        y_pred = self(x, training=True)
        loss, _ = self.compute_loss(y_pred, y, sample_weight)
        self.backward_and_step(loss)
        self.update_metrics(y_pred, y, sample_weight, loss=loss)
        self.log("batch_loss", loss.detach(), prog_bar=True)  # per step, if you want it


def main() -> dict[str, float]:
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = keras.Model(inputs, outputs)  # a plain model: the custom logic is in the module
    module = CustomStep(model, optimizer="adam", loss="mse", metrics=["mae"])

    x = np.random.random((1000, 32)).astype("float32")
    y = np.random.random((1000, 1)).astype("float32")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32
    )
    trainer = _custom_common.trainer(epochs=3)
    trainer.fit(module, data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
