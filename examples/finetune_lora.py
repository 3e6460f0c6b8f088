"""Fine-tune a keras_hub causal language model with LoRA under ``lightning.Trainer``.

The keras_hub recipe, unchanged, with Lightning doing the training:

1. ``GPT2CausalLM.from_preset(preset)``: the task with its tokenizer, preprocessor and its own
   ``compile()`` defaults (Adam, masked sparse cross-entropy);
2. ``backbone.enable_lora(rank=4)``: only the LoRA weights of the attention's query and value
   projections train; every other weight stays frozen, bit for bit;
3. batches are the task's own preprocessor output (``collate_fn=task.preprocessor``): token
   ids, padding mask, next-token labels and the padding mask as ``sample_weight``;
4. ``checkpoint_weights="trainable"``: Lightning's checkpoints hold the adapter only (a few
   kilobytes here, a few megabytes for a real model), and load back onto the base preset;
5. ``task.save_to_preset(out)``: a plain keras_hub preset (LoRA merged into the kernels) that
   any keras_hub user loads with ``from_preset(out)``; and ``generate()`` on the result.

No network here: with no ``--preset``, a small GPT-2 is built from its config, with a
character-level vocabulary, and saved to a local preset first. With a downloaded preset
(``--preset gpt2_base_en`` where the network allows, or its local folder), the same code
fine-tunes the real model. ``KL_FAST=1`` runs a few batches only (the test suite does).

Run: ``python examples/finetune_lora.py [--preset DIR_OR_HANDLE] [--out DIR]``
"""

from __future__ import annotations

import keras_lightning as kl  # selects Keras' torch backend before keras loads

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import keras
import keras_hub
import lightning as L
import torch

FAST = os.environ.get("KL_FAST") == "1"

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "the early bird catches the worm",
    "all that glitters is not gold",
    "actions speak louder than words",
    "the pen is mightier than the sword",
    "when in rome do as the romans do",
    "the best things in life are free",
]


def tiny_gpt2_preset(directory: str | Path, sequence_length: int = 24) -> Path:
    """Save a small GPT-2 causal LM, built from its config, as a local keras_hub preset."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = {"<|endoftext|>": 0, "Ġ": 1}
    for letter in letters:  # byte-level BPE: "Ġ" marks a letter that follows a space
        vocabulary[letter] = len(vocabulary)
        vocabulary["Ġ" + letter] = len(vocabulary)
    merges = ["t h", "h e", "i n"]
    for merge in merges:
        vocabulary[merge.replace(" ", "")] = len(vocabulary)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=64, dropout=0.0,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    task = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    task.save_to_preset(str(directory))
    return Path(directory)


def lora_task(preset: str | Path, rank: int = 4, seed: int = 1) -> Any:
    """The preset's causal LM with LoRA enabled (seeded, so every call gives the same adapter)."""
    task = keras_hub.models.CausalLM.from_preset(str(preset))
    keras.utils.set_random_seed(seed)
    task.backbone.enable_lora(rank=rank)
    return task


def _loss_of(module: kl.KerasLightningModule, loader: Any) -> float:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(module, loader, verbose=False)[0]["val_loss"])


def main(preset: str | Path | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune, save the adapter checkpoint and a preset; what was measured, by name."""
    work = Path(out or tempfile.mkdtemp(prefix="finetune_lora_"))
    if preset is None:
        preset = tiny_gpt2_preset(work / "base_preset")
    task = lora_task(preset)
    # keras_hub's LoRA guide fine-tunes with AdamW; a tiny model from scratch wants a larger
    # learning rate than its 5e-5 (every other compile() default, the loss, is the task's)
    optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.01)
    module = kl.KerasLightningModule(task, optimizer=optimizer, checkpoint_weights="trainable")
    texts = TEXTS[:4] if FAST else TEXTS * 8
    loader = torch.utils.data.DataLoader(texts, batch_size=4, collate_fn=task.preprocessor)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / "checkpoints", save_last=True)
    trainer = L.Trainer(
        max_epochs=1 if FAST else 20, callbacks=[saver], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    first_loss = None if FAST else _loss_of(module, loader)
    trainer.fit(module, loader)

    # the adapter checkpoint loads back onto the base preset with the same enable_lora call
    adapter = Path(saver.last_model_path)
    restored = kl.KerasLightningModule.load_from_checkpoint(adapter, model=lora_task(preset))
    preset_out = work / "finetuned_preset"
    restored.model.save_to_preset(str(preset_out))  # a plain keras_hub preset, LoRA merged
    finetuned = keras_hub.models.CausalLM.from_preset(str(preset_out))
    sample = finetuned.generate("the", max_length=16, stop_token_ids=None)
    results = {
        "loss_before": first_loss,
        "loss": float(trainer.callback_metrics["loss"]),
        "adapter_checkpoint_bytes": adapter.stat().st_size,
        "preset_weights_bytes": (preset_out / "model.weights.h5").stat().st_size,
        "trainable_weights": sum(int(v.numpy().size) for v in task.trainable_weights),
        "all_weights": sum(int(v.numpy().size) for v in task.weights),
        "adapter": str(adapter),
        "preset": str(preset_out),
        "generated": sample,
    }
    for name, value in results.items():
        print(f"{name}: {value}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a keras_hub preset folder or handle (default: tiny)")
    parser.add_argument("--out", help="where the checkpoints and the preset go")
    arguments = parser.parse_args()
    main(arguments.preset, arguments.out)
