"""Guide section: end-to-end training with a torch optimizer and a torch loss.

The guide's loop (forward, loss_fn(logits, targets), zero_grad, backward, optimizer.step)
becomes a KerasLightningModule and a Trainer. CrossEntropyLoss gets int64 labels, as in torch.

Run: python examples/loop_torch.py   (KL_FAST=1 for a seconds-long smoke run)
"""

from __future__ import annotations

import keras_lightning as kl

import _digits
import torch


def main() -> tuple[float, kl.KerasLightningModule]:
    train, val = _digits.dataloaders(one_hot=False)
    module = kl.KerasLightningModule(
        _digits.get_model(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["sparse_categorical_accuracy"],
    )
    trainer = _digits.trainer()
    trainer.fit(module, train, val)
    return float(trainer.callback_metrics["val_sparse_categorical_accuracy"]), module


if __name__ == "__main__":
    main()
