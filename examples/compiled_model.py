"""Bring your compiled Keras model: what model.compile() was given is what trains.

A Keras user who already has `model.compile(optimizer, loss, metrics)` hands the model over
as it is; the module takes the compiled optimizer, loss and metrics.

Run: python examples/compiled_model.py   (KL_FAST=1 for a seconds-long smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _digits
import keras


def main() -> tuple[float, kl.KerasLightningModule]:
    train, val = _digits.dataloaders(one_hot=False)
    model = _digits.get_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    module = kl.KerasLightningModule(model)  # nothing else to say
    trainer = _digits.trainer()
    trainer.fit(module, train, val)
    print(f"Keras optimizer steps taken: {int(model.optimizer.iterations)}")
    return float(trainer.callback_metrics["val_accuracy"]), module


if __name__ == "__main__":
    main()
