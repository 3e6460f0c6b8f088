"""jit_compile=True: same losses as eager, few compiles, no graph breaks, eager fallback."""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.compiled import (
    CompiledStep,
    drop_no_op_conversions,
    install_dynamo_shims,
    resolve_compile,
)

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def regularized_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(32, activation="relu", kernel_regularizer="l2")(inputs)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def discriminator(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(8, 3, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.GlobalMaxPooling2D(),
            layers.Dense(1),
        ]
    )


BATCH_SIZE = 50  # of every loader ``train`` builds
EPOCHS = 2  # ``train``'s default


def train(model_fn, x, y, compile, val=None, epochs=EPOCHS, **kwargs):
    module = kl.KerasLightningModule(model_fn(), jit_compile=compile, **kwargs)
    record = StepLosses()
    trainer = make_trainer(max_epochs=epochs, callbacks=[record])
    val_loader = None if val is None else loader(*val, batch_size=BATCH_SIZE)
    trainer.fit(module, loader(x, y, batch_size=BATCH_SIZE), val_loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module, np.array(record.losses), metrics


@pytest.mark.parametrize(
    ("spec", "backend"),
    [(False, None), (None, None), (True, "eager"), ("eager", "eager"), ("aot_eager", "aot_eager"),
     ("inductor", "inductor")],
)
def test_resolve_compile(spec, backend):
    assert resolve_compile(spec) == backend


@pytest.mark.parametrize("spec", ["fast", 1, "max-autotune"])
def test_bad_compile_argument_is_refused_with_the_fix(spec):
    with pytest.raises(kl.ConfigurationError, match=r"`jit_compile` must be True, False, .step."):
        kl.KerasLightningModule(regularized_mlp(), optimizer="adam", loss="mse", jit_compile=spec)


def test_compiled_losses_equal_eager_with_model_losses(digits):
    x, y = digits["x_train"][:400], digits["y_train"][:400]
    val = (digits["x_val"][:100], digits["y_val"][:100])
    kwargs = dict(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    _, eager, eager_metrics = train(regularized_mlp, x, y, False, val, **kwargs)
    module, compiled, compiled_metrics = train(regularized_mlp, x, y, True, val, **kwargs)
    train_batches, val_batches = len(x) // BATCH_SIZE, len(val[0]) // BATCH_SIZE
    assert len(eager) == len(compiled) == EPOCHS * train_batches
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    assert compiled_metrics.keys() == eager_metrics.keys()
    for name, value in eager_metrics.items():
        assert compiled_metrics[name] == pytest.approx(value, rel=1e-5), name
    stats = module.compile_stats
    assert stats is not None and stats.fallback is None
    assert stats.graph_breaks == 0
    # One graph for training and one for validation (training=False); batches of one size.
    assert 1 <= stats.frames_compiled <= 2
    # The sanity check's first batch resolves the loss eagerly; every later batch is compiled:
    # the other sanity batch, and every training and validation batch of every epoch.
    sanity_batches = min(2, val_batches)  # Trainer(num_sanity_val_steps=2), the default
    assert stats.calls == (sanity_batches - 1) + EPOCHS * (train_batches + val_batches)


def test_conv_with_global_max_pooling_has_no_graph_break():
    generator = np.random.default_rng(0)
    x = generator.random((200, 8, 8, 1), dtype=np.float32)
    y = generator.integers(0, 2, (200, 1)).astype("float32")
    kwargs = dict(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    _, eager, _ = train(discriminator, x, y, False, **kwargs)
    module, compiled, _ = train(discriminator, x, y, True, **kwargs)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    assert module.compile_stats.graph_breaks == 0
    assert module.compile_stats.frames_compiled == 1


def batchnorm_dropout_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(32)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def test_batchnorm_and_dropout_compile_whole_and_match_eager(digits):
    x, y = digits["x_train"][:400], digits["y_train"][:400]
    val = (digits["x_val"][:100], digits["y_val"][:100])
    kwargs = dict(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    eager_module, eager, eager_metrics = train(batchnorm_dropout_mlp, x, y, False, val, **kwargs)
    module, compiled, compiled_metrics = train(batchnorm_dropout_mlp, x, y, True, val, **kwargs)
    # Same dropout masks (Keras' seed state advances inside the graph) and BN statistics.
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, value in eager_metrics.items():
        assert compiled_metrics[name] == pytest.approx(value, rel=1e-5), name
    for ours, theirs in zip(module.model.variables, eager_module.model.variables, strict=True):
        np.testing.assert_allclose(
            ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=ours.path
        )
    assert module.compile_stats.graph_breaks == 0
    assert module.compile_stats.frames_compiled == 2  # training=True and training=False


def test_the_shims_compute_what_keras_computes():
    install_dynamo_shims()
    x = torch.randn(4, 5, 6)
    assert torch.equal(keras.ops.max(x, axis=(1, 2)), torch.amax(x, dim=(1, 2)))
    assert torch.equal(keras.ops.max(x), torch.max(x))
    compiled = torch.compile(lambda t: keras.ops.max(t, axis=1, initial=0.5), backend="eager")
    assert torch.equal(compiled(x), keras.ops.max(x, axis=1, initial=0.5))
    target, logits = torch.rand(6, 1).round(), torch.randn(6, 1)
    for from_logits, output in ((True, logits), (False, torch.sigmoid(logits))):
        bce = keras.losses.BinaryCrossentropy(from_logits=from_logits)
        compiled_bce = torch.compile(lambda t, o: bce(t, o), backend="eager")  # noqa: B023
        assert torch.equal(compiled_bce(target, output), bce(target, output))
    x = torch.randn(8, 3, 5)
    for axes in ([0], [0, 2], (1,)):
        for keepdims in (False, True):
            eager = keras.ops.moments(x, axes, keepdims=keepdims)
            compiled_moments = torch.compile(
                lambda t, a=axes, k=keepdims: keras.ops.moments(t, a, keepdims=k),
                backend="eager",
            )
            for ours, theirs in zip(compiled_moments(x), eager, strict=True):
                assert torch.equal(ours, theirs)


def test_smaller_last_batch_costs_at_most_one_recompile(digits):
    x, y = digits["x_train"][:230], digits["y_train"][:230]  # 4 batches of 50, then 30
    module, _, _ = train(regularized_mlp, x, y, True, epochs=3, optimizer="sgd",
                         loss="sparse_categorical_crossentropy")
    stats = module.compile_stats
    assert stats.fallback is None  # it ran compiled throughout, not eagerly after a failure
    # the full batches' graph, at most one more for the smaller last batch, none per epoch
    assert 1 <= stats.frames_compiled <= 2
    assert stats.graph_breaks == 0


def test_a_failing_compile_falls_back_to_eager_with_a_warning(digits, monkeypatch):
    x, y = digits["x_train"][:200], digits["y_train"][:200]
    kwargs = dict(optimizer="adam", loss="sparse_categorical_crossentropy")
    _, eager, _ = train(regularized_mlp, x, y, False, **kwargs)

    def broken_compile(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="running it eagerly from now on"):
        module, compiled, _ = train(regularized_mlp, x, y, True, **kwargs)
    np.testing.assert_array_equal(compiled, eager)
    assert module.compile_stats.fallback == "RuntimeError: backend exploded"
    assert module.compile_stats.calls == 1  # then eager, without trying again


def _double_sum(x):
    return (x * 2).sum()


def test_a_compiled_step_pickles_and_compiles_again():
    import copy
    import pickle

    step = CompiledStep(_double_sum, backend="eager")
    assert float(step(torch.ones(3))) == 6.0
    for clone in (pickle.loads(pickle.dumps(step)), copy.deepcopy(step)):
        assert clone.active and float(clone(torch.ones(4))) == 8.0
        assert clone.stats.calls == 2


def test_user_errors_are_not_swallowed_by_the_fallback():
    def fn(x):
        raise kl.ShapeMismatchError("bad targets")

    step = CompiledStep(fn, backend="eager")
    with pytest.raises(kl.ShapeMismatchError, match="bad targets"):
        step(torch.ones(2))
    assert step.active


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_dropping_no_op_conversions_keeps_the_graph_exact(autocast):
    """The graph dynamo captures from a Keras forward and loss, with and without the cleanup."""
    model = regularized_mlp(seed=1)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    y = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    captured = []

    def record(graph_module, example_inputs):
        captured.append((graph_module, example_inputs))
        return graph_module.forward

    def step(x, y):
        return loss(y, model(x, training=True)) + sum(model.losses)

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.compile(step, backend=record)(x, y)
        (graph, inputs), = captured
        before = [n.target for n in graph.graph.nodes if n.op == "call_method"]
        expected = graph(*inputs)
        removed = drop_no_op_conversions(graph)
        after = [n.target for n in graph.graph.nodes if n.op == "call_method"]
        result = graph(*inputs)
    assert removed >= 10  # Keras' convert_to_tensor around every op
    assert 0 < after.count("to") < before.count("to")  # real conversions stay
    for ours, theirs in zip(result, expected, strict=True):
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
