"""Trainer precisions with Keras models: what trains, what is refused, and why."""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.precision import check_keras_optimizer, check_precision

from collections.abc import Iterator
from typing import Any

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer
from lightning.pytorch.plugins.precision import MixedPrecision


@pytest.fixture
def keras_dtypes() -> Iterator[None]:
    """Restore Keras' global dtype policy and floatx exactly as they were (even unset)."""
    from keras.src.backend.common import global_state

    policy = global_state.get_global_attribute("dtype_policy", None)
    floatx = keras.config.floatx()
    yield
    keras.config.set_floatx(floatx)
    global_state.set_global_attribute("dtype_policy", policy)


@pytest.fixture
def policy(keras_dtypes: None) -> Any:
    """Set a global Keras dtype policy for one test."""
    return keras.config.set_dtype_policy


@pytest.fixture
def floatx(keras_dtypes: None) -> Any:
    """Set the layers' policy and Keras' floatx (loss and metric dtype) for one test."""

    def set_both(dtype: str) -> None:
        keras.config.set_dtype_policy(dtype)
        keras.config.set_floatx(dtype)

    return set_both


def small(hidden: int = 16, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(10)]
    )


class Probe(kl.KerasLightningModule):
    """Records the CPU autocast state while the loss is computed (after the forward)."""

    seen: set[Any]

    def compute_loss(self, y_pred: Any, y: Any, sample_weight: Any = None) -> Any:
        state = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        self.__dict__.setdefault("seen", set()).add(state)
        return super().compute_loss(y_pred, y, sample_weight)


def _module(model: Any, optimizer: Any = "adam", cls: type = kl.KerasLightningModule) -> Any:
    return cls(
        model,
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _flat(model: keras.Model) -> np.ndarray:
    return np.concatenate(
        [kl.devices.parameter_of(v).detach().double().numpy().ravel()
         for v in model.trainable_variables]
    )


# ---------------------------------------------------------------------- what trains


def test_bf16_mixed_autocasts_and_learns(digits):
    module = _module(small, optimizer=keras.optimizers.Adam(0.01), cls=Probe)
    trainer = make_trainer(precision="bf16-mixed", max_epochs=3)
    trainer.fit(
        module,
        loader(digits["x_train"], digits["y_train"], batch_size=64, shuffle=True),
        loader(digits["x_val"], digits["y_val"], batch_size=128),
    )
    assert module.seen == {(True, torch.bfloat16)}  # every step ran under bf16 autocast
    assert {str(v.dtype) for v in module.model.variables} == {"float32"}  # weights stay fp32
    assert float(trainer.callback_metrics["val_accuracy"]) > 0.8


def _one_sgd_step(digits: Any, scaler: torch.amp.GradScaler | None) -> tuple[Any, Any]:
    module = _module(small(seed=3), optimizer=keras.optimizers.SGD(0.5))
    before = _flat(module.model)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = make_trainer(plugins=[plugin], max_steps=1)
    trainer.fit(module, loader(digits["x_train"][:64], digits["y_train"][:64], batch_size=64))
    return module, _flat(module.model) - before


def test_16_mixed_grad_scaler_unscales_before_the_keras_update(digits):
    """Lightning's GradScaler (here on CPU) scales the loss by 2**10 and unscales the
    gradients on the adapter's param_groups before Keras applies them."""
    _, plain = _one_sgd_step(digits, scaler=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    module, scaled = _one_sgd_step(digits, scaler=scaler)
    assert np.abs(plain).max() > 1e-3
    np.testing.assert_allclose(scaled, plain, atol=1e-5)  # not 1024 times larger
    assert int(module.trainer.optimizers[0].keras_optimizer.iterations) == 1


def test_16_mixed_grad_scaler_skips_the_keras_update_on_overflow(digits):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # float16 gradients overflow
    module, delta = _one_sgd_step(digits, scaler=scaler)
    assert np.abs(delta).max() == 0.0  # step skipped: the adapter's step() never ran
    assert int(module.trainer.optimizers[0].keras_optimizer.iterations) == 0
    assert scaler.get_scale() < 2.0**120


def test_64_true_is_refused_because_keras_computes_float64_in_float32(digits, floatx):
    """Keras 3.15 on torch: float64 weights and inputs, float32 math (its type promotion)."""
    x = torch.rand(8, 64, dtype=torch.float64)
    k = torch.rand(64, 16, dtype=torch.float64)
    error = (keras.ops.matmul(x, k) - x @ k).abs().max()  # torch's own float64 matmul
    assert error > 1e-9  # float32 rounding, not float64
    floatx("float64")
    module = kl.KerasLightningModule(
        small, optimizer=keras.optimizers.SGD(0.1), loss=torch.nn.CrossEntropyLoss()
    )
    trainer = make_trainer(precision="64-true", max_steps=1)
    with pytest.raises(kl.ConfigurationError, match=r"precision='64-true'.*Use precision='32-true'"):
        trainer.fit(module, loader(digits["x_train"][:32], digits["y_train"][:32]))


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", "bfloat16"), ("16-true", "float16")]
)
def test_half_true_precisions_train_with_a_matching_floatx(digits, floatx, precision, dtype):
    floatx(dtype)
    module = _module(small, optimizer=keras.optimizers.SGD(0.1))
    trainer = make_trainer(precision=precision, max_steps=5)
    trainer.fit(module, loader(digits["x_train"], digits["y_train"], batch_size=64))
    assert {str(v.dtype) for v in module.model.variables} == {dtype}
    assert np.isfinite(float(trainer.callback_metrics["loss"]))


# ---------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("precision", "match"),
    [
        ("64-true", r"result_type\('float64', 'float64'\) == 'float32'"),
        ("16-true", r"set_dtype_policy\('float16'\).*set_floatx\('float16'\)"),
        ("bf16-true", r"set_dtype_policy\('bfloat16'\).*set_floatx\('bfloat16'\)"),
    ],
)
def test_true_precisions_refuse_float32_keras_variables(digits, precision, match):
    module = _module(small(seed=1))
    before = _flat(module.model)
    trainer = make_trainer(precision=precision, max_steps=1)
    with pytest.raises(kl.ConfigurationError, match=match):
        trainer.fit(module, loader(digits["x_train"][:32], digits["y_train"][:32]))
    # Refused before Lightning converted the module: the user's model is untouched.
    assert {kl.devices.parameter_of(v).dtype for v in module.model.variables} == {
        torch.float32
    }
    np.testing.assert_array_equal(_flat(module.model), before)


