"""jit_compile="step": the whole step in one graph, against the same run done eagerly.

Most runs use ``"step:aot_eager"``: the same capture (one dynamo graph, forward, loss,
``autograd.grad`` and the update, replayed directly) without inductor's code generation, which
takes tens of seconds per graph on two cores. One run uses inductor itself.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.compiled import resolve_compile

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer

FAST = "step:aot_eager"


class StepLosses(L.Callback):
    """The loss of every training batch, as ``on_train_batch_end`` receives it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def small_mlp(seed: int = 0, batch_norm: bool = True, dropout: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, activation="relu", kernel_regularizer="l2")(inputs)
    if dropout:  # unseeded: torch's generator (the same draws under aot_eager, not inductor)
        x = keras.layers.Dropout(0.25)(x)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def data(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = rng.integers(0, 3, size=n).astype("int64")
    w = rng.uniform(0.2, 2.0, size=n).astype("float32")
    return x, y, w


def run(
    jit_compile, *, optimizer, epochs=10, batches=None, trainer_kw=None, model=small_mlp,
    **module_kw,
):
    """Train ``small_mlp`` for ``epochs`` (50 steps by default); per-step losses, module."""
    module = kl.KerasLightningModule(
        model(),
        optimizer=optimizer(),
        loss=module_kw.pop("loss", "sparse_categorical_crossentropy"),
        jit_compile=jit_compile,
        **module_kw,
    )
    steps = StepLosses()
    trainer_kw = dict(trainer_kw or {})
    callbacks = [steps, *trainer_kw.pop("callbacks", [])]
    trainer = make_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kw)
    torch.manual_seed(0)  # the same dropout draws in both runs
    trainer.fit(module, batches if batches is not None else loader(*data()[:2], batch_size=16))
    return steps.losses, module, trainer


def weights(module) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v.value).astype("float64") for v in module.model.weights]


def keras_adam():
    return keras.optimizers.Adam(1e-2)


