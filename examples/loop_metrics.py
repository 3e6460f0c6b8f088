"""Guide section: low-level handling of metrics.

The guide updates train_acc_metric per batch, prints and resets it each epoch, and runs a
validation loop with val_acc_metric. Here the module does exactly that: a Keras
CategoricalAccuracy, accumulated over the epoch, reset at each epoch start, logged as
`categorical_accuracy` and `val_categorical_accuracy`.

Run: python examples/loop_metrics.py   (KL_FAST=1 for a seconds-long smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _digits
import keras


def main() -> tuple[float, kl.KerasLightningModule]:
    train, val = _digits.dataloaders(one_hot=True)
    module = kl.KerasLightningModule(
        _digits.get_model(),
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy()],
    )
    trainer = _digits.trainer()
    trainer.fit(module, train, val)
    return float(trainer.callback_metrics["val_categorical_accuracy"]), module


if __name__ == "__main__":
    main()
