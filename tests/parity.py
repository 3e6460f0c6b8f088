"""Run one Keras model under Keras' own ``fit()`` and under ``KerasLightningModule``, side by side.

Each run builds its model from the same factory (the same seed, so the same initial weights
and random streams) and trains on the same batches in the same order; the results compared are
Keras' History against the epoch values Lightning logged, and the weights after training.
"""

from __future__ import annotations

import keras_lightning as kl

from collections.abc import Callable
from typing import Any

import keras
import lightning as L
import numpy as np
import torch
from conftest import make_trainer


class EpochValues(L.Callback):
    """The values logged for each epoch, read once the module's epoch-end logging ran."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._record(trainer)

    def history(self) -> dict[str, list[float]]:
        """Keras' ``History.history`` layout: name -> one value per epoch."""
        names = self.epochs[-1].keys()
        return {name: [epoch[name] for epoch in self.epochs if name in epoch] for name in names}


def keras_fit(
    make_model: Callable[[], keras.Model], *args: Any, **fit_kwargs: Any
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train with Keras' ``fit`` (unshuffled, silent): the model and its History."""
    model = make_model()
    fit_kwargs.setdefault("shuffle", False)
    history = model.fit(*args, verbose=0, **fit_kwargs)
    return model, history.history


def lightning_fit(
    make_model: Callable[[], keras.Model],
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    **module_kwargs: Any,
) -> tuple[keras.Model, dict[str, list[float]], kl.KerasLightningModule]:
    """Train with ``lightning.Trainer``: the model, the logged epoch values, the module."""
    model = make_model()
    module = kl.KerasLightningModule(model, **module_kwargs)
    values = EpochValues()
    trainer = make_trainer(max_epochs=epochs, callbacks=[values], num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    return module.model, values.history(), module


def assert_same_history(
    keras_history: dict[str, list[float]],
    logged: dict[str, list[float]],
    atol: float = 1e-5,
    names: Any = None,
) -> None:
    """Every value Keras' History holds, logged under the same name with the same value."""
    for name in names or keras_history:
        assert name in logged, f"{name!r} not logged; logged: {sorted(logged)}"
        np.testing.assert_allclose(
            logged[name], keras_history[name], atol=atol, rtol=1e-5, err_msg=name
        )


def assert_same_weights(a: keras.Model, b: keras.Model, atol: float = 1e-5) -> None:
    """The same weights, variable by variable (trainable and not)."""
    assert len(a.weights) == len(b.weights)
    for left, right in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(left.value),
            keras.ops.convert_to_numpy(right.value),
            atol=atol,
            rtol=1e-5,
            err_msg=left.path,
        )


class KeptBatches:
    """A loader that keeps its tensors: the same batch objects every epoch (in-memory data)."""

    def __init__(self, *arrays: Any, batch_size: int) -> None:
        tensors = [torch.as_tensor(np.asarray(a)) for a in arrays]
        self.batches = [
            tuple(t[start : start + batch_size] for t in tensors)
            for start in range(0, len(tensors[0]), batch_size)
        ]

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batches(*arrays: Any, batch_size: int) -> KeptBatches:
    """Batches of ``arrays`` that are the same tensor objects every epoch."""
    return KeptBatches(*arrays, batch_size=batch_size)


def samples_loader(data: Any, batch_size: int) -> torch.utils.data.DataLoader:
    """An unshuffled DataLoader over a list of samples (dicts or tuples) or a TensorDataset."""
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def tiny_bert_classifier(seed: int, num_layers: int = 2) -> Any:
    """A keras_hub BertTextClassifier built from its config (no preset), seeded."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=num_layers, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=12, dropout=0.0,
    )
    # the task compiles itself with keras_hub's defaults (Adam 5e-5, sparse CE, accuracy)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None, dropout=0.0
    )


def bert_batches(seed: int, n: int) -> tuple[dict[str, np.ndarray], np.ndarray, Any]:
    """Token features and labels for :func:`tiny_bert_classifier`, and a loader of both."""
    rng = np.random.default_rng(seed)
    features = {
        "token_ids": rng.integers(1, 64, size=(n, 12)).astype("int32"),
        "segment_ids": np.zeros((n, 12), dtype="int32"),
        "padding_mask": np.ones((n, 12), dtype="bool"),
    }
    labels = rng.integers(0, 3, size=n).astype("int64")
    samples = [({k: v[i] for k, v in features.items()}, labels[i]) for i in range(n)]
    return features, labels, torch.utils.data.DataLoader(samples, batch_size=8)
