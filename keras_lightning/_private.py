"""Every use of a private Keras, Lightning or torch name, in one audited place.

The rest of the package calls these named functions and never touches ``keras.src``, an
underscored attribute of another library's object or a private module itself
(``tests/test_private.py`` scans the package to keep it so, and tests each function here on
the installed versions). Nothing private is imported when the package is imported: every
private import below happens inside the function that needs it, so a Keras release that moves
a name breaks the feature that uses it, with the name in the traceback, not
``import keras_lightning``.

Checked against Keras 3.8 - 3.15, Lightning 2.4 - 2.6 and torch 2.4 - 2.13 where a test says
so; re-check when the version ranges in ``pyproject.toml`` move.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------- Keras variables


def parameter_of(variable: Any) -> torch.Tensor:
    """The ``torch.nn.Parameter`` behind a Keras variable (never an autocast copy).

    Inside a Keras autocast scope ``variable.value`` can be a cast copy; the stored tensor
    (the Parameter autograd writes gradients to) is ``variable._value``.
    """
    value = getattr(variable, "_value", None)
    return value if value is not None else variable.value


def track_variables(model: Any) -> bool:
    """Register every Keras variable of ``model`` as a torch parameter; True if some were not.

    Keras' torch backend registers a layer's variables (``_torch_params``) when it is built;
    a model that gains variables afterwards (a keras_hub task assembled around a built
    backbone, ``enable_lora``) keeps the stale registration, so ``model.parameters()`` and
    ``state_dict()`` miss them (a keras_hub ``BertTextClassifier``: 0 parameters for 41
    variables). Re-registering keeps the same Parameter objects.
    """
    registered = {id(p) for p in model.parameters()}
    if all(id(parameter_of(v)) in registered for v in model.variables):
        return False
    model._track_variables()
    return True


def keras_fit_trackers(model: Any) -> list[Any]:
    """The metrics ``compile()`` made for Keras' own ``fit``, which the module never updates.

    Its loss tracker, the ``CompileMetrics`` container and the per-output loss means of the
    compiled loss: the module computes those values itself, from its own metric objects.
    """
    candidates = (getattr(model, "_loss_tracker", None), getattr(model, "_compile_metrics", None))
    found = [metric for metric in candidates if metric is not None]
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is not None:
        found.extend(compile_loss.metrics)
    return found


def flatten_layers(model: Any) -> list[Any]:
    """The model and every layer inside it, nested ones included."""
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=True)) if callable(flatten) else []


def weights_that_can_train(layer: Any) -> list[Any]:
    """The layer's weights created trainable, frozen or not (no moving statistics, no seeds).

    ``layer.trainable_weights`` is empty while the layer is frozen and
    ``non_trainable_weights`` mixes frozen kernels with ``BatchNormalization``'s moving
    statistics; each layer's own list of trainable-created variables tells them apart.
    """
    found: dict[int, Any] = {}
    for sub in flatten_layers(layer):
        for variable in getattr(sub, "_trainable_variables", ()):
            found.setdefault(id(variable), variable)
    return list(found.values())


def seed_generators_of(layer: Any) -> list[Any]:
    """The ``SeedGenerator`` objects a layer owns (seeded ``Dropout``, ...)."""
    return list(getattr(layer, "_seed_generators", ()))


def compile_config(model: Any) -> dict[str, Any]:
    """The arguments ``model.compile()`` received (``{}`` when not compiled)."""
    config = getattr(getattr(model, "_compile_config", None), "config", None)
    return dict(config or {})


def keras_mask_of(tensor: Any) -> Any:
    """The Keras mask a layer attached to an output tensor (``Embedding(mask_zero=True)``)."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(tensor)


def with_keras_mask(tensor: Any, mask: Any) -> Any:
    """``tensor`` carrying ``mask`` as its Keras mask (a detached output keeps its mask)."""
    if mask is not None:
        from keras.src.backend import set_keras_mask

        set_keras_mask(tensor, mask)
    return tensor


def symbolic_build(model: Any, data: Any, with_compiled: bool) -> None:
    """Build an unbuilt model from one batch as Keras' ``fit`` does, with symbolic tensors.

    Keras' ``Trainer._symbolic_build`` traces the model (and its compiled loss and metrics)
    on ``KerasTensor``s shaped like ``data``: the variables are created, no value is
    computed, and no random state (``SeedGenerator``) advances. Raises what Keras raises
    when the model cannot be traced. ``with_compiled=False`` traces the model alone, without
    building its compiled loss, metrics and optimizer (those the module does not use: its
    own step does, with ``with_compiled=True``).
    """
    if with_compiled and getattr(model, "compiled", False):
        model._symbolic_build(data_batch=data)
        return
    from keras.src import backend, tree
    from keras.src.trainers.data_adapters import data_adapter_utils

    def symbolic(value: Any) -> Any:
        if value is None:
            return None
        return backend.KerasTensor(value.shape, backend.standardize_dtype(value.dtype))

    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(tree.map_structure(symbolic, data))
    backend.compute_output_spec(model, x, training=False)
    model._post_build()  # the torch backend registers the new variables as parameters


