"""Sharding a Keras model with FSDP2 under Lightning's ``ModelParallelStrategy``.

Lightning refuses ``strategy="fsdp"`` on the CPU, and its ``FSDPStrategy`` wraps modules
(FSDP1) in a way Keras layers do not survive. ``ModelParallelStrategy`` builds a device mesh
(gloo on the CPU, NCCL on GPUs) and leaves the sharding to ``configure_model``: there, the
module applies FSDP2's ``fully_shard`` to the Keras model, so that each rank holds only its
shard of the weights, the gradients and the optimizer state between steps.

Two things make a Keras model different from a torch module here:

- Keras keeps non-float and frozen state as parameters (int32 seed states, BatchNorm moving
  statistics): they are left out of the sharded groups (``ignored_params``), whole on every
  rank.
- Keras reads each weight through its variable (``variable._value``), not through the
  module's registered parameter that FSDP2 swaps between the sharded and the gathered tensor.
  A forward pre-hook and post-hook point every variable at the tensor FSDP2 registered: the
  gathered weight during the forward, the sharded ``DTensor`` between steps (what the torch
  optimizer updates).

Supported: the built-in steps with a torch optimizer (a class such as ``torch.optim.AdamW`` or
a factory), data-parallel sharding (``tensor_parallel_size=1``), single-file and
distributed checkpoints under torch's raw parameter names. Refused before training: a Keras
optimizer, the model's own ``train_step``, ``checkpoint_weights="trainable"``, weight
regularizers, tensor parallelism, ``FSDPStrategy`` and DeepSpeed; and weights unfrozen
during training (each message names what works). :func:`unshard` gathers the full model (for a
``.keras`` export or ``save_to_preset``; not to train on).
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import ConfigurationError

from typing import Any

import keras
import torch

#: Attribute set on a Keras model that :func:`shard` sharded.
_SHARDED = "_keras_lightning_sharded"


def is_sharded(model: Any) -> bool:
    """True for a Keras model whose weights FSDP2 shards (see :func:`shard`)."""
    return bool(getattr(model, _SHARDED, None))


def is_model_parallel(strategy: Any) -> bool:
    """True for Lightning's ``ModelParallelStrategy`` (FSDP2 applied in ``configure_model``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(
    strategy: Any,
    *,
    optimizer: Any,
    own_train_step: bool,
    checkpoint_weights: str,
    model: Any = None,
    fitting: bool = True,
    own_optimizers: bool = False,
) -> None:
    """Refuse, before training, the sharded set-ups that cannot train a Keras model right.

    Raises:
        ConfigurationError: FSDP1 or DeepSpeed, tensor parallelism, a Keras optimizer or the
            model's own ``train_step`` under sharding, adapter checkpoints or weight
            regularizers under sharding. ``fitting=False`` (validate, test, predict) checks
            the strategy only; ``own_optimizers``: ``configure_optimizers`` is overridden.

    """
    name = type(strategy).__name__
    works = (
        "Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) (FSDP2, on "
        "CPUs with gloo and on GPUs) with a torch optimizer, e.g. "
        "KerasLightningModule(model, optimizer=torch.optim.AdamW, loss=...)"
    )
    if name == "FSDPStrategy" or name.startswith("DeepSpeed"):
        raise ConfigurationError(
            f"strategy={name} cannot shard a Keras model: it wraps the model's modules (FSDP1, "
            f"DeepSpeed ZeRO), and Keras layers read their weights through Keras variables, "
            f"not through the wrapped modules. {works}; or DDPStrategy for data parallelism "
            "without sharding."
        )
    if not is_model_parallel(strategy):
        return
    tensor_parallel = _private.tensor_parallel_size(strategy)
    if tensor_parallel != 1:
        raise ConfigurationError(
            f"ModelParallelStrategy(tensor_parallel_size={tensor_parallel}) "
            "would split single Keras weights across ranks, which a Keras layer cannot "
            f"compute with. {works}."
        )
    if not fitting:
        return
    if own_train_step:
        raise ConfigurationError(
            "The Keras model defines its own train_step, which creates and steps its own Keras "
            "optimizers; under ModelParallelStrategy those would update sharded weights they "
            "do not know. Train it with DDPStrategy, or move the loss into "
            "compute_loss() and let the module step a torch optimizer."
        )
    if not own_optimizers and (
        optimizer is None or isinstance(optimizer, str | keras.optimizers.Optimizer)
    ):
        shown = "no optimizer" if optimizer is None else f"{optimizer!r}, a Keras optimizer"
        raise ConfigurationError(
            f"Under ModelParallelStrategy the optimizer must be a torch optimizer, which "
            f"updates each rank's weight shards (DTensors); received {shown}. Pass "
            f"optimizer=torch.optim.AdamW (a class) or "
            f"optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3)."
        )
    regularized = [
        v.path for v in getattr(model, "trainable_variables", []) if getattr(v, "regularizer", None)
    ]
    if regularized:
        raise ConfigurationError(
            f"{len(regularized)} weights of the Keras model have a regularizer "
            f"({', '.join(regularized[:3])}); Keras computes its loss from the weights after the "
            "forward, when under ModelParallelStrategy they are shards. Remove the "
            "regularizers and use the optimizer's weight decay (torch.optim.AdamW), or train "
            "with DDPStrategy."
        )
    if checkpoint_weights != "all":
        raise ConfigurationError(
            "checkpoint_weights='trainable' (adapter checkpoints) is not supported under "
            "ModelParallelStrategy: its checkpoints are written by torch.distributed.checkpoint "
            "under raw parameter names. Pass checkpoint_weights='all', or train the adapter "
            "with DDPStrategy."
        )


