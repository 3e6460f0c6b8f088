"""Replicas: keep every process's copy of a Keras model the same (or, for randomness, different).

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

from keras_lightning import _private, collectives
from keras_lightning._private import parameter_of

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = [
    "SEED_STRIDE",
    "average_non_trainable",
    "averaged_variables",
    "broadcast_seed_states",
    "end_of_training",
    "fork_torch_rng",
    "fork_torch_rng_for_this_rank",
    "offset_seed_states",
    "seed_state_variables",
    "seed_states_kept",
    "start_of_training",
    "sync_checkpoint_state",
]

#: Added (times the rank) to the first word of every SeedGenerator state, modulo 2**32. Keras'
#: torch backend seeds a draw with ``(state[0] + state[1]) & 0xFFFFFFFF`` and increments
#: ``state[1]`` per draw, so ranks collide only after ~2.6e9 draws.
SEED_STRIDE = 0x9E3779B1


def seed_state_variables(model: Any) -> list[Any]:
    """The ``SeedGenerator`` state variables owned by ``model`` and its layers."""
    found: dict[int, Any] = {}
    for layer in _private.flatten_layers(model):
        for generator in _private.seed_generators_of(layer):
            state = getattr(generator, "state", None)
            if state is not None:
                found[id(state)] = state
    return list(found.values())


@contextlib.contextmanager
def seed_states_kept(model: Any) -> Iterator[None]:
    """Run a block (a building call) without advancing the model's ``SeedGenerator`` states."""
    states = [(v, v.value.detach().clone()) for v in seed_state_variables(model)]
    try:
        yield
    finally:
        for variable, value in states:
            variable.assign(value)


def averaged_variables(model: Any) -> list[Any]:
    """Float non-trainable variables of trainable layers (BatchNorm statistics): averaged.

    Frozen layers (``trainable=False``) never change, so they are left alone: averaging
    identical values over a world size that is not a power of two could move them by an ulp.
    """
    skip = {id(v) for v in seed_state_variables(model)}
    for layer in _private.flatten_layers(model):
        if not layer.trainable:
            skip.update(id(v) for v in layer.variables)
    return [
        v
        for v in model.non_trainable_variables
        if id(v) not in skip and parameter_of(v).is_floating_point()
    ]


def _write_back(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for param, value in zip(params, values, strict=True):
        param.copy_(value)


def average_non_trainable(model: Any) -> None:
    """Average every float non-trainable variable of ``model`` across ranks (in place).

    One ``all_reduce`` per dtype; a no-op outside a process group. Every rank must call it.
    """
    if model is None or not collectives.is_distributed():
        return
    params = [parameter_of(v).data for v in averaged_variables(model)]
    _write_back(params, collectives.all_reduce_sum(params, divide_by=collectives.world_size()))


def broadcast_seed_states(model: Any, src: int = 0) -> None:
    """Give every rank the ``SeedGenerator`` states of rank ``src`` (in place)."""
    if model is None or not collectives.is_distributed():
        return
    params = [parameter_of(v).data for v in seed_state_variables(model)]
    _write_back(params, collectives.broadcast(params, src=src))


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


def fork_torch_rng_for_this_rank() -> None:
    """:func:`fork_torch_rng` with this process's rank, under DDP only."""
    if collectives.is_distributed():
        fork_torch_rng(collectives.rank())


def start_of_training(model: Any) -> None:
    """Per-rank randomness for training: seed states and torch's generator (see module doc)."""
    if not collectives.is_distributed():
        return
    offset_seed_states(model, collectives.rank())
    fork_torch_rng(collectives.rank())


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
    if model is None or not collectives.is_distributed():
        return
    average_non_trainable(model)
    fresh = current()
    for key in state_dict:
        # a sharded weight (a DTensor) stays as the strategy gathered or kept it
        if key in fresh and not isinstance(fresh[key], DTensor):
            state_dict[key] = fresh[key]