CASES = {
    # name: (optimizer, trainer kwargs, module kwargs, mode, hosting); features are combined so
    # that each capture (seconds of tracing) covers several paths
    "keras Adam": (keras_adam, {}, {}, "fused", "manual"),
    "keras SGD nesterov, clipnorm (Keras' own update in the graph)": (
        lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, clipnorm=0.05),
        {}, {}, "fused", "manual",
    ),
    "keras AdamW, Keras schedule, bf16-mixed": (
        lambda: keras.optimizers.AdamW(keras.optimizers.schedules.ExponentialDecay(1e-2, 5, 0.8)),
        {"precision": "bf16-mixed"}, {}, "fused", "manual",
    ),
    "torch Adam": (lambda: torch.optim.Adam, {}, {}, "grads", "manual"),
    "gradient_clip_val, accumulate_grad_batches": (
        keras_adam, {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2}, {}, "grads",
        "automatic",
    ),
    "torch StepLR": (
        keras_adam, {}, {"lr_scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)},
        "grads", "automatic",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_whole_step_trains_as_the_eager_step(case):
    optimizer, trainer_kw, module_kw, mode, hosting = CASES[case]
    eager, eager_module, eager_trainer = run(
        False, optimizer=optimizer, trainer_kw=trainer_kw, **dict(module_kw)
    )
    fast, module, trainer = run(FAST, optimizer=optimizer, trainer_kw=trainer_kw, **dict(module_kw))
    stats = module.compile_stats
    assert isinstance(stats, kl.WholeStepStats)
    assert (stats.mode, stats.hosting, stats.fallback) == (mode, hosting, None)
    assert stats.train.captures == 1  # 80 samples in batches of 16: one shape
    # the steps before the first update run eagerly (they build the optimizer), one captures,
    # the others replay the graph
    eager_steps = trainer_kw.get("accumulate_grad_batches", 1)
    assert stats.train.calls == 50 - eager_steps - 1
    assert len(fast) == len(eager) == 50
    assert trainer.global_step == eager_trainer.global_step
    # the same ops on the same values; accumulation divides the gradient instead of the loss
    tolerance = 1e-4 if "accumulate" in case else 1e-5
    if "bf16" in case:  # bfloat16 matmuls: rounding differs with the fused kernels' order
        tolerance = 1e-3
    np.testing.assert_allclose(fast, eager, rtol=tolerance)
    for a, b in zip(weights(module), weights(eager_module), strict=True):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def test_weighted_batches_last_smaller_batch_and_validation():
    """sample_weight, class_weight, weighted metrics and a smaller last batch (one capture
    more), validation captured too; epoch values equal the eager run's."""
    x, y, w = data(n=70)
    train = loader(x, y, w, batch_size=16)
    val = loader(x[:30], y[:30], batch_size=16)
    values = {}
    for jit_compile in (False, FAST):
        module = kl.KerasLightningModule(
            small_mlp(),
            optimizer=keras_adam(),
            loss="sparse_categorical_crossentropy",
            weighted_metrics=["sparse_categorical_accuracy"],
            class_weight={0: 1.0, 1: 3.0, 2: 0.5},
            jit_compile=jit_compile,
        )
        trainer = make_trainer(max_epochs=3)
        torch.manual_seed(0)
        trainer.fit(module, train, val)
        values[jit_compile] = ({k: float(v) for k, v in trainer.callback_metrics.items()},
                               weights(module), module.compile_stats)
    stats = values[FAST][2]
    assert stats.train.captures == 2 and stats.evaluate.captures == 2  # 16 and the last 6 / 14
    assert stats.fallback is None
    assert set(values[FAST][0]) == set(values[False][0])
    for name, value in values[False][0].items():
        assert values[FAST][0][name] == pytest.approx(value, rel=1e-5), name
    for a, b in zip(values[FAST][1], values[False][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_whole_step_compiled_by_inductor():
    """The default backend: fused kernels; the losses are eager's within float rounding.

    Without dropout: inductor draws random masks with its own generator (the same rate, not
    eager's masks)."""

    def model():
        return small_mlp(dropout=False)

    eager, eager_module, _ = run(False, optimizer=keras_adam, epochs=4, model=model)
    fast, module, _ = run("step", optimizer=keras_adam, epochs=4, model=model)
    stats = module.compile_stats
    assert (stats.mode, stats.fallback, stats.train.captures) == ("fused", None, 1)
    assert stats.compile_seconds > 0
    np.testing.assert_allclose(fast, eager, rtol=1e-5)
    for a, b in zip(weights(module), weights(eager_module), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class FreezeFirstLayer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            pl_module.model.layers[1].trainable = False


class Snapshot(L.Callback):
    """The first kernel when the layer is frozen."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            self.kernel = weights(pl_module)[0].copy()


def test_freezing_a_layer_mid_training_captures_again():
    """``layer.trainable`` is read in Python: a change is a new key, not a stale graph."""
    results = {}
    for jit_compile in (False, FAST):
        module = kl.KerasLightningModule(
            small_mlp(batch_norm=False), optimizer=keras_adam(),
            loss="sparse_categorical_crossentropy", jit_compile=jit_compile,
        )
        snapshot = Snapshot()
        trainer = make_trainer(max_epochs=4, callbacks=[FreezeFirstLayer(), snapshot])
        torch.manual_seed(0)
        trainer.fit(module, loader(*data()[:2], batch_size=16))
        results[jit_compile] = (weights(module), snapshot.kernel, module.compile_stats)
    final, kernel_at_freeze, stats = results[FAST]
    assert stats.train.captures == 2 and stats.fallback is None
    np.testing.assert_array_equal(final[0], kernel_at_freeze)  # frozen: not one bit moved
    for a, b in zip(final, results[False][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first, second", [(FAST, False), (False, FAST)])
def test_checkpoints_resume_exactly_across_modes(tmp_path, first, second):
    """Stop after 3 epochs, resume in the other mode: the weights and step count of a
    straight 5-epoch run (Lightning's step counters follow both optimization modes)."""
    straight, straight_module, straight_trainer = run(False, optimizer=keras_adam, epochs=5)
    train = loader(*data()[:2], batch_size=16)
    module = kl.KerasLightningModule(
        small_mlp(), optimizer=keras_adam(), loss="sparse_categorical_crossentropy",
        jit_compile=first,
    )
    trainer = make_trainer(max_epochs=3)
    torch.manual_seed(0)
    trainer.fit(module, train)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    resumed = kl.KerasLightningModule(
        small_mlp(seed=1), optimizer=keras_adam(), loss="sparse_categorical_crossentropy",
        jit_compile=second,
    )
    trainer = make_trainer(max_epochs=5)
    trainer.fit(resumed, train, ckpt_path=path)
    assert trainer.global_step == straight_trainer.global_step == 25
    for a, b in zip(weights(resumed), weights(straight_module), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class PythonSideLayer(keras.layers.Layer):
    """A layer whose call reads a tensor's value in Python: dynamo must break the graph."""

    def call(self, x):
        return x * (2.0 if float(keras.ops.mean(x)) > -1e9 else 1.0)


def test_a_step_that_breaks_the_graph_falls_back_once_with_the_reason():
    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        x = PythonSideLayer()(keras.layers.Dense(8)(inputs))
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    results = {}
    for jit_compile in (False, FAST):
        module = kl.KerasLightningModule(
            model(), optimizer=keras_adam(), loss="sparse_categorical_crossentropy",
            jit_compile=jit_compile,
        )
        trainer = make_trainer(max_epochs=1, limit_train_batches=3)
        with pytest.warns(RuntimeWarning, match="could not capture") if jit_compile else _none():
            trainer.fit(module, loader(*data()[:2], batch_size=16))
        results[jit_compile] = (weights(module), module.compile_stats)
    stats = results[FAST][1]
    assert stats.mode == "compiled" and stats.train.captures == 0
    assert "data-dependent" in stats.fallback  # dynamo's reason, kept
    for a, b in zip(results[FAST][0], results[False][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _none:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TokenAndPosition(keras.layers.Layer):
    def __init__(self, length: int, vocabulary: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocabulary, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(keras.ops.shape(x)[-1]))


def text_transformer(dropout_seed: int | None = None) -> keras.Model:
    """The keras-io text classifier: token and position embedding, one attention block."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((16,), dtype="int64")
    h = TokenAndPosition(16, 100, 16)(inputs)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h)
    if dropout_seed is not None:
        attention = keras.layers.Dropout(0.1, seed=dropout_seed)(attention)
    h = keras.layers.LayerNormalization()(h + attention)
    f = keras.layers.Dense(16)(keras.layers.Dense(32, activation="relu")(h))
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(h + f))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_a_transformer_classifier_captures_whole_and_trains_as_keras_fit():
    """Embedding + MultiHeadAttention: one graph per mode, no fallback, Keras' fit values."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 100, size=(48, 16))
    y = rng.integers(0, 2, size=48)
    reference = text_transformer()
    history = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                            validation_data=(x, y)).history
    module = kl.KerasLightningModule(text_transformer(), jit_compile=FAST)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, loader(x, y, batch_size=16), loader(x, y, batch_size=16))
    stats = module.compile_stats
    assert (stats.mode, stats.fallback, stats.train.captures, stats.evaluate.captures) == (
        "fused", None, 1, 1
    )
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert float(trainer.callback_metrics[name]) == pytest.approx(history[name][-1], abs=1e-5)
    for a, b in zip(module.model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a.value),
                                   keras.ops.convert_to_numpy(b.value), atol=1e-5)


def test_seeded_dropout_is_captured_and_reproducible():
    """Seeded Keras dropout draws in the graph, from its SeedGenerator (not eager's masks)."""

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        x = keras.layers.Dropout(0.3, seed=7)(keras.layers.Dense(16)(inputs))
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    runs = []
    for _ in range(2):
        _, module, _ = run(FAST, optimizer=keras_adam, epochs=2, model=model)
        assert module.compile_stats.fallback is None
        assert module.compile_stats.train.captures == 1
        runs.append(weights(module))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    # the generator's state advanced once per step, as eager Keras advances it
    seed_state = [v for v in module.model.variables if "seed_generator_state" in v.path][0]
    assert int(keras.ops.convert_to_numpy(seed_state.value)[1]) == 10


def test_a_preprocessing_layer_is_captured():
    """``Rescaling`` reads its backend through ``importlib.import_module`` (substituted)."""

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((12,)), keras.layers.Rescaling(0.5, offset=0.1), keras.layers.Dense(3),
        ])

    eager, eager_module, _ = run(False, optimizer=keras_adam, epochs=2, model=model)
    fast, module, _ = run(FAST, optimizer=keras_adam, epochs=2, model=model)
    assert module.compile_stats.fallback is None and module.compile_stats.train.captures == 1
    np.testing.assert_allclose(fast, eager, rtol=1e-6)


def test_uniform_from_seed_keeps_the_rate():
    from keras_lightning.compiled import uniform_from_seed

    values = uniform_from_seed(torch.tensor([11, 3]), (200, 500), "cpu")
    assert values.shape == (200, 500)
    assert float((values < 0.9).float().mean()) == pytest.approx(0.9, abs=0.005)
    # neighbouring counters are not correlated
    flat = values.flatten().double()
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01


def test_jit_compile_names_the_fast_mode_in_its_error():
    assert resolve_compile("step") == "step"
    with pytest.raises(kl.ConfigurationError, match="jit_compile.*'step'.*whole training step"):
        resolve_compile("steps")


def test_a_second_fit_with_other_trainer_flags_trains_as_eager():
    """The mode is decided per step: a second fit that clips (automatic hosting) after one
    that fused the update, on the same module."""
    results = {}
    for jit_compile in (False, FAST):
        module = kl.KerasLightningModule(
            small_mlp(dropout=False), optimizer=keras_adam(),
            loss="sparse_categorical_crossentropy", jit_compile=jit_compile,
        )
        train = loader(*data()[:2], batch_size=16)
        make_trainer(max_epochs=1).fit(module, train)
        make_trainer(max_epochs=1, gradient_clip_val=0.05).fit(module, train)
        results[jit_compile] = (weights(module), module.compile_stats)
    assert results[FAST][1].hosting == "automatic" and results[FAST][1].fallback is None
    for a, b in zip(results[FAST][0], results[False][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class SetDropoutRate(L.Callback):
    """Anneals a Python attribute of a layer: the graph must not keep the old value."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.model.layers[2].rate = 0.0


def test_a_layer_attribute_changed_in_python_captures_again():
    results = {}
    for jit_compile in (False, FAST):
        _, module, _ = run(
            jit_compile, optimizer=keras_adam, epochs=2,
            trainer_kw={"callbacks": [SetDropoutRate()]},
        )
        results[jit_compile] = (weights(module), module.compile_stats)
    assert results[FAST][1].train.captures == 2
    for a, b in zip(results[FAST][0], results[False][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_scheduler_hosts_automatically():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    results = {}
    for jit_compile in (False, FAST):
        _, module, trainer = run(
            jit_compile, optimizer=keras_adam, epochs=3,
            trainer_kw={"callbacks": [GradientAccumulationScheduler({1: 2})]},
        )
        results[jit_compile] = (weights(module), trainer.global_step, module.compile_stats)
    assert results[FAST][2].hosting == "automatic"
    assert results[FAST][1] == results[False][1] == 5 + 3 + 3
    for a, b in zip(results[FAST][0], results[False][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
