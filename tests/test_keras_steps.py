"""Custom training logic (issue 3): Keras-side train_step / test_step and Lightning-side steps.

The Keras models below are the guide's ("Customizing what happens in fit() with PyTorch") as
written there; only the GAN's layer widths are smaller so that the tests stay fast on CPU.
"""

from __future__ import annotations

import keras_lightning as kl  # (first: selects Keras' torch backend)
from keras_lightning.keras_logs import scalar_logs
from keras_lightning.keras_model import overrides_step
from keras_lightning.keras_optimizers import (
    CHECKPOINT_KEY,
    keras_optimizer_state,
    keras_optimizers_of,
    load_keras_optimizer_state,
)

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import free_port, loader, make_trainer
from keras import layers

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the guide's models


class GuideModel(keras.Model):
    """First example: compile(optimizer, loss, metrics), compute_loss and self.metrics."""

    def train_step(self, data):
        x, y = data
        self.zero_grad()
        y_pred = self(x, training=True)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        loss.backward()
        trainable_weights = [v for v in self.trainable_weights]
        gradients = [v.value.grad for v in trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(gradients, trainable_weights)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class LowLevelModel(keras.Model):
    """Going lower-level: own trackers, loss_fn and metrics property; compile(optimizer) only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
        self.loss_fn = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        self.zero_grad()
        y_pred = self(x, training=True)
        loss = self.loss_fn(y, y_pred)
        loss.backward()
        trainable_weights = [v for v in self.trainable_weights]
        gradients = [v.value.grad for v in trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(gradients, trainable_weights)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


class SampleWeightModel(keras.Model):
    """Supporting sample_weight: 3-tuple batches reach compute_loss and the metrics."""

    def train_step(self, data):
        if len(data) == 3:
            x, y, sample_weight = data
        else:
            sample_weight = None
            x, y = data
        self.zero_grad()
        y_pred = self(x, training=True)
        loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
        loss.backward()
        trainable_weights = [v for v in self.trainable_weights]
        gradients = [v.value.grad for v in trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(gradients, trainable_weights)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}


class EvalStepModel(keras.Model):
    """Providing your own evaluation step."""

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class RawLossEvalModel(keras.Model):
    """A test_step that returns the batch's loss itself under "loss" (not a metric's result)."""

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        for metric in self.metrics:
            if metric.name != "loss":
                metric.update_state(y, y_pred)
        return {"loss": loss, **{m.name: m.result() for m in self.metrics if m.name != "loss"}}


class RecordingModel(GuideModel, EvalStepModel):
    """The guide's train_step and test_step; records each training batch's loss (for checks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_losses: list[float] = []
        self.batch_counts: list[int] = []
        self._training_step = False

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        if self._training_step:
            self.batch_losses.append(float(loss.detach()))
        return loss

    def train_step(self, data):
        self._training_step = True
        try:
            logs = super().train_step(data)
        finally:
            self._training_step = False
        self.batch_counts.append(int(self.metrics[0].variables[1].value))  # the Mean's count
        return logs


class GAN(keras.Model):
    """The end-to-end GAN, as written in the guide."""

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
        batch_size = real_images.shape[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        generated_images = self.generator(random_latent_vectors)
        real_images = torch.tensor(real_images, device=device)
        combined_images = torch.concat([generated_images, real_images], axis=0)
        labels = torch.concat(
            [
                torch.ones((batch_size, 1), device=device),
                torch.zeros((batch_size, 1), device=device),
            ],
            axis=0,
        )
        labels += 0.05 * keras.random.uniform(labels.shape, seed=self.seed_generator)
        self.zero_grad()
        predictions = self.discriminator(combined_images)
        d_loss = self.loss_fn(labels, predictions)
        d_loss.backward()
        grads = [v.value.grad for v in self.discriminator.trainable_weights]
        with torch.no_grad():
            self.d_optimizer.apply(grads, self.discriminator.trainable_weights)
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        misleading_labels = torch.zeros((batch_size, 1), device=device)
        self.zero_grad()
        predictions = self.discriminator(self.generator(random_latent_vectors))
        g_loss = self.loss_fn(misleading_labels, predictions)
        grads = g_loss.backward()
        grads = [v.value.grad for v in self.generator.trainable_weights]
        with torch.no_grad():
            self.g_optimizer.apply(grads, self.generator.trainable_weights)
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {
            "d_loss": self.d_loss_tracker.result(),
            "g_loss": self.g_loss_tracker.result(),
        }


LATENT = 8


def gan_parts(width: int = 8) -> tuple[keras.Model, keras.Model]:
    """The guide's discriminator and generator (28x28x1 images), with fewer filters."""
    discriminator = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(width, (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(2 * width, (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.GlobalMaxPooling2D(),
            layers.Dense(1),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [
            keras.Input(shape=(LATENT,)),
            layers.Dense(7 * 7 * width),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Reshape((7, 7, width)),
            layers.Conv2DTranspose(width, (4, 4), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2DTranspose(width, (4, 4), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(1, (7, 7), padding="same", activation="sigmoid"),
        ],
        name="generator",
    )
    return discriminator, generator


def make_gan() -> GAN:
    discriminator, generator = gan_parts()
    gan = GAN(discriminator=discriminator, generator=generator, latent_dim=LATENT)
    gan.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
        g_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return gan


# ---------------------------------------------------------------------- data and helpers


def digit_images(digits: dict[str, np.ndarray], count: int) -> torch.Tensor:
    """Real 8x8 digits upsampled to the guide's 28x28x1 (channels last), values in [0, 1]."""
    x = torch.from_numpy(digits["x_train"][:count]).reshape(-1, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()


def regression_data(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x in [0, 1)^32, y a fixed linear function of x plus noise (learnable, synthetic)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 32)).astype("float32")
    w = rng.normal(size=(32, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def dense_model(cls: type[keras.Model], seed: int = 0, **kwargs: Any) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(32,))
    outputs = layers.Dense(1)(inputs)
    return cls(inputs, outputs, **kwargs)


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.weights]


class EpochLogs(L.Callback):
    """What the Trainer holds after each training epoch (logged values, as floats).

    Read at the next epoch's start and at train end: after every epoch-end hook has logged.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("model", "train", "test"),
    [
        (lambda: keras.Sequential([keras.Input((2,)), layers.Dense(1)]), False, False),
        (lambda: dense_model(keras.Model), False, False),
        (lambda: dense_model(GuideModel), True, False),
        (lambda: dense_model(EvalStepModel), False, True),
        (lambda: dense_model(RecordingModel), True, True),
    ],
)
def test_overrides_step_tells_user_steps_from_keras_own(model, train, test):
    built = model()
    assert overrides_step(built, "train_step") is train
    assert overrides_step(built, "test_step") is test


def test_flatten_logs_merges_nested_dicts_like_keras_fit():
    from keras.src.utils.python_utils import pythonify_logs

    logs = {"loss": torch.tensor(2.0), "compile_metrics": {"mae": torch.tensor(0.5), "mse": 1}}
    flat = kl.flatten_logs(logs)
    assert flat.keys() == pythonify_logs(logs).keys() == {"loss", "mae", "mse"}
    assert {k: float(v) for k, v in flat.items()} == pythonify_logs(logs)


def test_flatten_logs_rejects_a_non_dict_with_the_fix():
    with pytest.raises(kl.ConfigurationError, match=r"must return a dict.*returned Tensor"):
        kl.flatten_logs(torch.tensor(1.0))


def test_scalar_logs_keeps_scalars_and_names_the_rest():
    values, skipped = scalar_logs({"a": torch.tensor([3.0]), "b": 2, "c": torch.ones(3)})
    assert {k: float(v) for k, v in values.items()} == {"a": 3.0, "b": 2.0}
    assert skipped == ["c"]


def _step_gan(gan: GAN, images: torch.Tensor, steps: int) -> None:
    for i in range(steps):
        gan.train_step((images[i * 8 : (i + 1) * 8],))


def test_optimizer_state_round_trips_into_a_rebuilt_model_with_other_layer_names(digits):
    images = digit_images(digits, 32)
    first, steps = make_gan(), 2
    _step_gan(first, images, steps)
    state = keras_optimizer_state(first)
    assert set(state) == {"d_optimizer", "g_optimizer", "optimizer"}
    assert state["optimizer"] == {"built": False}  # super().compile()'s unused default

    second = make_gan()  # same architecture, new auto-generated layer names
    assert first.discriminator.layers[0].name != second.discriminator.layers[0].name
    load_keras_optimizer_state(second, state)
    for name, owner in (("d_optimizer", "discriminator"), ("g_optimizer", "generator")):
        restored = keras_optimizers_of(second)[name]
        original = keras_optimizers_of(first)[name]
        assert int(restored.iterations) == steps
        assert [id(v) for v in restored._trainable_variables] == [
            id(v) for v in getattr(second, owner).trainable_weights
        ]
        for a, b in zip(original.variables, restored.variables, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # Training goes on from the restored state (Adam's step count continues).
    _step_gan(second, images, 1)
    assert int(second.d_optimizer.iterations) == steps + 1


def test_optimizer_state_for_an_optimizer_the_model_lacks_is_refused(digits):
    gan = make_gan()
    _step_gan(gan, digit_images(digits, 8), 1)
    state = keras_optimizer_state(gan)
    plain = dense_model(GuideModel)
    plain.compile(optimizer="adam", loss="mse")
    with pytest.raises(kl.CheckpointError, match=r"model.d_optimizer.*compile"):
        load_keras_optimizer_state(plain, state)


# ---------------------------------------------------------------------- Keras side, under a Trainer


def test_guide_train_step_logs_flat_keras_names_and_loss_falls():
    x, y = regression_data()
    model = dense_model(GuideModel)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", metrics=["mae"])
    before = weights_of(model)
    module = kl.KerasLightningModule(model)
    logs = EpochLogs()
    trainer = make_trainer(max_epochs=4, callbacks=[logs])
    data = loader(x, y, batch_size=32)
    trainer.fit(module, data)

    assert module.automatic_optimization is False
    assert set(trainer.callback_metrics) == {"loss", "mae"}  # compile_metrics flattened
    assert set(trainer.progress_bar_metrics) >= {"loss"}
    losses = [epoch["loss"] for epoch in logs.epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(model.optimizer.iterations) == trainer.max_epochs * len(data)  # one per batch
    assert all(not np.allclose(a, b) for a, b in zip(before, weights_of(model), strict=True))


def test_lower_level_train_step_with_its_own_metrics_property():
    x, y = regression_data()
    model = dense_model(LowLevelModel)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    module = kl.KerasLightningModule(model)
    logs = EpochLogs()
    trainer = make_trainer(max_epochs=4, callbacks=[logs])
    trainer.fit(module, loader(x, y, batch_size=32))
    assert set(trainer.callback_metrics) == {"loss", "mae"}
    losses = [epoch["loss"] for epoch in logs.epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    # Epoch values are this epoch's running means: the trackers were reset at epoch start.
    assert float(model.loss_tracker.variables[1].value) == 8  # count = batches of the last epoch


def test_metrics_are_reset_each_epoch_and_survive_a_mid_epoch_validation():
    x, y = regression_data(n=256)
    model = dense_model(RecordingModel)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    module = kl.KerasLightningModule(model)
    logs = EpochLogs()
    trainer = make_trainer(max_epochs=2, callbacks=[logs], val_check_interval=0.5)
    trainer.fit(module, loader(x, y, batch_size=32), loader(x[:64], y[:64], batch_size=32))

    # 8 batches per epoch; the Mean tracker counts 1..8 in each epoch, across the validation
    # run after batch 4 (which resets and uses the same Keras metrics).
    assert model.batch_counts == list(range(1, 9)) * 2
    for epoch, values in enumerate(logs.epochs):
        batch_losses = model.batch_losses[8 * epoch : 8 * (epoch + 1)]
        assert values["loss"] == pytest.approx(np.mean(batch_losses), rel=1e-5)
    assert {"loss", "mae", "val_loss", "val_mae"} <= set(trainer.callback_metrics)


def test_sample_weight_reaches_the_loss():
    x, y = regression_data(n=64)
    sw = np.random.default_rng(1).random((64, 1)).astype("float32")
    model = dense_model(SampleWeightModel)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
    kernel, bias = (keras.ops.convert_to_numpy(v) for v in model.weights)
    module = kl.KerasLightningModule(model)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, loader(x, y, sw, batch_size=64))  # one batch: initial weights

    error = x @ kernel + bias - y
    weighted_mse = float(np.mean(sw[:, 0] * np.mean(error**2, axis=1)))
    weighted_mae = float(np.sum(sw[:, 0] * np.abs(error[:, 0])) / np.sum(sw))
    logged = floats(trainer.callback_metrics)
    assert logged["loss"] == pytest.approx(weighted_mse, rel=1e-5)
    # compile(metrics=...) metrics ignore sample_weight in Keras (only weighted_metrics use it),
    # even when the guide's step passes it: the plain MAE is logged, as Keras' fit logs it.
    assert logged["mae"] == pytest.approx(float(np.abs(error).mean()), rel=1e-5)
    assert abs(logged["mae"] - weighted_mae) > 0.01
    assert abs(float(np.mean(error**2)) - weighted_mse) > 0.05 * weighted_mse  # weights matter


def test_custom_test_step_in_validate_and_test_equals_a_hand_computation():
    x, y = regression_data(n=100)
    other_x, other_y = regression_data(n=70, seed=5)
    model = dense_model(EvalStepModel)
    model.compile(loss="mse", metrics=["mae"])
    kernel, bias = (keras.ops.convert_to_numpy(v) for v in model.weights)
    module = kl.KerasLightningModule(model)
    trainer = make_trainer()

    def expected(xs: np.ndarray, ys: np.ndarray, prefix: str) -> dict[str, float]:
        error = xs @ kernel + bias - ys
        batch_mse = [np.mean(error[i : i + 32] ** 2) for i in range(0, len(xs), 32)]
        # The guide's loss tracker is a Mean of batch losses; MAE is over every sample.
        return {f"{prefix}loss": float(np.mean(batch_mse)), f"{prefix}mae": float(np.abs(error).mean())}

    for xs, ys in ((x, y), (other_x, other_y)):  # the second run starts from reset metrics
        (validated,) = trainer.validate(module, loader(xs, ys, batch_size=32), verbose=False)
        assert validated == pytest.approx(expected(xs, ys, "val_"), rel=1e-5)
    (tested,) = trainer.test(module, loader(x, y, batch_size=32), verbose=False)
    assert tested == pytest.approx(expected(x, y, "test_"), rel=1e-5)


def test_gan_trains_each_optimizer_on_its_own_model(digits):
    images = digit_images(digits, 32)
    gan = make_gan()
    before = {"discriminator": weights_of(gan.discriminator), "generator": weights_of(gan.generator)}
    seed_before = keras.ops.convert_to_numpy(gan.seed_generator.state).copy()
    module = kl.KerasLightningModule(gan)
    trainer = make_trainer(max_epochs=2)
    data = loader(images, images, batch_size=16)
    trainer.fit(module, data)

    assert set(trainer.callback_metrics) == {"d_loss", "g_loss"}
    for optimizer, owner in ((gan.d_optimizer, "discriminator"), (gan.g_optimizer, "generator")):
        assert int(optimizer.iterations) == trainer.max_epochs * len(data)  # one per batch
        owned = getattr(gan, owner).trainable_weights
        assert [id(v) for v in optimizer._trainable_variables] == [id(v) for v in owned]
        changed = [not np.allclose(a, b) for a, b in zip(before[owner], weights_of(getattr(gan, owner)), strict=True)]
        assert all(changed), (owner, changed)
    assert not gan.optimizer.built  # compile()'s default optimizer is never used
    assert not np.array_equal(seed_before, keras.ops.convert_to_numpy(gan.seed_generator.state))


def test_gan_optimizer_state_reaches_the_checkpoint_and_training_resumes_from_it(digits, tmp_path):
    images = digit_images(digits, 32)
    data = loader(images, images, batch_size=16)
    gan = make_gan()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(kl.KerasLightningModule(gan), data)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    saved = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
    for name in ("d_optimizer", "g_optimizer"):
        live = [keras.ops.convert_to_numpy(v) for v in getattr(gan, name).variables]
        assert saved[name]["keras_class"] == "Adam"
        assert len(live) == len(saved[name]["keras_variables"])
        for a, b in zip(live, saved[name]["keras_variables"], strict=True):
            np.testing.assert_array_equal(a, b.numpy())
    # The format of version 0.1.0 (values / paths / class) still loads.
    assert saved["optimizer"] == {"built": False}  # compile()'s default, never applied
    legacy = {
        name: {"built": True, "variable_positions": entry["variable_positions"],
               "values": entry["keras_variables"], "paths": entry["keras_variable_paths"],
               "class": entry["keras_class"]} if entry["built"] else entry
        for name, entry in saved.items()
        if entry["built"]
    }
    fresh = make_gan()
    trainer_for_fresh = make_trainer(max_epochs=1)
    trainer_for_fresh.fit(kl.KerasLightningModule(fresh), data)
    load_keras_optimizer_state(fresh, legacy)
    for name in ("d_optimizer", "g_optimizer"):
        for a, b in zip(getattr(fresh, name).variables, saved[name]["keras_variables"], strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), b.numpy())

    resumed = make_gan()
    trainer = make_trainer(max_epochs=2)
    trainer.fit(kl.KerasLightningModule(resumed), data, ckpt_path=path)
    # 1 epoch restored + 1 new one: Adam's step counts (and moments) came from the checkpoint.
    expected = trainer.max_epochs * len(data)
    assert int(resumed.d_optimizer.iterations) == int(resumed.g_optimizer.iterations) == expected


def test_gan_from_a_factory_is_built_in_configure_model_and_trains(digits):
    images = digit_images(digits, 32)
    module = kl.KerasLightningModule(make_gan)
    assert module.model is None and module.automatic_optimization is True  # not known yet
    trainer = make_trainer(max_epochs=1)
    data = loader(images, images, batch_size=16)
    trainer.fit(module, data)
    assert module.automatic_optimization is False
    d_steps, g_steps = int(module.model.d_optimizer.iterations), int(module.model.g_optimizer.iterations)
    assert d_steps == g_steps == trainer.max_epochs * len(data)
    assert set(trainer.callback_metrics) == {"d_loss", "g_loss"}


@pytest.mark.parametrize(
    ("build", "kwargs", "message"),
    [
        (lambda: dense_model(GuideModel), {}, r"not compiled.*model.compile\("),
        (
            lambda: _compiled(dense_model(GuideModel)),
            {"optimizer": "sgd"},
            r"optimizer='sgd'.*not used.*Drop `optimizer=`",
        ),
        (
            lambda: _compiled(dense_model(GuideModel)),
            {"lr_scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1)},
            r"lr_scheduler=.*LearningRateSchedule",
        ),
    ],
)
def test_keras_train_step_configuration_errors_name_the_fix(build, kwargs, message):
    x, y = regression_data(n=32)
    module = kl.KerasLightningModule(build(), **kwargs)
    with pytest.raises(kl.ConfigurationError, match=message):
        make_trainer().fit(module, loader(x, y))


def _compiled(model: keras.Model) -> keras.Model:
    model.compile(optimizer="adam", loss="mse")
    return model


def test_train_step_returning_a_non_dict_is_refused():
    class Bad(keras.Model):
        def train_step(self, data):
            return 1.5

    x, y = regression_data(n=32)
    model = _compiled(dense_model(Bad))
    with pytest.raises(kl.ConfigurationError, match=r"`train_step` must return a dict"):
        make_trainer().fit(kl.KerasLightningModule(model), loader(x, y))


def test_spawn_pickling_of_an_unpicklable_train_step_model_names_the_strategy_that_works():
    module = kl.KerasLightningModule(make_gan())
    with pytest.raises(kl.ConfigurationError, match=r"strategy='ddp_spawn'.*strategy='ddp'"):
        pickle.dumps(module)
    pickle.dumps(kl.KerasLightningModule(make_gan))  # a factory pickles


# ---------------------------------------------------------------------- Keras side, DDP

def run_ddp_script(template: str, out: Path) -> None:
    """Run ``template`` (formatted with ``tests`` and ``out``) as a 2-process DDP script."""
    script = out / "ddp_script.py"
    script.write_text(template.format(tests=str(ROOT / "tests"), out=str(out)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=out, env=env, capture_output=True, text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import keras_lightning as kl
import keras, lightning as L, numpy as np, torch
from test_keras_steps import make_gan

out = {out!r}
keras.utils.set_random_seed(0)
# Different data on each rank (the sampler splits it): gradients differ unless averaged.
images = torch.rand(128, 28, 28, 1)
gan = make_gan()
init = [keras.ops.convert_to_numpy(v).copy() for v in gan.trainable_variables]


class Save(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen = getattr(self, "seen", 0.0) + float(batch[0].sum())

    def on_train_end(self, trainer, module):
        arrays = [keras.ops.convert_to_numpy(v) for v in gan.trainable_variables]
        np.savez(f"{{out}}/rank{{trainer.global_rank}}.npz", *arrays)
        np.savez(f"{{out}}/init{{trainer.global_rank}}.npz", *init)
        np.save(f"{{out}}/meta{{trainer.global_rank}}.npy", np.array(
            [self.seen, int(gan.d_optimizer.iterations), int(gan.g_optimizer.iterations)]))


trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=[Save()],
)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, images), batch_size=16)
trainer.fit(kl.KerasLightningModule(gan), data)
torch.distributed.destroy_process_group()  # the script that asked for the processes ends them
"""


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_gan_under_ddp_keeps_weights_identical_across_ranks(tmp_path):
    run_ddp_script(DDP_SCRIPT, tmp_path)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    init = np.load(tmp_path / "init0.npz")
    meta = [np.load(tmp_path / f"meta{r}.npy") for r in (0, 1)]
    assert meta[0][0] != pytest.approx(meta[1][0])  # each rank trained on other images
    assert list(meta[0][1:]) == list(meta[1][1:]) == [4, 4]  # 128 / 16 / 2 ranks steps each
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        assert not np.allclose(ranks[0][key], init[key]), key


EVAL_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import keras_lightning as kl
import keras, lightning as L, torch
from test_keras_steps import EvalStepModel, RawLossEvalModel, dense_model, regression_data

x, y = regression_data(n=100)
model = dense_model(EvalStepModel)  # the same seed, so the same weights, on both ranks
model.compile(loss="mse", metrics=["mae"])
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
)
# Uneven shards, as the last shard of a real dataset is: rank 0 has 60 samples, rank 1 has 40.
rank = int(trainer.global_rank)
part = slice(0, 60) if rank == 0 else slice(60, 100)
data = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.as_tensor(x[part]), torch.as_tensor(y[part])),
    batch_size=16,
)
module = kl.KerasLightningModule(model)
(validated,) = trainer.validate(module, data, verbose=False)
(tested,) = trainer.test(module, data, verbose=False)
raw = dense_model(RawLossEvalModel)
raw.compile(loss="mse", metrics=["mae"])
(raw_validated,) = trainer.validate(kl.KerasLightningModule(raw), data, verbose=False)
with open(f"{out}/rank{{rank}}.json", "w") as f:
    json.dump({{"val": validated, "test": tested, "raw": raw_validated}}, f)
torch.distributed.destroy_process_group()  # the script that asked for the processes ends them
"""


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_custom_test_step_under_ddp_logs_exact_global_metrics(tmp_path):
    run_ddp_script(EVAL_DDP_SCRIPT, tmp_path)
    logged = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    x, y = regression_data(n=100)
    model = dense_model(EvalStepModel)
    kernel, bias = (keras.ops.convert_to_numpy(v) for v in model.weights)
    error = x @ kernel + bias - y
    shards = (error[:60], error[60:])
    batch_mse = [np.mean(s[i : i + 16] ** 2) for s in shards for i in range(0, len(s), 16)]
    expected = {"loss": float(np.mean(batch_mse)), "mae": float(np.abs(error).mean())}
    # What a mean of the two ranks' own results would give instead: not the global value.
    per_rank_mae = np.mean([np.abs(s).mean() for s in shards])
    assert abs(per_rank_mae - expected["mae"]) > 1e-3
    for stage, prefix in (("val", "val_"), ("test", "test_")):
        for rank in (0, 1):
            values = logged[rank][stage]
            assert values == pytest.approx(
                {prefix + name: value for name, value in expected.items()}, rel=1e-5
            ), (stage, rank)
    # A raw batch loss returned under "loss" (the compiled model's loss tracker, never updated
    # by this step, has the same name): not replaced by that tracker's 0, but the mean over
    # ranks of each rank's last batch loss, as Lightning's sync_dist gives.
    last_batch_mse = [np.mean(s[(len(s) - 1) // 16 * 16 :] ** 2) for s in shards]
    for rank in (0, 1):
        assert logged[rank]["raw"] == pytest.approx(
            {"val_loss": float(np.mean(last_batch_mse)), "val_mae": expected["mae"]}, rel=1e-5
        )


# ---------------------------------------------------------------------- Lightning side


class LightningSideRegression(kl.KerasLightningModule):
    """The guide's first train_step, written as a Lightning training_step with the helpers."""

    def __init__(self, model: keras.Model, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y, sample_weight = self.unpack_batch(batch)
        y_pred = self(x, training=True)
        loss, _ = self.compute_loss(y_pred, y, sample_weight)
        self.backward_and_step(loss)
        self.update_metrics(y_pred, y, sample_weight, loss=loss)


def test_lightning_side_step_matches_the_built_in_step():
    x, y = regression_data()
    epochs, batch_size = 3, 32
    args = dict(loss="mse", metrics=["mae"])
    custom = LightningSideRegression(dense_model(keras.Model), optimizer=keras.optimizers.SGD(0.05), **args)
    builtin = kl.KerasLightningModule(dense_model(keras.Model), optimizer=keras.optimizers.SGD(0.05), **args)
    results = []
    for module in (custom, builtin):
        logs = EpochLogs()
        trainer = make_trainer(max_epochs=epochs, callbacks=[logs])
        trainer.fit(module, loader(x, y, batch_size=batch_size))
        results.append((logs.epochs, weights_of(module.model)))
    # The reference: Keras' own fit on the same data, order and initial weights.
    reference = dense_model(keras.Model)
    reference.compile(optimizer=keras.optimizers.SGD(0.05), **args)
    history = reference.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0
    ).history
    keras_logs = [{name: history[name][e] for name in ("loss", "mae")} for e in range(epochs)]
    keras_weights = weights_of(reference)
    (custom_logs, custom_weights), (builtin_logs, builtin_weights) = results
    assert custom.automatic_optimization is False and builtin.automatic_optimization is True
    assert set(custom_logs[-1]) == {"loss", "mae"}
    assert len(custom_logs) == len(builtin_logs) == epochs
    for logs in (custom_logs, builtin_logs):
        for a, b in zip(logs, keras_logs, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["mae"] == pytest.approx(b["mae"], rel=1e-5)
    for weights in (custom_weights, builtin_weights):
        for a, b in zip(weights, keras_weights, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert custom_logs[-1]["loss"] < 0.8 * custom_logs[0]["loss"]


class LightningSideGAN(kl.KerasLightningModule):
    """The GAN as a Lightning training_step: two KerasOptimizers, manual optimization."""

    def __init__(self, steps: tuple[str, ...] = ("d", "g")) -> None:
        discriminator, generator = gan_parts()
        super().__init__(keras.Sequential([generator, discriminator]))
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.steps = steps
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
        fake = self.generator(torch.randn(n, LATENT), training=True)
        logits = self.discriminator(torch.cat([fake.detach(), real]), training=True)
        labels = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])
        d_loss = self.loss_fn(labels, logits)
        if "d" in self.steps:
            self.backward_and_step(d_loss, d_opt)
        fake = self.generator(torch.randn(n, LATENT), training=True)
        g_loss = self.loss_fn(torch.zeros(n, 1), self.discriminator(fake, training=True))
        if "g" in self.steps:
            self.backward_and_step(g_loss, g_opt)
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)


@pytest.mark.parametrize("steps", [("d",), ("g",), ("d", "g")])
def test_lightning_side_gan_changes_only_the_weights_each_optimizer_owns(digits, steps):
    images = digit_images(digits, 32)
    module = LightningSideGAN(steps)
    before = {"d": weights_of(module.discriminator), "g": weights_of(module.generator)}
    trainer = make_trainer(max_epochs=1)
    data = loader(images, batch_size=16)
    trainer.fit(module, data)
    assert set(trainer.callback_metrics) == {"d_loss", "g_loss"}
    d_opt, g_opt = trainer.optimizers
    for key, optimizer, owner in (("d", d_opt, module.discriminator), ("g", g_opt, module.generator)):
        after = weights_of(owner)
        changed = [not np.array_equal(a, b) for a, b in zip(before[key], after, strict=True)]
        assert all(changed) if key in steps else not any(changed), (key, changed)
        stepped = trainer.max_epochs * len(data)
        assert int(optimizer.keras_optimizer.iterations) == (stepped if key in steps else 0)


def test_backward_and_step_errors_name_the_fix():
    class Automatic(kl.KerasLightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss, _ = self.compute_loss(self(x, training=True), y)
            self.backward_and_step(loss)

    x, y = regression_data(n=32)
    with pytest.raises(kl.ConfigurationError, match=r"self.automatic_optimization = False"):
        make_trainer().fit(Automatic(dense_model(keras.Model), optimizer="sgd", loss="mse"), loader(x, y))

    class Two(LightningSideGAN):
        def training_step(self, batch, batch_idx):
            self.backward_and_step(self.discriminator(batch[0]).mean())

    images = torch.rand(16, 28, 28, 1)
    with pytest.raises(kl.ConfigurationError, match=r"2 optimizers.*self.backward_and_step\(loss, opt_d\)"):
        make_trainer().fit(Two(), loader(images, batch_size=16))


def test_lightning_side_gan_resumes_both_keras_optimizers_from_a_checkpoint(digits, tmp_path):
    images = digit_images(digits, 32)
    data = loader(images, batch_size=16)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(LightningSideGAN(), data)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)

    resumed = LightningSideGAN()
    trainer = make_trainer(max_epochs=2)
    trainer.fit(resumed, data, ckpt_path=path)
    d_opt, g_opt = trainer.optimizers
    expected = trainer.max_epochs * len(data)  # the checkpoint's epoch, then one more
    assert int(d_opt.keras_optimizer.iterations) == int(g_opt.keras_optimizer.iterations) == expected


# ---------------------------------------------------------------------- examples

EXAMPLES = {
    "custom_train_step.py": ["loss", "mae"],
    "custom_train_step_lowlevel.py": ["loss", "mae"],
    "sample_weight.py": ["loss", "mae"],
    "custom_test_step.py": ["test_loss", "val_mae"],
    "lightning_side_custom_step.py": ["loss", "mae"],
    "gan.py": ["d_loss", "g_loss"],
}


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every example once in fast mode, two at a time (each is mostly interpreter start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("custom_step_examples")

    def run(script: str) -> Any:
        command = [sys.executable, str(ROOT / "examples" / script)]
        if script == "gan.py":
            command += ["--out", str(folder / "grid.png")]
        try:
            return subprocess.run(
                command, cwd=folder, env=dict(os.environ, KL_FAST="1"), capture_output=True,
                text=True, timeout=200,
            )
        except subprocess.TimeoutExpired as error:
            return error

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(sorted(EXAMPLES), pool.map(run, sorted(EXAMPLES)), strict=True))
    results["folder"] = folder
    return results


@pytest.mark.parametrize("script", sorted(EXAMPLES))
@pytest.mark.timeout(600)
def test_custom_step_example_runs_in_fast_mode(example_runs, script):
    result = example_runs[script]
    assert not isinstance(result, subprocess.TimeoutExpired), f"{script} ran past 200 s"
    assert result.returncode == 0, result.stderr[-3000:]
    for key in EXAMPLES[script]:
        assert key in result.stdout, result.stdout[-2000:]
    if script == "gan.py":
        png = (example_runs["folder"] / "grid.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_keras_train_step_counts_global_steps_so_max_steps_stops_training():
    from checkpoint_worker import build_gan, loaders

    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = kl.KerasLightningModule(build_gan())
    trainer.fit(module, loaders()[0])
    assert trainer.global_step == trainer.max_steps
    assert int(module.model.d_optimizer.iterations) == trainer.max_steps
    assert trainer.max_steps < len(loaders()[0])  # it stopped within the first epoch