# ---------------------------------------------------------------------- Keras backend


def keras_default_device_name() -> str:
    """The device Keras' torch backend places new tensors on, outside ``keras.device``."""
    from keras.src.backend.torch.core import get_device

    return str(get_device())


def keras_torch_backend_modules() -> tuple[Any, Any]:
    """Keras' torch ``nn`` and ``numpy`` backend modules (for the dynamo substitutes)."""
    from keras.src.backend.torch import nn as torch_nn
    from keras.src.backend.torch import numpy as torch_numpy

    return torch_nn, torch_numpy


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """``torch.utils._pytree.tree_flatten``: the leaves and the spec that rebuilds ``tree``."""
    from torch.utils import _pytree

    return _pytree.tree_flatten(tree)


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    """``torch.utils._pytree.tree_unflatten``."""
    from torch.utils import _pytree

    return _pytree.tree_unflatten(leaves, spec)


def pytree_node(structure: Any) -> Any:
    """The pytree node type registered for ``structure`` (``flatten_fn`` / ``unflatten_fn``),
    or None for a leaf.
    """
    from torch.utils import _pytree

    return _pytree.SUPPORTED_NODES.get(_pytree._get_node_type(structure))


def is_dynamo_error(error: BaseException) -> bool:
    """An error of torch.compile itself (a graph break under ``fullgraph``, a compiler
    failure), as opposed to one the traced code raises.
    """
    from torch._dynamo import exc

    return isinstance(error, (exc.TorchDynamoException, exc.Unsupported)) or type(
        error
    ).__module__.startswith(("torch._dynamo", "torch._inductor"))


def graph_compiler(backend: str) -> Any:
    """The function a ``torch.compile`` backend runs on a captured graph (inductor's
    ``compile_fx`` or a registered backend).
    """
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(backend)


def keras_functions_to_substitute() -> dict[str, Any]:
    """Keras' private functions that :func:`~keras_lightning.compiled.install_dynamo_shims`
    gives dynamo substitutes for, by name.
    """
    torch_nn, _ = keras_torch_backend_modules()
    random, _ = keras_torch_random_and_rnn_modules()
    return {
        "can_use_flash_attention": torch_nn._can_use_flash_attention,
        "dict_to_ordered_dict": keras_torchtree_module()._dict_to_ordered_dict,
        "concrete_noise_shape": random._get_concrete_noise_shape,
    }


def is_unseeded_generator(seed: Any, seed_generator_class: type) -> bool:
    """A ``SeedGenerator`` made without a seed (Keras' dropout then uses torch's own)."""
    generator: Any = seed
    return isinstance(seed, seed_generator_class) and generator._initial_seed is None


def keras_backend_utils_module() -> Any:
    """``keras.src.utils.backend_utils`` (``in_tf_graph``, for a dynamo substitute)."""
    from keras.src.utils import backend_utils

    return backend_utils


def keras_torchtree_module() -> Any:
    """Keras' torch pytree implementation of ``keras.tree`` (for a dynamo substitute)."""
    from keras.src.tree import torchtree_impl

    return torchtree_impl


def keras_torch_random_and_rnn_modules() -> tuple[Any, Any]:
    """Keras' torch ``random`` and ``rnn`` backend modules (for dynamo substitutes)."""
    import importlib

    # the package's `rnn` attribute is the function: import the modules by name
    return (
        importlib.import_module("keras.src.backend.torch.random"),
        importlib.import_module("keras.src.backend.torch.rnn"),
    )


def global_seed_generator(create: bool) -> Any:
    """Keras' process-wide ``SeedGenerator`` (``keras.random`` calls without a seed)."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    if not create:
        return global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    return seed_generator.global_seed_generator()


def safe_mode_scope(safe_mode: bool) -> Any:
    """Keras' ``safe_mode`` for deserialization calls that take no such argument."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(safe_mode)


# ---------------------------------------------------------------------- Keras losses, metrics


