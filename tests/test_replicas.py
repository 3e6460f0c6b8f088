"""keras_lightning.distributed: devices followed in every hook, per-rank randomness helpers.

The multi-process behaviour is in tests/test_ddp.py; these are the single-process parts.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning import collectives, devices, replicas

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

REPO = Path(__file__).parent.parent

# Keras puts everything it creates outside a `keras.device` scope on KERAS_TORCH_DEVICE. With
# "meta" (tensors without data) any Keras work done outside the module's device scope breaks
# or leaves a variable on "meta": a CPU stand-in for "Keras defaults to cuda:0, Lightning
# chose the CPU (or cuda:1)".
_META_SCRIPT = """
import json, sys
import keras_lightning as kl
import keras, lightning as L, numpy as np, torch
from keras_lightning.devices import parameter_of
from sklearn.datasets import load_digits

assert str(keras.src.backend.torch.core.get_device()) == "meta"
L.seed_everything(0)
d = load_digits()
x = torch.as_tensor((d.data[:256] / 16.0).astype("float32"))
y = torch.as_tensor(d.target[:256].astype("int64"))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

def build():
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.BatchNormalization(),
                             keras.layers.Dropout(0.2, seed=1), keras.layers.Dense(10)])

module = kl.KerasLightningModule(build, optimizer="adam", metrics=["accuracy"],
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=8, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, loader, loader)
fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
test_metrics = trainer.test(module, loader, verbose=False)[0]
predictions = torch.cat(trainer.predict(module, loader))
optimizer = trainer.optimizers[0].keras_optimizer
metric_vars = [v for m in module._builtin.stages["val"].metrics for v in m.metric.variables]
print("RESULT " + json.dumps({
    "model": sorted({str(parameter_of(v).device) for v in module.model.variables}),
    "optimizer": sorted({str(parameter_of(v).device) for v in optimizer.variables}),
    "metrics": sorted({str(parameter_of(v).device) for v in metric_vars}),
    "optimizer_slots": len(optimizer.variables),
    "fit": fit_metrics, "test": test_metrics,
    "predictions": [str(predictions.device), bool(torch.isfinite(predictions).all())],
    "predict_accuracy": float((predictions.argmax(1) == y).float().mean()),
}))
"""


@pytest.mark.timeout(200)
def test_every_hook_runs_keras_on_the_lightning_device_not_keras_default(tmp_path):
    env = dict(os.environ, KERAS_TORCH_DEVICE="meta", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _META_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    result = json.loads(lines[0][len("RESULT ") :])
    # Model, Keras optimizer (iterations, learning rate, Adam slots built on the first step)
    # and Keras metric variables: all on the CPU Lightning chose.
    assert result["model"] == ["cpu"]
    assert result["optimizer"] == ["cpu"] and result["optimizer_slots"] > 2
    assert result["metrics"] == ["cpu"]
    assert result["predictions"] == ["cpu", True]
    assert result["fit"]["val_accuracy"] > 0.5  # it learned: real numbers, not meta stubs
    # The logged accuracies are the accuracy of the predictions (same data, same weights): the
    # metric state was really reset between epochs (a reset outside the scope is lost).
    assert result["test"]["test_accuracy"] == pytest.approx(result["predict_accuracy"], abs=1e-6)
    assert result["fit"]["val_accuracy"] == pytest.approx(result["predict_accuracy"], abs=1e-6)


# ---------------------------------------------------------------------- helpers, one process


def _seeded_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dropout(0.5, seed=11), keras.layers.Dense(2)]
    )


def test_offset_seed_states_changes_the_stream_of_rank_1_only():
    model = _seeded_model()
    (state,) = replicas.seed_state_variables(model)
    base = devices.parameter_of(state).clone()
    replicas.offset_seed_states(model, 0)
    assert torch.equal(devices.parameter_of(state), base)
    replicas.offset_seed_states(model, 1)
    shifted = devices.parameter_of(state)
    assert int(shifted[1]) == int(base[1])  # the draw counter is untouched
    assert (int(shifted[0]) - int(base[0])) % 2**32 == replicas.SEED_STRIDE
    ones = torch.ones(2, 64)
    layer = model.layers[0]
    twin = _seeded_model()
    mask_rank1 = layer(ones, training=True) != 0
    mask_rank0 = twin.layers[0](ones, training=True) != 0
    assert not torch.equal(mask_rank0, mask_rank1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (2**31 - 1, 2**31 - 1), (2**31, -(2**31)), (2**32 + 5, 5), (-1, -1)],
)
def test_as_int32_wraps_like_uint32_bits(value, expected):
    assert replicas._as_int32(value) == expected


def test_fork_torch_rng_gives_ranks_different_streams():
    torch.manual_seed(0)
    replicas.fork_torch_rng(0)
    rank0 = torch.rand(5)
    torch.manual_seed(0)
    replicas.fork_torch_rng(1)
    rank1 = torch.rand(5)
    torch.manual_seed(0)
    replicas.fork_torch_rng(1)
    assert torch.equal(torch.rand(5), rank1)  # deterministic given the starting state
    assert not torch.equal(rank0, rank1)


def test_collectives_are_no_ops_outside_a_process_group():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    before = [np.array(v) for v in model.variables]
    replicas.average_non_trainable(model)
    replicas.broadcast_seed_states(model)
    replicas.end_of_training(model)
    state = {"k": torch.zeros(1)}
    replicas.sync_checkpoint_state(model, state, lambda: {"k": torch.ones(1)})
    assert collectives.world_size() == 1 and not collectives.is_distributed()
    assert state["k"].item() == 0.0
    for a, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, np.array(v))


def test_averaged_variables_are_float_non_trainables_without_seed_states():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(), keras.layers.Dropout(0.1, seed=1)]
    )
    paths = [v.path for v in replicas.averaged_variables(model)]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["moving_mean", "moving_variance"]


def test_frozen_layers_are_not_averaged():
    frozen = keras.layers.Dense(4)
    frozen_bn = keras.layers.BatchNormalization()
    model = keras.Sequential(
        [keras.Input((3,)), frozen, frozen_bn, keras.layers.BatchNormalization(name="live")]
    )
    frozen.trainable = False
    frozen_bn.trainable = False
    paths = [v.path.split("/", 1)[-1] for v in replicas.averaged_variables(model)]
    assert paths == ["live/moving_mean", "live/moving_variance"]


@pytest.mark.parametrize(
    "target",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_place_variables_keeps_the_parameter_objects(target):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    params = [devices.parameter_of(v) for v in model.variables]
    values = [p.detach().cpu().clone() for p in params]
    storage = [p.data_ptr() for p in params]
    devices.place_variables(model.variables, torch.device(target))
    moved = [devices.parameter_of(v) for v in model.variables]
    assert all(a is b for a, b in zip(moved, params, strict=True))
    assert {p.device.type for p in moved} == {target}
    for param, value in zip(moved, values, strict=True):
        torch.testing.assert_close(param.detach().cpu(), value)
    if target == "cpu":  # already there: the storage is left alone, not copied
        assert [p.data_ptr() for p in moved] == storage
    # The Keras variables read the moved parameters.
    assert {str(keras.ops.convert_to_tensor(v).device.type) for v in model.variables} == {target}


def test_same_device_treats_bare_cuda_as_cuda_0():
    assert devices.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not devices.same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not devices.same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert devices.same_device(torch.device("cpu"), torch.device("cpu"))


def test_keras_optimizer_adapter_runs_keras_on_the_weights_device():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    adapter = kl.KerasOptimizer(keras.optimizers.Adam(0.1), model.trainable_variables)
    model(torch.ones(2, 3)).sum().backward()
    adapter.step()
    found = {devices.parameter_of(v).device for v in adapter.keras_optimizer.variables}
    assert found == {torch.device("cpu")}
    assert adapter._scoped is False  # the weights are on Keras' default device: no scope
