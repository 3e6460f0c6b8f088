"""Guide: supporting ``sample_weight`` -- batches of ``(x, y, sample_weight)``.

Keras' ``fit(x, y, sample_weight=sw)`` hands ``train_step`` a 3-tuple; with Lightning, yield the
weights as the third element of each batch (a ``TensorDataset(x, y, sw)``). The guide's
``train_step`` then passes them to ``compute_loss`` (the loss is weighted) and to the metrics.
As in Keras, metrics given as ``compile(metrics=...)`` ignore ``sample_weight``; use
``compile(weighted_metrics=...)`` for weighted ones.

Run: python examples/sample_weight.py   (KL_FAST=1 or --fast: a smoke run)
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
        if len(data) == 3:
            x, y, sample_weight = data
        else:
            sample_weight = None
            x, y = data

        # Call torch.nn.Module.zero_grad() to clear the leftover gradients
        # for the weights from the previous train step.
        self.zero_grad()

        # Compute loss
        y_pred = self(x, training=True)  # Forward pass
        loss = self.compute_loss(
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
        )

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
                metric.update_state(y, y_pred, sample_weight=sample_weight)

        # Return a dict mapping metric names to current value
        # Note that it will include the loss (tracked in self.metrics).
        return {m.name: m.result() for m in self.metrics}


def main() -> dict[str, float]:
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = CustomModel(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])

    # You can now use the sample_weight argument: here, the third element of each batch.
    x = np.random.random((1000, 32)).astype("float32")
    y = np.random.random((1000, 1)).astype("float32")
    sw = np.random.random((1000, 1)).astype("float32")
    dataset = torch.utils.data.TensorDataset(*(torch.from_numpy(a) for a in (x, y, sw)))
    trainer = _custom_common.trainer(epochs=3)
    trainer.fit(kl.KerasLightningModule(model), torch.utils.data.DataLoader(dataset, batch_size=32))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