def test_mixed_precision_refuses_float64_variables(policy):
    policy("float64")
    with pytest.raises(kl.ConfigurationError, match=r"precision='bf16-mixed'.*float64"):
        check_precision("bf16-mixed", small())


def test_mixed_float16_policy_needs_16_mixed(digits, policy):
    policy("mixed_float16")
    model = small()
    with pytest.raises(kl.ConfigurationError, match=r"mixed_float16.*precision='16-mixed'"):
        check_precision("32-true", model)
    with pytest.raises(kl.ConfigurationError, match=r"mixed_float16.*precision='bf16-mixed'"):
        check_precision("bf16-mixed", model)
    check_precision("16-mixed", model)  # Lightning's GradScaler does the scaling


def test_unknown_precision_is_refused():
    with pytest.raises(kl.ConfigurationError, match=r"Expected one of .*Received: precision="):
        check_precision("transformer-engine", small())


def test_keras_loss_scale_optimizer_is_refused():
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(kl.ConfigurationError, match=r"optimizer=opt\.inner_optimizer"):
        check_keras_optimizer(wrapped)
    with pytest.raises(kl.ConfigurationError, match="LossScaleOptimizer"):
        kl.KerasOptimizer(wrapped, small().trainable_variables)


def test_model_compiled_under_mixed_float16_points_to_the_inner_optimizer(digits, policy):
    policy("mixed_float16")
    model = small()
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras' doing
    # On CPU, Lightning 2.6 turns precision="16-mixed" into "bf16-mixed"; the plugin keeps fp16.
    trainer = make_trainer(plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=1)
    with pytest.raises(kl.ConfigurationError, match=r"model\.optimizer\.inner_optimizer"):
        trainer.fit(kl.KerasLightningModule(model), loader(digits["x_train"][:32],
                                                            digits["y_train"][:32]))


def test_32_true_follows_the_keras_policy(digits):
    module = _module(small)
    trainer = make_trainer(precision="32-true", max_steps=2)
    trainer.fit(module, loader(digits["x_train"][:64], digits["y_train"][:64]))
    assert {str(v.dtype) for v in module.model.variables} == {"float32"}
    assert type(trainer.precision_plugin) is L.pytorch.plugins.precision.Precision
