"""Guide section: the same loop with a Keras optimizer and a Keras loss.

keras.optimizers.Adam runs behind kl.KerasOptimizer (a real torch.optim.Optimizer), and
CategoricalCrossentropy is called in Keras' order (y_true, y_pred): the module swaps for you.

Run: python examples/loop_keras.py   (KL_FAST=1 for a seconds-long smoke run)
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
    )
    trainer = _digits.trainer()
    trainer.fit(module, train, val)
    print(f"Validation loss: {float(trainer.callback_metrics['val_loss']):.4f}")
    return float(trainer.callback_metrics["val_loss"]), module


if __name__ == "__main__":
    main()
