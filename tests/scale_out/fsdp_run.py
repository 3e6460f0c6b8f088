"""Sharded (FSDP2) and DDP training of the same Keras model, on 2 CPU processes (gloo).

Used by tests/test_sharding.py; run as a script::

    python tests/scale_out/fsdp_run.py --out DIR

Every Trainer here runs on both ranks (Lightning starts the second process once). Runs:

1. ``ddp``: DDPStrategy, 2 epochs: the reference weights.
2. ``sharded``: ModelParallelStrategy(data_parallel_size=2), 2 epochs, the same data;
   records what each rank holds (weights and optimizer state) while training.
3. ``resumed_full`` / ``resumed_distributed``: 1 sharded epoch, a checkpoint (one file, or
   the strategy's default: a folder of shards), then resumed from it to 2 epochs.

Each rank writes ``DIR/<run>_rank<r>.npz`` / ``.json``; rank 0 exports the sharded run's
model to ``DIR/sharded.keras``.
"""

from __future__ import annotations

import keras_lightning as kl  # noqa: I001  (selects the torch backend first)
from keras_lightning import sharding

import argparse
import json
import os
from pathlib import Path
from typing import Any

import keras
import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

BATCH = 8
N = 64


def build() -> keras.Model:
    """Float weights, a frozen layer and a seeded Dropout (int32 seed state): what FSDP2 skips."""
    # sharded checkpoints use torch's raw names, which hold Keras' per-process auto-names
    # (seed_generator_3): resuming in the same process needs the same names again
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="frozen"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2, seed=5, name="seeded_dropout"),
            keras.layers.Dense(4),
        ]
    )
    model.get_layer("frozen").trainable = False
    return model


def data() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 16)).astype("float32")
    y = rng.integers(0, 4, size=N).astype("int64")
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=BATCH
    )


class Held(L.Callback):
    """What this rank holds while training: weight elements and optimizer-state elements."""

    def __init__(self) -> None:
        self.weights = 0
        self.optimizer_state = 0

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        from keras_lightning._private import local_shard

        self.weights = sharding.local_numel(module)
        state = trainer.optimizers[0].state
        self.optimizer_state = sum(
            local_shard(v).numel()
            for entry in state.values()
            for k, v in entry.items()
            if torch.is_tensor(v) and k != "step"
        )


def module() -> kl.KerasLightningModule:
    return kl.KerasLightningModule(
        build(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def trainer(strategy: Any, epochs: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def sharded(**kwargs: Any) -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kwargs)


def full_weights(trained: kl.KerasLightningModule) -> list[np.ndarray]:
    model = kl.unshard(trained)
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.variables]


def save(out: Path, run: str, rank: int, weights: list[np.ndarray], **info: Any) -> None:
    np.savez(out / f"{run}_rank{rank}.npz", *weights)
    (out / f"{run}_rank{rank}.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)

    reference = module()
    ddp = trainer(DDPStrategy(process_group_backend="gloo"), 2, enable_checkpointing=False)
    ddp.fit(reference, data())
    rank = ddp.global_rank
    save(out, "ddp", rank, full_weights(reference), loss=float(ddp.callback_metrics["loss"]))

    held = Held()
    trained = module()
    run = trainer(sharded(), 2, callbacks=[held], enable_checkpointing=False)
    run.fit(trained, data())
    total = sum(int(np.prod(v.shape)) for v in trained.model.variables)
    weights = full_weights(trained)
    save(
        out, "sharded", rank, weights, loss=float(run.callback_metrics["loss"]),
        held_weights=held.weights, held_optimizer_state=held.optimizer_state, total=total,
        trainable=sum(int(np.prod(v.shape)) for v in trained.model.trainable_variables),
    )
    if rank == 0:
        trained.model.save(out / "sharded.keras")

    # a single file (save_distributed_checkpoint=False) and the default folder of shards
    for kind, distributed in (("full", False), ("distributed", True)):
        first = module()
        path = out / f"epoch1_{kind}.ckpt"
        one = trainer(sharded(save_distributed_checkpoint=distributed), 1,
                      enable_checkpointing=False)
        one.fit(first, data())
        one.save_checkpoint(path)
        save(out, f"epoch1_{kind}", rank, full_weights(first))
        resumed = module()
        again = trainer(sharded(save_distributed_checkpoint=distributed), 2,
                        enable_checkpointing=False)
        again.fit(resumed, data(), ckpt_path=path)
        save(out, f"resumed_{kind}", rank, full_weights(resumed))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # end cleanly (see examples/ddp.py)
