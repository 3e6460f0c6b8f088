"""The backend guard and the public surface, each checked in a fresh interpreter."""

from __future__ import annotations

import keras_lightning as kl

import os
import subprocess
import sys

import keras
import lightning as L
import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120
    )


def test_import_selects_torch_when_keras_is_not_imported_yet():
    result = run_python(
        "import os, keras_lightning, keras; "
        "print(os.environ['KERAS_BACKEND'], keras.backend.backend())"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "torch"]


def test_import_after_keras_on_another_backend_fails_with_the_fix():
    # JAX and TensorFlow are not installed here (Keras' numpy backend needs JAX too), so the
    # already-imported Keras is a stand-in module that reports another backend, as Keras does.
    code = (
        "import sys, types; keras = types.ModuleType('keras'); "
        "keras.backend = types.SimpleNamespace(backend=lambda: 'jax'); "
        "sys.modules['keras'] = keras; import keras_lightning"
    )
    result = run_python(code, KERAS_BACKEND="jax")
    assert result.returncode != 0
    assert "keras_lightning.exceptions.BackendError" in result.stderr
    assert "already imported with the 'jax' backend" in result.stderr
    assert "Import keras_lightning before keras" in result.stderr


def test_env_asking_for_another_backend_is_overridden_with_a_warning():
    result = run_python(
        "import warnings; warnings.simplefilter('always'); import keras_lightning, keras; "
        "print(keras.backend.backend())",
        KERAS_BACKEND="jax",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert "KERAS_BACKEND='jax' was set" in result.stderr


def test_import_after_keras_on_torch_is_fine():
    result = run_python("import keras; import keras_lightning; print('ok')", KERAS_BACKEND="torch")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_import_starts_no_training_machinery():
    # Nothing else happens at import: no process group, no CUDA initialisation, no threads.
    result = run_python(
        "import threading, torch, keras_lightning; "
        "print(torch.distributed.is_initialized(), torch.cuda.is_initialized(), "
        "threading.active_count())"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "1"]


def test_public_surface_is_pinned():
    # Exactly these names: a new public name is a decision, made here on purpose.
    assert sorted(kl.__all__) == [
        "AtomicCheckpointIO",
        "BackendError",
        "BatchError",
        "CheckpointError",
        "ConfigurationError",
        "KerasLightningError",
        "KerasLightningModule",
        "KerasLightningTypeError",
        "KerasLoss",
        "KerasModelSummary",
        "KerasOptimizer",
        "KerasWeights",
        "ShapeMismatchError",
        "StochasticWeightAveraging",
        "TerminateOnNaN",
        "TorchLoss",
        "WholeStepStats",
        "__version__",
        "export_keras",
        "flatten_logs",
        "keras_loss",
        "model_from_checkpoint",
        "torch_loss",
        "unshard",
        "weights_module",
    ]
    for name in kl.__all__:
        assert hasattr(kl, name), name
    for name in kl.__all__:
        error = getattr(kl, name)
        if isinstance(error, type) and issubclass(error, Exception):
            assert issubclass(error, kl.KerasLightningError)


def test_module_public_surface_beyond_lightning_is_pinned():
    # What a user subclass gains over a plain LightningModule: what users call, nothing else.
    added = {
        name
        for name in dir(kl.KerasLightningModule)
        if not name.startswith("_") and not hasattr(L.LightningModule, name)
    }
    assert added == {
        "apply_gradients",  # deprecated name of backward_and_step
        "backward_and_step",
        "build_from_batch",
        "compile_stats",
        "compute_loss",
        "keras_scope",
        "learning_rate",  # what lr_find reads and sets
        "require_model",  # deprecated: module.model
        "unpack_batch",
        "update_metrics",
    }


def test_renamed_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="kl.KerasLightningTypeError"):
        old = kl.ArgumentTypeError
    assert old is kl.KerasLightningTypeError
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.warns(DeprecationWarning, match="jit_compile=True"):
        module = kl.KerasLightningModule(model, optimizer="sgd", loss="mse", compile=True)
    assert module._builtin.compile_backend == "eager"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        kl.NoSuchName  # noqa: B018
