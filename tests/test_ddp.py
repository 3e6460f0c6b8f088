"""DDP on CPU (gloo, 2 processes): weights, gradients, BatchNorm statistics, seeds, metrics
(the module's, torchmetrics, and a metric the Keras model updates itself).

Every multi-process run is a separate script (tests/scale_out/ddp_run.py) that records what
each rank saw into files; the tests compare the ranks with each other and with single-process
computations done here (NumPy or plain torch autograd, not the package).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port

pytestmark = pytest.mark.ddp

HERE = Path(__file__).parent
SCRIPT = HERE / "scale_out" / "ddp_run.py"
REPO = HERE.parent
sys.path.insert(0, str(HERE / "scale_out"))

from ddp_run import BATCH, N_TRAIN, digits  # noqa: E402

EPOCHS = 2  # the main run of ddp_run.py: Trainer(max_epochs=2), one validation per epoch


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _run(args: list[str], timeout: int, **env: str) -> None:
    proc = subprocess.run(
        [sys.executable, *args], env=_env(**env), cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _load(out: Path, n: int = 2) -> tuple[list[Any], list[dict[str, Any]]]:
    arrays = [np.load(out / f"rank{r}.npz") for r in range(n)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return arrays, infos


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """strategy='ddp', 2 CPU processes: the main run, then the gradient-averaging run."""
    out = tmp_path_factory.mktemp("ddp")
    _run([str(SCRIPT), "--out", str(out), "--grads"], timeout=240, MASTER_PORT=str(free_port()))
    return out


# ---------------------------------------------------------------------- reference (NumPy)


def _forward(variables: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The recorded model (Dense-ReLU, BatchNorm inference, Dropout off, Dense) in NumPy."""
    k0, b0, gamma, beta, mean, var, _, _, k1, b1 = variables
    h = np.maximum(x @ k0 + b0, 0.0)
    h = (h - mean) / np.sqrt(var + 1e-3) * gamma + beta  # Keras BatchNormalization epsilon
    return (h @ k1 + b1).astype(np.float64)


def _global_metrics(variables: list[np.ndarray]) -> dict[str, float]:
    data = digits()
    y, w = data["y_val"], data["w_val"]
    logits = _forward(variables, data["x_val"])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -log_probs[np.arange(len(y)), y]
    correct = logits.argmax(axis=1) == y
    recalls = [correct[y == c].mean() for c in np.unique(y)]
    per_rank_weighted = [
        (w[r::2] * correct[r::2]).sum() / w[r::2].sum() for r in range(2)
    ]  # DistributedSampler(shuffle=False) gives rank r the samples r, r + 2, ...
    return {
        "val_mean_abs_logit": float(np.abs(logits).mean(axis=1).mean()),  # the model's own
        "val_accuracy": correct.mean(),
        "val_weighted_accuracy": (w * correct).sum() / w.sum(),
        "val_multiclass_accuracy": float(np.mean(recalls)),
        # Keras' weighted loss: sum(w * ce) / batch size, averaged over samples.
        "val_loss": (w * ce).mean(),
        "mean_of_rank_weighted_accuracies": float(np.mean(per_rank_weighted)),
    }


# ---------------------------------------------------------------------- tests


@pytest.mark.timeout(300)
def test_weights_identical_on_every_rank_after_every_step(ddp_run: Path) -> None:
    arrays, infos = _load(ddp_run)
    world_size = infos[0]["world_size"]
    assert [i["world_size"] for i in infos] == [2, 2]
    # one record per optimizer step: each step takes BATCH samples on every rank
    assert len(arrays[0]["weights"]) == EPOCHS * N_TRAIN // (world_size * BATCH)
    np.testing.assert_array_equal(arrays[0]["weights"], arrays[1]["weights"])
    # The factory seeded each rank differently: DDP broadcast rank 0's weights before training.
    np.testing.assert_array_equal(arrays[0]["initial_all"], arrays[1]["initial_all"])
    # And training moved them (the comparison above is not of untouched weights).
    assert not np.allclose(arrays[0]["weights"][-1], arrays[0]["initial_weights"])


