"""The low-overhead paths: the Keras optimizer's short update path, deferred step logging."""

from __future__ import annotations

import keras_lightning as kl

import csv

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp


def _gradient_sequence(model: keras.Model, steps: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        [torch.randn(tuple(v.shape), generator=generator) * 0.1 for v in model.trainable_variables]
        for _ in range(steps)
    ]


def _schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=2, decay_rate=0.5)


@pytest.mark.parametrize(
    ("make_optimizer", "path"),
    [
        (lambda: keras.optimizers.Adam(1e-2), "adam"),
        (lambda: keras.optimizers.Adam(_schedule(), beta_1=0.8, epsilon=1e-4), "adam"),
        (lambda: keras.optimizers.Adam(1e-2, amsgrad=True), "adam"),
        (lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1), "adam"),
        (lambda: keras.optimizers.SGD(0.1), "sgd"),
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), "sgd"),
        (lambda: keras.optimizers.SGD(_schedule(), momentum=0.9, nesterov=True), "sgd"),
        (lambda: keras.optimizers.RMSprop(1e-2), "short"),
        (lambda: keras.optimizers.Adam(1e-2, global_clipnorm=0.05), "short"),
        (lambda: keras.optimizers.Adam(1e-2, use_ema=True, ema_overwrite_frequency=3), "short"),
        (lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), "short"),
    ],
    ids=[
        "adam", "adam-schedule", "amsgrad", "adamw", "sgd", "sgd-momentum",
        "sgd-nesterov-schedule", "rmsprop", "clipnorm", "ema", "accumulate",
    ],
)
@pytest.mark.parametrize("missing_gradient", [False, True], ids=["all-grads", "one-grad-missing"])
def test_short_update_paths_are_bit_equal_to_keras_apply(make_optimizer, path, missing_gradient):
    reference_model, model = mlp(seed=3), mlp(seed=3)
    reference, optimizer = make_optimizer(), make_optimizer()
    adapter = kl.KerasOptimizer(optimizer, model.trainable_variables)
    steps = 7
    for step, grads in enumerate(_gradient_sequence(model, steps)):
        # From step 3 on, the last variable gets no gradient (a frozen branch, an unused
        # output): Keras' apply skips it, and so must every short path.
        skip = missing_gradient and step >= 3
        keep = len(grads) - 1 if skip else len(grads)
        with torch.no_grad():
            reference.apply(
                [g.clone() for g in grads[:keep]], reference_model.trainable_variables[:keep]
            )
        for i, param in enumerate(adapter.param_groups[0]["params"]):
            param.grad = grads[i].clone() if i < keep else None
        adapter.step()
    assert adapter.update_path == path  # decided on the second step, once the slots exist
    for ours, theirs in zip(model.variables, reference_model.variables, strict=True):
        assert torch.equal(ours.value, theirs.value), ours.path
    assert len(optimizer.variables) == len(reference.variables)
    for ours, theirs in zip(optimizer.variables, reference.variables, strict=True):
        assert torch.equal(ours.value, theirs.value), ours.path
    assert int(optimizer.iterations) == int(reference.iterations) > 0


def test_constrained_variables_keep_keras_apply():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, kernel_constraint=keras.constraints.NonNeg())]
    )
    adapter = kl.KerasOptimizer(keras.optimizers.SGD(0.5), model.trainable_variables)
    for _ in range(2):
        loss = model(torch.ones(2, 4)).sum()
        loss.backward()
        adapter.step()
        for param in adapter.param_groups[0]["params"]:
            param.grad = None
    assert adapter.update_path == "apply"
    assert float(model.layers[0].kernel.value.min()) >= 0.0  # the constraint was applied


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.at_epoch_end: list[float] = []
        self.batches: list[list[tuple[float, int]]] = []  # (loss, batch size) per epoch

    def on_train_epoch_start(self, trainer, pl_module):
        self.batches.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[-1].append((float(outputs["loss"]), len(batch[0])))

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_epoch_end.append(float(trainer.callback_metrics["loss"]))


