"""Nothing trains silently wrong: optimizers that cannot change the model are refused up front."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp
from test_precision import floatx, keras_dtypes  # noqa: F401 (fixtures)


def _data() -> torch.utils.data.DataLoader:
    rng = np.random.default_rng(0)
    return loader(
        rng.normal(size=(16, 64)).astype("float32"), rng.integers(0, 10, size=16), batch_size=8
    )


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


class _PlainModule(L.LightningModule):
    """The reference: a plain LightningModule given the same wrong optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.optimizer


def test_an_optimizer_over_other_parameters_is_refused_before_any_step():
    other = torch.nn.Linear(64, 10)
    # Plain Lightning accepts it and trains nothing: the weights do not move.
    plain = _PlainModule(torch.optim.SGD(other.parameters(), lr=0.5))
    before = plain.net.weight.detach().clone()
    make_trainer(max_epochs=2).fit(plain, _data())
    assert torch.equal(plain.net.weight, before)
    # The Keras module refuses it, naming the fix, before the first step.
    model = mlp(hidden=8)
    module = kl.KerasLightningModule(
        model, optimizer=torch.optim.SGD(other.parameters(), lr=0.5), loss=torch.nn.CrossEntropyLoss()
    )
    weights = _weights(model)
    trainer = make_trainer(max_epochs=2)
    with pytest.raises(kl.ConfigurationError, match=r"none of which is a weight of the Keras model"):
        trainer.fit(module, _data())
    assert trainer.global_step == 0
    for a, b in zip(weights, _weights(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_optimizer_over_part_of_the_weights_is_accepted():
    model = mlp(hidden=8)
    head = [kl.devices.parameter_of(v) for v in model.layers[-1].trainable_variables]

    class HeadOnly(kl.KerasLightningModule):
        def configure_optimizers(self):
            return torch.optim.SGD(head, lr=0.5)

    module = HeadOnly(model, loss=torch.nn.CrossEntropyLoss())
    first = _weights(model)
    make_trainer(max_epochs=1).fit(module, _data())
    after = _weights(model)
    np.testing.assert_array_equal(first[0], after[0])  # the first layer is not optimized
    assert not np.array_equal(first[2], after[2])  # the head trained


def _bf16_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(8, dtype="bfloat16"), keras.layers.Dense(10, dtype="bfloat16")]
    )


def test_keras_adam_in_bfloat16_is_refused_where_keras_fit_never_changes_a_weight(floatx):  # noqa: F811
    assert float(torch.tensor(0.999, dtype=torch.bfloat16)) == 1.0  # why: beta_2 rounds to 1
    floatx("bfloat16")
    # Keras' own fit with the same model and optimizer: every weight stays as it was.
    reference = _bf16_model()
    reference.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    start = _weights(reference)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 64)).astype("float32"), rng.normal(size=(16, 10)).astype("float32")
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for a, b in zip(start, _weights(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    # The module refuses it, naming the precision that trains.
    module = kl.KerasLightningModule(_bf16_model(), optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    trainer = make_trainer(precision="bf16-true", max_epochs=1)
    with pytest.raises(kl.ConfigurationError, match=r"beta_2=0.999, which rounds to 1.0 in bfloat16.*bf16-mixed"):
        trainer.fit(module, loader(x, y, batch_size=8))
    # SGD has no such decay: it trains in bfloat16.
    model = _bf16_model()
    start = _weights(model)
    module = kl.KerasLightningModule(model, optimizer=keras.optimizers.SGD(0.1), loss="mse")
    make_trainer(precision="bf16-true", max_epochs=1).fit(module, loader(x, y, batch_size=8))
    assert any(not np.array_equal(a, b) for a, b in zip(start, _weights(model), strict=True))
