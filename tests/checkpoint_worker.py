"""Worker process for tests/test_checkpoint.py: train, stop, resume, in a fresh process.

Not a test module. Run as::

    python tests/checkpoint_worker.py --variant keras_schedule --dir DIR --max-epochs 4 \
        --out result.pt [--resume CKPT] [--sleep SECONDS] [--predict-from CKPT]

Variants:
    keras_schedule: Dense + BatchNormalization + Dropout (unseeded: torch's global generator)
        + Dropout(seed=...) (a Keras SeedGenerator) + Keras Adam with an ExponentialDecay
        learning-rate schedule.
    torch_scheduler: the same model with a Keras Adam at a float learning rate driven by a
        torch StepLR stepped every batch.

Data order is shuffled: by a ``DistributedSampler`` with one replica and a fixed seed, whose
``set_epoch`` Lightning calls every epoch; for ``torch_scheduler`` by a plain
``DataLoader(shuffle=True)`` drawing from torch's global generator, which the checkpoint
restores. Either way a resumed run sees the same order as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def build_model(variant: str) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(48),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.3),  # no seed: torch's global generator draws the masks
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2, seed=11),  # seeded: a SeedGenerator variable
            keras.layers.Dense(10),
        ]
    )


def build_gan() -> Any:
    """A small GAN trained by its own ``train_step`` with two Keras optimizers (the guide's)."""
    import keras
    import torch

    class GAN(keras.Model):
        def __init__(self, discriminator: Any, generator: Any, latent_dim: int) -> None:
            super().__init__()
            self.discriminator = discriminator
            self.generator = generator
            self.latent_dim = latent_dim
            self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
            self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
            self.seed_generator = keras.random.SeedGenerator(1337)
            self.built = True

        @property
        def metrics(self) -> list[Any]:
            return [self.d_loss_tracker, self.g_loss_tracker]

        def compile(self, d_optimizer: Any, g_optimizer: Any, loss_fn: Any) -> None:
            super().compile()
            self.d_optimizer = d_optimizer
            self.g_optimizer = g_optimizer
            self.loss_fn = loss_fn

        def train_step(self, data: Any) -> dict[str, Any]:
            real = data[0] if isinstance(data, list | tuple) else data
            batch = real.shape[0]
            latent = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
            combined = torch.concat([self.generator(latent, training=True), real], axis=0)
            labels = torch.concat([torch.ones((batch, 1)), torch.zeros((batch, 1))], axis=0)
            labels += 0.05 * keras.random.uniform(labels.shape, seed=self.seed_generator)
            self.zero_grad()
            d_loss = self.loss_fn(labels, self.discriminator(combined, training=True))
            d_loss.backward()
            weights = self.discriminator.trainable_weights
            with torch.no_grad():
                self.d_optimizer.apply([v.value.grad for v in weights], weights)
            latent = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
            self.zero_grad()
            fake = self.generator(latent, training=True)
            g_loss = self.loss_fn(torch.zeros((batch, 1)), self.discriminator(fake, training=True))
            g_loss.backward()
            weights = self.generator.trainable_weights
            with torch.no_grad():
                self.g_optimizer.apply([v.value.grad for v in weights], weights)
            self.d_loss_tracker.update_state(d_loss)
            self.g_loss_tracker.update_state(g_loss)
            return {"d_loss": self.d_loss_tracker.result(), "g_loss": self.g_loss_tracker.result()}

    keras.utils.set_random_seed(0)
    discriminator = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32),
            keras.layers.LeakyReLU(0.2),
            keras.layers.Dropout(0.2),  # unseeded: torch's global generator
            keras.layers.Dense(1),
        ]
    )
    generator = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.LeakyReLU(0.2),
            keras.layers.Dense(64, activation="sigmoid"),
        ]
    )
    gan = GAN(discriminator, generator, latent_dim=8)
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=4, decay_rate=0.9)
    gan.compile(
        d_optimizer=keras.optimizers.Adam(3e-4),
        g_optimizer=keras.optimizers.Adam(schedule),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return gan


def build_module(variant: str) -> Any:
    import keras_lightning as kl

    import keras
    import torch

    if variant == "gan":
        return kl.KerasLightningModule(build_gan())
    model = build_model(variant)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if variant == "keras_schedule":
        schedule = keras.optimizers.schedules.ExponentialDecay(5e-3, decay_steps=4, decay_rate=0.8)
        return kl.KerasLightningModule(
            model, optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"]
        )
    if variant == "torch_scheduler":
        return kl.KerasLightningModule(
            model,
            optimizer=keras.optimizers.Adam(5e-3),
            loss=loss,
            metrics=["accuracy"],
            lr_scheduler={
                "scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.7),
                "interval": "step",
            },
        )
    raise SystemExit(f"unknown variant {variant!r}")


def loaders(variant: str = "keras_schedule") -> tuple[Any, Any]:
    """Shuffled digits. ``torch_scheduler`` uses a plain ``DataLoader(shuffle=True)``, whose
    order comes from torch's global generator (restored from the checkpoint); the others a
    sampler whose order is a function of the epoch."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    train = torch.utils.data.TensorDataset(x[:512], y[:512])
    val = torch.utils.data.TensorDataset(x[1400:1528], y[1400:1528])
    sampler = torch.utils.data.DistributedSampler(
        train, num_replicas=1, rank=0, shuffle=True, seed=3
    )
    if variant == "torch_scheduler":
        train_loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    else:
        train_loader = torch.utils.data.DataLoader(train, batch_size=64, sampler=sampler)
    return train_loader, torch.utils.data.DataLoader(val, batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--predict-from", default=None)
    args = parser.parse_args()

    import keras_lightning as kl  # selects Keras' torch backend before keras is imported

    import keras
    import lightning as L
    import torch

    torch.set_num_threads(1)  # the same reduction order in every process

    class Slow(L.Callback):
        """Sleeps after each batch and says which batch ended (for the SIGKILL test)."""

        def on_train_batch_end(self, trainer: Any, *unused: Any) -> None:
            print(f"batch {trainer.current_epoch} {unused[-1]}", flush=True)
            time.sleep(args.sleep)

    module = build_module(args.variant)
    train, val = loaders(args.variant)
    gan = args.variant == "gan"
    callbacks: list[Any] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=args.dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=True
        )
    ]
    if args.sleep:
        callbacks.append(Slow())
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, train, None if gan else val, ckpt_path=args.resume)
    model = module.model
    if gan:  # the two Keras optimizers the GAN's compile() created
        keras_optimizers = [model.d_optimizer, model.g_optimizer]
        lr = float(keras.ops.convert_to_numpy(model.g_optimizer.learning_rate))
    else:
        keras_optimizers = [trainer.optimizers[0].keras_optimizer]
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
    result: dict[str, Any] = {
        "weights": [v.value.detach().clone() for v in model.variables],
        "paths": [v.path for v in model.variables],
        "optimizer": [v.value.detach().clone() for o in keras_optimizers for v in o.variables],
        "lr": lr,
        "global_step": trainer.global_step,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    x = next(iter(val))[0]
    if not gan:
        result["predictions"] = torch.as_tensor(keras.ops.convert_to_numpy(module(x)))
    if args.predict_from:  # rebuilt from the checkpoint alone; the lambda cannot be stored
        restored = kl.KerasLightningModule.load_from_checkpoint(
            args.predict_from, lr_scheduler=None
        )
        result["restored_predictions"] = torch.as_tensor(keras.ops.convert_to_numpy(restored(x)))
        result["restored_class"] = type(restored.model).__name__
    torch.save(result, args.out)


if __name__ == "__main__":
    main()
