"""Checkpoints: stable keys, exact resume in new processes, SIGKILL, rebuilding, safety, export.

The resume tests run tests/checkpoint_worker.py in fresh processes (as a real restart does)
and compare against an uninterrupted run in another process: nothing here compares a run
with itself.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.checkpoint import STATE_KEY, collect_rng_states, set_rng_states, stable_keys

import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp

WORKER = Path(__file__).with_name("checkpoint_worker.py")
EPOCHS = 4
STOP_AFTER = 2  # epochs of the interrupted run
# see tests/checkpoint_worker.py: Dropout + BatchNormalization + Keras Adam with a Keras
# learning-rate schedule; the same with a torch LR scheduler; a GAN with its own train_step
VARIANTS = ("keras_schedule", "torch_scheduler", "gan")


# ---------------------------------------------------------------------- helpers


def run_worker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONHASHSEED="0")
    result = subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_result(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def bn_dropout_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(10),
        ]
    )


# The state_dict keys of bn_dropout_model: position in model.variables, then the layer's class
# name (not Keras' numbered auto name such as dense_1) and the variable's name.
BN_DROPOUT_KEYS = [
    "model.variables.0.dense/kernel",
    "model.variables.1.dense/bias",
    "model.variables.2.batch_normalization/gamma",
    "model.variables.3.batch_normalization/beta",
    "model.variables.4.batch_normalization/moving_mean",
    "model.variables.5.batch_normalization/moving_variance",
    "model.variables.6.seed_generator/seed_generator_state",
    "model.variables.7.dense/kernel",
    "model.variables.8.dense/bias",
]


BRIEF_BATCHES = 4  # fit_briefly trains one epoch of this many batches


def fit_briefly(module: kl.KerasLightningModule, digits: dict, tmp_path: Path) -> Path:
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=BRIEF_BATCHES, default_root_dir=tmp_path
    )
    trainer.fit(module, loader(digits["x_train"], digits["y_train"], batch_size=32))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def predict(module_or_model: Any, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(module_or_model(torch.as_tensor(x), training=False))


SCCE = "sparse_categorical_crossentropy"


# ---------------------------------------------------------------------- 1. stable keys


def test_state_dict_keys_do_not_depend_on_keras_auto_names() -> None:
    first = kl.KerasLightningModule(bn_dropout_model(seed=1))
    second = kl.KerasLightningModule(bn_dropout_model(seed=2))
    # Keras numbered the second model's layers differently: raw keys would not match.
    assert [v.path for v in first.model.variables] != [v.path for v in second.model.variables]
    state = first.state_dict()
    assert list(state) == list(second.state_dict())
    assert list(state) == BN_DROPOUT_KEYS
    assert stable_keys(first.model) == BN_DROPOUT_KEYS
    assert len(state) == len(first.model.variables)  # Sequential's aliases appear once
    assert not any("_torch_params" in key for key in state)

    second.load_state_dict(state)

    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    np.testing.assert_array_equal(predict(second, x), predict(first, x))
    for a, b in zip(first.model.variables, second.model.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (
            lambda: keras.Sequential([keras.Input((64,)), keras.layers.Dense(17),
                                      keras.layers.BatchNormalization(),
                                      keras.layers.Dropout(0.2, seed=3), keras.layers.Dense(10)]),
            r"Different shape or dtype \(7\):\n  model\.variables\.0\.dense/kernel: "
            r"checkpoint \(64, 16\) float32, model \(64, 17\) float32",
        ),
        (
            lambda: keras.Sequential([keras.Input((64,)), keras.layers.Dense(16),
                                      keras.layers.Dense(10)]),
            r"(?s)Missing from the checkpoint \(2\):\n  model\.variables\.2\.dense/kernel.*"
            r"Unexpected in the checkpoint \(7\):\n  model\.variables\.2\.batch_normalization/gamma",
        ),
        (
            lambda: keras.Sequential([keras.Input((64,)), keras.layers.Dense(16),
                                      keras.layers.LayerNormalization(),
                                      keras.layers.Dropout(0.2, seed=3), keras.layers.Dense(10)]),
            r"(?s)Missing.*model\.variables\.2\.layer_normalization/gamma.*"
            r"Unexpected.*model\.variables\.2\.batch_normalization/gamma",
        ),
    ],
    ids=["other-shapes", "fewer-layers", "other-layer-type"],
)
def test_mismatch_is_an_error_listing_variables_and_loads_nothing(other, match) -> None:
    state = kl.KerasLightningModule(bn_dropout_model()).state_dict()
    target = kl.KerasLightningModule(other())
    before = [keras.ops.convert_to_numpy(v).copy() for v in target.model.variables]
    with pytest.raises(kl.CheckpointError, match=match) as error:
        target.load_state_dict(state)
    assert "nothing was loaded" in str(error.value) and "strict=False" in str(error.value)
    after = [keras.ops.convert_to_numpy(v) for v in target.model.variables]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_strict_false_loads_matching_variables_and_reports_the_rest() -> None:
    source = kl.KerasLightningModule(mlp(seed=1))
    deeper = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10),
         keras.layers.Dense(3)]
    )
    target = kl.KerasLightningModule(deeper)
    keys = target.load_state_dict(source.state_dict(), strict=False)
    assert sorted(keys.missing_keys) == ["model.variables.4.dense/kernel", "model.variables.5.dense/bias"]
    assert keys.unexpected_keys == []
    for a, b in zip(source.model.variables, target.model.variables[:4], strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # another shape is an error even then
    wider = kl.KerasLightningModule(mlp(hidden=33))
    with pytest.raises(kl.CheckpointError, match=r"dense/kernel: checkpoint \(64, 32\) float32, "
                       r"model \(64, 33\) float32"):
        wider.load_state_dict(source.state_dict(), strict=False)


def test_loading_into_an_unbuilt_model_says_how_to_build_it() -> None:
    state = kl.KerasLightningModule(mlp()).state_dict()
    unbuilt = kl.KerasLightningModule(keras.Sequential([keras.layers.Dense(10)]))
    with pytest.raises(kl.CheckpointError, match=r"not built\. Build it before loading"):
        unbuilt.load_state_dict(state)


def test_lightning_checkpoint_uses_stable_keys_and_loads_with_weights_only(
    digits: dict, tmp_path: Path
) -> None:
    module = kl.KerasLightningModule(bn_dropout_model(), optimizer="adam", loss=SCCE)
    path = fit_briefly(module, digits, tmp_path)
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects at all
    assert list(checkpoint["state_dict"]) == BN_DROPOUT_KEYS
    optimizer_state = checkpoint["optimizer_states"][0]
    # Keras Adam's iterations: one per batch of fit_briefly's single epoch
    assert int(optimizer_state["keras_variables"][0]) == BRIEF_BATCHES
    # iterations, learning rate, and Adam's two moments for each trainable variable
    trainable = len(module.model.trainable_variables)
    assert trainable == 6  # two Dense (kernel, bias) and BatchNormalization's gamma, beta
    assert len(optimizer_state["keras_variables"]) == 2 + 2 * trainable
    # Keras numbers optimizer names per process (adam, adam_3, ...): compare the variable names.
    names = [p.split("/")[-1] for p in optimizer_state["keras_variable_paths"][:2]]
    assert names == ["iteration", "learning_rate"]
    assert STATE_KEY in checkpoint


# ---------------------------------------------------------------------- 2. exact resume


def test_random_generator_states_round_trip_through_a_safe_file(tmp_path: Path) -> None:
    def draw() -> list[float]:
        return [
            float(torch.rand(())),
            float(np.random.rand()),
            random.random(),
            float(keras.ops.convert_to_numpy(keras.random.normal(()))),  # global SeedGenerator
        ]

    draw()  # creates Keras' global SeedGenerator
    torch.save(collect_rng_states(), tmp_path / "rng.pt")
    expected = draw()
    draw()
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run per variant, each in its own process."""
    root = tmp_path_factory.mktemp("uninterrupted")
    dirs = {}
    for variant in VARIANTS:
        run_worker("--variant", variant, "--dir", str(root / variant),
                   "--max-epochs", str(EPOCHS), "--out", str(root / f"{variant}.pt"))
        dirs[variant] = root
    return dirs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_in_a_new_process_equals_an_uninterrupted_run(
    variant: str, uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    stopped = tmp_path / "stopped"
    run_worker("--variant", variant, "--dir", str(stopped), "--max-epochs", str(STOP_AFTER),
               "--out", str(tmp_path / "stopped.pt"))
    last = stopped / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] in (STOP_AFTER - 1, STOP_AFTER)
    rebuild = [] if variant == "gan" else ["--predict-from", str(last)]
    run_worker("--variant", variant, "--dir", str(tmp_path / "resumed"), "--max-epochs",
               str(EPOCHS), "--out", str(tmp_path / "resumed.pt"), "--resume", str(last),
               *rebuild)

    reference = load_result(uninterrupted[variant] / f"{variant}.pt")
    stopped_result = load_result(tmp_path / "stopped.pt")
    resumed = load_result(tmp_path / "resumed.pt")
    # the resumed process trained the remaining epochs, and only those
    if variant != "gan":
        assert sorted(p.name for p in (tmp_path / "resumed").glob("epoch=*.ckpt")) == [
            f"epoch={e}.ckpt" for e in range(STOP_AFTER, EPOCHS)
        ]
    assert max_diff(stopped_result["weights"], reference["weights"]) > 1e-3
    assert resumed["global_step"] == reference["global_step"]
    # model variables: weights, BatchNorm statistics, SeedGenerator states
    assert resumed["paths"] == reference["paths"]
    assert any("seed_generator_state" in p for p in reference["paths"])
    assert max_diff(resumed["weights"], reference["weights"]) <= 1e-6
    # Keras optimizers: iterations and Adam moments; learning rate after the schedule
    assert max_diff(resumed["optimizer"], reference["optimizer"]) <= 1e-6
    assert resumed["lr"] == pytest.approx(reference["lr"], rel=1e-6)
    # last epoch's logged values: loss, metrics (Keras metric state), validation
    assert resumed["metrics"].keys() == reference["metrics"].keys()
    assert len(reference["metrics"]) >= 2
    for name, value in reference["metrics"].items():
        assert resumed["metrics"][name] == pytest.approx(value, abs=1e-6), name
    if variant != "gan":
        # the stopped run's checkpoint, rebuilt without the model code in the new process
        assert resumed["restored_class"] == "Sequential"
        np.testing.assert_allclose(
            resumed["restored_predictions"].numpy(), stopped_result["predictions"].numpy(),
            atol=1e-6,
        )


