"""KerasLightningModule under a real lightning.Trainer: losses, weights, structures, errors."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp


class FirstBatchLoss(L.Callback):
    """Records the loss the module returned for the first batch, and the weights before it."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.weights: list[np.ndarray] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and self.weights is None:
            self.weights = [np.array(w) for w in pl_module.model.get_weights()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and self.loss is None:
            self.loss = float(outputs["loss"])


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype("float64")
    return (
        z
        - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        - z.max(1, keepdims=True)
    )


def np_mlp_logits(weights: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1, w2, b2 = weights
    hidden = np.maximum(x @ w1 + b1, 0.0)
    return hidden, hidden @ w2 + b2


class ActivityRegularization(keras.layers.Layer):
    """The guide's add_loss layer."""

    def call(self, inputs):
        self.add_loss(1e-2 * torch.sum(inputs))
        return inputs


def test_training_loss_is_keras_loss_plus_add_loss_as_computed_by_hand(digits):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    hidden = ActivityRegularization()(hidden)
    outputs = keras.layers.Dense(10)(hidden)
    model = keras.Model(inputs, outputs)
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    y_onehot = np.eye(10, dtype="float32")[y]
    module = kl.KerasLightningModule(
        model, optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    probe = FirstBatchLoss()
    make_trainer(max_steps=1, callbacks=[probe]).fit(module, loader(x, y_onehot))
    hidden_np, logits = np_mlp_logits(probe.weights, x)
    expected = -np_log_softmax(logits)[np.arange(32), y].mean() + 1e-2 * hidden_np.sum()
    assert probe.loss == pytest.approx(expected, rel=1e-4)


def test_torch_cross_entropy_with_int64_labels_equals_hand_value(digits):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    module = kl.KerasLightningModule(
        mlp(hidden=16), optimizer=torch.optim.SGD, loss=torch.nn.CrossEntropyLoss()
    )
    probe = FirstBatchLoss()
    make_trainer(max_steps=1, callbacks=[probe]).fit(module, loader(x, y))
    _, logits = np_mlp_logits(probe.weights, x)
    assert probe.loss == pytest.approx(-np_log_softmax(logits)[np.arange(32), y].mean(), rel=1e-4)


@pytest.mark.parametrize("one_hot", [False, True], ids=["sparse", "one-hot"])
def test_class_weight_scales_each_sample_loss_as_keras_defines(digits, one_hot):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    class_weight = {0: 3.0, 1: 0.5, 7: 2.0}
    loss = (
        keras.losses.CategoricalCrossentropy(from_logits=True)
        if one_hot
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    targets = np.eye(10, dtype="float32")[y] if one_hot else y
    module = kl.KerasLightningModule(
        mlp(hidden=16), optimizer="sgd", loss=loss, class_weight=class_weight
    )
    probe = FirstBatchLoss()
    make_trainer(max_steps=1, callbacks=[probe]).fit(module, loader(x, targets))
    _, logits = np_mlp_logits(probe.weights, x)
    per_sample = -np_log_softmax(logits)[np.arange(32), y]
    weights = np.array([class_weight.get(int(c), 1.0) for c in y])
    assert probe.loss == pytest.approx((per_sample * weights).sum() / 32, rel=1e-4)


def test_sample_weight_from_three_element_batches_reaches_torch_loss(digits):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    sample_weight = np.linspace(0.0, 2.0, 32).astype("float32")
    module = kl.KerasLightningModule(
        mlp(hidden=16), optimizer=torch.optim.SGD, loss=torch.nn.CrossEntropyLoss()
    )
    probe = FirstBatchLoss()
    make_trainer(max_steps=1, callbacks=[probe]).fit(module, loader(x, y, sample_weight))
    _, logits = np_mlp_logits(probe.weights, x)
    per_sample = -np_log_softmax(logits)[np.arange(32), y]
    assert probe.loss == pytest.approx((per_sample * sample_weight).sum() / 32, rel=1e-4)


def two_in_two_out() -> keras.Model:
    image = keras.Input((64,), name="image")
    extra = keras.Input((3,), name="extra")
    joined = keras.layers.Concatenate()([image, extra])
    hidden = keras.layers.Dense(8, activation="relu")(joined)
    digit = keras.layers.Dense(10, name="digit")(hidden)
    size = keras.layers.Dense(1, name="size")(hidden)
    return keras.Model({"image": image, "extra": extra}, {"digit": digit, "size": size})


def test_multi_input_multi_output_with_loss_weights(digits):
    x, y = digits["x_train"][:64], digits["y_train"][:64]
    extra = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    size = x.sum(axis=1, keepdims=True) / 64

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"image": x[i], "extra": extra[i]}, {"digit": y[i], "size": size[i]}

    model = two_in_two_out()
    module = kl.KerasLightningModule(
        model,
        optimizer="adam",
        loss={"digit": torch.nn.CrossEntropyLoss(), "size": "mse"},
        loss_weights={"digit": 1.0, "size": 0.25},
        metrics={"digit": ["sparse_categorical_accuracy"]},
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, torch.utils.data.DataLoader(DictData(), batch_size=64))
    # After training, the evaluated loss must equal the weighted sum by hand.
    results = trainer.validate(module, torch.utils.data.DataLoader(DictData(), batch_size=64))[0]
    out = model({"image": torch.tensor(x), "extra": torch.tensor(extra)}, training=False)
    digit_loss = float(torch.nn.functional.cross_entropy(out["digit"], torch.tensor(y)))
    size_loss = float(((out["size"].detach().numpy() - size) ** 2).mean())
    assert results["val_digit_loss"] == pytest.approx(digit_loss, rel=1e-4)
    assert results["val_size_loss"] == pytest.approx(size_loss, rel=1e-4)
    assert results["val_loss"] == pytest.approx(digit_loss + 0.25 * size_loss, rel=1e-4)
    accuracy = (out["digit"].argmax(1).numpy() == y).mean()
    assert results["val_digit_sparse_categorical_accuracy"] == pytest.approx(accuracy)


def test_training_flag_is_explicit_dropout_on_in_training_off_in_validation(digits):
    x, y = digits["x_val"][:64], digits["y_val"][:64]
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dropout(0.9), keras.layers.Dense(10)]
    )
    module = kl.KerasLightningModule(model, optimizer="sgd", loss=torch.nn.CrossEntropyLoss())
    trainer = make_trainer()
    val = trainer.validate(module, loader(x, y, batch_size=64))[0]["val_loss"]
    logits = model(torch.tensor(x), training=False)
    assert val == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(y))))
    probe = FirstBatchLoss()
    make_trainer(max_steps=1, callbacks=[probe]).fit(module, loader(x, y, batch_size=64))
    # With 90% dropout in training the loss differs from the deterministic one.
    assert abs(probe.loss - val) > 1e-3


