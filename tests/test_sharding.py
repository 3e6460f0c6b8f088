"""FSDP2 sharding of a Keras model under ModelParallelStrategy, on 2 CPU processes (gloo).

The multi-process runs are one script (tests/scale_out/fsdp_run.py) that records each rank's
weights and what it held; the reference is a DDP run of the same model on the same data.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning import sharding

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from conftest import free_port
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

HERE = Path(__file__).parent
SCRIPT = HERE / "scale_out" / "fsdp_run.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], env=env, cwd=HERE.parent,
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _weights(out: Path, run: str, rank: int) -> list[np.ndarray]:
    arrays = np.load(out / f"{run}_rank{rank}.npz")
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _info(out: Path, run: str, rank: int) -> dict:
    return json.loads((out / f"{run}_rank{rank}.json").read_text())


@pytest.mark.timeout(300)
def test_sharded_training_gives_the_weights_of_a_ddp_run(runs: Path) -> None:
    reference = _weights(runs, "ddp", 0)
    for rank in (0, 1):
        for a, b in zip(_weights(runs, "sharded", rank), reference, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert _info(runs, "sharded", 0)["loss"] == pytest.approx(_info(runs, "ddp", 0)["loss"])


@pytest.mark.timeout(300)
def test_each_rank_holds_only_its_shard_while_training(runs: Path) -> None:
    for rank in (0, 1):
        info = _info(runs, "sharded", rank)
        trainable, total = info["trainable"], info["total"]
        # frozen weights and seed states whole on every rank, trained weights halved
        assert info["held_weights"] == (total - trainable) + trainable // 2
        assert info["held_optimizer_state"] == 2 * (trainable // 2)  # Adam's two moments


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["full", "distributed"])
def test_a_checkpoint_resumes_exactly(runs: Path, kind: str) -> None:
    straight = _weights(runs, "sharded", 0)
    for rank in (0, 1):
        for a, b in zip(_weights(runs, f"resumed_{kind}", rank), straight, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(300)
def test_a_single_file_checkpoint_of_a_sharded_run_loads_unsharded(runs: Path, tmp_path) -> None:
    sys.path.insert(0, str(HERE / "scale_out"))
    import fsdp_run

    module = kl.KerasLightningModule.load_from_checkpoint(
        runs / "epoch1_full.ckpt", model=fsdp_run.build(), optimizer=None, weights_only=False
    )
    expected = _weights(runs, "epoch1_full", 0)
    for variable, value in zip(module.model.variables, expected, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    module.model.save(tmp_path / "from_checkpoint.keras")


@pytest.mark.timeout(300)
def test_the_full_model_exports_to_a_keras_file(runs: Path) -> None:
    model = keras.saving.load_model(runs / "sharded.keras")
    assert type(model) is keras.Sequential  # not FSDP's subclass of it
    weights = [w for w in _weights(runs, "sharded", 0) if w.dtype.kind == "f"]  # not seeds
    assert len(weights) == len(model.weights) == 6
    for variable, expected in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)


def test_set_ups_that_cannot_shard_a_keras_model_are_refused_with_the_one_that_works():
    def check(strategy, optimizer=torch.optim.Adam, own_train_step=False, weights="all"):
        sharding.check_strategy(
            strategy, optimizer=optimizer, own_train_step=own_train_step,
            checkpoint_weights=weights,
        )

    works = r"ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)"
    with pytest.raises(kl.ConfigurationError, match=f"strategy=FSDPStrategy.*{works}"):
        check(FSDPStrategy())
    tensor_parallel = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(kl.ConfigurationError, match=f"tensor_parallel_size=2.*{works}"):
        check(tensor_parallel)
    model_parallel = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    for keras_optimizer in ("adam", keras.optimizers.Adam(), None):
        with pytest.raises(kl.ConfigurationError, match=r"torch optimizer.*torch\.optim\.AdamW"):
            check(model_parallel, optimizer=keras_optimizer)
    with pytest.raises(kl.ConfigurationError, match="own train_step.*DDPStrategy"):
        check(model_parallel, own_train_step=True)
    with pytest.raises(kl.ConfigurationError, match="checkpoint_weights='trainable'"):
        check(model_parallel, weights="trainable")
    regularized = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, kernel_regularizer="l2", name="reg")]
    )
    with pytest.raises(kl.ConfigurationError, match=r"1 weights .*regularizer.*reg/kernel.*AdamW"):
        sharding.check_strategy(
            model_parallel, optimizer=torch.optim.Adam, own_train_step=False,
            checkpoint_weights="all", model=regularized,
        )
    # validate / test / predict, and a configure_optimizers of the user's: nothing to refuse
    sharding.check_strategy(
        model_parallel, optimizer="adam", own_train_step=True, checkpoint_weights="all",
        fitting=False,
    )
    sharding.check_strategy(
        model_parallel, optimizer=None, own_train_step=False, checkpoint_weights="all",
        own_optimizers=True,
    )
    check(model_parallel)  # a torch optimizer, data-parallel sharding: accepted
    check(DDPStrategy(), optimizer="adam")  # not sharded: anything goes


def test_a_weight_unfrozen_after_sharding_is_refused():
    from keras_lightning.optimizers import LaterTrainable

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="base"), keras.layers.Dense(2)]
    )
    model.get_layer("base").trainable = False
    optimizer = torch.optim.SGD([v.value for v in model.trainable_variables], lr=0.1)
    later = LaterTrainable()
    later.adopt(optimizer, model)  # nothing unfrozen: nothing to do
    model.get_layer("base").trainable = True
    setattr(model, sharding._SHARDED, ([], type(model)))  # as shard() leaves it
    with pytest.raises(kl.ConfigurationError, match="2 weights .* after it was sharded.*before"):
        later.adopt(optimizer, model)