@pytest.mark.timeout(300)
def test_batchnorm_statistics_averaged_before_validation_and_at_the_end(ddp_run: Path) -> None:
    arrays, _ = _load(ddp_run)
    pre = [a["val_pre"] for a in arrays]
    post = [a["val_post"] for a in arrays]
    assert len(pre[0]) == len(pre[1]) == EPOCHS  # one validation per epoch
    # Each rank saw other data: its moving statistics drifted away from the other rank's...
    assert np.abs(pre[0] - pre[1]).max() > 1e-3
    # ...and validation ran with their mean, identical on both ranks.
    np.testing.assert_array_equal(post[0], post[1])
    np.testing.assert_allclose(post[0], (pre[0] + pre[1]) / 2, atol=1e-6)
    # At the end of training every variable (weights, statistics, seed states) is identical.
    np.testing.assert_array_equal(arrays[0]["final_all"], arrays[1]["final_all"])


@pytest.mark.timeout(300)
def test_checkpoint_holds_averaged_statistics_and_rank0_seed_state(ddp_run: Path) -> None:
    arrays, _ = _load(ddp_run)
    checkpoint = torch.load(ddp_run / "ckpt" / "step=3.ckpt", map_location="cpu")
    state = checkpoint["state_dict"]
    saved = np.concatenate(
        [state[k].double().numpy().ravel() for k in state if k.endswith("moving_mean")]
        + [state[k].double().numpy().ravel() for k in state if k.endswith("moving_variance")]
    )
    at_step3 = [a["stats_by_step"][list(a["steps"]).index(3)] for a in arrays]
    assert np.abs(at_step3[0] - at_step3[1]).max() > 1e-3  # mid-epoch: ranks differ
    np.testing.assert_allclose(saved, (at_step3[0] + at_step3[1]) / 2, atol=1e-6)
    seeded = [state[k] for k in state if k.endswith("seed_generator_state")][0]
    # Rank 0 holds the base state: seed 7, counter 1 (mask probe) + 3 steps.
    assert seeded.tolist() == [7, 4]


@pytest.mark.timeout(300)
def test_dropout_masks_differ_across_ranks(ddp_run: Path) -> None:
    arrays, _ = _load(ddp_run)
    for name in ("seeded_mask", "torch_mask"):  # Dropout(seed=7) and Dropout() (torch RNG)
        masks = [a[name] for a in arrays]
        assert 0.5 < masks[0].mean() < 0.95  # the probe really dropped units
        assert (masks[0] != masks[1]).mean() > 0.1, name