def test_compiled_keras_model_brings_its_optimizer_loss_and_metrics(digits):
    model = mlp(hidden=16)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    module = kl.KerasLightningModule(model)
    x, y = digits["x_train"][:256], digits["y_train"][:256]
    data = loader(x, y)
    seen: list[tuple[int, list[np.ndarray], float]] = []  # (epoch, weights used, batch loss)

    def forward(weights: list[np.ndarray], batch: np.ndarray) -> np.ndarray:
        kernel1, bias1, kernel2, bias2 = weights
        return np.maximum(batch @ kernel1 + bias1, 0.0) @ kernel2 + bias2

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [np.array(w, "float64") for w in model.get_weights()], 0.0))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            epoch, weights, _ = seen[-1]
            seen[-1] = (epoch, weights, float(outputs["loss"]))

    trainer = make_trainer(max_epochs=2, callbacks=[Record()])
    trainer.fit(module, data)

    # The optimizer: compile()'s Keras SGD, at its learning rate, stepped once per batch.
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, kl.KerasOptimizer)
    assert optimizer.keras_optimizer is model.optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    batch_size = data.batch_size
    assert int(model.optimizer.iterations) == trainer.max_epochs * -(-len(x) // batch_size)
    # The loss: sparse cross-entropy from logits, as NumPy computes it on the first batch.
    _, weights, first_loss = seen[0]
    logits = forward(weights, x[:batch_size].astype("float64"))
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(batch_size), y[:batch_size]].mean()
    assert first_loss == pytest.approx(expected, rel=1e-4)
    # The metric: the last epoch's accuracy over the predictions each batch was trained on.
    correct = 0
    last = [w for epoch, w, _ in seen if epoch == trainer.max_epochs - 1]
    for index, weights in enumerate(last):
        xb = x[index * batch_size : (index + 1) * batch_size].astype("float64")
        yb = y[index * batch_size : (index + 1) * batch_size]
        correct += int((forward(weights, xb).argmax(axis=1) == yb).sum())
    assert float(trainer.callback_metrics["accuracy"]) == pytest.approx(correct / len(x), abs=1e-6)


