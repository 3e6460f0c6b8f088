"""Data-parallel training of a Keras model on sklearn's digits with Lightning DDP.

    python examples/ddp.py                      # 2 CPU processes (gloo)
    KL_ACCELERATOR=gpu KL_DEVICES=4 python examples/ddp.py   # 4 GPUs (nccl)
    KL_FAST=1 python examples/ddp.py            # a quick smoke run (used by the tests)

    # two machines (or two "nodes" on one machine), one process each:
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 \\
        --master_addr=10.0.0.1 --master_port=29500 examples/ddp.py   # on node 0
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=1 \\
        --master_addr=10.0.0.1 --master_port=29500 examples/ddp.py   # on node 1
    (with KL_NUM_NODES=2 KL_DEVICES=1 in the environment of both)

The model is passed as a factory: every process builds its own copy on its own device, and
DDP makes the copies identical before the first step. Epoch metrics are reduced across the
processes (metric state summed), so the printed accuracy is the exact accuracy over the whole
validation set, whichever rank prints it.
"""

from __future__ import annotations

import keras_lightning as kl  # noqa: I001  (first: selects Keras' torch backend)

import os

import keras
import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits

FAST = os.environ.get("KL_FAST") == "1"
EPOCHS = 1 if FAST else 20
BATCH_SIZE = 32  # per process
ACCELERATOR = os.environ.get("KL_ACCELERATOR", "cpu")
DEVICES = int(os.environ.get("KL_DEVICES", "2"))
NUM_NODES = int(os.environ.get("KL_NUM_NODES", "1"))


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.BatchNormalization(),  # statistics averaged across ranks
            keras.layers.Dropout(0.2),  # masks differ across ranks
            keras.layers.Dense(10),
        ]
    )


def dataloaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    digits = load_digits()
    x = torch.as_tensor((digits.data / 16.0).astype("float32"))
    y = torch.as_tensor(digits.target.astype("int64"))
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(x)))
    train, val = order[:1536], order[1536:1792]  # multiples of 2 processes x 32: no padding
    if FAST:
        train, val = train[:256], val[:128]
    make = torch.utils.data.TensorDataset
    return (
        torch.utils.data.DataLoader(make(x[train], y[train]), batch_size=BATCH_SIZE, shuffle=True),
        torch.utils.data.DataLoader(make(x[val], y[val]), batch_size=BATCH_SIZE),
    )


def main() -> float:
    L.seed_everything(0)
    module = kl.KerasLightningModule(
        build_model,
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    trainer = L.Trainer(
        accelerator=ACCELERATOR,
        devices=DEVICES,
        num_nodes=NUM_NODES,
        strategy="ddp",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = dataloaders()
    trainer.fit(module, train, val)
    accuracy = float(trainer.callback_metrics["val_accuracy"])
    if trainer.is_global_zero:
        print(
            f"world_size={trainer.world_size} epochs={EPOCHS} "
            f"val_accuracy={accuracy:.4f} (exact, over all {len(val.dataset)} samples)"
        )
    return accuracy


if __name__ == "__main__":
    main()
    # Lightning creates the gloo / nccl process group and leaves it alive after fit; a process
    # that exits with it alive can abort in interpreter shutdown ("terminate called without an
    # active exception"). The script that asked for the processes ends the group.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
