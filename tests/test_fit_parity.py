"""Parity with Keras' ``fit()`` on everyday Keras patterns: what the model brings is adopted.

Each test trains the same model (same seed, same batches) with Keras' ``fit`` and with
``KerasLightningModule`` under a ``lightning.Trainer``, and compares Keras' History with the
logged epoch values and the weights after training.
"""

from __future__ import annotations

import keras_lightning as kl

import keras
import numpy as np
import pytest
import torch
import torchmetrics
from conftest import loader, make_trainer
from keras import ops
from parity import (
    assert_same_history,
    assert_same_weights,
    batches,
    keras_fit,
    lightning_fit,
    samples_loader,
)

# ---------------------------------------------------------------------- 1. compute_loss


class Distiller(keras.Model):
    """keras-io "Knowledge distillation": the objective is an override of compute_loss."""

    def __init__(self, student: keras.Model, teacher: keras.Model) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student

    def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha=0.1,
                temperature=3):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn = student_loss_fn
        self.distillation_loss_fn = distillation_loss_fn
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, allow_empty=False):
        teacher_pred = self.teacher(x, training=False)
        student_loss = self.student_loss_fn(y, y_pred)
        distillation_loss = self.distillation_loss_fn(
            ops.softmax(teacher_pred / self.temperature, axis=1),
            ops.softmax(y_pred / self.temperature, axis=1),
        ) * (self.temperature**2)
        return self.alpha * student_loss + (1 - self.alpha) * distillation_loss

    def call(self, x):
        return self.student(x)


def _mlp(units: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(units, activation="relu"), keras.layers.Dense(10)]
    )


def _distiller() -> Distiller:
    distiller = Distiller(student=_mlp(16, 1), teacher=_mlp(32, 2))
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        metrics=["sparse_categorical_accuracy"],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
    )
    return distiller


def test_a_compute_loss_override_is_the_objective_as_in_keras_fit(digits):
    x, y = digits["x_train"][:400], digits["y_train"][:400]
    xv, yv = digits["x_val"][:200], digits["y_val"][:200]
    reference, history = keras_fit(
        _distiller, x, y, batch_size=50, epochs=2, validation_data=(xv, yv)
    )
    model, logged, _ = lightning_fit(
        _distiller, loader(x, y, batch_size=50), loader(xv, yv, batch_size=50), epochs=2
    )
    assert set(history) == {"loss", "sparse_categorical_accuracy", "val_loss",
                            "val_sparse_categorical_accuracy"}
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


class PenalizedRegressor(keras.Model):
    """compute_loss with ``training``, adding to the compiled loss through super()."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + (0.5 if training else 0.0) * ops.mean(ops.square(y_pred))


def _penalized() -> PenalizedRegressor:
    keras.utils.set_random_seed(3)
    model = PenalizedRegressor()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


def test_compute_loss_gets_training_and_sample_weight_like_keras_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype="float32"))[:, None]
    sw = rng.uniform(0.5, 2.0, size=(96,)).astype("float32")
    reference, history = keras_fit(
        _penalized, x, y, sample_weight=sw, batch_size=32, epochs=3,
        validation_data=(x[:64], y[:64]),
    )
    model, logged, _ = lightning_fit(
        _penalized, loader(x, y, sw, batch_size=32), loader(x[:64], y[:64], batch_size=32),
        epochs=3,
    )
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


def test_loss_given_to_the_module_for_a_compute_loss_model_is_refused(digits):
    module = kl.KerasLightningModule(_penalized(), loss="mae")
    with pytest.raises(kl.ConfigurationError, match=r"loss=\.\.\.\) is not used.*compute_loss"):
        make_trainer(max_steps=1).fit(
            module, loader(digits["x_train"][:8, :4], digits["x_train"][:8, :1], batch_size=4)
        )


# ---------------------------------------------------------------------- 2. add_loss only


class LogisticEndpoint(keras.layers.Layer):
    """keras-io "The endpoint layer pattern": the loss is added by a layer."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def call(self, targets, logits, sample_weights=None):
        self.add_loss(self.loss_fn(targets, logits, sample_weights))
        return ops.sigmoid(logits)


