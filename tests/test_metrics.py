"""Epoch metrics are exact values over the whole epoch, under Keras' names."""

from __future__ import annotations

import keras_lightning as kl

import keras
import numpy as np
import pytest
import torch
import torchmetrics
from conftest import loader, make_trainer, mlp


def logits_of(model, x):
    return keras.ops.convert_to_numpy(model(torch.tensor(x), training=False))


def test_val_categorical_accuracy_is_the_full_validation_set_accuracy(digits):
    # 397 samples in batches of 32: the last batch has 13, so a mean of batch accuracies differs.
    model = mlp(hidden=16)
    module = kl.KerasLightningModule(
        model,
        optimizer="adam",
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["categorical_accuracy", keras.metrics.AUC(from_logits=True, name="auc")],
    )
    one_hot = np.eye(10, dtype="float32")
    trainer = make_trainer(max_epochs=2)
    trainer.fit(
        module,
        loader(digits["x_train"], one_hot[digits["y_train"]], shuffle=True),
        loader(digits["x_val"], one_hot[digits["y_val"]]),
    )
    logits = logits_of(model, digits["x_val"])
    accuracy = (logits.argmax(1) == digits["y_val"]).mean()
    batch_means = [
        (logits[i : i + 32].argmax(1) == digits["y_val"][i : i + 32]).mean()
        for i in range(0, 397, 32)
    ]
    assert abs(np.mean(batch_means) - accuracy) > 1e-4  # the test can tell the two apart
    assert float(trainer.callback_metrics["val_categorical_accuracy"]) == pytest.approx(accuracy)
    auc = keras.metrics.AUC(from_logits=True)
    auc.update_state(one_hot[digits["y_val"]], logits)
    assert float(trainer.callback_metrics["val_auc"]) == pytest.approx(
        float(auc.result()), abs=1e-6
    )
    ce = keras.losses.CategoricalCrossentropy(from_logits=True)(one_hot[digits["y_val"]], logits)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert {"loss", "val_loss"} <= set(trainer.progress_bar_metrics)


def test_training_epoch_metric_covers_the_whole_epoch(digits):
    # A learning rate of zero keeps the weights fixed, so the epoch value is computable.
    model = mlp(hidden=16)
    module = kl.KerasLightningModule(
        model,
        optimizer=keras.optimizers.SGD(0.0),
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["sparse_categorical_accuracy", "accuracy"],
    )
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, loader(digits["x_train"], digits["y_train"]))
    logits = logits_of(model, digits["x_train"])
    accuracy = (logits.argmax(1) == digits["y_train"]).mean()
    assert float(trainer.callback_metrics["sparse_categorical_accuracy"]) == pytest.approx(accuracy)
    assert float(trainer.callback_metrics["accuracy"]) == pytest.approx(accuracy)
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(digits["y_train"]))
    assert float(trainer.callback_metrics["loss"]) == pytest.approx(float(ce), rel=1e-5)


def test_metric_state_is_reset_between_evaluations(digits):
    model = mlp(hidden=16)
    module = kl.KerasLightningModule(
        model,
        optimizer="adam",
        loss=torch.nn.CrossEntropyLoss(),
        metrics=["sparse_categorical_accuracy"],
    )
    trainer = make_trainer()
    first = trainer.test(module, loader(digits["x_train"], digits["y_train"]))[0]
    second = trainer.test(module, loader(digits["x_val"][:100], digits["y_val"][:100]))[0]
    logits = logits_of(model, digits["x_val"][:100])
    assert second["test_sparse_categorical_accuracy"] == pytest.approx(
        (logits.argmax(1) == digits["y_val"][:100]).mean()
    )
    assert first["test_sparse_categorical_accuracy"] != second["test_sparse_categorical_accuracy"]


def test_torchmetrics_are_registered_and_exact(digits):
    accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")
    model = mlp(hidden=16)
    module = kl.KerasLightningModule(
        model, optimizer="adam", loss=torch.nn.CrossEntropyLoss(), metrics=[accuracy]
    )
    assert any(m is accuracy for m in module.modules())
    result = make_trainer().validate(module, loader(digits["x_val"], digits["y_val"]))[0]
    logits = logits_of(model, digits["x_val"])
    assert result["val_multiclass_accuracy"] == pytest.approx(
        (logits.argmax(1) == digits["y_val"]).mean()
    )


def test_only_weighted_metrics_receive_sample_weight(digits):
    rng = np.random.default_rng(0)
    x = digits["x_val"]
    y = rng.normal(size=(len(x), 1)).astype("float32")
    sw = rng.uniform(0, 2, size=(len(x),)).astype("float32")
    model = mlp(classes=1, hidden=8)
    module = kl.KerasLightningModule(
        model, optimizer="adam", loss="mse", metrics=["mae"], weighted_metrics=["mse"]
    )
    result = make_trainer().validate(module, loader(x, y, sw))[0]
    error = logits_of(model, x) - y
    assert result["val_mae"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert result["val_mse"] == pytest.approx((sw * error[:, 0] ** 2).sum() / sw.sum(), rel=1e-5)
    # Keras' loss with sample weights: sum(w * l) / N.
    assert result["val_loss"] == pytest.approx((sw * error[:, 0] ** 2).sum() / len(x), rel=1e-5)
