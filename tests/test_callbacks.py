"""Keras users' callback habits under Lightning: TerminateOnNaN, and Keras callbacks refused clearly."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import GuideRegressor, loader, make_trainer, mlp


def _data_with_nan_in_batch(bad_batch: int, batches: int = 5, batch_size: int = 4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batches * batch_size, 64)).astype("float32")
    x[bad_batch * batch_size] = np.nan
    y = rng.integers(0, 10, size=batches * batch_size)
    return x, y


class _Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_keras_callback_given_to_the_trainer_is_refused_naming_the_lightning_way():
    data = loader(torch.randn(8, 64), torch.randint(0, 10, (8,)))
    # plain Lightning fails inside its own hooks, with an AttributeError
    with pytest.raises(AttributeError):
        make_trainer(max_epochs=1, callbacks=[keras.callbacks.TerminateOnNaN()]).fit(_Plain(), data)
    module = kl.KerasLightningModule(mlp(hidden=4), optimizer="sgd", loss=torch.nn.CrossEntropyLoss())
    trainer = make_trainer(max_epochs=1, callbacks=[keras.callbacks.TerminateOnNaN()])
    with pytest.raises(kl.KerasLightningTypeError, match=r"keras.callbacks.TerminateOnNaN.*Use kl.TerminateOnNaN\(\) instead"):
        trainer.fit(module, data)
    with pytest.raises(kl.KerasLightningTypeError, match=r"EarlyStopping.*lightning.pytorch.callbacks.EarlyStopping"):
        make_trainer(max_epochs=1, callbacks=[keras.callbacks.EarlyStopping()]).fit(module, data)


def test_terminate_on_nan_stops_where_keras_fit_stops(tmp_path):
    x, y = _data_with_nan_in_batch(bad_batch=2)
    # Keras' own fit with its TerminateOnNaN, on the same batches
    reference = mlp(hidden=4)
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.TerminateOnNaN()])
    keras_steps = int(reference.optimizer.iterations)

    stop = kl.TerminateOnNaN()
    module = kl.KerasLightningModule(
        mlp(hidden=4), optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainer = make_trainer(max_epochs=3, callbacks=[stop], default_root_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match=r"TerminateOnNaN: the loss of batch 2 \(epoch 0"):
        trainer.fit(module, loader(x, y, batch_size=4))
    assert stop.stopped_at == (0, 2, keras_steps)
    assert trainer.global_step == keras_steps == 3


def test_terminate_on_nan_reads_a_keras_train_step_s_loss():
    model = GuideRegressor()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model(torch.zeros(1, 3))
    x = np.ones((12, 3), dtype="float32")
    x[8] = np.nan  # third batch of 4
    stop = kl.TerminateOnNaN()
    trainer = make_trainer(max_epochs=2, callbacks=[stop], enable_progress_bar=True)
    with pytest.warns(RuntimeWarning, match="TerminateOnNaN"):
        trainer.fit(kl.KerasLightningModule(model), loader(x, x[:, :1], batch_size=4))
    assert stop.stopped_at is not None and stop.stopped_at[1] == 2


def test_a_checkpoint_with_non_finite_weights_says_so(tmp_path):
    x, y = _data_with_nan_in_batch(bad_batch=1)
    module = kl.KerasLightningModule(
        mlp(hidden=4), optimizer=keras.optimizers.SGD(0.1), loss=torch.nn.CrossEntropyLoss()
    )
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, loader(x, y, batch_size=4))
    assert not all(np.isfinite(w).all() for w in module.model.get_weights())
    good = tmp_path / "last.ckpt"
    good.write_bytes(b"a good checkpoint was here")
    with pytest.warns(RuntimeWarning, match=r"whose weights are not finite .* It replaces the checkpoint that was there"):
        trainer.save_checkpoint(good)