def _endpoint_model() -> keras.Model:
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8,), name="inputs")
    targets = keras.Input((3,), name="targets")
    logits = keras.layers.Dense(3)(keras.layers.Dense(16, activation="relu")(inputs))
    predictions = LogisticEndpoint(name="predictions")(targets, logits)
    model = keras.Model(inputs=[inputs, targets], outputs=predictions)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def test_a_model_whose_only_loss_is_add_loss_trains_on_batches_without_y():
    rng = np.random.default_rng(1)
    data = {
        "inputs": rng.normal(size=(64, 8)).astype("float32"),
        "targets": rng.integers(0, 2, size=(64, 3)).astype("float32"),
    }
    reference, history = keras_fit(
        _endpoint_model, data, batch_size=16, epochs=2, validation_data=(data,)
    )
    samples = [{k: v[i] for k, v in data.items()} for i in range(64)]
    model, logged, _ = lightning_fit(
        _endpoint_model, samples_loader(samples, 16), samples_loader(samples, 16), epochs=2
    )
    assert set(history) == {"loss", "val_loss"}
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


# ---------------------------------------------------------------------- 3. outputs without loss


def _two_outputs_one_loss() -> keras.Model:
    """keras-io "miniature GPT": outputs [logits, hidden], compiled loss=[..., None]."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    logits = keras.layers.Dense(10)(hidden)
    model = keras.Model(inputs, [logits, hidden])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-2), loss=[loss, None])
    return model


def test_an_output_without_a_loss_takes_no_target(digits):
    x, y = digits["x_train"][:256], digits["y_train"][:256]
    reference, history = keras_fit(_two_outputs_one_loss, x, y, batch_size=32, epochs=2)
    model, logged, _ = lightning_fit(_two_outputs_one_loss, loader(x, y, batch_size=32), epochs=2)
    assert set(history) == {"loss"}
    assert not [name for name in logged if name.endswith("_loss")]  # as Keras: one loss
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


# ---------------------------------------------------------------------- 4. compile's function


def contrastive_loss(y_true, y_pred, margin=1.0):
    """keras-io "Image similarity estimation using a Siamese Network with a contrastive loss"."""
    square_pred = ops.square(y_pred)
    margin_square = ops.square(ops.maximum(margin - y_pred, 0))
    return ops.mean((1 - y_true) * square_pred + y_true * margin_square)


def _siamese() -> keras.Model:
    keras.utils.set_random_seed(6)
    embedding = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="tanh")])
    left, right = keras.Input((64,)), keras.Input((64,))
    distance = keras.layers.Lambda(
        lambda pair: ops.sqrt(ops.sum(ops.square(pair[0] - pair[1]), axis=1, keepdims=True)
                              + 1e-7)
    )([embedding(left), embedding(right)])
    score = keras.layers.Dense(1, activation="sigmoid")(keras.layers.BatchNormalization()(distance))
    model = keras.Model([left, right], score)
    model.compile(loss=contrastive_loss, optimizer="rmsprop", metrics=["accuracy"])
    return model


def test_a_plain_function_given_to_compile_is_a_keras_loss(digits):
    x = digits["x_train"][:256]
    pairs = [x, x[::-1].copy()]
    same = (digits["y_train"][:256] == digits["y_train"][:256][::-1]).astype("float32")
    reference, history = keras_fit(_siamese, pairs, same, batch_size=32, epochs=2)
    samples = [((pairs[0][i], pairs[1][i]), same[i]) for i in range(256)]
    model, logged, _ = lightning_fit(_siamese, samples_loader(samples, 32), epochs=2)
    assert set(history) == {"loss", "accuracy"}
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


def test_a_plain_function_given_to_the_module_is_still_ambiguous():
    with pytest.raises(kl.KerasLightningTypeError, match="kl.keras_loss"):
        kl.KerasLightningModule(_siamese(), loss=contrastive_loss)


# ---------------------------------------------------------------------- 5. unbuilt, own step


class NoisyEmbedding(keras.layers.Layer):
    """Adds noise on every call (training or not), from its own SeedGenerator."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)
        self.seed_generator = keras.random.SeedGenerator(11)

    def call(self, x):
        noise = keras.random.normal(ops.shape(x), stddev=0.1, seed=self.seed_generator)
        return self.dense(x + noise)