def test_model_factory_is_built_in_configure_model(digits):
    calls = []

    def factory():
        calls.append(1)
        return mlp(hidden=8)

    module = kl.KerasLightningModule(factory, optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    assert module.model is None
    make_trainer(max_steps=2).fit(module, loader(digits["x_train"][:64], digits["y_train"][:64]))
    assert isinstance(module.model, keras.Model) and calls == [1]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(10)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.parametrize(
    "build",
    [lambda: keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(10)]), Subclassed],
    ids=["sequential-without-input", "subclassed"],
)
def test_unbuilt_model_is_built_from_the_first_batch_and_trains(digits, build):
    model = build()
    assert list(model.parameters()) == []
    module = kl.KerasLightningModule(model, optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    data = loader(digits["x_train"][:128], digits["y_train"][:128])
    built: list[list[np.ndarray]] = []

    class RecordBuiltWeights(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                built.append([np.array(w) for w in model.get_weights()])

    trainer = make_trainer(max_epochs=3, callbacks=[RecordBuiltWeights()])
    trainer.fit(module, data)
    assert len(built) == 1  # built before the first batch's update
    weights = model.get_weights()
    assert [w.shape for w in built[0]] == [(64, 8), (8,), (8, 10), (10,)]
    assert [w.shape for w in weights] == [w.shape for w in built[0]]
    for before, after in zip(built[0], weights, strict=True):
        assert not np.allclose(before, after)
    assert trainer.global_step == trainer.max_epochs * len(data)


def test_predict_returns_outputs_with_training_false(digits):
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dropout(0.5), keras.layers.Dense(10)]
    )
    module = kl.KerasLightningModule(model, optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    outputs = make_trainer().predict(module, loader(digits["x_val"], batch_size=100))
    predicted = torch.cat(outputs)
    expected = model(torch.tensor(digits["x_val"]), training=False)
    torch.testing.assert_close(predicted, expected)


def test_trained_model_saves_as_keras_file_and_loads_back(tmp_path, digits):
    model = mlp(hidden=16)
    module = kl.KerasLightningModule(model, optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    make_trainer(max_epochs=1).fit(module, loader(digits["x_train"], digits["y_train"]))
    path = tmp_path / "digits.keras"
    module.model.save(path)
    loaded = keras.saving.load_model(path)
    x = torch.tensor(digits["x_val"])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )


def test_bf16_mixed_on_cpu_trains_with_float32_weights(digits):
    seen = []

    class Recording(kl.KerasLightningModule):
        def training_step(self, batch, batch_idx):
            x = batch[0]
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            # Under autocast a matmul in the Keras forward rounds to bfloat16.
            kernel = self.model.layers[0].kernel.value
            seen.append((x @ kernel).dtype)
            return super().training_step(batch, batch_idx)

    module = Recording(mlp(hidden=32), optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    losses = []

    class Epochs(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["loss"]))

    trainer = make_trainer(max_epochs=4, precision="bf16-mixed", callbacks=[Epochs()])
    trainer.fit(module, loader(digits["x_train"], digits["y_train"], shuffle=True))
    assert seen[0] == (True, torch.bfloat16) and seen[1] == torch.bfloat16
    assert all(w.dtype == np.float32 for w in module.model.get_weights())
    assert losses[-1] < losses[0] * 0.5


# ---------------------------------------------------------------------------------- bad input


def test_non_model_is_refused_with_the_fix():
    with pytest.raises(
        kl.KerasLightningTypeError, match=r"`model` must be a keras.Model .* received int"
    ):
        kl.KerasLightningModule(3, loss="mse")
    with pytest.raises(kl.KerasLightningTypeError, match=r"Wrap a single layer as keras.Sequential"):
        kl.KerasLightningModule(keras.layers.Dense(3), loss="mse")


def test_factory_returning_a_non_model_is_refused(digits):
    module = kl.KerasLightningModule(lambda: "not a model", optimizer="adam", loss="mse")
    with pytest.raises(
        kl.KerasLightningTypeError, match="factory must return a keras.Model; it returned str"
    ):
        make_trainer(max_steps=1).fit(module, loader(digits["x_train"][:8], digits["y_train"][:8]))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(optimizer="adamm"),
            kl.ConfigurationError,
            r"`optimizer='adamm'` is not a Keras optimizer name. Did you mean 'adam'",
        ),
        (dict(loss="msee"), kl.ConfigurationError, r"`loss='msee'` is not a Keras loss name"),
        (
            dict(metrics=["acuracy"]),
            kl.ConfigurationError,
            r"`metrics` contains 'acuracy'.*Did you mean",
        ),
        (dict(loss=lambda a, b: a - b), kl.KerasLightningTypeError, r"kl\.keras_loss\(fn\)"),
        (dict(optimizer=3.0), kl.KerasLightningTypeError, r"`optimizer` must be a Keras optimizer"),
        (dict(lr_scheduler="cosine"), kl.KerasLightningTypeError, r"`lr_scheduler` must be a callable"),
    ],
)
def test_bad_arguments_fail_early_or_at_configure_with_named_argument(
    digits, kwargs, error, message
):
    base = dict(optimizer="adam", loss="mse")
    base.update(kwargs)
    with pytest.raises(error, match=message):
        module = kl.KerasLightningModule(mlp(classes=1), **base)
        make_trainer(max_steps=1).fit(
            module, loader(digits["x_train"][:8], digits["y_train"][:8, None].astype("float32"))
        )


