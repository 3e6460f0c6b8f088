"""One test per error the package raises: the error class and a distinctive fragment of its text.

Each error is reached through the public API (a Trainer, ``load_from_checkpoint``, the module's
methods) where one reaches it; the checkpoint-internal checks are called directly.
"""

from __future__ import annotations

import keras_lightning as kl  # (first: selects Keras' torch backend)
from keras_lightning import optimizer_state
from keras_lightning.data import align_targets, batch_size_of
from keras_lightning.keras_optimizers import keras_optimizer_state, load_keras_optimizer_state
from keras_lightning.losses import resolve_loss

import re

import keras
import lightning as L
import numpy as np
import pytest
import torch
import torchmetrics
from conftest import loader, make_trainer, mlp


def _xy(n: int = 16, features: int = 64, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, classes, size=(n,)).astype("int64")
    return x, y


def _saved_checkpoint(tmp_path, module: L.LightningModule, data) -> str:
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, data)
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return path


# ------------------------------------------------------------------------- checkpoint/config


class Unserializable(keras.Model):
    """A subclassed model whose constructor takes an argument get_config does not return."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)


def test_a_model_without_get_config_cannot_be_rebuilt_from_its_checkpoint(tmp_path) -> None:
    x, y = _xy()
    model = Unserializable(10)
    path = _saved_checkpoint(
        tmp_path, kl.KerasLightningModule(model, optimizer="sgd", loss="crossentropy"), loader(x, y)
    )
    # The save succeeded (the config failure is recorded), but rebuilding needs the model.
    with pytest.raises(kl.CheckpointError, match="holds no Keras model config") as info:
        kl.KerasLightningModule.load_from_checkpoint(path)
    assert "cannot be serialized" in str(info.value)
    assert "model=build_model()" in str(info.value)


def test_model_config_refuses_a_model_that_cannot_be_serialized() -> None:
    from keras_lightning.checkpoint.config import model_config

    model = Unserializable(3)
    model(np.zeros((1, 2), "float32"))
    with pytest.raises(kl.CheckpointError, match="Unserializable cannot be serialized"):
        model_config(model)


# -------------------------------------------------------------------------- checkpoint/files


def test_a_file_without_a_state_dict_is_not_a_lightning_checkpoint(tmp_path) -> None:
    path = tmp_path / "not_a_checkpoint.ckpt"
    torch.save({"a": 1}, path)
    with pytest.raises(kl.CheckpointError, match="is not a Lightning checkpoint"):
        kl.KerasLightningModule.load_from_checkpoint(path)


# ------------------------------------------------------------------------ checkpoint/loading


class PlainModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_plain_lightning_checkpoint_was_not_written_by_a_keras_module(tmp_path) -> None:
    x, y = _xy()
    path = _saved_checkpoint(tmp_path, PlainModule(), loader(x, y))
    with pytest.raises(kl.CheckpointError, match="was not written by a KerasLightningModule"):
        kl.KerasLightningModule.load_from_checkpoint(path)
    with pytest.raises(kl.CheckpointError, match="was not written by a KerasLightningModule"):
        kl.model_from_checkpoint(path)


def _keras_checkpoint(tmp_path) -> str:
    x, y = _xy()
    module = kl.KerasLightningModule(mlp(), optimizer="sgd", loss="crossentropy")
    return _saved_checkpoint(tmp_path, module, loader(x, y))


def test_model_from_checkpoint_lists_the_variables_missing_from_the_state_dict(tmp_path) -> None:
    path = _keras_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["state_dict"]["model.variables.1.dense/bias"]
    torch.save(checkpoint, path)
    with pytest.raises(
        kl.CheckpointError,
        match=r"(?s)Missing from the checkpoint \(1\):\s+model\.variables\.1\.dense/bias",
    ):
        kl.model_from_checkpoint(path)


def test_model_from_checkpoint_reports_a_variable_of_another_shape(tmp_path) -> None:
    path = _keras_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"]["model.variables.1.dense/bias"] = torch.zeros(5)
    torch.save(checkpoint, path)
    with pytest.raises(
        kl.CheckpointError,
        match=re.escape("model.variables.1.dense/bias: checkpoint (5,), model (32,)"),
    ):
        kl.model_from_checkpoint(path)


# ------------------------------------------------------------------------- keras_optimizers


def test_an_optimizer_that_updates_another_models_variables_cannot_be_saved() -> None:
    model, other = mlp(), mlp(seed=1)
    model.d_optimizer = keras.optimizers.SGD()
    model.d_optimizer.build(other.trainable_variables)
    with pytest.raises(
        kl.CheckpointError, match=r"`model\.d_optimizer` updates the variable .*not one of"
    ):
        keras_optimizer_state(model)


def test_optimizer_state_for_a_larger_model_is_refused() -> None:
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    count = len(model.variables)
    saved = {"optimizer": {"built": True, "variable_positions": [0, count]}}
    with pytest.raises(
        kl.CheckpointError,
        match=rf"`model\.optimizer` updated variable #{count}, but the model has only {count} ",
    ):
        load_keras_optimizer_state(model, saved)


def test_optimizer_state_of_another_shape_is_refused() -> None:
    small, large = mlp(hidden=8), mlp(hidden=16)
    for model in (small, large):
        model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
        model.optimizer.build(model.trainable_variables)
    state = optimizer_state.capture(small.optimizer)
    with pytest.raises(kl.CheckpointError, match=r"has shape \(64, 8\) in the checkpoint but"):
        optimizer_state.restore(large.optimizer, state)


# ---------------------------------------------------------------------------- keras_steps


class OwnStep(keras.Sequential):
    def train_step(self, data):
        x, y = data
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        loss.backward()
        variables = list(self.trainable_weights)
        with torch.no_grad():
            self.optimizer.apply([v.value.grad for v in variables], variables)
        return {"loss": loss}


def test_gradient_clipping_cannot_act_on_a_keras_train_step() -> None:
    model = OwnStep([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    module = kl.KerasLightningModule(model)
    # trainer.fit stops earlier, at Lightning's own check for manual optimization; the
    # package's check is reached when configure_optimizers runs under a clipping Trainer.
    module.trainer = make_trainer(max_steps=1, gradient_clip_val=1.0)
    with pytest.raises(
        kl.ConfigurationError,
        match=r"Trainer\(gradient_clip_val=1\.0\) cannot act on a Keras train_step",
    ):
        module.configure_optimizers()
    module.trainer = make_trainer(max_steps=1)
    assert module.configure_optimizers() == []


# --------------------------------------------------------------------------------- module


def test_update_metrics_refuses_an_unknown_stage() -> None:
    module = kl.KerasLightningModule(mlp(), optimizer="sgd", loss="crossentropy", metrics=["mae"])
    with pytest.raises(kl.ConfigurationError, match=r"update_metrics\(stage='predict'\)"):
        module.update_metrics(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), stage="predict")


def test_an_unbuilt_model_has_no_trainable_variables_to_optimize() -> None:
    model = keras.Sequential([keras.layers.Dense(10)])
    module = kl.KerasLightningModule(model, optimizer="sgd", loss="mse")
    with pytest.raises(kl.ConfigurationError, match="no trainable variables yet"):
        module.configure_optimizers()


def test_an_lr_scheduler_factory_must_return_a_torch_scheduler() -> None:
    x, y = _xy()
    module = kl.KerasLightningModule(
        mlp(), optimizer="sgd", loss="crossentropy", lr_scheduler=lambda optimizer: optimizer
    )
    with pytest.raises(
        kl.KerasLightningTypeError,
        match="`lr_scheduler` was called with the optimizer and returned an optimizer, SGD",
    ):
        make_trainer(max_steps=1).fit(module, loader(x, y))


# ----------------------------------------------------------------------------------- data


def test_the_batch_size_needs_a_tensor_with_a_batch_dimension() -> None:
    with pytest.raises(kl.BatchError, match="Could not find the batch size") as info:
        batch_size_of([])
    assert "received list" in str(info.value)
    with pytest.raises(kl.BatchError, match="Could not find the batch size"):
        batch_size_of({"a": torch.tensor(3.0)})


def test_targets_must_match_the_outputs_in_number() -> None:
    with pytest.raises(kl.ShapeMismatchError, match=r"holds 3 targets but the model has 2 outputs"):
        align_targets([1, 2, 3], ["a", "b"])


# --------------------------------------------------------------------------------- losses


def test_crossentropy_needs_the_shapes_of_a_batch() -> None:
    with pytest.raises(
        kl.ConfigurationError, match="`loss='crossentropy'` is resolved from the shapes"
    ):
        resolve_loss("crossentropy", None, None)


# -------------------------------------------------------------------------------- metrics


def test_metrics_entries_must_be_metric_names_or_objects() -> None:
    with pytest.raises(
        kl.KerasLightningTypeError, match="`metrics` entries must be Keras metric names or objects"
    ):
        kl.KerasLightningModule(mlp(), optimizer="sgd", loss="mse", metrics=[3])


# ------------------------------------------------------------------------------ objective


def test_class_weight_applies_to_single_output_models_only() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="x")
    model = keras.Model(
        inputs,
        {"a": keras.layers.Dense(10, name="a")(inputs), "b": keras.layers.Dense(10, name="b")(inputs)},
    )
    x, y = _xy()
    module = kl.KerasLightningModule(
        model, optimizer="sgd", loss="sparse_categorical_crossentropy", class_weight={0: 2.0}
    )
    data = torch.utils.data.DataLoader(
        [(xi, {"a": yi, "b": yi}) for xi, yi in zip(torch.as_tensor(x), torch.as_tensor(y), strict=True)],
        batch_size=8,
    )
    with pytest.raises(kl.ConfigurationError, match="`class_weight` applies to single-output"):
        make_trainer(max_steps=1).fit(module, data)


def test_a_loss_needs_targets_in_the_batch() -> None:
    x, _ = _xy()
    data = torch.utils.data.DataLoader(torch.as_tensor(x), batch_size=8)
    module = kl.KerasLightningModule(mlp(), optimizer="sgd", loss="mse")
    with pytest.raises(kl.ShapeMismatchError, match="needs targets, but the batch has no y"):
        make_trainer(max_steps=1).fit(module, data)


def test_training_without_a_loss_has_nothing_to_minimize() -> None:
    x, y = _xy()
    module = kl.KerasLightningModule(mlp(), optimizer="sgd", loss=None)
    with pytest.raises(kl.ConfigurationError, match="There is no loss to minimize"):
        make_trainer(max_steps=1).fit(module, loader(x, y))


# ----------------------------------------------------------------------------- optimizers


def test_keras_optimizer_wraps_only_keras_optimizers() -> None:
    model = mlp()
    with pytest.raises(
        kl.KerasLightningTypeError, match="KerasOptimizer expects a keras.optimizers.Optimizer"
    ) as info:
        kl.KerasOptimizer(torch.optim.SGD, model.trainable_variables)
    assert "received type" in str(info.value)


def test_keras_optimizer_needs_variables_to_train() -> None:
    with pytest.raises(kl.ConfigurationError, match="has no variables to train"):
        kl.KerasOptimizer(keras.optimizers.SGD(), [])


# ---------------------------------------------------------------------- classes for objects


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(optimizer=keras.optimizers.Adam, loss="mse"),
         r"`optimizer=Adam` is a class, but an object is expected: pass optimizer=keras\.optimizers\.Adam\(1e-3\) or 'adam'"),
        (dict(optimizer="sgd", loss=torch.nn.CrossEntropyLoss),
         r"`loss=CrossEntropyLoss` is a class, but an object is expected: pass loss=torch\.nn\.CrossEntropyLoss\(\)"),
        (dict(optimizer="sgd", loss="mse", metrics=[torchmetrics.MeanAbsoluteError]),
         r"`metrics=MeanAbsoluteError` is a class, but an object is expected: pass metrics=\[torchmetrics\.MeanAbsoluteError\(\.\.\.\)\]"),
    ],
    ids=["keras_optimizer_class", "torch_loss_class", "torchmetrics_class"],
)
def test_a_class_where_an_object_is_expected_is_named(kwargs, match):
    with pytest.raises(kl.KerasLightningTypeError, match=match):
        module = kl.KerasLightningModule(mlp(hidden=4), **kwargs)
        make_trainer(max_epochs=1).fit(module, loader(torch.randn(4, 64), torch.randn(4, 10)))


def test_keras_loss_and_metric_classes_work_as_in_keras_compile():
    # Keras' compile instantiates a loss or metric class: so does the module. With a zero
    # learning rate the weights stay, so the epoch values equal Keras' evaluate.
    x, y = torch.randn(8, 64), torch.randn(8, 10)
    model = mlp(hidden=4)
    module = kl.KerasLightningModule(
        model, optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.MeanSquaredError,
        metrics=[keras.metrics.MeanAbsoluteError],
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, loader(x, y, batch_size=8))
    model.compile(loss=keras.losses.MeanSquaredError, metrics=[keras.metrics.MeanAbsoluteError])
    reference = model.evaluate(x.numpy(), y.numpy(), batch_size=8, verbose=0, return_dict=True)
    assert float(trainer.callback_metrics["loss"]) == pytest.approx(reference["loss"], rel=1e-6)
    assert float(trainer.callback_metrics["mean_absolute_error"]) == pytest.approx(
        reference["mean_absolute_error"], rel=1e-6
    )


def test_one_keras_optimizer_shared_by_two_modules_is_refused_clearly():
    shared = keras.optimizers.Adam(1e-3)
    data = loader(torch.randn(4, 64), torch.randn(4, 10))
    make_trainer(max_epochs=1).fit(
        kl.KerasLightningModule(mlp(hidden=4), optimizer=shared, loss="mse"), data
    )
    second = kl.KerasLightningModule(mlp(hidden=4, seed=1), optimizer=shared, loss="mse")
    with pytest.raises(kl.ConfigurationError, match=r"already built for other variables .* its own optimizer object"):
        make_trainer(max_epochs=1).fit(second, data)


def test_an_empty_dataloader_with_an_unbuilt_model_is_named():
    model = keras.Sequential([keras.layers.Dense(2)])  # no Input: built from the first batch
    module = kl.KerasLightningModule(model, optimizer="sgd", loss="mse")
    empty = loader(torch.randn(0, 3), torch.randn(0, 2))
    with pytest.raises(kl.BatchError, match="The dataloader yielded no batch, so the Keras model"):
        make_trainer(max_epochs=1).fit(module, empty)