class TripletModel(keras.Model):
    """Batches are (anchor, positive, negative): no y. Unbuilt until the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = NoisyEmbedding(8)
        self.dropout = keras.layers.Dropout(0.3, seed=5)  # unseeded: torch's global stream
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, x, training=False):
        return self.dropout(self.embed(x), training=training)

    def train_step(self, data):
        anchor, positive, negative = data
        self.zero_grad()
        a, p, n = (self(t, training=True) for t in (anchor, positive, negative))
        loss = ops.mean(ops.relu(
            ops.sum(ops.square(a - p), -1) - ops.sum(ops.square(a - n), -1) + 1.0
        ))
        loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}

    @property
    def metrics(self):
        return [self.tracker]


def _triplet() -> TripletModel:
    keras.utils.set_random_seed(7)
    model = TripletModel()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def test_an_unbuilt_model_with_its_own_step_builds_as_keras_fit_builds_it():
    rng = np.random.default_rng(2)
    anchor, positive, negative = (rng.normal(size=(64, 6)).astype("float32") for _ in range(3))
    data = torch.utils.data.TensorDataset(*map(torch.as_tensor, (anchor, positive, negative)))
    # Keras' fit takes the same DataLoader: its build draws nothing from the random streams
    reference, history = keras_fit(_triplet, samples_loader(data, 16), epochs=2)
    model, logged, _ = lightning_fit(_triplet, samples_loader(data, 16), epochs=2)
    assert reference.embed.seed_generator.state.value.tolist() == \
        model.embed.seed_generator.state.value.tolist()
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


# ---------------------------------------------------------------------- 6. one-element batches


class Sampling(keras.layers.Layer):
    """keras-io "Variational AutoEncoder": z = mean + sigma * epsilon."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