def test_missing_optimizer_names_the_argument(digits):
    module = kl.KerasLightningModule(mlp(), loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(
        kl.ConfigurationError, match=r"KerasLightningModule\(optimizer=...\) is needed"
    ):
        make_trainer(max_steps=1).fit(module, loader(digits["x_train"][:8], digits["y_train"][:8]))


def test_batch_of_wrong_structure_is_refused(digits):
    x, y = digits["x_train"][:8], digits["y_train"][:8]
    module = kl.KerasLightningModule(mlp(), optimizer="adam", loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(kl.BatchError, match="tuple of 4 elements|list of 4 elements"):
        make_trainer(max_steps=1).fit(module, loader(x, y, y, y))


def test_integer_labels_with_categorical_crossentropy_explain_the_fix(digits):
    module = kl.KerasLightningModule(mlp(), optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(
        kl.ShapeMismatchError,
        match=r"shape \(8, 10\).*shape \(8,\).*sparse_categorical_crossentropy",
    ):
        make_trainer(max_steps=1).fit(module, loader(digits["x_train"][:8], digits["y_train"][:8]))


def test_targets_with_another_batch_size_are_refused(digits):
    module = kl.KerasLightningModule(mlp(), optimizer="adam", loss="mse")

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(4, 64), torch.zeros(3, 10)

    with pytest.raises(kl.ShapeMismatchError, match="batch size 4 .* have 3"):
        make_trainer(max_steps=1).fit(module, torch.utils.data.DataLoader(Bad(), batch_size=None))


def test_loss_weights_keys_that_match_no_output(digits):
    module = kl.KerasLightningModule(
        two_in_two_out(), optimizer="adam", loss="mse", loss_weights={"digits": 1.0}
    )
    x = {"image": torch.zeros(4, 64), "extra": torch.zeros(4, 3)}
    y = {"digit": torch.zeros(4, 10), "size": torch.zeros(4, 1)}
    with pytest.raises(
        kl.ConfigurationError,
        match=r"`loss_weights` has keys \['digits'\] that match no model output",
    ):
        make_trainer(max_steps=1).fit(
            module, torch.utils.data.DataLoader([(x, y)], batch_size=None)
        )