def shard(model: Any, mesh: Any) -> None:
    """Apply FSDP2's ``fully_shard`` to ``model`` over ``mesh``; Keras reads the right tensors.

    Float weights that train are sharded; non-float and frozen state stays whole on every
    rank. Idempotent.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    slots = _private.registered_slots(model)
    ignored = {
        param
        for param in model.parameters()
        if not (param.is_floating_point() and param.requires_grad)
    }
    # resharded after the forward too, so that between steps the registered tensors (what
    # the variables point at, what the optimizer updates) are the shards. fully_shard swaps
    # the model's class for an FSDP subclass, which unshard() undoes (Keras saves the class).

    def point_variables(*_: Any, **__: Any) -> None:
        _private.follow_registered(slots)

    original_class = type(model)
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    handles = [
        model.register_forward_pre_hook(point_variables, with_kwargs=True),
        model.register_forward_hook(point_variables, with_kwargs=True),
    ]
    point_variables()
    setattr(model, _SHARDED, (handles, original_class))


def refuse_later_trainable(model: Any, count: int) -> None:
    """Refuse weights that start to train after a sharded model's groups were made.

    Raises:
        ConfigurationError: ``model`` is sharded: those weights were left out of the sharded
            group (frozen then), so no rank would average their gradients.

    """
    if is_sharded(model):
        raise ConfigurationError(
            f"{count} weights of the sharded Keras model started to train after it was sharded "
            "(a layer unfrozen during training, e.g. by BackboneFinetuning). Frozen weights "
            "stay out of the sharded group, so their gradients would differ per rank. Under "
            "ModelParallelStrategy, unfreeze before trainer.fit (a second fit for a second "
            "phase), or train with DDPStrategy."
        )


def local_numel(module: torch.nn.Module) -> int:
    """How many weight elements this rank holds (a ``DTensor`` counts its local shard)."""
    return sum(_private.local_shard(param).numel() for param in module.parameters())


def unshard(module: Any) -> keras.Model:
    """Gather the full weights of a sharded module's Keras model on every rank; return it.

    A collective: call it on every rank (e.g. after ``trainer.fit``). The model is then a
    Keras model over ordinary tensors, ready for ``model.save(path)`` or keras_hub's
    ``save_to_preset`` on rank 0. FSDP2's hooks stay on the torch module: to predict or train
    again, load the saved file.

    Example:
        >>> trainer.fit(module, loader)  # doctest: +SKIP
        >>> model = kl.unshard(module)  # doctest: +SKIP
        >>> if trainer.is_global_zero: model.save("model.keras")  # doctest: +SKIP

    """
    model = module.model if hasattr(module, "model") else module
    sharded = getattr(model, _SHARDED, None)
    if not sharded:
        return model
    handles, original_class = sharded
    for handle in handles:
        handle.remove()
    from torch.distributed.tensor import DTensor

    full = {}
    with torch.no_grad():
        for index, variable in enumerate(model.variables):
            value = _private.parameter_of(variable)
            if isinstance(value, DTensor):
                tensor = value.full_tensor().detach().clone()
                full[index] = torch.nn.Parameter(tensor, requires_grad=value.requires_grad)
    _private.replace_variable_tensors(model, full)  # registered in place of the shards, everywhere
    setattr(model, _SHARDED, None)
    model.__class__ = original_class  # Keras saves the class: not FSDP's subclass of it
    return model
