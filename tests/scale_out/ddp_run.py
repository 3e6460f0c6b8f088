"""One distributed training run that records what every rank saw (used by tests/test_ddp.py).

Run as a script (never imported for its side effects)::

    python tests/scale_out/ddp_run.py --out DIR --strategy ddp --devices 2

Each rank writes ``DIR/rank<global rank>.npz`` (arrays) and ``DIR/rank<r>.json`` (scalars);
the test compares ranks with each other and with a single-process computation. Data: the
first 256 (train) and next 128 (validation) sklearn digits, with sample weights 1, 2, 3, so
that a per-rank mean of weighted accuracies would differ from the global value. Sizes are
multiples of world_size * batch_size: DistributedSampler pads nothing. (Lightning gives the
training loader a shuffling DistributedSampler, seed 0; validation is not shuffled.)
"""

from __future__ import annotations

import keras_lightning as kl  # noqa: I001  (selects the torch backend first)
from keras_lightning import devices, replicas

import argparse
import json
import os
from pathlib import Path
from typing import Any

import keras
import lightning as L
import numpy as np
import torch
import torchmetrics

BATCH = 16
N_TRAIN = 256
N_VAL = 128


def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    w = (1.0 + np.arange(len(y)) % 3).astype("float32")
    return {
        "x_train": x[:N_TRAIN], "y_train": y[:N_TRAIN], "w_train": w[:N_TRAIN],
        "x_val": x[N_TRAIN : N_TRAIN + N_VAL], "y_val": y[N_TRAIN : N_TRAIN + N_VAL],
        "w_val": w[N_TRAIN : N_TRAIN + N_VAL],
    }


def loader(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, batch: int = BATCH) -> Any:
    arrays = [torch.as_tensor(a) for a in (x, y, w) if a is not None]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*arrays), batch_size=batch, shuffle=False
    )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class LogitTracker(keras.layers.Layer):
    """Passes its input through; a metric of the model's own: the mean |logit| per sample."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tracker = keras.metrics.Mean(name="mean_abs_logit")

    def call(self, x: Any) -> Any:
        values = keras.ops.mean(keras.ops.abs(keras.ops.stop_gradient(x)), axis=-1)
        self.tracker.update_state(values)
        return x


def build_model() -> keras.Model:
    """BatchNorm, a seeded and an unseeded Dropout; initial weights differ per rank."""
    keras.utils.set_random_seed(100 + _rank())  # DDP must broadcast rank 0's weights
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dropout(0.25, seed=7, name="seeded_dropout"),
            keras.layers.Dropout(0.25, name="torch_dropout"),
            keras.layers.Dense(10),
            LogitTracker(),
        ]
    )
    torch.manual_seed(0)  # like seed_everything: torch's generator equal on every rank
    return model


def build_linear() -> keras.Model:
    """A deterministic model for the exact gradient-averaging check."""
    keras.utils.set_random_seed(5 + _rank())
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(10)]
    )


def flat(variables: Any) -> np.ndarray:
    return np.concatenate(
        [np.asarray(devices.parameter_of(v).detach().cpu().double()).ravel()
         for v in variables]
    )


def stats(model: keras.Model) -> np.ndarray:
    return flat(replicas.averaged_variables(model))


class Recorder(L.Callback):
    """Records per-rank state; callback hooks run before the module's hooks of the same name."""

    def __init__(self) -> None:
        self.arrays: dict[str, Any] = {"weights": [], "steps": [], "stats_by_step": []}
        self.val_pre: list[np.ndarray] = []
        self.val_post: list[np.ndarray] = []
        self.device = ""

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.device = str(module.device)  # Lightning moves the module to the CPU at teardown
        self.arrays["initial_weights"] = flat(module.model.trainable_variables)
        self.arrays["initial_all"] = flat(module.model.variables)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0 and "seeded_mask" not in self.arrays:
            ones = torch.ones(4, 32, device=module.device)
            with module.keras_scope():
                seeded = module.model.get_layer("seeded_dropout")(ones, training=True)
                unseeded = module.model.get_layer("torch_dropout")(ones, training=True)
            self.arrays["seeded_mask"] = (seeded.detach().cpu().numpy() != 0).astype("int8")
            self.arrays["torch_mask"] = (unseeded.detach().cpu().numpy() != 0).astype("int8")
            self.arrays["seed_states_training"] = flat(
                replicas.seed_state_variables(module.model)
            )

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.arrays["weights"].append(flat(module.model.trainable_variables))
        self.arrays["steps"].append(trainer.global_step)
        self.arrays["stats_by_step"].append(stats(module.model))

    def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.val_pre.append(stats(module.model))

    def on_validation_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
        if not trainer.sanity_checking and len(self.val_post) < len(self.val_pre):
            self.val_post.append(stats(module.model))


def run_main(args: argparse.Namespace, out: Path) -> None:
    data = digits()
    recorder = Recorder()
    module = kl.KerasLightningModule(
        build_model,
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="macro"),
        ],
        weighted_metrics=["accuracy"],
    )
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, checkpoints],
    )
    trainer.fit(
        module,
        loader(data["x_train"], data["y_train"], data["w_train"]),
        loader(data["x_val"], data["y_val"], data["w_val"]),
    )
    if args.strategy == "ddp_spawn":
        # Rank 0's results come back to this process, which never ran a step: the
        # recorder's state of every rank was written by the workers (see below).
        return
    save(trainer, module, recorder, out)


