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


MID_EPOCH_SCRIPT = r'''
import sys
import keras_lightning as kl
import keras, lightning as L, numpy as np, torch
from torchdata.stateful_dataloader import StatefulDataLoader

mode, out, resume_from = sys.argv[1], sys.argv[2], sys.argv[3]
L.seed_everything(0)
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((8,)),
    keras.layers.Dense(16, activation="relu"),
    keras.layers.Dropout(0.3),  # unseeded: draws from torch's global generator
    keras.layers.Dense(1),
])
rng = np.random.default_rng(0)
x = torch.as_tensor(rng.normal(size=(96, 8)).astype("float32"))
data = StatefulDataLoader(
    torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True
)
module = kl.KerasLightningModule(model, optimizer=keras.optimizers.Adam(1e-2), loss="mse")
common = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, max_epochs=2)
if mode == "uninterrupted":
    L.Trainer(enable_checkpointing=False, **common).fit(module, data)
elif mode == "interrupted":  # checkpoints mid-epoch, then stops as a killed run would
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=5, save_top_k=-1)
    L.Trainer(callbacks=[every], max_steps=17, **common).fit(module, data)
else:  # a new process resumes from the mid-epoch checkpoint
    L.Trainer(enable_checkpointing=False, **common).fit(module, data, ckpt_path=resume_from)
np.save(f"{out}/{mode}.npy", np.concatenate([w.ravel() for w in model.get_weights()]))
'''


@pytest.mark.timeout(300)
def test_a_mid_epoch_checkpoint_resumes_exactly_with_a_stateful_dataloader(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(MID_EPOCH_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONHASHSEED="0")

    def run(mode: str, resume_from: str = "") -> np.ndarray:
        done = subprocess.run(
            [sys.executable, str(script), mode, str(tmp_path), resume_from],
            env=env, capture_output=True, text=True, timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(tmp_path / f"{mode}.npy")

    uninterrupted = run("uninterrupted")
    interrupted = run("interrupted")
    steps_per_epoch = 96 // 8
    # step 15 is batch 3 of the second epoch: a mid-epoch checkpoint
    middle = tmp_path / f"epoch=1-step={steps_per_epoch + 3}.ckpt"
    assert middle.exists(), sorted(p.name for p in tmp_path.iterdir())
    resumed = run("resumed", str(middle))
    assert np.abs(resumed - uninterrupted).max() <= 1e-6
    assert np.abs(interrupted - uninterrupted).max() > 1e-4  # the stop did cut training short
