"""Guide: going lower-level -- own loss, own metrics, ``compile()`` for the optimizer only.

The model keeps its own ``loss_tracker``, ``mae_metric`` and ``loss_fn`` and lists its metrics in
the ``metrics`` property; as Keras' ``fit`` does, ``KerasLightningModule`` calls
``reset_state()`` on them at the start of every epoch, so each epoch logs its own means.

Run: python examples/custom_train_step_lowlevel.py   (KL_FAST=1 or --fast: a smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _custom_common
import keras
import numpy as np
import torch


class CustomModel(keras.Model):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
        self.loss_fn = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data

        # Call torch.nn.Module.zero_grad() to clear the leftover gradients
        # for the weights from the previous train step.
        self.zero_grad()

        # Compute loss
        y_pred = self(x, training=True)  # Forward pass
        loss = self.loss_fn(y, y_pred)

        # Call torch.Tensor.backward() on the loss to compute gradients
        # for the weights.
        loss.backward()

        trainable_weights = [v for v in self.trainable_weights]
        gradients = [v.value.grad for v in trainable_weights]

        # Update weights
        with torch.no_grad():
            self.optimizer.apply(gradients, trainable_weights)

        # Compute our own metrics
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {
            "loss": self.loss_tracker.result(),
            "mae": self.mae_metric.result(),
        }

    @property
    def metrics(self):
        # We list our `Metric` objects here so that `reset_states()` can be
        # called automatically at the start of each epoch.
        return [self.loss_tracker, self.mae_metric]


def main() -> dict[str, float]:
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = CustomModel(inputs, outputs)

    # We don't pass a loss or metrics here.
    model.compile(optimizer="adam")

    x = np.random.random((1000, 32)).astype("float32")
    y = np.random.random((1000, 1)).astype("float32")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32
    )
    trainer = _custom_common.trainer(epochs=5)
    trainer.fit(kl.KerasLightningModule(model), data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
