"""keras_hub fine-tuning under Lightning, the way keras_hub users write it, all offline.

Every model is a small keras_hub task built from its config and saved to a local preset
(``examples/finetune_lora.py``'s ``tiny_gpt2_preset``); ``from_preset(folder)`` is the same call
a user makes with a hub handle. The reference is keras_hub's own ``fit`` on the same batches.
"""

from __future__ import annotations

import keras_lightning as kl

import importlib.util
import sys
from pathlib import Path

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_trainer
from parity import (
    EpochValues,
    assert_same_history,
    assert_same_weights,
    bert_batches,
    tiny_bert_classifier,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras_hub") is None, reason="needs keras-hub (Python 3.11+)"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TEXTS = [
    "the cat sat on the mat",
    "a dog ran far away",
    "then the sun came out",
    "he ate the bread",
    "she walks in the rain",
    "the theme of the thing",
    "in the end it was fine",
    "zebras eat grass",
]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    import finetune_lora

    return finetune_lora.tiny_gpt2_preset(tmp_path_factory.mktemp("hub") / "base")


def lora_task(preset):
    import finetune_lora

    return finetune_lora.lora_task(preset)


def text_batches(task, texts=TEXTS, batch_size=4):
    """The task's own preprocessor output as batches: (inputs, next tokens, padding mask)."""
    return torch.utils.data.DataLoader(texts, batch_size=batch_size, collate_fn=task.preprocessor)


def keras_hub_fit(task, texts=TEXTS, batch_size=4, epochs=1):
    import tensorflow as tf

    history = task.fit(
        tf.data.Dataset.from_tensor_slices(texts).batch(batch_size), epochs=epochs, shuffle=False, verbose=0
    )
    return history.history


def logits(task, texts=TEXTS[:2]):
    x, _, _ = task.preprocessor(texts)
    return keras.ops.convert_to_numpy(task(x, training=False))


def weights_of(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.weights}


def test_a_causal_lm_from_a_preset_trains_as_under_keras_hub_fit(preset):
    import keras_hub

    reference = keras_hub.models.CausalLM.from_preset(str(preset))
    history = keras_hub_fit(reference, epochs=2)

    # a factory: built in configure_model; the task's compile() defaults are adopted
    module = kl.KerasLightningModule(lambda: keras_hub.models.CausalLM.from_preset(str(preset)))
    x, y, sample_weight = next(iter(text_batches(reference)))
    assert sample_weight.dtype == torch.bool and not bool(sample_weight.all())  # padding
    values = EpochValues()
    trainer = make_trainer(max_epochs=2, callbacks=[values])
    loader = text_batches(reference)
    trainer.fit(module, loader)
    assert type(module.model.optimizer).__name__ == "Adam"
    assert_same_history(history, values.history())
    assert_same_weights(reference, module.model)


def test_lora_trains_only_the_adapter_as_under_keras_hub_fit(preset):
    reference = lora_task(preset)
    history = keras_hub_fit(reference)
    task = lora_task(preset)
    before = weights_of(task)
    module = kl.KerasLightningModule(task)
    values = EpochValues()
    make_trainer(max_epochs=1, callbacks=[values]).fit(module, text_batches(task))
    assert_same_history(history, values.history())
    assert_same_weights(reference, task)
    after = weights_of(task)
    trainable = {v.path for v in task.trainable_weights}
    assert any("lora_kernel" in path for path in trainable)
    assert not any("lora_kernel" not in p and "/kernel" in p for p in trainable)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed and changed <= trainable  # every frozen weight is bit for bit unchanged
    # the optimizer holds the trainable weights only
    owned = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert len(owned) == len(task.trainable_weights)


def test_an_adapter_checkpoint_is_small_and_resumes_exactly_on_the_base(preset, tmp_path):
    straight = kl.KerasLightningModule(lora_task(preset), checkpoint_weights="trainable")
    make_trainer(max_epochs=2).fit(straight, text_batches(straight.model))

    first = kl.KerasLightningModule(lora_task(preset), checkpoint_weights="trainable")
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_epochs=1, callbacks=[saver], enable_checkpointing=True).fit(
        first, text_batches(first.model)
    )
    adapter = torch.load(saver.last_model_path, weights_only=True)
    kept = sum(t.numel() * t.element_size() for t in adapter["state_dict"].values())
    full = sum(t.numel() * t.element_size() for t in first.state_dict().values())
    lora = sum(v.numpy().size * 4 for v in first.model.trainable_weights)
    assert kept < 0.15 * full  # the frozen GPT-2 weights are not in it
    assert kept <= lora + 64  # the trainable weights, plus the seed generator states
    assert adapter["keras_lightning_adapter"]["left_out"]

    # loaded onto the base preset with the same enable_lora call: the trained model
    restored = kl.KerasLightningModule.load_from_checkpoint(
        saver.last_model_path, model=lora_task(preset)
    )
    np.testing.assert_array_equal(logits(restored.model), logits(first.model))

    # resumed from it onto a fresh base: the same as two epochs straight
    resumed = kl.KerasLightningModule(lora_task(preset), checkpoint_weights="trainable")
    make_trainer(max_epochs=2).fit(
        resumed, text_batches(resumed.model), ckpt_path=saver.last_model_path
    )
    for a, b in zip(straight.model.variables, resumed.model.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_an_adapter_checkpoint_refuses_another_base_and_a_rebuild_alone(preset, tmp_path):
    module = kl.KerasLightningModule(lora_task(preset), checkpoint_weights="trainable")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, text_batches(module.model))
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)

    other = lora_task(preset)
    other.backbone.get_layer("token_embedding").embeddings.assign(
        np.ones(other.backbone.get_layer("token_embedding").embeddings.shape, "float32")
    )
    untouched = weights_of(other)
    with pytest.raises(kl.CheckpointError, match=r"(?s)base weights differ.*token_embedding"):
        kl.KerasLightningModule.load_from_checkpoint(path, model=other)
    after = weights_of(other)
    assert all(np.array_equal(untouched[k], after[k]) for k in untouched)  # nothing loaded
    with pytest.raises(kl.CheckpointError, match="adapter checkpoint.*model=base_model"):
        kl.model_from_checkpoint(path)
    with pytest.raises(kl.CheckpointError, match="adapter checkpoint.*model=base_model"):
        kl.KerasLightningModule.load_from_checkpoint(path)
    with pytest.raises(kl.ConfigurationError, match="checkpoint_weights.*'trainable'"):
        kl.KerasLightningModule(lora_task(preset), checkpoint_weights="lora")


