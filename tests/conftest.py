"""Shared fixtures: small real data, quiet Trainer settings, free ports."""

from __future__ import annotations

import keras_lightning  # noqa: F401  (selects the torch backend before keras is imported)

import os
import socket
from typing import Any

import keras
import lightning as L
import numpy as np
import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """A Trainer that prints nothing and writes nothing unless asked."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        deterministic=False,
    )
    kwargs.update(overrides)
    return kwargs


def make_trainer(**overrides: Any) -> L.Trainer:
    return L.Trainer(**trainer_kwargs(**overrides))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loader(
    *arrays: Any, batch_size: int = 32, shuffle: bool = False
) -> torch.utils.data.DataLoader:
    tensors = [torch.as_tensor(np.asarray(a)) for a in arrays]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle
    )


def mlp(inputs: int = 64, classes: int = 10, hidden: int = 32, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes),
        ]
    )


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """sklearn's real 8x8 handwritten digits, scaled to [0, 1], split 1400 / 397."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    return {
        "x_train": x[:1400],
        "y_train": y[:1400],
        "x_val": x[1400:],
        "y_val": y[1400:],
    }


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(1234)


class GuideRegressor(keras.Model):
    """One Dense layer with the train_step of Keras' guide "Customizing what happens in fit()"."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        self.zero_grad()
        loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, self(x, training=False))
        return {m.name: m.result() for m in self.metrics}
