"""The main example: the loop guide's end-to-end MLP, under lightning.Trainer, on real digits.

"Writing a training loop from scratch in PyTorch" trains the MLP three ways: a torch optimizer
and loss; a Keras optimizer and loss with metrics; and with a layer that calls add_loss().
Each is one KerasLightningModule and a Trainer (see loop_*.py for the single sections). The
data is scikit-learn's 8x8 handwritten digits (1797 real scans, offline). The last model is
saved as a .keras file and reloaded by plain Keras.

Run:  python examples/train_digits.py            (about a minute on a laptop CPU)
      KL_FAST=1 python examples/train_digits.py  (a few seconds: smoke test)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _digits  # noqa: E402
import keras  # noqa: E402
import lightning as L  # noqa: E402
import loop_add_loss  # noqa: E402
import loop_metrics  # noqa: E402
import loop_torch  # noqa: E402
import numpy as np  # noqa: E402


def main() -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    print("== 1. torch optimizer + torch loss")
    torch_acc, _ = loop_torch.main()
    print("\n== 2. Keras Adam + Keras loss + metrics")
    keras_acc, _ = loop_metrics.main()
    print("\n== 3. ... with a layer that calls add_loss()")
    add_loss_acc, module = loop_add_loss.main()

    path = os.environ.get("KL_SAVE", "digits_mlp.keras")
    module.model.save(path)
    reloaded = keras.saving.load_model(path)
    x_val = next(iter(_digits.dataloaders(one_hot=True)[1]))[0]
    same = np.allclose(
        keras.ops.convert_to_numpy(reloaded(x_val)), keras.ops.convert_to_numpy(module.model(x_val))
    )
    results = {"torch": torch_acc, "keras": keras_acc, "add_loss": add_loss_acc}
    print(f"\nValidation accuracy: {results}")
    print(f"Saved the trained Keras model to {path}; plain Keras reloads it: same outputs={same}")
    return results


if __name__ == "__main__":
    main()