def test_the_fine_tuned_task_exports_to_a_preset_plain_keras_hub_loads(preset, tmp_path):
    import keras_hub

    reference = lora_task(preset)
    keras_hub_fit(reference)
    module = kl.KerasLightningModule(lora_task(preset), checkpoint_weights="trainable")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, text_batches(module.model))
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")

    # from the trained module
    module.model.save_to_preset(str(tmp_path / "from_module"))
    exported = keras_hub.models.CausalLM.from_preset(str(tmp_path / "from_module"))
    assert not any("lora" in v.path for v in exported.weights)  # LoRA merged into the kernels
    np.testing.assert_allclose(logits(exported), logits(module.model), atol=1e-5)
    # from the checkpoint, onto the base
    loaded = kl.KerasLightningModule.load_from_checkpoint(
        tmp_path / "adapter.ckpt", model=lora_task(preset)
    )
    loaded.model.save_to_preset(str(tmp_path / "from_checkpoint"))
    again = keras_hub.models.CausalLM.from_preset(str(tmp_path / "from_checkpoint"))
    np.testing.assert_allclose(logits(again), logits(exported), atol=1e-6)
    # keras_hub's own adapter file loads onto the base too; it holds the LoRA kernels only,
    # not the query / value biases that train beside them (the adapter checkpoint has both)
    module.model.backbone.save_lora_weights(str(tmp_path / "adapter.lora.h5"))
    base = keras_hub.models.CausalLM.from_preset(str(preset))
    base.backbone.load_lora_weights(str(tmp_path / "adapter.lora.h5"))
    trained = {v.path: v for v in module.model.weights}
    for variable in base.trainable_weights:
        if "lora_kernel" in variable.path:
            np.testing.assert_array_equal(variable.numpy(), trained[variable.path].numpy())
        else:
            variable.assign(trained[variable.path])  # the biases
    np.testing.assert_allclose(logits(base), logits(module.model), atol=1e-6)

    # generate() on the fine-tuned model: what the keras_hub-trained twin generates
    prompts = ["the", "a dog"]
    for sampler in ("greedy",):
        exported.compile(sampler=sampler)
        reference.compile(sampler=sampler)
        generated = exported.generate(prompts, max_length=12, stop_token_ids=None)
        assert all(len(text) > len(prompt) for text, prompt in zip(generated, prompts, strict=True))
        assert generated == reference.generate(prompts, max_length=12, stop_token_ids=None)


def test_a_frozen_backbone_then_unfrozen_trains_in_two_phases():
    def classifier():
        return tiny_bert_classifier(seed=5, num_layers=1)

    features, labels, data = bert_batches(seed=6, n=16)

    # Keras: freeze, compile, fit; unfreeze, compile again (a fresh optimizer), fit
    reference = classifier()
    reference.backbone.trainable = False
    reference.compile(optimizer=keras.optimizers.Adam(1e-2), loss=reference.loss)
    reference.fit(features, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    reference.backbone.trainable = True
    reference.compile(optimizer=keras.optimizers.Adam(1e-3), loss=reference.loss)
    reference.fit(features, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)

    task = classifier()
    start = weights_of(task.backbone)
    task.backbone.trainable = False
    phase_one = kl.KerasLightningModule(task, optimizer=keras.optimizers.Adam(1e-2))
    make_trainer(max_epochs=1).fit(phase_one, data)
    frozen = weights_of(task.backbone)
    assert all(np.array_equal(start[k], frozen[k]) for k in start)
    task.backbone.trainable = True
    phase_two = kl.KerasLightningModule(task, optimizer=keras.optimizers.Adam(1e-3))
    make_trainer(max_epochs=1).fit(phase_two, data)
    assert_same_weights(reference, task)
    trained = weights_of(task.backbone)
    assert any(not np.array_equal(frozen[k], trained[k]) for k in frozen)


def test_the_lora_example_runs_in_fast_mode(tmp_path, monkeypatch):
    import finetune_lora

    monkeypatch.setattr(finetune_lora, "FAST", True)
    results = finetune_lora.main(out=tmp_path)
    assert results["adapter_checkpoint_bytes"] < results["preset_weights_bytes"]
    assert results["trainable_weights"] < results["all_weights"] / 10
    assert results["generated"].startswith("the")
