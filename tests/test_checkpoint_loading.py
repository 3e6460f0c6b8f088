"""Resuming is all or nothing: a checkpoint that does not fit is refused before anything loads."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
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


# ---------------------------------------------------------------------- what still loads


def test_strict_false_still_loads_the_matching_part(tmp_path):
    trainer = make_trainer(max_epochs=1)
    module = _module("adam")
    trainer.fit(module, _data())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    # a model with one more layer: the first two layers match, the extra one is missing
    keras.utils.set_random_seed(5)
    wider = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(10),
        keras.layers.Dense(10),
    ])
    with pytest.raises(kl.CheckpointError, match="Missing from the checkpoint"):
        kl.KerasLightningModule.load_from_checkpoint(path, model=wider)
    restored = kl.KerasLightningModule.load_from_checkpoint(path, model=wider, strict=False)
    for ours, theirs in zip(module.model.get_weights(), restored.model.get_weights()[:4], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_an_override_may_migrate_the_checkpoint_before_it_is_checked(tmp_path):
    trainer = make_trainer(max_epochs=1)
    trainer.fit(_module("adam"), _data())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {f"old.{k}": v for k, v in saved["state_dict"].items()}  # renamed
    torch.save(saved, path)

    class Migrating(kl.KerasLightningModule):
        def on_load_checkpoint(self, checkpoint):  # the usual Lightning key migration
            checkpoint["state_dict"] = {
                k.removeprefix("old."): v for k, v in checkpoint["state_dict"].items()
            }

    module = Migrating(
        mlp(hidden=8, seed=1), optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, _data(), ckpt_path=path)
    assert trainer.current_epoch == 2


def test_a_resume_that_never_trains_leaves_no_random_state_behind(adam_checkpoint):
    module = _module(keras.optimizers.Adam(1e-2))
    # max_epochs already reached by the checkpoint: no batch runs
    make_trainer(max_epochs=1).fit(module, _data(), ckpt_path=adam_checkpoint)
    torch.manual_seed(7)
    expected = torch.get_rng_state().clone()
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("rng", torch.get_rng_state().clone())

    make_trainer(max_epochs=1, callbacks=[Probe()]).fit(module, loader(torch.randn(8, 64), torch.randint(0, 10, (8,))))
    # the new fit's random stream is the caller's (nothing from the old checkpoint): compare
    # with the same fit of a fresh module from the same seed
    fresh = _module(keras.optimizers.Adam(1e-2))  # (builds with its own seed: before ours)
    torch.manual_seed(7)
    other = {}

    class Probe2(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            other.setdefault("rng", torch.get_rng_state().clone())

    make_trainer(max_epochs=1, callbacks=[Probe2()]).fit(
        fresh, loader(torch.randn(8, 64), torch.randint(0, 10, (8,)))
    )
    assert torch.equal(seen["rng"], other["rng"])
    assert expected.shape == seen["rng"].shape


def test_a_kerasoptimizer_object_as_optimizer_resumes(adam_checkpoint):
    model = mlp(hidden=8, seed=1)

    class Module(kl.KerasLightningModule):
        pass

    adapter = kl.KerasOptimizer(keras.optimizers.Adam(1e-2), model.trainable_variables)
    module = Module(model, optimizer=adapter, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, _data(), ckpt_path=adam_checkpoint)
    assert trainer.current_epoch == 2


def test_an_optimizer_over_added_torch_parameters_is_accepted():
    class WithTemperature(kl.KerasLightningModule):
        def __init__(self, model):
            super().__init__(model, loss=torch.nn.CrossEntropyLoss())
            self.temperature = torch.nn.Parameter(torch.ones(()))

        def configure_optimizers(self):
            keras_opt = kl.KerasOptimizer(keras.optimizers.SGD(0.1), self.model.trainable_variables)
            return [keras_opt, torch.optim.SGD([self.temperature], lr=0.1)]

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss, _ = self.compute_loss(self(x, training=True) / self.temperature, y)
            keras_opt, torch_opt = self.optimizers()
            keras_opt.zero_grad()
            torch_opt.zero_grad()
            self.manual_backward(loss)
            keras_opt.step()
            torch_opt.step()

    module = WithTemperature(mlp(hidden=8))
    module.automatic_optimization = False
    make_trainer(max_epochs=1).fit(module, _data())
    assert float(module.temperature) != 1.0
