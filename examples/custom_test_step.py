"""Guide: providing your own evaluation step -- ``test_step`` for validate, test and fit.

The model's ``test_step`` runs for every validation and test batch; its last returned dict is
the result, logged with the ``val_`` / ``test_`` prefix (Keras' ``evaluate`` returns the same
values). ``model.metrics`` are reset before each evaluation, and a validation run inside
``fit`` leaves the training epoch's running metrics as they were.

Run: python examples/custom_test_step.py   (KL_FAST=1 or --fast: a smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _custom_common
import keras
import numpy as np
import torch


class CustomModel(keras.Model):
    def test_step(self, data):
        # Unpack the data
        x, y = data
        # Compute predictions
        y_pred = self(x, training=False)
        # Updates the metrics tracking the loss
        loss = self.compute_loss(y=y, y_pred=y_pred)
        # Update the metrics.
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        # Return a dict mapping metric names to current value.
        # Note that it will include the loss (tracked in self.metrics).
        return {m.name: m.result() for m in self.metrics}


def main() -> tuple[dict[str, float], dict[str, float]]:
    # Construct an instance of CustomModel
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = CustomModel(inputs, outputs)
    model.compile(loss="mse", metrics=["mae"])

    # Evaluate with our custom test_step: the guide's model.evaluate(x, y).
    x = np.random.random((1000, 32)).astype("float32")
    y = np.random.random((1000, 1)).astype("float32")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32
    )
    module = kl.KerasLightningModule(model)
    trainer = _custom_common.trainer()
    (validated,) = trainer.validate(module, data, verbose=False)
    (tested,) = trainer.test(module, data, verbose=False)
    print("validate:", {k: round(v, 4) for k, v in validated.items()})
    print("test:", {k: round(v, 4) for k, v in tested.items()})
    return validated, tested


if __name__ == "__main__":
    main()
