"""Guide: wrapping up -- an end-to-end GAN, trained by Lightning, on real handwritten digits.

The GAN below is the guide's, as written there: two ``keras.Sequential`` models, a custom
``compile(d_optimizer, g_optimizer, loss_fn)``, ``keras.random`` with a ``SeedGenerator`` and two
backward passes per ``train_step``. ``KerasLightningModule`` runs that ``train_step`` per batch,
and saves ``d_optimizer`` / ``g_optimizer`` state in checkpoints.

The guide trains on MNIST, which needs a download; this example uses scikit-learn's 1797 real
8x8 digits, upsampled to the guide's 28x28. ``--way lightning`` trains the same networks with
the Lightning-side helpers instead (a ``training_step``, two ``KerasOptimizer``s).
``--strategy ddp --devices 2`` trains on two CPU processes (gradients averaged across them).

By default the networks have half the guide's filters (``--width 32``; ``--width 64`` is the
guide's exact size, slower on CPU) and train 10 epochs of batch 32 (570 steps): about 4 minutes
on 2 CPU cores, and the samples are still stroke-like blobs. ``--epochs 30`` (about 11 minutes)
gives blurry but recognizable digits. Measured once each, on a shared 2-core machine.

Run: python examples/gan.py [--out gan_digits.png] [--epochs 10] [--way keras|lightning]
     (KL_FAST=1 or --fast: a seconds-long smoke run with tiny networks)
"""

from __future__ import annotations

import keras_lightning as kl

import argparse

import _custom_common
import keras
import numpy as np
import torch
from keras import layers
from sklearn.datasets import load_digits

FAST = _custom_common.FAST


def build_networks(latent_dim: int, width: int = 64) -> tuple[keras.Model, keras.Model]:
    """The guide's discriminator and generator; ``width=64`` is the guide's exact size.

    The discriminator's convolutions have ``width`` and ``2 * width`` filters, the generator's
    ``2 * width`` (the guide: 64, 128 and 128).
    """
    wide, narrow = width, 2 * width
    # Create the discriminator
    discriminator = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(wide, (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(2 * wide, (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.GlobalMaxPooling2D(),
            layers.Dense(1),
        ],
        name="discriminator",
    )
    # Create the generator
    generator = keras.Sequential(
        [
            keras.Input(shape=(latent_dim,)),
            # We want to generate 128 coefficients to reshape into a 7x7x128 map
            layers.Dense(7 * 7 * narrow),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Reshape((7, 7, narrow)),
            layers.Conv2DTranspose(narrow, (4, 4), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2DTranspose(narrow, (4, 4), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(1, (7, 7), padding="same", activation="sigmoid"),
        ],
        name="generator",
    )
    return discriminator, generator


class GAN(keras.Model):
    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.built = True

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, real_images):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(real_images, tuple) or isinstance(real_images, list):
            real_images = real_images[0]
        # Sample random points in the latent space
        batch_size = real_images.shape[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )

        # Decode them to fake images
        generated_images = self.generator(random_latent_vectors)

        # Combine them with real images
        real_images = torch.tensor(real_images, device=device)
        combined_images = torch.concat([generated_images, real_images], axis=0)

        # Assemble labels discriminating real from fake images
        labels = torch.concat(
            [
                torch.ones((batch_size, 1), device=device),
                torch.zeros((batch_size, 1), device=device),
            ],
            axis=0,
        )
        # Add random noise to the labels - important trick!
        labels += 0.05 * keras.random.uniform(labels.shape, seed=self.seed_generator)

        # Train the discriminator
        self.zero_grad()
        predictions = self.discriminator(combined_images)
        d_loss = self.loss_fn(labels, predictions)
        d_loss.backward()
        grads = [v.value.grad for v in self.discriminator.trainable_weights]
        with torch.no_grad():
            self.d_optimizer.apply(grads, self.discriminator.trainable_weights)

        # Sample random points in the latent space
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )

        # Assemble labels that say "all real images"
        misleading_labels = torch.zeros((batch_size, 1), device=device)

        # Train the generator (note that we should *not* update the weights
        # of the discriminator)!
        self.zero_grad()
        predictions = self.discriminator(self.generator(random_latent_vectors))
        g_loss = self.loss_fn(misleading_labels, predictions)
        grads = g_loss.backward()
        grads = [v.value.grad for v in self.generator.trainable_weights]
        with torch.no_grad():
            self.g_optimizer.apply(grads, self.generator.trainable_weights)

        # Update metrics and return their value.
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {
            "d_loss": self.d_loss_tracker.result(),
            "g_loss": self.g_loss_tracker.result(),
        }


class LightningSideGAN(kl.KerasLightningModule):
    """The same algorithm as a Lightning ``training_step``, with the module's helpers."""

    def __init__(self, discriminator: keras.Model, generator: keras.Model, latent_dim: int):
        # One Keras model holds both networks, so checkpoints and devices cover them.
        super().__init__(keras.Sequential([generator, discriminator]))
        self.latent_dim = latent_dim
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.automatic_optimization = False

    @property
    def generator(self) -> keras.Model:
        return self.model.layers[0]

    @property
    def discriminator(self) -> keras.Model:
        return self.model.layers[1]

    def configure_optimizers(self):
        return [
            kl.KerasOptimizer(keras.optimizers.Adam(3e-4), self.discriminator.trainable_variables),
            kl.KerasOptimizer(keras.optimizers.Adam(3e-4), self.generator.trainable_variables),
        ]

    def training_step(self, batch, batch_idx):
        real = batch[0]
        n = real.shape[0]
        d_opt, g_opt = self.optimizers()
        # Discriminator: fake images (1) against real ones (0), noisy labels.
        fake = self.generator(torch.randn(n, self.latent_dim, device=self.device), training=True)
        labels = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)]).to(self.device)
        labels += 0.05 * torch.rand_like(labels)
        logits = self.discriminator(torch.cat([fake.detach(), real]), training=True)
        d_loss = self.loss_fn(labels, logits)
        self.backward_and_step(d_loss, d_opt)  # zero_grad, manual_backward, step: D only
        # Generator: make the discriminator call fresh fakes real.
        fake = self.generator(torch.randn(n, self.latent_dim, device=self.device), training=True)
        g_loss = self.loss_fn(torch.zeros(n, 1, device=self.device), self.discriminator(fake))
        self.backward_and_step(g_loss, g_opt)  # G only
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)