class VAE(keras.Model):
    """The keras-io VAE's train_step on the torch backend: ``data`` is the batch of images."""

    def __init__(self) -> None:
        super().__init__()
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(16, activation="relu")(inputs)
        z_mean, z_log_var = keras.layers.Dense(2)(hidden), keras.layers.Dense(2)(hidden)
        self.encoder = keras.Model(inputs, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])])
        latent = keras.Input((2,))
        self.decoder = keras.Model(latent, keras.layers.Dense(64, activation="sigmoid")(
            keras.layers.Dense(16, activation="relu")(latent)))
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.kl_loss_tracker]

    def call(self, x):
        return self.decoder(self.encoder(x)[2])

    def train_step(self, data):
        self.zero_grad()
        z_mean, z_log_var, z = self.encoder(data)
        reconstruction = self.decoder(z)
        reconstruction_loss = ops.mean(ops.sum(ops.square(data - reconstruction), axis=1))
        kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
        kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
        total_loss = reconstruction_loss + kl_loss
        total_loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        self.total_loss_tracker.update_state(total_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {"loss": self.total_loss_tracker.result(), "kl_loss": self.kl_loss_tracker.result()}


def _vae() -> VAE:
    keras.utils.set_random_seed(8)
    model = VAE()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def test_a_one_element_batch_reaches_train_step_as_fit_x_does(digits):
    x = digits["x_train"][:256]
    reference, history = keras_fit(_vae, x, batch_size=32, epochs=2)
    data = torch.utils.data.TensorDataset(torch.as_tensor(x))  # yields [x] batches
    model, logged, _ = lightning_fit(_vae, samples_loader(data, 32), epochs=2)
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


# ---------------------------------------------------------------------- 7. masks, user data


def _sequences(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids padded with 0 (the mask), per-token labels, per-token weights."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, size=(count, 6))
    lengths = rng.integers(2, 7, size=count)
    x[np.arange(6)[None, :] >= lengths[:, None]] = 0
    y = (x % 5).astype("int64")
    y[x == 0] = rng.integers(0, 5, size=int((x == 0).sum()))  # padding labels: noise
    # per-token: Keras' fit on torch fails on per-sequence weights with a temporal mask
    # (apply_mask's in-place `sample_weight *= mask` cannot broadcast (batch, 1) to the mask)
    weights = rng.uniform(0.5, 2.0, size=(count, 6)).astype("float32")
    return x.astype("int64"), y, weights


def _masked_tagger() -> keras.Model:
    keras.utils.set_random_seed(9)
    model = keras.Sequential([
        keras.Input((6,), dtype="int64"),
        keras.layers.Embedding(20, 8, mask_zero=True),
        keras.layers.LSTM(8, return_sequences=True),
        keras.layers.Dense(5),
    ])
    model.compile(
        keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_masked_outputs_weigh_loss_and_metrics_and_the_batches_are_not_written():
    x, y, weights = _sequences(64, seed=3)
    xv, yv, _ = _sequences(32, seed=4)
    reference, history = keras_fit(
        _masked_tagger, x, y, sample_weight=weights, batch_size=16, epochs=2,
        validation_data=(xv, yv),
    )
    kept = batches(x, y, weights, batch_size=16)  # the same tensors every epoch
    before = [batch[2].clone() for batch in kept.batches]
    model, logged, _ = lightning_fit(
        _masked_tagger, kept, batches(xv, yv, batch_size=16), epochs=2
    )
    assert all(torch.equal(b[2], w) for b, w in zip(kept.batches, before, strict=True))
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert_same_history(history, logged)
    assert_same_weights(reference, model)
    # and the accuracy is over the unmasked tokens: computed here from the trained model
    logits = keras.ops.convert_to_numpy(model(torch.as_tensor(xv), training=False))
    real = xv != 0
    expected = ((logits.argmax(-1) == yv) & real).sum() / real.sum()
    np.testing.assert_allclose(logged["val_accuracy"][-1], expected, rtol=1e-5)


# ---------------------------------------------------------------------- 8. class_weight


def test_class_weight_weighs_training_data_only_as_in_keras_fit(digits):
    x, y = digits["x_train"][:320], digits["y_train"][:320]
    xv, yv = digits["x_val"][:160], digits["y_val"][:160]
    class_weight = {0: 4.0, 3: 0.25, 7: 2.0}

    def make():
        model = _mlp(16, 10)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      weighted_metrics=["sparse_categorical_accuracy"])
        return model

    reference, history = keras_fit(
        make, x, y, class_weight=class_weight, batch_size=32, epochs=2, validation_data=(xv, yv)
    )
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=32), loader(xv, yv, batch_size=32), epochs=2,
        class_weight=class_weight,
    )
    assert_same_history(history, logged)
    assert_same_weights(reference, model)
    # the validation loss is the plain mean over the validation data
    logits = model(torch.as_tensor(xv), training=False)
    plain = keras.losses.SparseCategoricalCrossentropy()(yv, logits)  # as compiled
    np.testing.assert_allclose(logged["val_loss"][-1], float(plain), rtol=1e-5)


# ---------------------------------------------------------------------- 9. torchmetrics names


def test_torchmetrics_are_logged_under_their_class_name_in_snake_case():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, 0] + 0.3 * rng.normal(size=96) > 0).astype("int64")[:, None]

    def make():
        keras.utils.set_random_seed(12)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])

    metrics = [torchmetrics.classification.BinaryAUROC(),
               torchmetrics.classification.BinaryF1Score()]
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=32), loader(x, y, batch_size=32), epochs=1,
        optimizer="adam", loss=kl.torch_loss(lambda logits, y: torch.nn.functional.
                                             binary_cross_entropy_with_logits(logits, y.float())),
        metrics=metrics,
    )
    scores = torch.as_tensor(keras.ops.convert_to_numpy(model(torch.as_tensor(x)))).squeeze(-1)
    target = torch.as_tensor(y).squeeze(-1)
    expected = {
        "val_binary_auroc": torchmetrics.functional.classification.binary_auroc(scores, target),
        "val_binary_f1_score": torchmetrics.functional.classification.binary_f1_score(
            scores, target),
    }
    for name, value in expected.items():
        assert name in logged, sorted(logged)
        np.testing.assert_allclose(logged[name][-1], float(value), rtol=1e-5)


