"""Devices and processes: keep a Keras model's state right under DDP, forks and device moves.

DDP averages gradients of trainable variables, so trainable weights stay identical on every
rank. Keras' non-trainable variables are ``torch.nn.Parameter`` objects that DDP broadcasts once
(when it wraps the module) and then leaves alone, so they need a policy:

* Float non-trainable variables (BatchNormalization moving mean and variance, frozen weights)
  are **averaged across ranks** by :func:`average_non_trainable`: before validation, before a
  checkpoint is written and at the end of training. (This is the mean of per-rank moving
  averages, the usual DDP practice; it is not ``SyncBatchNorm``, which would also synchronise
  the batch statistics inside every training step.)
* ``SeedGenerator`` states (seeded ``Dropout``, ``keras.random`` calls with a layer's
  generator) are made **different per rank** when training starts
  (:func:`offset_seed_states`: rank ``r`` adds ``r * SEED_STRIDE`` to the seed, so dropout
  masks differ across ranks), and **rank 0's states are broadcast back** at the end of
  training (:func:`broadcast_seed_states`). Rank 0's offset is zero, so a checkpoint (written
  by rank 0) holds the base state, and a resumed run derives the same per-rank streams again.
* Unseeded Keras ``Dropout`` draws from torch's global generator, which starts from the same
  seed in every process (and ``seed_everything`` sets the same seed on every rank on
  purpose): :func:`fork_torch_rng` reseeds it per rank when training starts.
"""

from __future__ import annotations

from keras_lightning.exceptions import ConfigurationError

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import keras
import torch

#: Added (times the rank) to the first word of every SeedGenerator state, modulo 2**32. Keras'
#: torch backend seeds a draw with ``(state[0] + state[1]) & 0xFFFFFFFF`` and increments
#: ``state[1]`` per draw, so ranks collide only after ~2.6e9 draws.
SEED_STRIDE = 0x9E3779B1


def world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when not distributed."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    size = torch.distributed.get_world_size()
    if size == 1:
        return None
    return torch.distributed.get_rank(), size


def parameter_of(variable: Any) -> torch.Tensor:
    """The ``torch.nn.Parameter`` behind a Keras variable (never an autocast copy)."""
    return variable._value if hasattr(variable, "_value") else variable.value


def seed_state_variables(model: Any) -> list[Any]:
    """The ``SeedGenerator`` state variables owned by ``model`` and its layers."""
    found: dict[int, Any] = {}
    layers = model._flatten_layers(include_self=True) if hasattr(model, "_flatten_layers") else []
    for layer in layers:
        for generator in getattr(layer, "_seed_generators", ()):
            state = getattr(generator, "state", None)
            if state is not None:
                found[id(state)] = state
    return list(found.values())


def averaged_variables(model: Any) -> list[Any]:
    """Float non-trainable variables of trainable layers (BatchNorm statistics): averaged.

    Frozen layers (``trainable=False``) never change, so they are left alone: averaging
    identical values over a world size that is not a power of two could move them by an ulp.
    """
    skip = {id(v) for v in seed_state_variables(model)}
    layers = model._flatten_layers(include_self=True) if hasattr(model, "_flatten_layers") else []
    for layer in layers:
        if not layer.trainable:
            skip.update(id(v) for v in layer.variables)
    return [
        v
        for v in model.non_trainable_variables
        if id(v) not in skip and parameter_of(v).is_floating_point()
    ]