def loss_function_wrapper(fn: Callable[..., Any], name: str) -> Any:
    """A ``keras.losses.Loss`` around a Keras-convention function ``fn(y_true, y_pred)``."""
    from keras.src.losses.losses import LossFunctionWrapper

    return LossFunctionWrapper(fn, name=name)


def keras_loss_names() -> list[str]:
    """The lower-case names ``keras.losses.get`` accepts."""
    from keras.src.losses import ALL_OBJECTS_DICT

    return sorted(name for name in ALL_OBJECTS_DICT if name[0].islower())


def keras_metric_names() -> list[str]:
    """The lower-case names ``keras.metrics.get`` accepts."""
    from keras.src.metrics import ALL_OBJECTS_DICT

    return sorted(name for name in ALL_OBJECTS_DICT if name[0].islower())


def compile_loss(identifier: Any, y_true: Any, y_pred: Any) -> Any:
    """The loss ``compile(loss=identifier)`` would use (``"crossentropy"`` from shapes)."""
    from keras.src.trainers.compile_utils import get_loss

    return get_loss(identifier, y_true, y_pred)


def compile_metric(identifier: Any, y_true: Any, y_pred: Any) -> Any:
    """The metric ``compile(metrics=[identifier])`` would use (``"accuracy"`` from shapes)."""
    from keras.src.trainers.compile_utils import get_metric

    return get_metric(identifier, y_true, y_pred)


# ---------------------------------------------------------------------- Keras optimizers


def learning_rate_spec(optimizer: Any) -> Any:
    """What the optimizer was given as ``learning_rate`` (a float variable or a schedule)."""
    return optimizer._learning_rate


def current_learning_rate(optimizer: Any) -> Any:
    """The learning rate of the next update (a schedule evaluated at ``iterations``)."""
    return optimizer._get_current_learning_rate()


def optimizer_variables_updated(optimizer: Any) -> list[Any]:
    """The model variables a built Keras optimizer updates, in its slot order."""
    return list(optimizer._trainable_variables)


def optimizer_knows(optimizer: Any, variables: Sequence[Any]) -> bool:
    """True when a built optimizer has slots for every one of ``variables``."""
    known = getattr(optimizer, "_trainable_variables_indices", {})
    return all(optimizer._var_key(v) in known for v in variables)


def uses_base_apply(optimizer: Any) -> bool:
    """True when ``optimizer.apply`` is Keras' ``BaseOptimizer.apply`` (no override)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    has_internals = hasattr(optimizer, "_backend_apply_gradients") and hasattr(
        optimizer, "_iterations"
    )
    return has_internals and getattr(type(optimizer), "apply", None) is BaseOptimizer.apply


def backend_apply_gradients(optimizer: Any, grads: list[Any], variables: list[Any]) -> None:
    """``apply`` without its set-up: the update (with clipping, EMA, accumulation), then
    ``iterations += 1``.
    """
    optimizer._backend_apply_gradients(grads, variables)
    optimizer._iterations.assign_add(1)


def iterations_parameter(optimizer: Any) -> torch.Tensor:
    """The tensor behind ``optimizer.iterations``."""
    return parameter_of(optimizer._iterations)


def apply_weight_decay(optimizer: Any, variables: list[Any]) -> None:
    """Keras' torch weight decay step (a no-op when ``weight_decay`` is None)."""
    optimizer._apply_weight_decay(variables)


