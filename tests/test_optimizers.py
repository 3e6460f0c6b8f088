"""Keras optimizers behind a real torch.optim.Optimizer, driven by Lightning."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp


def clone(model: keras.Model) -> keras.Model:
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def guide_step(model, optimizer, x, y):
    """One step of the guide's hand-written loop (Keras optimizer, torch loss)."""
    loss = torch.nn.functional.cross_entropy(model(x, training=True), y)
    model.zero_grad()
    loss.backward()
    weights = list(model.trainable_weights)
    with torch.no_grad():
        optimizer.apply([w.value.grad for w in weights], weights)


def test_adapter_step_is_exactly_the_guides_keras_update(digits):
    x, y = torch.tensor(digits["x_train"][:32]), torch.tensor(digits["y_train"][:32])
    model = mlp(hidden=16)
    twin = clone(model)
    adapter = kl.KerasOptimizer(keras.optimizers.Adam(1e-2), model.trainable_variables)
    reference = keras.optimizers.Adam(1e-2)
    steps = 3
    for _ in range(steps):
        adapter.zero_grad()
        torch.nn.functional.cross_entropy(model(x, training=True), y).backward()
        adapter.step()
        guide_step(twin, reference, x, y)
    for ours, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert int(adapter.keras_optimizer.iterations) == int(reference.iterations) == steps