def test_per_sequence_weights_on_a_masked_output_weigh_each_step_of_the_sequence():
    # Keras' fit on torch fails here (its in-place `sample_weight *= mask` cannot broadcast a
    # (batch, 1) weight to the mask); what it means is each sequence's weight on its steps,
    # which Keras' fit computes from per-step weights.
    x, y, per_step = _sequences(64, seed=6)
    per_sequence = per_step[:, 0].copy()
    reference, history = keras_fit(
        _masked_tagger, x, y, sample_weight=np.repeat(per_sequence[:, None], 6, axis=1),
        batch_size=16, epochs=2,
    )
    model, logged, _ = lightning_fit(
        _masked_tagger, loader(x, y, per_sequence, batch_size=16), epochs=2
    )
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


# ---------------------------------------------------------------------- the model's own metrics


class TrackedRegressor(keras.Model):
    """Keras' compute_loss docstring example: a loss tracker, its own `metrics` list."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def compute_loss(self, x, y, y_pred, sample_weight, training=True):
        loss = ops.mean((y_pred - y) ** 2)
        self.loss_tracker.update_state(loss)
        return loss

    def reset_metrics(self):
        self.loss_tracker.reset_state()

    @property
    def metrics(self):
        return [self.loss_tracker]


class PenaltyTracker(keras.Model):
    """A tracker attribute, updated in compute_loss, next to the compiled metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty_tracker = keras.metrics.Mean(name="penalty")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        penalty = 0.1 * ops.mean(ops.abs(y_pred))
        self.penalty_tracker.update_state(penalty)
        return super().compute_loss(x, y, y_pred, sample_weight, training) + penalty


def _functional(cls) -> keras.Model:
    keras.utils.set_random_seed(13)
    inputs = keras.Input((4,))
    model = cls(inputs, keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(inputs)))
    model.compile(keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


@pytest.mark.parametrize("cls", [TrackedRegressor, PenaltyTracker])
def test_the_models_own_metrics_are_logged_as_in_keras_fit(cls):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(80, 4)).astype("float32")
    y = (x @ np.array([1.0, -1.0, 2.0, 0.5], dtype="float32"))[:, None]
    xv, yv = x[:40], y[:40]
    make = lambda: _functional(cls)  # noqa: E731
    reference, history = keras_fit(
        make, x, y, batch_size=16, epochs=2, validation_data=(xv, yv)
    )
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=16), loader(xv, yv, batch_size=16), epochs=2
    )
    if cls is PenaltyTracker:
        assert {"penalty", "val_penalty", "mae", "val_mae"} <= set(history)
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


@pytest.mark.skipif(not hasattr(keras, "distillation"), reason="keras.distillation: Keras 3.14+")
def test_keras_distillation_distiller_trains_as_under_keras_fit(digits):
    def make():
        distiller = keras.distillation.Distiller(
            teacher=_mlp(32, 2), student=_mlp(16, 1),
            distillation_losses=keras.distillation.LogitsDistillation(temperature=3.0),
            student_loss_weight=0.3,
        )
        distiller.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["sparse_categorical_accuracy"],
        )
        return distiller

    x, y = digits["x_train"][:320], digits["y_train"][:320]
    xv, yv = digits["x_val"][:160], digits["y_val"][:160]
    reference, history = keras_fit(make, x, y, batch_size=32, epochs=2, validation_data=(xv, yv))
    model, logged, _ = lightning_fit(
        make, loader(x, y, batch_size=32), loader(xv, yv, batch_size=32), epochs=2
    )
    assert {"loss", "sparse_categorical_accuracy", "val_loss"} <= set(history)
    assert_same_history(history, logged)
    assert_same_weights(reference.student, model.student)


