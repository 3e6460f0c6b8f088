"""Resuming is all or nothing: a checkpoint that does not fit is refused before anything loads."""

from __future__ import annotations

import keras_lightning as kl

import keras
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp


def _data() -> torch.utils.data.DataLoader:
    rng = np.random.default_rng(0)
    return loader(
        rng.normal(size=(16, 64)).astype("float32"), rng.integers(0, 10, size=16), batch_size=8
    )


def _module(optimizer) -> kl.KerasLightningModule:
    return kl.KerasLightningModule(
        mlp(hidden=8, seed=1),
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


@pytest.fixture
def adam_checkpoint(tmp_path):
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module(keras.optimizers.Adam(1e-2)), _data())
    path = tmp_path / "adam.ckpt"
    trainer.save_checkpoint(path)
    return path


def _state(module: kl.KerasLightningModule) -> tuple[list[np.ndarray], torch.Tensor]:
    return [np.array(w) for w in module.model.get_weights()], torch.get_rng_state().clone()


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), r"is a SGD, but the checkpoint holds the state of a Adam"),
        (lambda: keras.optimizers.Adamax(1e-2), r"is a Adamax, but the checkpoint holds the state of a Adam"),
        (lambda: torch.optim.SGD, r"holds the state of a Keras optimizer \(Adam\), but this module trains with a torch optimizer"),
    ],
    ids=["sgd_momentum", "adamax", "torch_sgd"],
)
def test_resuming_with_another_optimizer_leaves_the_run_untouched(adam_checkpoint, optimizer, match):
    module = _module(optimizer())
    # the in-memory run that must survive: trained weights and the current random stream
    make_trainer(max_epochs=1).fit(module, _data())
    torch.manual_seed(1234)
    weights, rng = _state(module)
    trainer = make_trainer(max_epochs=3)
    with pytest.raises(kl.CheckpointError, match=match):
        trainer.fit(module, _data(), ckpt_path=adam_checkpoint)
    after_weights, after_rng = _state(module)
    for a, b in zip(weights, after_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(rng, after_rng)


def test_resuming_with_the_same_optimizer_class_still_works(adam_checkpoint):
    saved = torch.load(adam_checkpoint, weights_only=True)
    module = _module(keras.optimizers.Adam(1e-2))
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, _data(), ckpt_path=adam_checkpoint)
    optimizer = trainer.optimizers[0].keras_optimizer
    # 2 steps saved + 2 new ones: the slots and step count came from the checkpoint
    steps_per_epoch = trainer.num_training_batches
    assert int(optimizer.iterations) == int(
        saved["optimizer_states"][0]["keras_variables"][0]
    ) + steps_per_epoch


def test_a_checkpoint_of_another_architecture_is_refused_before_the_rng_moves(tmp_path):
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module("adam"), _data())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    other = kl.KerasLightningModule(mlp(hidden=5), optimizer="adam", loss="mse")
    make_trainer(max_epochs=1).fit(other, loader(torch.randn(8, 64), torch.randn(8, 10)))
    data = loader(torch.randn(8, 64), torch.randn(8, 10))
    torch.manual_seed(99)
    weights, rng = _state(other)
    with pytest.raises(kl.CheckpointError, match="does not match this Keras model; nothing was loaded"):
        make_trainer(max_epochs=3).fit(other, data, ckpt_path=path)
    after_weights, after_rng = _state(other)
    for a, b in zip(weights, after_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(rng, after_rng)
