"""strategy="ddp_notebook" through a real Jupyter kernel (nbclient), CPU, 2 forked processes.

The kernel runs this interpreter from a kernelspec written to a temporary directory (nothing
is registered globally).
"""

from __future__ import annotations

from keras_lightning.devices import fork_error

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

REPO = Path(__file__).parent.parent

SETUP = """
import json, os
import keras_lightning as kl
import keras, lightning as L, numpy as np, torch
from sklearn.datasets import load_digits

data = load_digits()
x = torch.as_tensor((data.data[:256] / 16.0).astype("float32"))
y = torch.as_tensor(data.target[:256].astype("int64"))
def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(10)])

def trainer():
    return L.Trainer(strategy="ddp_notebook", accelerator="cpu", devices=2, max_epochs=2,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False)
"""

TRAIN = """
module = kl.KerasLightningModule(build_model, optimizer=keras.optimizers.Adam(0.01),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 metrics=["accuracy"])
t = trainer()
t.fit(module, loader(), loader())
logits = module(x).detach().numpy()
print("RESULT", json.dumps({
    "strategy": type(t.strategy).__name__, "world_size": t.world_size,
    "metrics": {k: float(v) for k, v in t.callback_metrics.items()},
    "parent_accuracy": float((logits.argmax(1) == y.numpy()).mean()),
    "parent_pid": os.getpid(),
}))
"""

# A CUDA machine initializes CUDA when Keras builds a model in the notebook; the forked
# workers then cannot use it. On this CPU machine, make torch report exactly that state in the
# forked workers (and only there), with a model built in the notebook process.
BAD_FORK = """
parent = os.getpid()
torch.cuda._is_in_bad_fork = lambda: os.getpid() != parent
built = build_model()
module = kl.KerasLightningModule(built, optimizer="adam",
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    trainer().fit(module, loader())
    print("RESULT", json.dumps({"error": None}))
except Exception as error:
    print("RESULT", json.dumps({"error": str(error)}))
"""


def _kernel_manager(tmp_path: Path) -> object:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels" / "keras-lightning-test"
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "keras_lightning test",
        "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MASTER_PORT": ""},
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="keras-lightning-test", kernel_spec_manager=specs)


def _results(nb: object) -> list[dict[str, object]]:
    found = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        # A cell's stdout can arrive as several stream messages, split anywhere (seen on a
        # loaded machine): join them before reading lines.
        text = "".join(
            output.get("text", "")
            for output in cell.get("outputs", [])
            if output.get("output_type") == "stream" and output.get("name") == "stdout"
        )
        for line in text.splitlines():
            if line.startswith("RESULT "):
                found.append(json.loads(line[len("RESULT ") :]))
    return found


def _outputs(nb: object) -> str:
    """Every cell's output, for the failure message."""
    return "\n".join(
        f"[cell {i}] {output.get('name', output.get('output_type'))}: "
        f"{output.get('text', output.get('evalue', ''))[-1500:]}"
        for i, cell in enumerate(nb.cells)  # type: ignore[attr-defined]
        for output in cell.get("outputs", [])
    )


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_notebook_in_a_real_kernel(tmp_path: Path) -> None:
    from conftest import free_port

    port = free_port()
    cells = [
        f"import os\nos.environ['MASTER_PORT'] = '{port}'\n",
        SETUP,
        TRAIN,
        f"os.environ['MASTER_PORT'] = '{free_port()}'\n",
        BAD_FORK,
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=240, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    results = _results(nb)
    assert len(results) == 2, _outputs(nb)
    trained, refused = results

    assert trained["strategy"] == "DDPStrategy" and trained["world_size"] == 2
    metrics = trained["metrics"]
    assert metrics["val_accuracy"] > 0.5  # it learned something in 2 short epochs
    # The notebook's module got rank 0's trained weights back: its own prediction in the
    # kernel process reproduces the logged global validation accuracy (val set == train set,
    # BatchNorm statistics averaged across ranks before validation and at the end).
    assert trained["parent_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)

    error = refused["error"]
    assert error is not None and "pass a factory" in error.lower().replace("\n", " ")
    assert "KerasLightningModule(lambda: build_model()" in error


@pytest.mark.parametrize(
    ("built", "bad_fork", "expected"),
    [
        (True, True, "Pass a factory instead of a built model"),
        (False, True, "Remove every CUDA call made before trainer.fit"),
        (True, False, None),
        (False, False, None),
    ],
)
def test_fork_error_message(built: bool, bad_fork: bool, expected: str | None) -> None:
    error = fork_error(built, bad_fork)
    if expected is None:
        assert error is None
    else:
        assert error is not None and expected in str(error)
        assert "ddp_notebook" in str(error)


@pytest.mark.parametrize(
    ("built", "expected"),
    [(True, "Pass a factory instead of a built model"), (False, "Remove every CUDA call")],
)
def test_check_fork_raises_in_a_bad_cuda_fork(monkeypatch, built: bool, expected: str) -> None:
    from keras_lightning import ConfigurationError
    from keras_lightning.devices import check_fork

    import torch

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(ConfigurationError, match=expected):
        check_fork(built)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    assert check_fork(built) is None
