"""Shared pieces of the loop-guide examples: real digits data, the guide's models, a Trainer.

The guide ("Writing a training loop from scratch in PyTorch") uses MNIST, which needs a
download; these examples use scikit-learn's 8x8 handwritten digits (1797 real scans, offline),
so the MLP takes 64 inputs instead of 784.
"""

from __future__ import annotations

import keras_lightning  # noqa: F401  (first: selects Keras' torch backend)

import os

import keras
import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits

FAST = os.environ.get("KL_FAST") == "1"
EPOCHS = 1 if FAST else 15
BATCH_SIZE = 32


def get_model() -> keras.Model:
    """The guide's MLP."""
    inputs = keras.Input(shape=(64,), name="digits")
    x1 = keras.layers.Dense(64, activation="relu")(inputs)
    x2 = keras.layers.Dense(64, activation="relu")(x1)
    outputs = keras.layers.Dense(10, name="predictions")(x2)
    return keras.Model(inputs=inputs, outputs=outputs)


@keras.saving.register_keras_serializable(package="examples")
class ActivityRegularizationLayer(keras.layers.Layer):
    """The guide's layer that adds a loss during the forward pass."""

    def call(self, inputs):
        self.add_loss(1e-4 * torch.sum(inputs))
        return inputs


def get_regularized_model() -> keras.Model:
    """The guide's MLP with the add_loss layer after the first Dense."""
    inputs = keras.Input(shape=(64,), name="digits")
    x = keras.layers.Dense(64, activation="relu")(inputs)
    x = ActivityRegularizationLayer()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(10, name="predictions")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def dataloaders(one_hot: bool) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Train (1500) / validation (297) loaders; labels as int64 or one-hot float32."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    if one_hot:
        y = keras.utils.to_categorical(y, 10).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))

    def make(index: np.ndarray, shuffle: bool) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(
            torch.from_numpy(x[index]), torch.from_numpy(y[index])
        )
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=shuffle)

    return make(order[:1500], True), make(order[1500:], False)


class PrintLikeTheGuide(L.Callback):
    """Prints what the guide's loop prints: the batch loss every 100 steps, epoch accuracies.

    Lightning runs a plain callback's ``on_train_epoch_end`` before the module's, which is
    where the epoch values are logged; so each epoch's values are printed when the next epoch
    starts (and when training ends).
    """

    def __init__(self, every: int = 100) -> None:
        self.every = every

    def _report(self, trainer: L.Trainer) -> None:
        metrics = trainer.callback_metrics
        for name, value in metrics.items():
            if name.endswith("accuracy") and not name.startswith("val_"):
                print(f"Training acc over epoch: {float(value):.4f}")
        for name, value in metrics.items():
            if name.startswith("val_") and name.endswith("accuracy"):
                print(f"Validation acc: {float(value):.4f}")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self._report(trainer)
        print(f"\nStart of epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % self.every == 0:
            print(f"Training loss (for 1 batch) at step {batch_idx}: {float(outputs['loss']):.4f}")
            print(f"Seen so far: {(batch_idx + 1) * BATCH_SIZE} samples")

    def on_train_end(self, trainer, pl_module):
        self._report(trainer)


def trainer(**overrides) -> L.Trainer:
    """A CPU Trainer that prints like the guide (FAST: one short epoch)."""
    kwargs = dict(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_train_batches=5 if FAST else None,
        callbacks=[PrintLikeTheGuide()],
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