def test_state_dict_holds_slots_and_iterations_and_restores_them(digits):
    x, y = torch.tensor(digits["x_train"][:32]), torch.tensor(digits["y_train"][:32])
    model = mlp(hidden=16)
    adapter = kl.KerasOptimizer(keras.optimizers.Adam(1e-2), model.trainable_variables)
    steps = 2
    for _ in range(steps):
        adapter.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        adapter.step()
    state = adapter.state_dict()
    # iterations, learning rate, and two Adam moments per trainable variable
    assert len(state["keras_variables"]) == 2 + 2 * len(model.trainable_variables)
    twin = clone(model)
    restored = kl.KerasOptimizer(keras.optimizers.Adam(1e-2), twin.trainable_variables)
    restored.load_state_dict(state)
    assert int(restored.keras_optimizer.iterations) == steps
    for opt, net in ((adapter, model), (restored, twin)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for ours, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_loading_state_of_another_optimizer_is_refused():
    model = mlp(hidden=4)
    adam = kl.KerasOptimizer(keras.optimizers.Adam(), model.trainable_variables)
    sgd = kl.KerasOptimizer(keras.optimizers.SGD(), mlp(hidden=4).trainable_variables)
    before = [v.value.clone() for v in sgd.keras_optimizer.variables]
    with pytest.raises(kl.CheckpointError, match="is a SGD, but the checkpoint holds the state of an? Adam"):
        sgd.load_state_dict(adam.state_dict())
    # A state without the class (written by version 0.1.0) is still checked by count.
    legacy = {k: v for k, v in adam.state_dict().items() if k != "keras_class"}
    with pytest.raises(
        kl.CheckpointError, match="holds 10 Keras optimizer variables but this optimizer has"
    ):
        sgd.load_state_dict(legacy)
    for variable, value in zip(sgd.keras_optimizer.variables, before, strict=True):
        assert torch.equal(variable.value, value)  # nothing was assigned
    with pytest.raises(kl.CheckpointError, match="not written by a KerasOptimizer"):
        adam.load_state_dict(torch.optim.SGD(mlp(hidden=4).parameters(), lr=0.1).state_dict())


def test_torch_scheduler_lr_reaches_the_keras_optimizer(digits):
    keras_opt = keras.optimizers.SGD(0.4)
    used = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # The learning rate the Keras update of this step used.
            used[trainer.current_epoch] = float(keras.ops.convert_to_numpy(keras_opt.learning_rate))

    module = kl.KerasLightningModule(
        mlp(hidden=8),
        optimizer=keras_opt,
        loss=torch.nn.CrossEntropyLoss(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    make_trainer(max_epochs=3, callbacks=[Record()]).fit(
        module, loader(digits["x_train"][:64], digits["y_train"][:64])
    )
    assert used == pytest.approx({0: 0.4, 1: 0.2, 2: 0.1})


def test_keras_learning_rate_schedule_keeps_working_and_is_visible_to_lightning(digits):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    keras_opt = keras.optimizers.SGD(schedule)
    module = kl.KerasLightningModule(
        mlp(hidden=8), optimizer=keras_opt, loss=torch.nn.CrossEntropyLoss()
    )
    trainer = make_trainer(max_steps=3)
    trainer.fit(module, loader(digits["x_train"][:96], digits["y_train"][:96]))
    assert int(keras_opt.iterations) == trainer.global_step == trainer.max_steps
    # decayed once per step (decay_steps=1): the schedule's value after max_steps updates
    expected = float(schedule(trainer.max_steps))
    assert expected == pytest.approx(0.1 * 0.5**trainer.max_steps)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_keras_schedule_together_with_lr_scheduler_is_refused(digits):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    module = kl.KerasLightningModule(
        mlp(),
        optimizer=keras.optimizers.SGD(schedule),
        loss=torch.nn.CrossEntropyLoss(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1),
    )
    with pytest.raises(kl.ConfigurationError, match="would fight over the learning rate"):
        make_trainer(max_steps=1).fit(module, loader(digits["x_train"][:8], digits["y_train"][:8]))


def test_lightning_gradient_clipping_applies_to_the_keras_update(digits):
    x, y = torch.tensor(digits["x_train"][:32]), torch.tensor(digits["y_train"][:32])
    model = mlp(hidden=16)
    reference = clone(model)
    torch.nn.functional.cross_entropy(reference(x, training=True), y).backward()
    grads = [w.value.grad.numpy().copy() for w in reference.trainable_weights]
    before = model.get_weights()
    module = kl.KerasLightningModule(
        model, optimizer=keras.optimizers.SGD(1.0), loss=torch.nn.CrossEntropyLoss()
    )
    make_trainer(max_steps=1, gradient_clip_val=1e-3, gradient_clip_algorithm="value").fit(
        module, loader(digits["x_train"][:32], digits["y_train"][:32])
    )
    for old, new, grad in zip(before, model.get_weights(), grads, strict=True):
        np.testing.assert_allclose(new, old - np.clip(grad, -1e-3, 1e-3), atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch(digits):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    model = mlp(hidden=16)
    twin = clone(model)
    accumulated = kl.KerasLightningModule(
        model, optimizer=keras.optimizers.SGD(0.5), loss=torch.nn.CrossEntropyLoss()
    )
    big = kl.KerasLightningModule(
        twin, optimizer=keras.optimizers.SGD(0.5), loss=torch.nn.CrossEntropyLoss()
    )
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=2)
    trainer.fit(accumulated, loader(x, y, batch_size=16))
    make_trainer(max_steps=1).fit(big, loader(x, y, batch_size=32))
    for ours, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # one Keras update for accumulate_grad_batches batches
    assert int(trainer.optimizers[0].keras_optimizer.iterations) == trainer.max_steps


@pytest.mark.parametrize(
    "optimizer",
    [torch.optim.Adam, lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), "rmsprop"],
    ids=["torch-class", "torch-callable", "keras-name"],
)
def test_every_optimizer_form_trains(digits, optimizer):
    module = kl.KerasLightningModule(
        mlp(hidden=32), optimizer=optimizer, loss=torch.nn.CrossEntropyLoss()
    )
    losses = []

    class Epochs(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["loss"]))

    make_trainer(max_epochs=3, callbacks=[Epochs()]).fit(
        module, loader(digits["x_train"], digits["y_train"], shuffle=True)
    )
    assert losses[-1] < losses[0]


def test_callable_returning_something_else_is_refused(digits):
    module = kl.KerasLightningModule(
        mlp(), optimizer=lambda params: "adam", loss=torch.nn.CrossEntropyLoss()
    )
    with pytest.raises(kl.KerasLightningTypeError, match="returned str, not a torch.optim.Optimizer"):
        make_trainer(max_steps=1).fit(module, loader(digits["x_train"][:8], digits["y_train"][:8]))


def test_zero_grad_drops_or_zeroes_the_gradients(digits):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    adapter = kl.KerasOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
    params = adapter.param_groups[0]["params"]
    model(torch.as_tensor(digits["x_train"][:8])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    adapter.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    adapter.zero_grad()
    assert all(p.grad is None for p in params)
