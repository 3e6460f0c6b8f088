"""Guide section: losses added by layers with add_loss().

The guide adds `sum(model.losses)` to the loss by hand; the module always does.

Run: python examples/loop_add_loss.py   (KL_FAST=1 for a seconds-long smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _digits
import keras


def main() -> tuple[float, kl.KerasLightningModule]:
    train, val = _digits.dataloaders(one_hot=True)
    module = kl.KerasLightningModule(
        _digits.get_regularized_model(),
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy()],
    )
    trainer = _digits.trainer()
    trainer.fit(module, train, val)
    return float(trainer.callback_metrics["val_categorical_accuracy"]), module


if __name__ == "__main__":
    main()