@pytest.mark.timeout(300)
def test_epoch_metrics_are_exact_global_values(ddp_run: Path) -> None:
    arrays, infos = _load(ddp_run)
    assert infos[0]["metrics"] == infos[1]["metrics"]
    variables = [arrays[0][f"var{i}"] for i in range(10)]
    assert infos[0]["variable_paths"][4].endswith("moving_mean")
    expected = _global_metrics(variables)
    logged = infos[0]["metrics"]
    for name in ("val_accuracy", "val_weighted_accuracy", "val_multiclass_accuracy",
                 "val_mean_abs_logit"):
        assert logged[name] == pytest.approx(expected[name], abs=1e-6), name
    assert logged["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    # A mean of per-rank weighted accuracies would be measurably different:
    gap = abs(expected["mean_of_rank_weighted_accuracies"] - expected["val_weighted_accuracy"])
    assert gap > 1e-6


@pytest.mark.timeout(300)
def test_keras_optimizer_gradients_averaged_once_with_accumulation(ddp_run: Path) -> None:
    """2 ranks x batch 8 x accumulate 2 == one process, batch 32, same SGD (plain autograd)."""
    _check_averaged_gradients(ddp_run)


@pytest.mark.timeout(300)
def test_the_whole_step_under_ddp_averages_the_graphs_gradients(tmp_path: Path) -> None:
    """jit_compile="step" under DDP: the graph computes each rank's gradients, DDP's reducer
    averages them in the backward of the loss that carries them, Lightning accumulates: the
    same weights as one process over the 32 samples."""
    _run(
        [str(SCRIPT), "--out", str(tmp_path), "--grads-only", "step:aot_eager"],
        timeout=240, MASTER_PORT=str(free_port()),
    )
    for rank in range(2):
        stats = json.loads((tmp_path / f"grads_rank{rank}.json").read_text())
        assert stats == {"mode": "grads", "hosting": "automatic", "captures": 1,
                         "fallback": None, "not_whole": None}
    _check_averaged_gradients(tmp_path)


def _check_averaged_gradients(out: Path) -> None:
    runs = [np.load(out / f"grads_rank{r}.npz") for r in range(2)]
    np.testing.assert_array_equal(runs[0]["weights"], runs[1]["weights"])
    np.testing.assert_array_equal(runs[0]["steps"], [0, 1, 1, 2, 2, 3, 3, 4])
    data = digits()
    params = [torch.tensor(runs[0][f"init{i}"], requires_grad=True) for i in range(4)]
    x_all = torch.as_tensor(data["x_train"])
    y_all = torch.as_tensor(data["y_train"])
    # Lightning gives the training loader a shuffling DistributedSampler (seed 0, epoch 0).
    order = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(
            range(len(x_all)), num_replicas=2, rank=rank, shuffle=True, seed=0
        )
        sampler.set_epoch(0)
        order.append(list(sampler))
    for step in range(4):  # one step = 2 micro-batches of 8 on each of 2 ranks
        index = order[0][16 * step : 16 * step + 16] + order[1][16 * step : 16 * step + 16]
        x, y = x_all[index], y_all[index]
        k0, b0, k1, b1 = params
        loss = torch.nn.functional.cross_entropy(torch.tanh(x @ k0 + b0) @ k1 + b1, y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.5 * g
        reference = np.concatenate([p.detach().numpy().ravel() for p in params])
        after_step = runs[0]["weights"][2 * step + 1]  # the micro-batch that stepped
        np.testing.assert_allclose(after_step, reference, atol=1e-6)


def test_a_layer_unfrozen_during_training_stays_identical_across_ranks(ddp_run: Path) -> None:
    # DDP's reducer knows only the parameters that required gradients when it wrapped the
    # module: the module averages the gradients of a layer unfrozen later itself.
    ranks = [np.load(ddp_run / f"unfreeze_rank{r}.npy") for r in range(2)]
    assert ranks[0].shape[0] == 8
    np.testing.assert_array_equal(ranks[0], ranks[1])  # after every step
    kernel = slice(0, 64 * 16)  # the first layer's kernel, first in model.weights
    np.testing.assert_array_equal(ranks[0][0, kernel], ranks[0][2, kernel])  # frozen: steps 1-3
    assert not np.array_equal(ranks[0][2, kernel], ranks[0][3, kernel])  # trains from step 4


@pytest.mark.timeout(300)
def test_ddp_spawn_trains_and_reduces(tmp_path: Path) -> None:
    """ddp_spawn pickles the module (factory, Keras optimizer, torchmetrics): no fd errors."""
    _run(
        [str(SCRIPT), "--out", str(tmp_path), "--strategy", "ddp_spawn"],
        timeout=280,
        MASTER_PORT=str(free_port()),
    )
    arrays, infos = _load(tmp_path)
    np.testing.assert_array_equal(arrays[0]["weights"], arrays[1]["weights"])
    np.testing.assert_array_equal(arrays[0]["final_all"], arrays[1]["final_all"])
    # Rank 0's final weights came back to the launching process.
    np.testing.assert_array_equal(np.load(tmp_path / "parent_final.npy"), arrays[0]["final_all"])
    expected = _global_metrics([arrays[0][f"var{i}"] for i in range(10)])
    assert infos[0]["metrics"]["val_weighted_accuracy"] == pytest.approx(
        expected["val_weighted_accuracy"], abs=1e-6
    )


@pytest.mark.timeout(300)
def test_two_nodes_under_torchrun(tmp_path: Path) -> None:
    """Two torchrun 'nodes' on this machine (1 process each, loopback, gloo), num_nodes=2."""
    port = str(free_port())
    common = [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--master_addr=127.0.0.1", f"--master_port={port}",
    ]
    script = [str(SCRIPT), "--out", str(tmp_path), "--num-nodes", "2", "--devices", "1"]
    procs = [
        subprocess.Popen(
            [sys.executable, *common, f"--node_rank={node}", *script],
            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=280)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    arrays, infos = _load(tmp_path)
    assert [(i["world_size"], i["num_nodes"]) for i in infos] == [(2, 2), (2, 2)]
    np.testing.assert_array_equal(arrays[0]["weights"], arrays[1]["weights"])
    np.testing.assert_array_equal(arrays[0]["final_all"], arrays[1]["final_all"])
    expected = _global_metrics([arrays[0][f"var{i}"] for i in range(10)])
    for name in ("val_accuracy", "val_weighted_accuracy", "val_multiclass_accuracy",
                 "val_mean_abs_logit"):
        assert infos[0]["metrics"][name] == pytest.approx(expected[name], abs=1e-6), name


@pytest.mark.timeout(200)
def test_ddp_example_runs_in_fast_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "ddp.py")],
        env=_env(KL_FAST="1", MASTER_PORT=str(free_port())),
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("world_size=")]
    assert line and line[0].startswith("world_size=2 epochs=1 val_accuracy=")
    assert "over all 128 samples" in line[0]
