"""Adapter checkpoints (``checkpoint_weights="trainable"``) on a plain Keras model: what is
kept (trained weights, state training changed), what is left out, and loading onto a base."""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning import adapters

import keras
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer


def frozen_base_with_a_batchnorm_head() -> keras.Model:
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="base"),
            keras.layers.BatchNormalization(name="head_norm"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model.get_layer("base").trainable = False
    return model


def data():
    rng = np.random.default_rng(0)
    return loader(rng.normal(size=(32, 8)).astype("float32"),
                  rng.integers(0, 3, size=32).astype("int64"), batch_size=8)


def module(**kwargs):
    return kl.KerasLightningModule(
        frozen_base_with_a_batchnorm_head(), optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        checkpoint_weights="trainable", **kwargs,
    )


def test_moving_statistics_are_kept_and_the_frozen_base_is_left_out(tmp_path):
    trained = module()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(trained, data())
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    saved = torch.load(tmp_path / "adapter.ckpt", weights_only=True)
    kept = {key.split(".", 3)[-1] for key in saved["state_dict"]}
    assert {"head_norm/moving_mean", "head_norm/moving_variance", "head/kernel"} <= kept
    assert not kept & {"base/kernel", "base/bias"}
    assert set(saved[adapters.KEY]["left_out"]) == {
        "model.variables.0.base/kernel", "model.variables.1.base/bias"
    }

    restored = kl.KerasLightningModule.load_from_checkpoint(
        tmp_path / "adapter.ckpt", model=frozen_base_with_a_batchnorm_head()
    )
    for a, b in zip(restored.model.variables, trained.model.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_a_frozen_weight_moved_by_one_ulp_or_transposed_counts_as_changed():
    weight = torch.linspace(1.0, 10.0, 64 * 64).reshape(64, 64)
    nudged = weight.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(100.0))
    base = adapters.fingerprint(weight)
    assert adapters.fingerprint(weight.clone()) == base
    assert adapters.fingerprint(nudged) != base  # strip compares exactly
    assert adapters.fingerprint(weight.T.contiguous()) != base
    assert not adapters._same(adapters.fingerprint(weight.T.contiguous()), base)


def test_a_base_of_another_dtype_is_refused_as_such(tmp_path):
    trained = module()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(trained, data())
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    other = frozen_base_with_a_batchnorm_head()
    layer = other.get_layer("base")
    layer.kernel.assign(layer.kernel.numpy() + 1.0)
    with pytest.raises(kl.CheckpointError, match=r"(?s)base weights differ.*base/kernel: other"):
        kl.KerasLightningModule.load_from_checkpoint(tmp_path / "adapter.ckpt", model=other)
