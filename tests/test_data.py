"""Batch unpacking, output alignment and class weights, without a Trainer."""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning.data import (
    align_targets,
    class_weight_tensor,
    class_weights_for,
    per_output,
    unpack_batch,
    validate_class_weight,
)

import numpy as np
import pytest
import torch


@pytest.mark.parametrize(
    "batch, expected",
    [
        ((1,), (1, None, None)),
        ([1, 2], (1, 2, None)),
        ((1, 2, 3), (1, 2, 3)),
        ({"a": 1}, ({"a": 1}, None, None)),
    ],
)
def test_unpack_batch_follows_keras(batch, expected):
    assert unpack_batch(batch) == expected


def test_unpack_batch_rejects_four_elements_and_shows_the_multi_input_form():
    with pytest.raises(kl.BatchError, match=r"received a tuple of 4 elements.*\(\(x1, x2\), y\)"):
        unpack_batch((1, 2, 3, 4))


def test_class_weights_match_keras_own_conversion():
    from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights

    weights = {0: 0.5, 2: 4.0}
    rng = np.random.default_rng(0)
    sparse = rng.integers(0, 4, size=50)
    one_hot = np.eye(4, dtype="float32")[sparse]
    table = class_weight_tensor(weights)
    for y in (sparse, one_hot, sparse[:, None]):
        ours = class_weights_for(torch.as_tensor(y), table).numpy()
        theirs = class_weight_to_sample_weights(y, weights)
        np.testing.assert_allclose(ours, theirs)


@pytest.mark.parametrize(
    "value, message",
    [
        ([1, 2], r"non-empty dict mapping class indices"),
        ({"cat": 1.0}, r"keys must be class indices .* received key 'cat'"),
        ({0: "heavy"}, r"class_weight\[0\]` must be a number"),
    ],
)
def test_bad_class_weight_is_refused(value, message):
    with pytest.raises(kl.ConfigurationError, match=message):
        validate_class_weight(value)


def test_per_output_spreads_and_checks_names():
    assert per_output("mse", ["a", "b"], "loss") == ["mse", "mse"]
    assert per_output({"b": 2.0}, ["a", "b"], "loss_weights") == [None, 2.0]
    with pytest.raises(
        kl.ConfigurationError,
        match=r"`loss_weights` has keys \['c'\] that match "
        r"no model output.*\['a', 'b'\]",
    ):
        per_output({"c": 1.0}, ["a", "b"], "loss_weights")
    with pytest.raises(kl.ConfigurationError, match="list of 3 entries but the model has 2"):
        per_output(["mse", "mae", "mse"], ["a", "b"], "loss")


def test_align_targets_by_name_and_position():
    assert align_targets({"b": 2, "a": 1}, ["a", "b"]) == [1, 2]
    assert align_targets([1, 2], ["a", "b"]) == [1, 2]
    with pytest.raises(kl.ShapeMismatchError, match=r"keys \['z'\] that match no model output"):
        align_targets({"z": 1}, ["a", "b"])
    with pytest.raises(kl.ShapeMismatchError, match="has 2 outputs"):
        align_targets(torch.zeros(3), ["a", "b"])
