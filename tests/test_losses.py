"""Loss adapters: one convention inside, Keras and torch orders handled at the edge."""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.losses import KerasLoss, TorchLoss, resolve_loss

import keras
import numpy as np
import pytest
import torch

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [1.0, 1.0, -2.0], [0.0, 0.3, 0.1]])
LABELS = torch.tensor([0, 2, 1, 1])
ONE_HOT = torch.nn.functional.one_hot(LABELS, 3).float()


def reference_cce(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy by hand with numpy: -log softmax at the true class, per sample."""
    z = logits.numpy().astype("float64")
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels.numpy()]


@pytest.mark.parametrize(
    "spec, target",
    [
        (keras.losses.CategoricalCrossentropy(from_logits=True), ONE_HOT),
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), LABELS),
        (torch.nn.CrossEntropyLoss(), LABELS),
        (torch.nn.functional.cross_entropy, LABELS),
        (
            kl.keras_loss(
                lambda t, p: keras.losses.categorical_crossentropy(t, p, from_logits=True)
            ),
            ONE_HOT,
        ),
        (kl.torch_loss(lambda p, t: torch.nn.functional.cross_entropy(p, t)), LABELS),
    ],
    ids=[
        "keras-object",
        "keras-sparse",
        "torch-module",
        "torch-functional",
        "marked-keras",
        "marked-torch",
    ],
)
def test_every_kind_of_loss_equals_the_hand_computed_value(spec, target):
    loss = resolve_loss(spec)
    expected = reference_cce(LOGITS, LABELS).mean()
    assert float(loss(LOGITS, target)) == pytest.approx(expected, rel=1e-5)


def test_keras_loss_names_are_called_with_keras_order():
    y_pred = torch.tensor([[1.0], [2.0], [4.0]])
    y_true = torch.tensor([[0.0], [2.0], [1.0]])
    for name, expected in [("mse", (1 + 0 + 9) / 3), ("mae", (1 + 0 + 3) / 3)]:
        assert float(resolve_loss(name)(y_pred, y_true)) == pytest.approx(expected)
    # A loss that is not symmetric shows the order: msle uses log(1 + y) of each side.
    msle = resolve_loss("mean_squared_logarithmic_error")(y_pred, y_true)
    by_hand = ((np.log1p([1.0, 2.0, 4.0]) - np.log1p([0.0, 2.0, 1.0])) ** 2).mean()
    assert float(msle) == pytest.approx(by_hand, rel=1e-5)


def test_torch_cross_entropy_keeps_int64_labels_instead_of_keras_float_cast():
    loss = resolve_loss(torch.nn.CrossEntropyLoss())
    assert isinstance(loss, TorchLoss)
    # Had the labels been cast to float they would be read as class probabilities and fail.
    assert float(loss(LOGITS, LABELS.long())) == pytest.approx(
        reference_cce(LOGITS, LABELS).mean(), rel=1e-5
    )


def test_sample_weight_follows_keras_sum_over_batch_size_for_keras_and_torch_losses():
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    per_sample = reference_cce(LOGITS, LABELS)
    expected = (per_sample * weights.numpy()).sum() / len(per_sample)
    keras_value = resolve_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))(
        LOGITS, LABELS, weights
    )
    torch_value = resolve_loss(torch.nn.CrossEntropyLoss())(LOGITS, LABELS, weights)
    functional_value = resolve_loss(torch.nn.functional.cross_entropy)(LOGITS, LABELS, weights)
    assert float(keras_value) == pytest.approx(expected, rel=1e-5)
    assert float(torch_value) == pytest.approx(expected, rel=1e-5)
    assert float(functional_value) == pytest.approx(expected, rel=1e-5)


def test_crossentropy_alias_resolves_from_shapes_like_keras():
    # Keras' compile(loss="crossentropy") picks the loss from the shapes; its outputs are
    # probabilities (from_logits=False).
    probabilities = torch.softmax(LOGITS, dim=1)
    expected = reference_cce(LOGITS, LABELS).mean()
    # integer labels of shape (batch,) against (batch, classes): sparse categorical
    sparse = resolve_loss("crossentropy", LABELS, probabilities)
    assert float(sparse(probabilities, LABELS)) == pytest.approx(expected, rel=1e-5)
    # one-hot targets of the output's shape: categorical
    dense = resolve_loss("crossentropy", ONE_HOT, probabilities)
    assert float(dense(probabilities, ONE_HOT)) == pytest.approx(expected, rel=1e-5)
    # one output unit: binary
    p = torch.tensor([[0.9], [0.2], [0.6], [0.3]])
    t = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    binary = resolve_loss("crossentropy", t, p)
    pn, tn = p.numpy().astype("float64"), t.numpy().astype("float64")
    expected_binary = -(tn * np.log(pn) + (1 - tn) * np.log(1 - pn)).mean()
    assert float(binary(p, t)) == pytest.approx(expected_binary, rel=1e-5)


def test_plain_callable_is_refused_with_both_markers_in_the_message():
    with pytest.raises(kl.KerasLightningTypeError, match=r"kl\.keras_loss\(fn\).*kl\.torch_loss\(fn\)"):
        resolve_loss(lambda a, b: (a - b).abs().mean())


def test_unknown_loss_name_suggests_close_names():
    with pytest.raises(
        kl.ConfigurationError,
        match=r"'categorical_crossentropy'.*not a Keras loss"
        r"|not a Keras loss name.*Did you mean 'categorical_crossentropy'",
    ):
        resolve_loss("categorical_crosentropy")


def test_non_callable_loss_is_refused_naming_the_argument():
    with pytest.raises(kl.KerasLightningTypeError, match=r"`loss` must be .* Received: loss=42"):
        resolve_loss(42)


def test_marker_requires_a_callable():
    with pytest.raises(kl.KerasLightningTypeError, match=r"kl\.torch_loss\(fn\)` expects a callable"):
        kl.torch_loss("mse")


def test_torch_loss_without_reduction_cannot_take_sample_weights():
    loss = kl.torch_loss(lambda p, t: ((p - t) ** 2).mean())
    with pytest.raises(kl.ConfigurationError, match="reduction='none'"):
        loss(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2))


def test_adapters_report_their_convention():
    assert isinstance(resolve_loss("mse"), KerasLoss)
    assert resolve_loss(keras.losses.mean_squared_error).convention == "keras"
    assert resolve_loss(torch.nn.MSELoss()).convention == "torch"