# ---------------------------------------------------------------------- predict, continued fit


class ArgmaxClassifier(keras.Model):
    """A model whose predict_step post-processes, which Keras' predict() calls."""

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return ops.argmax(self(x, training=False), axis=-1)


def test_trainer_predict_returns_what_keras_predict_returns_for_a_predict_step_override(digits):
    keras.utils.set_random_seed(14)
    inputs = keras.Input((64,))
    model = ArgmaxClassifier(inputs, keras.layers.Dense(10)(inputs))
    x = digits["x_val"][:96]
    expected = model.predict(x, batch_size=32, verbose=0)
    module = kl.KerasLightningModule(model, loss="mse", optimizer="sgd")
    batches_out = make_trainer().predict(module, loader(x, batch_size=32))
    got = np.concatenate([keras.ops.convert_to_numpy(b) for b in batches_out])
    np.testing.assert_array_equal(got, expected)


def test_training_goes_on_from_a_keras_fit_as_a_longer_keras_fit_would(digits):
    x, y = digits["x_train"][:256], digits["y_train"][:256]

    def make():
        model = _mlp(16, 15)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      metrics=["sparse_categorical_accuracy"])
        return model

    reference, history = keras_fit(make, x, y, batch_size=32, epochs=3)

    def fitted_once():
        model = make()
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        return model  # its Adam holds the moments and iterations of the first epoch

    model, logged, _ = lightning_fit(fitted_once, loader(x, y, batch_size=32), epochs=2)
    assert_same_history({k: v[1:] for k, v in history.items()}, logged)
    assert_same_weights(reference, model)
    assert int(model.optimizer.iterations) == int(reference.optimizer.iterations)


