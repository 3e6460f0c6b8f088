"""Errors from the objective say what is actually wrong: hints come from the data, not a guess."""

from __future__ import annotations

import keras_lightning as kl

import keras
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp


def _fit(loss, x, y, *weights, batch_size=8):
    module = kl.KerasLightningModule(mlp(hidden=4), optimizer="sgd", loss=loss)
    make_trainer(max_epochs=1).fit(module, loader(x, y, *weights, batch_size=batch_size))


X = np.random.default_rng(0).normal(size=(8, 64)).astype("float32")
LABELS = np.arange(8) % 10


def test_integer_labels_with_a_categorical_loss_get_the_sparse_hint():
    with pytest.raises(kl.ShapeMismatchError, match=r"y looks like integer class labels.*sparse_categorical_crossentropy"):
        _fit("categorical_crossentropy", X, LABELS)


def test_one_hot_targets_with_a_sparse_loss_get_the_one_hot_hint():
    one_hot = np.eye(10, dtype="float32")[LABELS]
    with pytest.raises(kl.ShapeMismatchError, match=r"like one-hot targets, but a sparse loss wants integer class labels"):
        _fit(keras.losses.SparseCategoricalCrossentropy(from_logits=True), X, one_hot)


@pytest.mark.parametrize(
    "loss",
    [keras.losses.SparseCategoricalCrossentropy(from_logits=True), torch.nn.CrossEntropyLoss()],
    ids=["keras", "torch"],
)
def test_a_label_out_of_range_is_named_not_taken_for_a_shape_problem(loss):
    labels = LABELS.copy()
    labels[3] = 12  # 10 classes: 0..9
    with pytest.raises(kl.ShapeMismatchError, match=r"class labels from 0 to 12, but the output has 10 columns.*out of range") as info:
        _fit(loss, X, labels)
    assert "looks like integer class labels" not in str(info.value)


@pytest.mark.parametrize(
    ("weights", "shape"),
    [(np.ones(6, dtype="float32"), r"\(6,\)"), (np.ones((8, 10, 2), dtype="float32"), r"\(8, 10, 2\)")],
    ids=["wrong_length", "wrong_rank"],
)
def test_a_sample_weight_that_cannot_weigh_the_batch_is_named(weights, shape):
    # A DataLoader cannot carry weights of another length per batch: build the batch by hand.
    module = kl.KerasLightningModule(
        mlp(hidden=4), optimizer="sgd", loss="sparse_categorical_crossentropy"
    )
    batch = (torch.as_tensor(X), torch.as_tensor(LABELS), torch.as_tensor(weights))
    with pytest.raises(kl.BatchError, match=rf"sample_weight has shape {shape}, but output .* expected one weight per sample, shape \(8,\)"):
        y_pred = module(batch[0], training=True)
        module.compute_loss(y_pred, batch[1], batch[2])


def test_valid_weights_and_labels_still_train():
    weights = np.linspace(0.5, 1.5, 8).astype("float32")
    _fit("sparse_categorical_crossentropy", X, LABELS, weights)
