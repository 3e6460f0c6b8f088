"""CUDA: placement, mixed precision, a real training run, the notebook fork check.

Every test is marked ``gpu`` and skipped without CUDA. Not run in the session that wrote them
(no GPU machine was available): see the README section "Scaling out" for what was proven where.
"""

from __future__ import annotations

import keras_lightning as kl

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import torch
from conftest import free_port, loader, make_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REPO = Path(__file__).parent.parent


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.1, seed=3),
            keras.layers.Dense(10),
        ]
    )


def _module(model: Any, optimizer: Any = None, metrics: Any = None) -> kl.KerasLightningModule:
    return kl.KerasLightningModule(
        model,
        optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics if metrics is not None else ["accuracy"],
    )


def _devices_of(variables: Any) -> set[torch.device]:
    return {kl.devices.parameter_of(v).device for v in variables}


def _fit(module: Any, digits: dict[str, np.ndarray], **trainer: Any) -> Any:
    t = make_trainer(**trainer)
    t.fit(
        module,
        loader(digits["x_train"], digits["y_train"], batch_size=64, shuffle=True),
        loader(digits["x_val"], digits["y_val"], batch_size=128),
    )
    return t


class _Where(kl.KerasLightningModule):
    """Records where the model, optimizer and metric variables live during training."""

    def on_train_batch_end(self, *args: Any) -> None:
        if not hasattr(self, "where"):
            optimizer = self.trainer.optimizers[0].keras_optimizer
            metrics = [m.metric for m in self._builtin.stages["train"].metrics or () if not m.is_torchmetric]
            self.where = {
                "model": _devices_of(self.model.variables),
                "optimizer": _devices_of(optimizer.variables),
                "metrics": _devices_of([v for m in metrics for v in m.variables]),
            }


def test_devices_index_places_every_keras_variable_on_that_gpu(digits):
    index = torch.cuda.device_count() - 1  # devices=[1] on a 2-GPU machine
    # Built on Keras' default device (cuda, i.e. cuda:0) before the Trainer exists.
    optimizer = keras.optimizers.Adam(1e-2)
    metric = keras.metrics.SparseCategoricalAccuracy()
    module = _Where(build, optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=[metric])
    trainer = _fit(module, digits, accelerator="gpu", devices=[index], max_epochs=1)
    target = torch.device("cuda", index)
    assert module.where == {"model": {target}, "optimizer": {target}, "metrics": {target}}
    assert float(trainer.callback_metrics["val_sparse_categorical_accuracy"]) > 0.5


class _ScaleByConstant(keras.layers.Layer):
    """Keeps a plain tensor (not a variable) made in build(): Lightning's .to() never moves it."""

    def build(self, input_shape: Any) -> None:
        self.scale = keras.ops.ones((input_shape[-1],)) * 0.5

    def call(self, x: Any) -> Any:
        return x * self.scale


def test_factory_builds_on_the_lightning_device_not_on_the_cpu_first(digits):
    index = torch.cuda.device_count() - 1

    def build_with_constant() -> keras.Model:
        return keras.Sequential([keras.Input((64,)), _ScaleByConstant(), keras.layers.Dense(10)])

    module = _module(build_with_constant)
    _fit(module, digits, accelerator="gpu", devices=[index], max_epochs=1)
    assert module.model.layers[0].scale.device == torch.device("cuda", index)


def test_accelerator_cpu_on_a_cuda_machine_trains_on_the_cpu(digits):
    model = build()  # Keras' default device here is CUDA
    assert _devices_of(model.variables) == {torch.device("cuda", torch.cuda.current_device())}
    module = _Where(model, optimizer=keras.optimizers.Adam(1e-2),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=[keras.metrics.SparseCategoricalAccuracy()])
    trainer = _fit(module, digits, accelerator="cpu", max_epochs=1)
    cpu = {torch.device("cpu")}
    assert module.where == {"model": cpu, "optimizer": cpu, "metrics": cpu}
    assert float(trainer.callback_metrics["val_sparse_categorical_accuracy"]) > 0.5


def test_16_mixed_on_cuda_uses_lightnings_grad_scaler(digits):
    module = _module(build)
    trainer = _fit(module, digits, accelerator="gpu", devices=1, precision="16-mixed",
                   max_epochs=3)
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() > 1.0
    steps = int(trainer.optimizers[0].keras_optimizer.iterations)
    assert 0 < steps <= trainer.global_step  # skipped (overflow) steps never reach Keras
    assert float(trainer.callback_metrics["val_accuracy"]) > 0.85


@pytest.mark.skipif(
    torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="no bf16 on GPU"
)
def test_bf16_mixed_on_cuda(digits):
    module = _module(build)
    trainer = _fit(module, digits, accelerator="gpu", devices=1, precision="bf16-mixed",
                   max_epochs=3)
    assert {str(v.dtype) for v in module.model.variables if "float" in str(v.dtype)} == {
        "float32"
    }
    assert float(trainer.callback_metrics["val_accuracy"]) > 0.85


def test_real_cuda_training_run(digits, capsys):
    module = _module(build)
    start = time.perf_counter()
    trainer = _fit(module, digits, accelerator="gpu", devices=1, max_epochs=10)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.callback_metrics["val_accuracy"])
    with capsys.disabled():
        print(f"\nCUDA digits run ({torch.cuda.get_device_name()}): 10 epochs in "
              f"{seconds:.1f} s, val_accuracy {accuracy:.4f}")
    assert accuracy > 0.93
    assert _devices_of(module.model.variables) <= {torch.device("cpu"), torch.device("cuda", 0)}


_BUILT_IN_PARENT = """
import keras_lightning as kl
import keras, lightning as L, torch
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # on CUDA
assert torch.cuda.is_initialized()
module = kl.KerasLightningModule(model, optimizer="sgd", loss="mse")
data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
from lightning.pytorch.strategies import DDPStrategy
# What strategy="ddp_notebook" is, spelled so that one GPU still forks a worker.
trainer = L.Trainer(strategy=DDPStrategy(start_method="fork"), accelerator="gpu", devices=1,
                    max_epochs=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False)
try:
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    print("NO ERROR")
except Exception as error:
    print("ERROR", str(error).replace(chr(10), " "))
"""


@pytest.mark.timeout(300)
def test_ddp_notebook_with_a_model_built_on_cuda_says_pass_a_factory(tmp_path):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _BUILT_IN_PARENT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)
    assert "ERROR" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Pass a factory instead of a built model" in proc.stdout


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_two_gpus_nccl(tmp_path):
    script = REPO / "tests" / "scale_out" / "ddp_run.py"
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--accelerator", "gpu"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["device"] for i in infos] == ["cuda:0", "cuda:1"]
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])
    np.testing.assert_array_equal(ranks[0]["final_all"], ranks[1]["final_all"])
    np.testing.assert_allclose(
        ranks[0]["val_post"], (ranks[0]["val_pre"] + ranks[1]["val_pre"]) / 2, atol=1e-6
    )