def adam_slots(optimizer: Any, variables: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """Adam's first moments, second moments and (AMSGrad) maxima for ``variables``."""
    index = [optimizer._get_variable_index(v) for v in variables]
    hats = [optimizer._velocity_hats[i] for i in index] if optimizer.amsgrad else []
    return [optimizer._momentums[i] for i in index], [optimizer._velocities[i] for i in index], hats


def sgd_slots(optimizer: Any, variables: Sequence[Any]) -> list[Any]:
    """SGD's momentum buffers for ``variables`` (empty without momentum)."""
    if optimizer.momentum == 0:
        return []
    return [optimizer.momentums[optimizer._get_variable_index(v)] for v in variables]


#: sha256 (first 16 hex digits) of the source of Keras' torch ``_parallel_update_step`` bodies
#: that ``keras_lightning.fast_update`` reproduces op for op, per Keras version they were read
#: in. A Keras whose body hashes to anything else gets the exact ``"short"`` path instead.
CHECKED_UPDATE_BODIES: dict[str, frozenset[str]] = {
    "adam": frozenset({"29329d08ad93236d"}),  # Keras 3.15
    "sgd": frozenset({"9be60d8e2a6a7860"}),  # Keras 3.15
}


def source_digest(function: Any) -> str | None:
    """A short digest of a function's source (None where the source is not available)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(inspect.cleandoc(source).encode()).hexdigest()[:16]


def direct_update_kind(optimizer: Any) -> str | None:
    """``"adam"`` / ``"sgd"`` when the optimizer runs Keras' torch Adam / SGD update unchanged.

    Unchanged means: none of the methods between ``apply`` and the update overridden by the
    optimizer's class, and the update body the same source as the one read when
    ``fast_update`` was written (:data:`CHECKED_UPDATE_BODIES`). Anything else: None.
    """
    try:
        from keras.src.backend.torch.optimizers import (
            torch_adam,
            torch_optimizer,
            torch_parallel_optimizer,
            torch_sgd,
        )
        from keras.src.optimizers.base_optimizer import BaseOptimizer
    except ImportError:  # another Keras layout
        return None
    cls = type(optimizer)
    try:
        untouched = (
            cls._backend_apply_gradients is BaseOptimizer._backend_apply_gradients
            and cls._backend_update_step
            is torch_parallel_optimizer.TorchParallelOptimizer._backend_update_step
            and cls._clip_gradients is BaseOptimizer._clip_gradients
            and cls._apply_weight_decay is torch_optimizer.TorchOptimizer._apply_weight_decay
            and cls._get_current_learning_rate is BaseOptimizer._get_current_learning_rate
        )
    except AttributeError:
        return None
    if not untouched:
        return None
    for kind, reference in (("adam", torch_adam.Adam), ("sgd", torch_sgd.SGD)):
        body = getattr(reference, "_parallel_update_step", None)
        if getattr(cls, "_parallel_update_step", None) is body:
            return kind if source_digest(body) in CHECKED_UPDATE_BODIES[kind] else None
    return None


# ---------------------------------------------------------------------- Lightning


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises)."""
    return getattr(module, "_trainer", None)


def logger_writes_this_step(trainer: Any) -> bool:
    """Whether Lightning's loggers write on the current step (``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def stage_dataloaders(trainer: Any) -> Any:
    """The dataloader(s) of the running stage, or None when not set up yet."""
    loop = {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }.get(str(trainer.state.fn.value) if trainer.state.fn else "")
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    return source.dataloader()


def use_summary(callback: Any, summary_class: type) -> None:
    """Make a Lightning ``ModelSummary`` callback build ``summary_class(module, max_depth)``.

    The callback builds its table with its ``_summary(trainer, module)`` method (Lightning's
    ``summarize``, or DeepSpeed's summary under ZeRO-3, left alone); one set on the instance
    replaces it for this callback only, and a second call changes nothing.
    """
    if "_summary" in vars(callback):
        return
    original = callback._summary

    def summary(trainer: Any, module: Any) -> Any:
        if getattr(trainer.strategy, "zero_stage_3", False):
            return original(trainer, module)
        return summary_class(module, max_depth=callback._max_depth)

    callback._summary = summary


def refresh_average_model(callback: Any, module: Any) -> None:
    """Copy ``module`` again into an SWA callback whose copy holds no Keras model.

    Lightning's ``StochasticWeightAveraging`` keeps ``deepcopy(module)`` from its ``setup``
    in ``_average_model``; before ``configure_model`` a factory's model is not built.
    """
    import copy

    average = getattr(callback, "_average_model", None)
    if average is not None and getattr(average, "model", None) is None:
        callback._average_model = copy.deepcopy(module)


def fitting(trainer: Any) -> bool:
    """True while ``trainer.fit`` runs (not validate / test / predict)."""
    return trainer is not None and str(getattr(trainer.state.fn, "value", "")) == "fit"


def mid_epoch(trainer: Any) -> bool:
    """True while fitting between two training batches of an epoch (not at its end)."""
    if not fitting(trainer):
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    started = progress.current.ready > 0
    return bool(started and not progress.is_last_batch)


def chosen_checkpoint_io(strategy: Any) -> Any:
    """The checkpoint writer the user or strategy set explicitly (None: Lightning's default)."""
    return getattr(strategy, "_checkpoint_io", False)


def count_manual_optimizer_step(trainer: Any) -> None:
    """Advance ``trainer.global_step`` by one under manual optimization.

    For updates Lightning did not see (a Keras ``train_step`` applies its optimizers itself):
    without it ``max_steps`` never stops training and ``ModelCheckpoint`` never saves.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def count_whole_step(trainer: Any) -> None:
    """Advance ``trainer.global_step`` by one for an update a ``jit_compile="step"`` graph made.

    Counted on both of Lightning's step counters (manual and automatic optimization), so that a
    checkpoint of a fast-mode run resumes with the right ``global_step`` eagerly too (Lightning
    reads the automatic counter there), and one of an eager run resumes in fast mode
    (:func:`align_step_counters`).
    """
    count_manual_optimizer_step(trainer)
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
    progress.increment_ready()
    progress.increment_completed()


def align_step_counters(trainer: Any) -> None:
    """Start the manual step counter where an eagerly trained checkpoint's automatic one is."""
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    manual = epoch_loop.manual_optimization.optim_step_progress.total
    if automatic.completed > manual.completed:
        manual.ready = manual.completed = automatic.completed


def tracing_autograd() -> Any:
    """Dynamo traces through ``torch.autograd.grad`` instead of breaking the graph there."""
    import torch._dynamo

    return torch._dynamo.config.patch(trace_autograd_ops=True)


def forget_compiled(fn: Any) -> None:
    """Drop dynamo's cache entries of ``fn``'s code (a graph kept elsewhere stays usable).

    Dynamo keeps one entry per compile of a code object and refuses more than
    ``recompile_limit`` of them; each capture of :class:`~keras_lightning.replay.Replay`
    compiles the same code, for another model or key, and keeps the graph itself.
    """
    from torch._dynamo.eval_frame import remove_from_cache

    remove_from_cache(fn)


def load_checkpoint_file(path: Any, map_location: Any, weights_only: bool | None) -> Any:
    """Lightning's checkpoint reader (local paths, URLs, fsspec filesystems)."""
    from lightning.fabric.utilities.cloud_io import _load

    return _load(path, map_location=map_location, weights_only=weights_only)


def restore_module_state(cls: type, checkpoint: dict[str, Any], strict: bool, **kwargs: Any) -> Any:
    """Lightning's ``load_from_checkpoint`` body: construct ``cls`` and load ``checkpoint``."""
    from lightning.pytorch.core.saving import _load_state

    return _load_state(cls, checkpoint, strict=strict, **kwargs)


# ---------------------------------------------------------------------- sharding (FSDP2)


def registered_slots(model: Any) -> list[tuple[Any, torch.nn.Module, str]]:
    """Each Keras variable of ``model`` with one ``(module, name)`` torch registered it under.

    FSDP2's ``fully_shard`` swaps the tensor registered there (``module._parameters[name]``)
    between the shard and the gathered weight; :func:`follow_registered` makes the variable
    read what is registered now.
    """
    owner: dict[int, tuple[torch.nn.Module, str]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owner.setdefault(id(param), (module, name))
    slots = []
    for variable in model.variables:
        found = owner.get(id(parameter_of(variable)))
        if found is not None:
            slots.append((variable, *found))
    return slots


def follow_registered(slots: list[tuple[Any, torch.nn.Module, str]]) -> None:
    """Point each variable's stored tensor at the one registered in its slot now."""
    for variable, module, name in slots:
        variable._value = module._parameters[name]


def replace_variable_tensors(model: Any, tensors: Mapping[int, torch.Tensor]) -> None:
    """Give variables (by position in ``model.variables``) new tensors and register those."""
    variables = model.variables
    for index, tensor in tensors.items():
        variables[index]._value = tensor
    for layer in list(model.modules()):  # the model, its sublayers and Sequential's _functional
        if "_torch_params" in getattr(layer, "_modules", {}):
            layer._track_variables()


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank holds: a ``DTensor``'s local shard, or ``param``."""
    local = getattr(param, "_local_tensor", None)
    return local if local is not None else param


def tensor_parallel_size(strategy: Any) -> Any:
    """``ModelParallelStrategy``'s ``tensor_parallel_size`` (it keeps no public property)."""
    return getattr(strategy, "_tensor_parallel_size", 1)


# ---------------------------------------------------------------------- torch


def is_torch_loss_module(value: Any) -> bool:
    """True for the ``torch.nn`` loss modules (``torch.nn.MSELoss()``, ...).

    Their base class, ``torch.nn.modules.loss._Loss``, is private.
    """
    return isinstance(value, torch.nn.modules.loss._Loss)


def in_bad_cuda_fork() -> bool:
    """True in a process forked from a parent that had initialized CUDA."""
    check = getattr(torch.cuda, "_is_in_bad_fork", None)
    return bool(check()) if callable(check) else False


def dynamo_counters() -> Any:
    """Torch dynamo's global counters (frames compiled, graph breaks by reason)."""
    from torch._dynamo.utils import counters

    return counters


def iter_private_names() -> Iterator[str]:
    """The public functions of this module (for the audit test)."""
    for name, value in globals().items():
        if callable(value) and not name.startswith("_") and value.__module__ == __name__:
            yield name