def test_a_compute_loss_model_reloads_from_a_checkpoint_with_its_objective(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    module = kl.KerasLightningModule(_penalized())  # loss and optimizer from its compile()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, loader(x, y, batch_size=16))
    trainer.save_checkpoint(tmp_path / "penalized.ckpt")
    expected = make_trainer().validate(module, loader(x, y, batch_size=16), verbose=False)
    model = _penalized()
    model(torch.zeros(1, 4))  # built, as loading asks
    restored = kl.KerasLightningModule.load_from_checkpoint(tmp_path / "penalized.ckpt", model=model)
    got = make_trainer().validate(restored, loader(x, y, batch_size=16), verbose=False)
    assert got[0]["val_loss"] == pytest.approx(expected[0]["val_loss"], rel=1e-6)
    assert got[0]["val_mae"] == pytest.approx(expected[0]["val_mae"], rel=1e-6)


# ---------------------------------------------------------------------- weights per output


def _two_heads(weighted_metrics: bool, structure: str = "dict") -> keras.Model:
    keras.utils.set_random_seed(66)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    heads = [keras.layers.Dense(10, name="a")(hidden), keras.layers.Dense(1, name="b")(hidden)]
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"]
    metrics = [[], ["mae"]] if weighted_metrics else None
    if structure == "list":
        model = keras.Model(inputs, heads)
        model.compile("sgd", loss=losses, loss_weights=[0.5, 3.0], weighted_metrics=metrics)
        return model
    model = keras.Model(inputs, dict(zip("ab", heads, strict=True)))
    model.compile(
        "sgd", loss=dict(zip("ab", losses, strict=True)), loss_weights={"a": 0.5, "b": 3.0},
        weighted_metrics=dict(zip("ab", metrics, strict=True)) if metrics else None,
    )
    return model


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_sample_weight_per_output_weighs_each_outputs_loss_and_metrics(digits, structure):
    x, y = digits["x_train"][:320], digits["y_train"][:320]
    yb = (x.sum(axis=1, keepdims=True) / 10).astype("float32")
    rng = np.random.default_rng(8)
    wa, wb = rng.uniform(0.5, 2, 320).astype("float32"), np.zeros(320, "float32")

    def pack(a, b):
        return [a, b] if structure == "list" else {"a": a, "b": b}

    make = lambda: _two_heads(True, structure)  # noqa: E731
    reference, history = keras_fit(
        make, x, pack(y, yb), sample_weight=pack(wa, wb), batch_size=32, epochs=1
    )
    samples = [(x[i], pack(y[i], yb[i]), pack(wa[i], wb[i])) for i in range(320)]
    model, logged, _ = lightning_fit(make, samples_loader(samples, 32), epochs=1)
    assert history["b_loss"] == [0.0]  # output b weighs nothing
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


def test_a_wrong_number_of_per_output_weights_is_named(digits):
    x, y = digits["x_train"][:8], digits["y_train"][:8]
    yb = np.zeros((8, 1), "float32")
    module = kl.KerasLightningModule(_two_heads(weighted_metrics=False))
    samples = [(x[i], {"a": y[i], "b": yb[i]}, [1.0, 1.0, 1.0]) for i in range(8)]
    with pytest.raises(kl.BatchError, match=r"sample_weight holds 3 weight tensors"):
        make_trainer(max_steps=1).fit(module, samples_loader(samples, 4))


# ---------------------------------------------------------------------- end of fit, metric state


def test_ema_weights_are_written_into_the_model_when_training_ends(digits):
    x, y = digits["x_train"][:256], digits["y_train"][:256]

    def make():
        model = _mlp(16, 16)
        model.compile(keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    reference, history = keras_fit(make, x, y, batch_size=32, epochs=2)
    model, logged, _ = lightning_fit(make, loader(x, y, batch_size=32), epochs=2)
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


def test_a_metric_object_that_saw_data_before_starts_the_first_epoch_empty(digits):
    x, y = digits["x_train"][:320], digits["y_train"][:320]

    def make():
        model = _mlp(16, 17)
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2),
                     keras.metrics.SparseCategoricalAccuracy(name="acc")],
        )
        model.evaluate(x[:100], y[:100], verbose=0)  # the untrained model, looked at first
        return model

    reference, history = keras_fit(make, x, y, batch_size=32, epochs=2)
    model, logged, _ = lightning_fit(make, loader(x, y, batch_size=32), epochs=2)
    assert_same_history(history, logged)