def _grouped(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return groups


def _collective(group: list[torch.Tensor]) -> torch.Tensor:
    """One flat copy of ``group`` on a device the process group's backend accepts."""
    flat = torch.cat([p.reshape(-1) for p in group])
    if torch.distributed.get_backend() == "nccl" and flat.device.type != "cuda":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    return flat


def _scatter_back(flat: torch.Tensor, group: list[torch.Tensor]) -> None:
    offset = 0
    for p in group:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def average_non_trainable(model: Any) -> None:
    """Average every float non-trainable variable of ``model`` across ranks (in place).

    One ``all_reduce`` per dtype; a no-op outside a process group. Every rank must call it.
    """
    ranks = world()
    if ranks is None or model is None:
        return
    params = [parameter_of(v).data for v in averaged_variables(model)]
    for group in _grouped(params).values():
        flat = _collective(group)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= ranks[1]
        _scatter_back(flat, group)


def broadcast_seed_states(model: Any, src: int = 0) -> None:
    """Give every rank the ``SeedGenerator`` states of rank ``src`` (in place)."""
    if world() is None or model is None:
        return
    params = [parameter_of(v).data for v in seed_state_variables(model)]
    for group in _grouped(params).values():
        flat = _collective(group)
        torch.distributed.broadcast(flat, src=src)
        _scatter_back(flat, group)


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def offset_seed_states(model: Any, rank: int) -> None:
    """Add ``rank * SEED_STRIDE`` (mod 2**32) to the seed word of every SeedGenerator state."""
    if rank == 0 or model is None:
        return
    for variable in seed_state_variables(model):
        param = parameter_of(variable).data
        first = int(param[0].item()) + rank * SEED_STRIDE
        param[0] = _as_int32(first)


def fork_torch_rng(rank: int) -> None:
    """Reseed torch's global generator (CPU and CUDA) differently on every rank.

    The new seed is drawn from the current generator, then offset by the rank, so ranks that
    start from the same state end up with different streams and repeated fits do not replay.
    """
    drawn = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed((drawn + rank * SEED_STRIDE) % (2**63))


def start_of_training(model: Any) -> None:
    """Per-rank randomness for training: seed states and torch's generator (see module doc)."""
    ranks = world()
    if ranks is None:
        return
    offset_seed_states(model, ranks[0])
    fork_torch_rng(ranks[0])


def end_of_training(model: Any) -> None:
    """Make every rank hold the same model: averaged statistics, rank 0's seed states."""
    average_non_trainable(model)
    broadcast_seed_states(model)


def sync_checkpoint_state(
    model: Any, state_dict: dict[str, Any], current: Callable[[], Mapping[str, Any]]
) -> None:
    """Average the statistics, then refresh a checkpoint's state dict from ``current()``.

    ``state_dict`` is the checkpoint's ``"state_dict"``, taken before ``on_save_checkpoint``;
    ``current`` is the LightningModule's ``state_dict`` method (same keys). Every rank must
    call it (Lightning builds the checkpoint on every rank; rank 0 writes it).
    """
    if world() is None or model is None:
        return
    average_non_trainable(model)
    fresh = current()
    for key in state_dict:
        if key in fresh:
            state_dict[key] = fresh[key]


# ---------------------------------------------------------------------- devices


def place_variables(variables: Iterable[Any], device: torch.device) -> None:
    """Move Keras variables to ``device`` in place (same Parameter objects, new storage)."""
    for variable in variables:
        param = parameter_of(variable)
        if param.device != device:
            param.data = param.data.to(device)


def move_to_lightning_device(module: torch.nn.Module, trainer: Any) -> None:
    """Put ``module`` on its strategy's device before ``configure_model`` builds Keras there.

    Lightning moves the module only after ``configure_model``; until then its ``device`` is
    the CPU, so a factory would build the Keras model on the CPU (and tensors a layer keeps
    outside its variables would stay there). Only for the strategies that move the whole
    module anyway (single device, DDP and its spawn / fork variants).
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
        module.to(strategy.root_device)


@contextlib.contextmanager
def keras_device(device: torch.device | None) -> Iterator[None]:
    """Run Keras under ``device`` (no scope when it is Keras' default device already)."""
    if device is None or same_device(device, keras_default_device()):
        yield
        return
    with keras.device(_keras_device_name(device)):
        yield


def _keras_device_name(device: torch.device) -> str:
    return str(device) if device.index is not None or device.type == "cpu" else device.type


def keras_default_device() -> torch.device:
    """The device Keras would place new tensors on, outside any ``keras.device`` scope."""
    from keras.src.backend.torch.core import get_device

    device = torch.device(get_device())
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` are the same device (``cuda`` means ``cuda:0``)."""
    if a.type != b.type:
        return False
    return a.type == "cpu" or (a.index or 0) == (b.index or 0)


# ---------------------------------------------------------------------- forks


def in_bad_cuda_fork() -> bool:
    """True in a process forked from a parent that had initialized CUDA."""
    check = getattr(torch.cuda, "_is_in_bad_fork", None)
    return bool(check()) if callable(check) else False


def fork_error(model_given_built: bool, bad_fork: bool) -> ConfigurationError | None:
    """The error to raise in a forked worker whose parent initialized CUDA, or None.

    Args:
        model_given_built: The module was given a Keras model object (not a factory).
        bad_fork: :func:`in_bad_cuda_fork` in the worker.

    """
    if not bad_fork:
        return None
    if model_given_built:
        return ConfigurationError(
            "CUDA was initialized in the notebook (parent) process before "
            "Trainer(strategy='ddp_notebook') forked, so the forked workers cannot use the GPU. "
            "Building a Keras model in the notebook does that: Keras creates its variables on "
            "the GPU. Pass a factory instead of a built model, so that each worker builds the "
            "model on its own GPU: KerasLightningModule(lambda: build_model(), ...) or "
            "KerasLightningModule(build_model, ...); then restart the kernel."
        )
    return ConfigurationError(
        "CUDA was initialized in the notebook (parent) process before "
        "Trainer(strategy='ddp_notebook') forked, so the forked workers cannot use the GPU. "
        "Remove every CUDA call made before trainer.fit (torch.cuda.*, .cuda(), building Keras "
        "models or tensors in the notebook) and restart the kernel."
    )


def check_fork(model_given_built: bool) -> None:
    """Raise :func:`fork_error` when this is a forked worker of a CUDA-initialized parent."""
    error = fork_error(model_given_built, in_bad_cuda_fork())
    if error is not None:
        raise error
