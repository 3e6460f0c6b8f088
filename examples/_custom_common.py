"""Shared bits of the custom-step examples: fast mode, a quiet Trainer, Keras-style epoch lines.

Every example runs in seconds with ``KL_FAST=1`` (or ``--fast``), which is what the test suite
does; without it, each finishes in a few minutes at most on a laptop CPU.
"""

from __future__ import annotations

import keras_lightning  # noqa: F401  (first: selects Keras' torch backend)

import os
import sys
from typing import Any

import lightning as L

FAST = os.environ.get("KL_FAST") == "1" or "--fast" in sys.argv


class PrintEpochs(L.Callback):
    """Print ``Epoch 1/3 - loss: 0.1772 - mae: 0.3410`` after each epoch, as Keras' fit does."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._print(trainer, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, trainer.current_epoch)

    @staticmethod
    def _print(trainer: L.Trainer, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        metrics = sorted(trainer.callback_metrics.items())
        logs = " - ".join(f"{name}: {float(value):.4f}" for name, value in metrics)
        print(f"Epoch {epoch}/{trainer.max_epochs} - {logs}", flush=True)


def trainer(epochs: int = 1, **overrides: Any) -> L.Trainer:
    """A CPU Trainer that prints one line per epoch and writes nothing (1 short epoch if fast)."""
    kwargs: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PrintEpochs()],
    )
    if FAST:
        kwargs.update(
            max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2
        )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
