"""Public architectures, built offline, trained by Keras' ``fit()`` and by the module side by side.

``keras.applications`` at small input sizes, a keras_hub task built from its config, an LSTM
over masked sequences: each is compiled as its author would, trained for one epoch on the same
batches from the same initial weights, and compared on epoch values (train and validation) and
weights. Dropout is off (``dropout_rate=0``): unseeded Keras ``Dropout`` on the torch backend
draws from torch's global generator, which each DataLoader iterator also advances, and Keras'
``fit`` and Lightning create their iterators a different number of times. Seeded layers match
exactly (``tests/test_fit_parity.py``).
"""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest
from conftest import loader
from parity import (
    assert_same_history,
    assert_same_weights,
    bert_batches,
    keras_fit,
    lightning_fit,
    tiny_bert_classifier,
)


def _images(count: int, seed: int, size: int = 32, classes: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=(count, size, size, 3)).astype("float32")
    y = rng.integers(0, classes, size=count).astype("int64")
    return x, y


def _compiled(model: keras.Model) -> keras.Model:
    model.compile(
        keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )
    return model


APPLICATIONS = {
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=4, dropout_rate=0.0
    ),
    # a head on the backbone, as for fine-tuning (the top's Dropout is unseeded; the blocks'
    # stochastic depth draws from its layers' seeded generators)
    "EfficientNetB0": lambda: keras.Sequential([
        keras.applications.EfficientNetB0(
            input_shape=(32, 32, 3), weights=None, include_top=False, pooling="avg"
        ),
        keras.layers.Dense(4, activation="softmax"),
    ]),
    "ResNet50": lambda: keras.applications.ResNet50(
        input_shape=(32, 32, 3), weights=None, classes=4
    ),
}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_keras_applications_train_as_under_keras_fit(name):
    def make():
        keras.utils.set_random_seed(21)
        return _compiled(APPLICATIONS[name]())

    x, y = _images(32, seed=1)
    xv, yv = _images(16, seed=2)
    reference, history = keras_fit(make, x, y, batch_size=16, epochs=1, validation_data=(xv, yv))
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=16), loader(xv, yv, batch_size=16), epochs=1
    )
    assert set(history) == {"loss", "sparse_categorical_accuracy", "val_loss",
                            "val_sparse_categorical_accuracy"}
    # BatchNorm over float32 convolutions: the same ops in the same order, so equal within
    # float rounding
    assert_same_history(history, logged, atol=1e-4)
    assert_same_weights(reference, model, atol=1e-4)


def test_masked_lstm_classifier_with_a_frozen_embedding_trains_as_under_keras_fit():
    rng = np.random.default_rng(3)
    x = rng.integers(1, 50, size=(64, 12))
    x[np.arange(12)[None, :] >= rng.integers(3, 13, size=64)[:, None]] = 0
    y = (x.sum(axis=1) % 2).astype("float32")[:, None]

    def make():
        keras.utils.set_random_seed(22)
        embedding = keras.layers.Embedding(50, 8, mask_zero=True)
        model = keras.Sequential([
            keras.Input((12,), dtype="int64"),
            embedding,
            keras.layers.Bidirectional(keras.layers.LSTM(8)),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        embedding.trainable = False
        model.compile("adam", "binary_crossentropy", metrics=["accuracy", "auc"])
        return model

    reference, history = keras_fit(make, x, y, batch_size=16, epochs=2, validation_data=(x, y))
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=16), loader(x, y, batch_size=16), epochs=2
    )
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


@pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None, reason="needs keras-hub")
def test_keras_hub_text_classifier_from_config_trains_as_under_keras_fit():
    def make():
        return tiny_bert_classifier(seed=23)

    features, labels, data = bert_batches(seed=4, n=32)
    reference, history = keras_fit(
        make, features, labels, batch_size=8, epochs=1, validation_data=(features, labels)
    )
    model, logged, module = lightning_fit(make, data, data, epochs=1)
    # every variable is a parameter Lightning sees (the task registers none by itself)
    assert sum(p.numel() for p in module.parameters()) == sum(
        int(np.prod(v.shape)) for v in model.variables
    )
    assert {"loss", "val_loss"} <= set(history)
    assert_same_history(history, logged)
    assert_same_weights(reference, model)