def save(trainer: Any, module: Any, recorder: Recorder, out: Path) -> None:
    rank = trainer.global_rank
    model = module.model
    arrays = {k: np.asarray(v) for k, v in recorder.arrays.items()}
    arrays["val_pre"] = np.asarray(recorder.val_pre)
    arrays["val_post"] = np.asarray(recorder.val_post)
    arrays["final_all"] = flat(model.variables)
    arrays["final_stats"] = stats(model)
    arrays["final_seed_states"] = flat(replicas.seed_state_variables(model))
    for i, v in enumerate(model.variables):
        arrays[f"var{i}"] = devices.parameter_of(v).detach().cpu().numpy()
    np.savez(out / f"rank{rank}.npz", **arrays)
    info = {
        "rank": rank,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "strategy": type(trainer.strategy).__name__,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "variable_paths": [v.path for v in model.variables],
        "stats_paths": [v.path for v in replicas.averaged_variables(model)],
        "device": recorder.device,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


class SaveFromWorker(L.Callback):
    """ddp_spawn: write each worker's record before the workers exit."""

    def __init__(self, recorder: Recorder, out: Path) -> None:
        self.recorder, self.out = recorder, out

    def teardown(self, trainer: Any, module: Any, stage: str) -> None:
        save(trainer, module, self.recorder, self.out)


def run_grads(args: argparse.Namespace, out: Path, jit_compile: Any = False) -> None:
    """Plain Keras SGD, 2 ranks x batch 8, accumulate 2: one step sees 32 samples."""
    data = digits()
    recorder = Recorder()
    module = kl.KerasLightningModule(
        build_linear,
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        max_epochs=1,
        limit_train_batches=8,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[_Weights(recorder)],
    )
    trainer.fit(module, loader(data["x_train"], data["y_train"], batch=8))
    rank = trainer.global_rank
    stats = module.compile_stats
    if isinstance(stats, kl.WholeStepStats):
        (out / f"grads_rank{rank}.json").write_text(json.dumps({
            "mode": stats.mode, "hosting": stats.hosting, "captures": stats.train.captures,
            "fallback": stats.fallback, "not_whole": stats.not_whole,
        }))
    np.savez(
        out / f"grads_rank{rank}.npz",
        initial=recorder.arrays["initial_weights"],
        weights=np.asarray(recorder.arrays["weights"]),
        steps=np.asarray(recorder.arrays["steps"]),
        **{f"init{i}": a for i, a in enumerate(recorder.arrays["initial_list"])},
    )


class _UnfreezeFirstLayer(L.Callback):
    """Unfreezes the first Dense layer (frozen before fit) at the fourth step."""

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 3:
            module.model.layers[0].trainable = True


class _AllWeights(L.Callback):
    def __init__(self) -> None:
        self.weights: list[np.ndarray] = []

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.weights.append(flat(module.model.weights))


def run_unfreeze(args: argparse.Namespace, out: Path) -> None:
    """A layer frozen before fit and unfrozen at step 4: DDP never averaged its gradients."""
    data = digits()

    def build() -> keras.Model:
        model = build_linear()
        model.layers[0].trainable = False
        return model

    recorder = _AllWeights()
    module = kl.KerasLightningModule(
        build,
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=1,
        limit_train_batches=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[_UnfreezeFirstLayer(), recorder],
    )
    trainer.fit(module, loader(data["x_train"], data["y_train"], batch=8))
    np.save(out / f"unfreeze_rank{trainer.global_rank}.npy", np.asarray(recorder.weights))


class _Weights(L.Callback):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.recorder.arrays["initial_weights"] = flat(module.model.trainable_variables)
        self.recorder.arrays["initial_list"] = [
            devices.parameter_of(v).detach().cpu().numpy().copy()
            for v in module.model.trainable_variables
        ]

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.recorder.arrays["weights"].append(flat(module.model.trainable_variables))
        self.recorder.arrays["steps"].append(trainer.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--grads", action="store_true", help="also run the gradient check")
    parser.add_argument("--grads-only", metavar="JIT_COMPILE",
                        help="only the gradient check, with KerasLightningModule(jit_compile=...)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.grads_only:
        run_grads(args, out, jit_compile=args.grads_only)
        return
    if args.strategy == "ddp_spawn":
        run_spawn(args, out)
    else:
        run_main(args, out)
    if args.grads:
        run_grads(args, out)
        run_unfreeze(args, out)


def run_spawn(args: argparse.Namespace, out: Path) -> None:
    data = digits()
    recorder = Recorder()
    module = kl.KerasLightningModule(
        build_model,
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="macro"),
        ],
        weighted_metrics=["accuracy"],
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, SaveFromWorker(recorder, out)],
    )
    trainer.fit(
        module,
        loader(data["x_train"], data["y_train"], data["w_train"]),
        loader(data["x_val"], data["y_val"], data["w_val"]),
    )
    # Back in the launching process: rank 0's weights were copied into `module`.
    np.save(out / "parent_final.npy", flat(module.model.variables))
    (out / "parent.json").write_text(
        json.dumps({"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}})
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # end cleanly (see examples/ddp.py)
