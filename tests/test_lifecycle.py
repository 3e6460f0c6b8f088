"""A subclass may override any Lightning hook the Lightning way, with or without ``super()``.

The module's own work in those hooks (building a factory's model, atomic checkpoint writes,
epoch metrics, checkpoint contents, RNG restore, per-rank randomness) runs either way, once
per call; the override's body runs too.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.checkpoint import HPARAMS_KEY, STATE_KEY
from keras_lightning.lifecycle import LIBRARY_HOOKS

from collections import Counter
from typing import Any

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import GuideRegressor, loader, make_trainer, mlp


def _overriding_class(call_super: bool) -> type:
    """A subclass that overrides every hook the module does work in, recording each call."""
    namespace: dict[str, Any] = {}

    def make(name: str) -> Any:
        def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.__dict__.setdefault("bodies", Counter())[name] += 1
            if name == "on_train_start" and "rng_at_start" not in self.__dict__:
                # resumed: the saved random state is back when training starts
                self.__dict__["rng_at_start"] = torch.get_rng_state().clone()
            result = getattr(super(cls, self), name)(*args, **kwargs) if call_super else None
            if name == "configure_optimizers" and not call_super:
                # what the user's body returns is their optimizer: here, the module's own
                result = kl.KerasLightningModule.configure_optimizers.__wrapped__(self)
            return [] if name == "configure_callbacks" else result

        hook.__name__ = name
        return hook

    for name in LIBRARY_HOOKS:
        namespace[name] = make(name)

    def count(name: str) -> Any:
        def library(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.__dict__.setdefault("library", Counter())[name] += 1
            return getattr(kl.KerasLightningModule, f"_library_{name}")(self, *args, **kwargs)

        return library

    for name in LIBRARY_HOOKS:
        namespace[f"_library_{name}"] = count(name)
    cls = type("Overriding", (kl.KerasLightningModule,), namespace)
    return cls


def _data(n: int = 24) -> torch.utils.data.DataLoader:
    rng = np.random.default_rng(0)
    return loader(
        rng.normal(size=(n, 64)).astype("float32"),
        rng.integers(0, 10, size=n),
        batch_size=8,
    )


def _module(cls: type) -> Any:
    return cls(
        lambda: mlp(hidden=8),  # a factory: built in configure_model
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


@pytest.mark.parametrize("call_super", [False, True], ids=["without_super", "with_super"])
def test_overriding_every_hook_loses_nothing(tmp_path, call_super):
    cls = _overriding_class(call_super)
    module = _module(cls)
    data = _data()
    trainer = make_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(module, data, data)

    # configure_model: the factory's model was built and trained
    assert isinstance(module.model, keras.Model) and trainer.global_step == 6
    # setup: the atomic writer is in place
    assert isinstance(trainer.strategy.checkpoint_io, kl.AtomicCheckpointIO)
    # epoch ends: exact epoch values logged, equal to the same run of a plain module
    reference = _module(kl.KerasLightningModule)
    reference_trainer = make_trainer(max_epochs=2)
    reference_trainer.fit(reference, data, data)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(
            float(reference_trainer.callback_metrics[key]), abs=1e-6
        ), key

    # on_save_checkpoint: model config, arguments and RNG states in the file
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert HPARAMS_KEY in saved["hyper_parameters"] and STATE_KEY in saved

    # on_load_checkpoint: resuming restores the saved random streams: training starts from
    # the same generator state as a plain module resumed from the same checkpoint
    class StartState(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rng = torch.get_rng_state().clone()

    start = StartState()
    torch.manual_seed(321)
    make_trainer(max_epochs=3, callbacks=[start]).fit(
        _module(kl.KerasLightningModule), data, ckpt_path=path
    )
    torch.manual_seed(123)  # something else again: the checkpoint's state must win
    resumed = _module(cls)
    trainer = make_trainer(max_epochs=3)
    trainer.fit(resumed, data, ckpt_path=path)
    assert torch.equal(resumed.rng_at_start, start.rng)
    assert not torch.equal(start.rng, torch.manual_seed(123).get_state())

    # test: the test epoch's values are logged
    results = trainer.test(resumed, data, verbose=False)
    assert set(results[0]) == {"test_loss", "test_accuracy"}

    # every library part ran exactly as often as its hook's body: once per call
    for instance in (module, resumed):
        bodies, library = instance.bodies, instance.library
        assert set(library) == set(bodies)
        assert library == bodies, (library, bodies)
    assert module.library["on_train_epoch_end"] == 2
    assert module.library["on_validation_epoch_start"] == 3  # sanity check + 2 epochs


def test_a_keras_train_step_model_keeps_its_logs_when_hooks_are_overridden():
    class Quiet(kl.KerasLightningModule):
        def on_train_epoch_start(self) -> None:  # no super()
            pass

        def on_train_epoch_end(self) -> None:  # no super()
            pass

    def build() -> GuideRegressor:
        keras.utils.set_random_seed(0)
        model = GuideRegressor()
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
        model(torch.zeros(1, 3))
        return model

    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(Quiet(build()), loader(x, y, batch_size=8))
    # Keras' own fit on the same data and weights: metrics reset at each epoch start, so the
    # second epoch's mae covers that epoch only (the overridden hook must not lose the reset).
    history = build().fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "mae"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(history[key][-1], rel=1e-5)


def test_hooks_defined_twice_up_a_hierarchy_run_the_library_part_once():
    class Base(kl.KerasLightningModule):
        def on_train_epoch_end(self) -> None:
            super().on_train_epoch_end()

    class Leaf(Base):
        def on_train_epoch_end(self) -> None:
            super().on_train_epoch_end()

        def _library_on_train_epoch_end(self) -> None:
            self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
            super()._library_on_train_epoch_end()

    module = Leaf(mlp(hidden=4), optimizer="sgd", loss="mse")
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, loader(torch.randn(8, 64), torch.randn(8, 10), batch_size=4))
    assert module.calls == 2
    assert isinstance(trainer.callback_metrics["loss"], torch.Tensor)


def test_every_library_hook_is_a_lightning_hook():
    for name in LIBRARY_HOOKS:
        assert hasattr(L.LightningModule, name), name
        assert callable(getattr(kl.KerasLightningModule, f"_library_{name}"))