def test_model_checkpoint_saves_every_epoch_of_a_gan(tmp_path: Path) -> None:
    from checkpoint_worker import build_gan, loaders

    trainer = make_trainer(
        max_epochs=2, enable_checkpointing=True, limit_train_batches=2,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1
        )],
    )
    trainer.fit(kl.KerasLightningModule(build_gan()), loaders()[0])
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    # one step per batch (not one per optimizer), so max_steps works too
    assert trainer.global_step == trainer.max_epochs * trainer.limit_train_batches


@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_loses_nothing_saved(
    uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    variant = "keras_schedule"
    killed = tmp_path / "killed"
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONHASHSEED="0")
    process = subprocess.Popen(
        [sys.executable, str(WORKER), "--variant", variant, "--dir", str(killed),
         "--max-epochs", str(EPOCHS), "--out", str(tmp_path / "never.pt"), "--sleep", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # "batch <epoch> <index>" after each batch
            if line.strip() == "batch 2 2":  # the third batch of the third epoch ended
                break
        else:
            raise AssertionError(f"the worker ended early with {process.wait()}")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()

    # every file that was written is complete, loads safely and holds what the
    # uninterrupted run (another process) had at the same point
    reference_dir = uninterrupted[variant] / variant
    names = sorted(p.name for p in killed.iterdir())
    assert names == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    for name in names:
        saved = torch.load(killed / name, weights_only=True)
        expected = torch.load(reference_dir / ("epoch=1.ckpt" if name == "last.ckpt" else name),
                              weights_only=True)
        assert saved["state_dict"].keys() == expected["state_dict"].keys()
        assert max_diff(list(saved["state_dict"].values()),
                        list(expected["state_dict"].values())) == 0.0
        assert max_diff(saved["optimizer_states"][0]["keras_variables"],
                        expected["optimizer_states"][0]["keras_variables"]) == 0.0

    run_worker("--variant", variant, "--dir", str(tmp_path / "resumed"), "--max-epochs",
               str(EPOCHS), "--out", str(tmp_path / "resumed.pt"), "--resume",
               str(killed / "last.ckpt"))
    reference = load_result(uninterrupted[variant] / f"{variant}.pt")
    resumed = load_result(tmp_path / "resumed.pt")
    assert max_diff(resumed["weights"], reference["weights"]) <= 1e-6
    assert max_diff(resumed["optimizer"], reference["optimizer"]) <= 1e-6


WRITER = """
import sys, time, torch
import fsspec.implementations.local as local
import keras_lightning as kl
import keras_lightning.checkpoint.files as files
from lightning.pytorch.plugins.io import TorchCheckpointIO

state = {"n": 0}

def slow_write(write):
    def wrapper(self, data, *args):
        if state["n"] < 3:
            return write(self, data, *args)
        view = memoryview(data).cast("B")
        written = write(self, view[: len(view) // 2])
        print("writing", flush=True)  # half of the third checkpoint is on disk
        time.sleep(60)
        return written + write(self, view[len(view) // 2 :])
    return wrapper

class SlowFile:
    def __init__(self, *args, **kwargs):
        self.file = open(*args, **kwargs)
    def write(self, data):
        return slow_write(lambda self, d: self.file.write(d))(self, data)
    def __getattr__(self, name):
        return getattr(self.file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()

local.LocalFileOpener.write = slow_write(local.LocalFileOpener.write)
files.open = SlowFile  # what AtomicCheckpointIO writes through
io = kl.AtomicCheckpointIO() if sys.argv[1] == "atomic" else TorchCheckpointIO()
while True:
    state["n"] += 1
    io.save_checkpoint({"n": state["n"], "x": torch.full((100_000,), float(state["n"]))},
                       sys.argv[2])
"""


def kill_during_third_write(writer: str, target: Path, temp: Path) -> None:
    env = dict(os.environ, TMPDIR=str(temp), KERAS_BACKEND="torch")
    process = subprocess.Popen([sys.executable, "-c", WRITER, writer, str(target)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == "writing\n", (line, process.stderr.read() if process.stderr else "")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("writer", ["lightning", "atomic"])
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(
    writer: str, tmp_path: Path
) -> None:
    """Lightning writes to a temp file and renames it; AtomicCheckpointIO does too, next to
    the target. Either way a kill halfway through a write leaves the previous file whole."""
    target = tmp_path / "ckpt" / "last.ckpt"
    temp = tmp_path / "tmp"  # the system temp dir of the writer: same filesystem here
    temp.mkdir()
    kill_during_third_write(writer, target, temp)
    saved = torch.load(target, weights_only=True)
    assert saved["n"] == 2 and bool((saved["x"] == 2).all())
    # the half-written third checkpoint is where each writer puts it
    partial_dir = temp if writer == "lightning" else target.parent
    partial = [p for p in partial_dir.iterdir() if p.name != "last.ckpt" and p.is_file()]
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    if writer == "atomic":  # the next write of the same file clears what the kill left
        kl.AtomicCheckpointIO().save_checkpoint({"n": 4}, target)
        assert torch.load(target, weights_only=True) == {"n": 4}
        assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_atomic_checkpoint_io_trains_and_resumes(digits: dict, tmp_path: Path) -> None:
    def fit(max_epochs: int, ckpt_path: Path | None = None) -> kl.KerasLightningModule:
        module = kl.KerasLightningModule(mlp(), optimizer="adam", loss=SCCE)
        make_trainer(
            max_epochs=max_epochs, plugins=[kl.AtomicCheckpointIO()], enable_checkpointing=True,
            default_root_dir=tmp_path, limit_train_batches=3,
        ).fit(module, loader(digits["x_train"], digits["y_train"]), ckpt_path=ckpt_path)
        return module

    fit(1)
    (written,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temp files left
    resumed = fit(2, written)
    reference = fit(2)
    x = digits["x_val"]
    np.testing.assert_allclose(predict(resumed, x), predict(reference, x), atol=1e-6)


@pytest.mark.parametrize("given", [None, "lightning"], ids=["default", "user-chosen"])
def test_the_module_writes_atomically_unless_a_writer_was_chosen(
    digits: dict, tmp_path: Path, given: str | None
) -> None:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    plugins = [] if given is None else [TorchCheckpointIO()]
    trainer = make_trainer(
        max_epochs=1, plugins=plugins, enable_checkpointing=True, default_root_dir=tmp_path,
        limit_train_batches=2,
    )
    module = kl.KerasLightningModule(mlp(), optimizer="adam", loss=SCCE)
    trainer.fit(module, loader(digits["x_train"], digits["y_train"]))
    writer = type(trainer.strategy.checkpoint_io)
    assert writer is (kl.AtomicCheckpointIO if given is None else TorchCheckpointIO)
    (written,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert [p.name for p in written.parent.iterdir()] == [written.name]
    np.testing.assert_allclose(
        predict(kl.KerasLightningModule.load_from_checkpoint(written), digits["x_val"]),
        predict(module, digits["x_val"]),
        atol=0,
    )


def test_atomic_writes_give_checkpoints_the_mode_lightning_gives(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    kl.AtomicCheckpointIO().save_checkpoint({"n": 1}, tmp_path / "atomic.ckpt")
    TorchCheckpointIO().save_checkpoint({"n": 1}, tmp_path / "lightning.ckpt")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["atomic.ckpt"] == modes["lightning.ckpt"], modes


def test_a_strategy_default_writer_other_than_lightnings_is_kept(digits: dict) -> None:
    """XLA strategies default to their own writer (and refuse others): it must stay."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class OwnWriter(TorchCheckpointIO):
        pass

    class OwnWriterStrategy(SingleDeviceStrategy):
        @property
        def checkpoint_io(self):
            if self._checkpoint_io is None:
                return OwnWriter()
            return self._checkpoint_io

        @checkpoint_io.setter
        def checkpoint_io(self, io):
            if not isinstance(io, OwnWriter):
                raise TypeError("this strategy only works with its own writer")
            self._checkpoint_io = io

    trainer = make_trainer(max_epochs=1, limit_train_batches=2,
                           strategy=OwnWriterStrategy(device="cpu"))
    module = kl.KerasLightningModule(mlp(), optimizer="adam", loss=SCCE)
    trainer.fit(module, loader(digits["x_train"], digits["y_train"]))
    assert type(trainer.strategy.checkpoint_io) is OwnWriter


# ---------------------------------------------------------------------- 3. load_from_checkpoint


def test_load_from_checkpoint_rebuilds_model_and_arguments(digits: dict, tmp_path: Path) -> None:
    module = kl.KerasLightningModule(
        bn_dropout_model(),
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.9)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3)],
        class_weight={0: 2.0},
    )
    path = fit_briefly(module, digits, tmp_path)
    bn_dropout_model()  # shift Keras' auto-numbering in this process

    restored = kl.KerasLightningModule.load_from_checkpoint(path)

    np.testing.assert_allclose(
        predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
    )
    optimizer = restored._arguments.optimizer
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert optimizer.get_config()["learning_rate"]["config"]["decay_steps"] == 5
    assert isinstance(restored._arguments.loss, keras.losses.SparseCategoricalCrossentropy)
    assert restored._arguments.loss.get_config()["from_logits"] is True
    assert restored._arguments.metrics[0] == "accuracy"
    assert restored._arguments.metrics[1].get_config()["k"] == 3
    assert restored._arguments.class_weight == {0: 2.0}
    val = loader(digits["x_val"], digits["y_val"], batch_size=64)
    original_scores = make_trainer().validate(module, val, verbose=False)[0]
    restored_scores = make_trainer().validate(restored, val, verbose=False)[0]
    assert restored_scores.keys() == original_scores.keys()
    for name, value in original_scores.items():
        assert restored_scores[name] == pytest.approx(value, abs=1e-6), name


def test_a_model_built_lazily_by_a_factory_round_trips(digits: dict, tmp_path: Path) -> None:
    def factory() -> keras.Model:  # no Input: built by the Trainer from the first batch
        return keras.Sequential([keras.layers.Dense(16), keras.layers.BatchNormalization(),
                                 keras.layers.Dense(10)])

    module = kl.KerasLightningModule(factory, optimizer="adam", loss=SCCE)
    path = fit_briefly(module, digits, tmp_path)
    restored = kl.KerasLightningModule.load_from_checkpoint(path)
    np.testing.assert_allclose(
        predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
    )


@keras.saving.register_keras_serializable(package="kl_checkpoint_tests")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


class Unregistered(Scale):
    pass


def test_custom_layers_come_from_the_registry_or_custom_objects(
    digits: dict, tmp_path: Path
) -> None:
    for layer_class, folder in ((Scale, "registered"), (Unregistered, "unregistered")):
        model = keras.Sequential([keras.Input((64,)), layer_class(), keras.layers.Dense(10)])
        module = kl.KerasLightningModule(model, optimizer="sgd", loss=SCCE)
        (tmp_path / folder).mkdir()
        path = fit_briefly(module, digits, tmp_path / folder)
        if layer_class is Unregistered:
            with pytest.raises(
                kl.CheckpointError, match=r"not registered.*custom_objects=\{'MyLayer': MyLayer\}"
            ):
                kl.KerasLightningModule.load_from_checkpoint(path)
            restored = kl.KerasLightningModule.load_from_checkpoint(
                path, custom_objects={"Unregistered": Unregistered}
            )
        else:
            restored = kl.KerasLightningModule.load_from_checkpoint(path)
        assert isinstance(restored.model.layers[0], layer_class)
        np.testing.assert_allclose(
            predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
        )


def test_torch_objects_must_be_passed_again(digits: dict, tmp_path: Path) -> None:
    module = kl.KerasLightningModule(
        mlp(), optimizer=torch.optim.Adam, loss=torch.nn.CrossEntropyLoss(), metrics=["accuracy"]
    )
    path = fit_briefly(module, digits, tmp_path)
    with pytest.raises(
        kl.CheckpointError,
        match=r"optimizer \(torch\.optim\.adam\.Adam\), loss \(torch\.nn\.modules\.loss\."
        r"CrossEntropyLoss\)\. Pass them again: .*load_from_checkpoint\(path, loss=\.\.\., "
        r"optimizer=\.\.\.\), or loss=None, optimizer=None to only predict",
    ):
        kl.KerasLightningModule.load_from_checkpoint(path)
    restored = kl.KerasLightningModule.load_from_checkpoint(
        path, optimizer=torch.optim.Adam, loss=torch.nn.CrossEntropyLoss()
    )
    assert restored._arguments.metrics == ["accuracy"]
    np.testing.assert_allclose(
        predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
    )
    make_trainer(limit_train_batches=2).fit(restored, loader(digits["x_train"],
                                                             digits["y_train"]))


def test_load_from_checkpoint_rejects_hparams_file(tmp_path: Path) -> None:
    with pytest.raises(kl.ConfigurationError, match=r"`hparams_file` is not supported"):
        kl.KerasLightningModule.load_from_checkpoint(tmp_path / "x.ckpt", hparams_file="h.yaml")


# ---------------------------------------------------------------------- 4. safe by default


def test_lambda_layer_is_refused_unless_safe_mode_is_off(digits: dict, tmp_path: Path) -> None:
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(10)]
    )
    module = kl.KerasLightningModule(model, optimizer="sgd", loss=SCCE)
    path = fit_briefly(module, digits, tmp_path)
    with pytest.raises(kl.CheckpointError, match=r"Lambda layer.*pass safe_mode=False"):
        kl.KerasLightningModule.load_from_checkpoint(path)
    with pytest.raises(kl.CheckpointError, match=r"safe_mode=False"):
        kl.export_keras(path, tmp_path / "m.keras")
    restored = kl.KerasLightningModule.load_from_checkpoint(path, safe_mode=False)
    np.testing.assert_allclose(
        predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
    )


class Payload:
    """Stands for any pickled object; unpickling it would import and run code."""


class PicklingModule(kl.KerasLightningModule):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["payload"] = Payload()


def test_pickled_objects_are_refused_unless_weights_only_is_off(
    digits: dict, tmp_path: Path
) -> None:
    module = PicklingModule(mlp(), optimizer="adam", loss=SCCE)
    path = fit_briefly(module, digits, tmp_path)
    with pytest.raises(kl.CheckpointError, match=r"weights_only=True.*pass weights_only=False"):
        PicklingModule.load_from_checkpoint(path)
    # trainer.fit(ckpt_path=...) loads safely too, and names the opt-in
    with pytest.raises(kl.CheckpointError, match=r"refuses.*weights_only=False to trainer\.fit.*Payload"):
        make_trainer(max_epochs=2).fit(
            PicklingModule(mlp(), optimizer="adam", loss=SCCE),
            loader(digits["x_train"], digits["y_train"]),
            ckpt_path=path,
        )
    restored = PicklingModule.load_from_checkpoint(path, weights_only=False)
    np.testing.assert_allclose(
        predict(restored, digits["x_val"]), predict(module, digits["x_val"]), atol=1e-6
    )


# ---------------------------------------------------------------------- 5. export


def test_export_to_keras_and_weights_files(digits: dict, tmp_path: Path) -> None:
    module = kl.KerasLightningModule(
        bn_dropout_model(), optimizer=keras.optimizers.Adam(0.003), loss=SCCE,
        metrics=["accuracy"],
    )
    path = fit_briefly(module, digits, tmp_path)
    expected = predict(module, digits["x_val"])

    written = kl.export_keras(path, tmp_path / "model.keras")
    model = keras.saving.load_model(written)
    np.testing.assert_allclose(model.predict(digits["x_val"], verbose=0), expected, atol=1e-6)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.003)
    assert model.loss == SCCE
    # nothing in it names torch-only Keras modules, which Keras on JAX or TensorFlow
    # could not import (checked by hand with Keras 3.15.1 on JAX: same predictions)
    with zipfile.ZipFile(written) as archive:
        assert "keras.src.backend.torch" not in archive.read("config.json").decode()
    # the optimizer state travels too: iterations and Adam's moments, as in the checkpoint
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["keras_variables"]
    assert int(model.optimizer.iterations) == BRIEF_BATCHES
    assert max_diff([torch.as_tensor(keras.ops.convert_to_numpy(v))
                     for v in model.optimizer.variables], saved) == 0.0

    kl.export_keras(path, tmp_path / "model.weights.h5")
    fresh = bn_dropout_model(seed=9)
    fresh.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_allclose(fresh.predict(digits["x_val"], verbose=0), expected, atol=1e-6)

    with pytest.raises(kl.ConfigurationError, match=r"must end with '\.keras'.*'\.weights\.h5'"):
        kl.export_keras(path, tmp_path / "model.h5")


def test_training_starts_from_a_keras_file(digits: dict, tmp_path: Path) -> None:
    model = bn_dropout_model()
    model.compile(optimizer=keras.optimizers.Adam(0.004), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)  # saved with its slots, as after fit()
    model.save(tmp_path / "start.keras")

    module = kl.KerasLightningModule(keras.saving.load_model(tmp_path / "start.keras"))
    np.testing.assert_allclose(
        predict(module, digits["x_val"]), predict(model, digits["x_val"]), atol=1e-6
    )
    trainer = make_trainer(max_epochs=2)
    data = loader(digits["x_train"], digits["y_train"])
    trainer.fit(module, data)
    assert set(trainer.callback_metrics) == {"loss", "loss_epoch", "accuracy"}
    keras_optimizer = trainer.optimizers[0].keras_optimizer
    assert keras_optimizer.get_config()["learning_rate"] == pytest.approx(0.004)
    batches = -(-len(data.dataset) // data.batch_size)  # the last batch is partial
    assert int(keras_optimizer.iterations) == trainer.max_epochs * batches
    assert float(trainer.callback_metrics["accuracy"]) > 0.8


def test_public_names() -> None:
    assert {"export_keras", "model_from_checkpoint"} <= set(kl.__all__)
    assert kl.export_keras is kl.checkpoint.export.export_keras