class LabelsOnly(keras.Model):
    """Targets shaped unlike the outputs (as keras_hub's RetinaNet takes boxes and labels)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        classes = keras.losses.sparse_categorical_crossentropy(
            y["labels"], y_pred["cls_logits"], from_logits=True
        )
        boxes = ops.mean(ops.square(y["boxes"] - y_pred["bbox_regression"]), axis=-1)
        return ops.mean(classes + boxes)


def test_a_compute_loss_model_takes_targets_shaped_unlike_its_outputs(digits):
    x, labels = digits["x_train"][:256], digits["y_train"][:256]
    boxes = (x[:, :4] * 2.0).astype("float32")

    def make():
        keras.utils.set_random_seed(18)
        inputs = keras.Input((64,))
        model = LabelsOnly(inputs, {
            "bbox_regression": keras.layers.Dense(4, name="bbox_regression")(inputs),
            "cls_logits": keras.layers.Dense(10, name="cls_logits")(inputs),
        })
        model.compile(keras.optimizers.Adam(1e-2))
        return model

    reference, history = keras_fit(
        make, x, {"boxes": boxes, "labels": labels}, batch_size=32, epochs=2
    )
    samples = [(x[i], {"boxes": boxes[i], "labels": labels[i]}) for i in range(256)]
    model, logged, _ = lightning_fit(make, samples_loader(samples, 32), epochs=2)
    assert_same_history(history, logged)
    assert_same_weights(reference, model)


def test_validation_keeps_the_training_values_of_compiled_metric_objects(digits):
    # a compiled metric object is the one the module updates, and the one Keras' own
    # compile container holds (built by the earlier Keras fit): a validation must not reset it
    rng = np.random.default_rng(9)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x @ np.array([1.0, -1.0, 2.0, 0.5], dtype="float32"))[:, None]

    def make():
        model = _functional(PenaltyTracker)
        model.compile(keras.optimizers.SGD(0.05), loss="mse",
                      metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
        return model

    reference, history = keras_fit(
        make, x, y, batch_size=16, epochs=2, validation_data=(x[:32], y[:32])
    )

    def fitted_once():
        model = make()
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  validation_data=(x[:32], y[:32]))
        return model

    model, logged, _ = lightning_fit(
        fitted_once, loader(x, y, batch_size=16), loader(x[:32], y[:32], batch_size=16), epochs=1
    )
    assert_same_history({k: v[1:] for k, v in history.items()}, logged)
    assert_same_weights(reference, model)


def test_a_hand_written_step_passes_x_to_a_models_compute_loss(digits):
    class Module(kl.KerasLightningModule):
        def __init__(self, model, pass_x):
            super().__init__(model)
            self.pass_x = pass_x

        def training_step(self, batch, batch_idx):
            x, y = batch
            y_pred = self(x, training=True)
            loss, _ = self.compute_loss(y_pred, y, x=x if self.pass_x else None)
            return loss

    data = loader(digits["x_train"][:64], digits["y_train"][:64], batch_size=32)
    with pytest.raises(kl.ConfigurationError, match=r"compute_loss\(y_pred, y, sample_weight, x=x\)"):
        make_trainer(max_steps=1).fit(Module(_distiller(), pass_x=False), data)
    module = Module(_distiller(), pass_x=True)
    make_trainer(max_steps=2).fit(module, data)
    reference = _distiller()
    reference.fit(digits["x_train"][:64], digits["y_train"][:64], batch_size=32, epochs=1,
                  shuffle=False, verbose=0)
    assert_same_weights(reference.student, module.model.student)


# ---------------------------------------------------------------------- errors, fallback build


class NoLoss(keras.Model):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return None


def test_a_compute_loss_that_returns_none_is_named(digits):
    inputs = keras.Input((64,))
    model = NoLoss(inputs, keras.layers.Dense(10)(inputs))
    model.compile(optimizer="sgd")
    with pytest.raises(kl.ConfigurationError, match=r"NoLoss\.compute_loss.*returned None"):
        make_trainer(max_steps=1).fit(
            kl.KerasLightningModule(model),
            loader(digits["x_train"][:8], digits["y_train"][:8], batch_size=4),
        )


def test_per_output_weights_keyed_by_an_unknown_output_are_named(digits):
    x, y = digits["x_train"][:8], digits["y_train"][:8]
    module = kl.KerasLightningModule(_two_heads(weighted_metrics=False))
    samples = [(x[i], {"a": y[i], "b": np.zeros(1, "float32")}, {"c": 1.0}) for i in range(8)]
    with pytest.raises(kl.BatchError, match=r"sample_weight is a dict with keys \['c'\]"):
        make_trainer(max_steps=1).fit(module, samples_loader(samples, 4))


class Untraceable(keras.Model):
    """Reads a value out of its input (no symbolic trace), and draws noise on every call."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.seed = keras.random.SeedGenerator(4)

    def call(self, x):
        scale = float(keras.ops.convert_to_numpy(keras.ops.max(x)))  # needs real values
        return self.dense(x / scale + keras.random.normal(keras.ops.shape(x), seed=self.seed))


def test_a_model_that_cannot_be_traced_is_built_eagerly_without_moving_its_seeds():
    model = Untraceable()
    before = model.seed.state.value.tolist()
    module = kl.KerasLightningModule(model, loss="mse", optimizer="sgd")
    module.build_from_batch((torch.rand(4, 2) + 1.0, torch.zeros(4, 3)))
    assert [tuple(v.shape) for v in model.dense.weights] == [(2, 3), (3,)]
    assert model.seed.state.value.tolist() == before
