"""Guide: a first simple example -- override ``train_step``, train with Lightning.

The Keras model below is the guide's ("Customizing what happens in fit() with PyTorch"), as
written there. ``KerasLightningModule`` runs its ``train_step`` for each batch (Lightning's
manual optimization), logs the dict it returns under Keras' names (``loss``, ``mae``: the nested
``compile_metrics`` dict is flattened as ``fit`` does) and resets ``model.metrics`` at each epoch
start. The data is the guide's: random numbers, so the loss only shows that training runs.

Run: python examples/custom_train_step.py   (KL_FAST=1 or --fast: a seconds-long smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _custom_common
import keras
import numpy as np
import torch


class CustomModel(keras.Model):
    def train_step(self, data):
        # Unpack the data. Its structure depends on your model and
        # on what you pass to `fit()`.
        x, y = data

        # Call torch.nn.Module.zero_grad() to clear the leftover gradients
        # for the weights from the previous train step.
        self.zero_grad()

        # Compute loss
        y_pred = self(x, training=True)  # Forward pass
        loss = self.compute_loss(y=y, y_pred=y_pred)

        # Call torch.Tensor.backward() on the loss to compute gradients
        # for the weights.
        loss.backward()

        trainable_weights = [v for v in self.trainable_weights]
        gradients = [v.value.grad for v in trainable_weights]

        # Update weights
        with torch.no_grad():
            self.optimizer.apply(gradients, trainable_weights)

        # Update metrics (includes the metric that tracks the loss)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)

        # Return a dict mapping metric names to current value
        # Note that it will include the loss (tracked in self.metrics).
        return {m.name: m.result() for m in self.metrics}


def main() -> dict[str, float]:
    # Construct and compile an instance of CustomModel
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = CustomModel(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])

    # Where the guide calls model.fit(x, y, epochs=3): a DataLoader and a Trainer.
    x = np.random.random((1000, 32)).astype("float32")
    y = np.random.random((1000, 1)).astype("float32")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32
    )
    trainer = _custom_common.trainer(epochs=3)
    trainer.fit(kl.KerasLightningModule(model), data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