def digit_images() -> torch.Tensor:
    """sklearn's 1797 real 8x8 digits, upsampled to 28x28x1 (channels last), in [0, 1]."""
    x = torch.from_numpy((load_digits().images / 16.0).astype("float32")).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def save_grid(generator: keras.Model, latent_dim: int, path: str, rows: int = 4) -> None:
    """Generate rows x rows digits and save them as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = keras.random.normal((rows * rows, latent_dim), seed=7)
    images = keras.ops.convert_to_numpy(generator(noise, training=False))[..., 0]
    figure, axes = plt.subplots(rows, rows, figsize=(rows, rows))
    for image, axis in zip(images, np.ravel(axes), strict=True):
        axis.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gan_digits.png", help="PNG grid of generated digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--width", type=int, default=32, help="filters; 64 is the guide's size"
    )
    parser.add_argument("--way", choices=("keras", "lightning"), default="keras")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="same as KL_FAST=1")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(42)
    latent_dim = 16 if FAST else 128
    discriminator, generator = build_networks(latent_dim, width=4 if FAST else args.width)
    if args.way == "keras":
        gan = GAN(discriminator=discriminator, generator=generator, latent_dim=latent_dim)
        gan.compile(
            d_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
            g_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
            loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
        )
        module: kl.KerasLightningModule = kl.KerasLightningModule(gan)
    else:
        module = LightningSideGAN(discriminator, generator, latent_dim)

    images = digit_images()
    dataloader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, images), batch_size=args.batch_size, shuffle=True
    )
    trainer = _custom_common.trainer(
        epochs=args.epochs, strategy=args.strategy, devices=args.devices
    )
    trainer.fit(module, dataloader)
    if trainer.is_global_zero:
        save_grid(generator, latent_dim, args.out)
        print(f"Saved {args.out}")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