def test_step_loss_is_logged_where_it_is_read(digits, tmp_path):
    # 330 samples: 10 batches of 32 and a last one of 10, so the weighted mean is not the mean
    x, y = digits["x_train"][:330], digits["y_train"][:330]
    module = kl.KerasLightningModule(
        mlp(), optimizer="sgd", loss=torch.nn.CrossEntropyLoss()
    )
    logged_steps: list[int] = []
    original_log = module.log

    def spy(name, value, *args, **kwargs):
        if name == "loss" and kwargs.get("on_step"):
            logged_steps.append(module.trainer.fit_loop.epoch_loop.batch_idx)
        return original_log(name, value, *args, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    record = StepLosses()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = make_trainer(max_epochs=2, logger=logger, log_every_n_steps=4, callbacks=[record])
    data = loader(x, y)
    trainer.fit(module, data)
    # First and last batch of each epoch, and the steps the logger writes (every 4th).
    batches, every = trainer.num_training_batches, trainer.log_every_n_steps
    assert batches == -(-len(x) // data.batch_size)
    expected = [
        batch
        for epoch in range(trainer.max_epochs)
        for batch in range(batches)
        if batch in (0, batches - 1) or (epoch * batches + batch + 1) % every == 0
    ]
    assert logged_steps == expected
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("loss")]
    written_steps = {int(row["step"]) for row in rows}
    # every log_every_n_steps-th step (plus the epoch means, at each epoch's last step)
    total = trainer.max_epochs * batches
    assert trainer.global_step == total
    assert {step for step in range(total) if (step + 1) % every == 0} <= written_steps
    # Callbacks see the last batch's loss at epoch end; the module then logs the exact mean
    # of the epoch's batch losses, weighted by batch size (as Keras' fit does).
    assert len(record.at_epoch_end) == len(record.batches) == trainer.max_epochs
    for epoch_end, losses in zip(record.at_epoch_end, record.batches, strict=True):
        assert epoch_end == pytest.approx(losses[-1][0], rel=1e-6)
    last = record.batches[-1]
    sizes = [size for _, size in last]
    assert sizes[-1] < sizes[0]
    weighted = sum(loss * size for loss, size in last) / sum(sizes)
    assert float(trainer.callback_metrics["loss"]) == pytest.approx(weighted, rel=1e-5)
    assert weighted != pytest.approx(np.mean([loss for loss, _ in last]), rel=1e-6)


def test_progress_bar_gets_the_loss_every_step(digits):
    x, y = digits["x_train"][:96], digits["y_train"][:96]
    module = kl.KerasLightningModule(mlp(), optimizer="sgd", loss=torch.nn.CrossEntropyLoss())
    calls = []
    original_log = module.log
    module.log = lambda name, *a, **k: (calls.append(name), original_log(name, *a, **k))[1]
    trainer = make_trainer(max_epochs=1, enable_progress_bar=True)
    data = loader(x, y)
    trainer.fit(module, data)
    # every step's loss, then the epoch mean
    assert trainer.num_training_batches == -(-len(x) // data.batch_size)
    assert calls.count("loss") == trainer.num_training_batches + 1
    assert np.isfinite(float(trainer.progress_bar_metrics["loss"]))


@pytest.mark.parametrize(
    "switch_on",
    [
        {"clipnorm": 0.01},
        {"clipvalue": 0.001},
        {"global_clipnorm": 0.01},
    ],
    ids=["clipnorm", "clipvalue", "global_clipnorm"],
)
def test_clipping_switched_on_mid_training_reaches_the_direct_update(switch_on):
    reference_model, model = mlp(seed=4), mlp(seed=4)
    reference, optimizer = keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2)
    adapter = kl.KerasOptimizer(optimizer, model.trainable_variables)
    for step, grads in enumerate(_gradient_sequence(model, 6)):
        if step == 3:  # e.g. from a callback, after the update path was chosen
            for keras_optimizer in (reference, optimizer):
                for name, value in switch_on.items():
                    setattr(keras_optimizer, name, value)
        with torch.no_grad():
            reference.apply([g.clone() for g in grads], reference_model.trainable_variables)
        for param, grad in zip(adapter.param_groups[0]["params"], grads, strict=True):
            param.grad = grad.clone()
        adapter.step()
    assert adapter.update_path == "adam"
    for ours, theirs in zip(model.variables, reference_model.variables, strict=True):
        assert torch.equal(ours.value, theirs.value), ours.path
