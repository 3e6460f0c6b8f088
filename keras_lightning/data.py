"""Pure functions over batches: unpacking, output structure, class weights."""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import BatchError, ConfigurationError, ShapeMismatchError

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: The keys of a dict batch that holds the parts of a batch, not the model's inputs.
BATCH_KEYS = ("x", "y", "sample_weight")


def standard_batch(batch: Any, device: Any = None, model: Any = None) -> Any:
    """The batch as the steps take it: tensors on ``device``, ``(x, y[, sample_weight])``.

    The one place where batches become tensors, for every step of the module:

    - NumPy arrays (a ``DataLoader`` over NumPy arrays with a custom ``collate_fn``, a list of
      arrays) become torch tensors on ``device``; floating arrays take Keras' ``floatx``, as
      Keras' ``fit`` converts them (a torch loss then gets what a Keras loss gets);
    - a dict batch keyed ``"x"``, ``"y"`` (and ``"sample_weight"``) is those parts, unless
      the model has an input named ``"y"`` (then the dict is the model's inputs, as in Keras).

    Example:
        >>> import numpy as np
        >>> x, y = standard_batch({"x": np.zeros((2, 3)), "y": np.ones(2, dtype="int64")})
        >>> x.dtype, y.dtype
        (torch.float32, torch.int64)

    """
    if (
        isinstance(batch, Mapping)
        and "x" in batch
        and "y" in batch
        and set(batch) <= set(BATCH_KEYS)
        and "y" not in input_names(model)
    ):
        batch = tuple(batch[key] for key in BATCH_KEYS if key in batch)
    return _tensors(batch, device)


def input_names(model: Any) -> tuple[str, ...]:
    """The names of a Functional model's inputs (none known for a subclassed one)."""
    try:
        inputs = getattr(model, "inputs", None) or ()
        return tuple(getattr(tensor, "name", "") for tensor in inputs)
    except (AttributeError, ValueError):  # an unbuilt model has no inputs yet
        return ()


def _tensors(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point():
            tensor = tensor.to(_floatx())
        return tensor if device is None else tensor.to(device)
    if isinstance(value, list | tuple):
        converted = [_tensors(item, device) for item in value]
        if all(a is b for a, b in zip(converted, value, strict=True)):
            return value
        return type(value)(converted) if isinstance(value, tuple) else converted
    if isinstance(value, Mapping):
        items = {key: _tensors(item, device) for key, item in value.items()}
        if all(items[key] is value[key] for key in value):
            return value
        return items
    return value


def _floatx() -> torch.dtype:
    import keras

    return getattr(torch, keras.config.floatx())


def unpack_batch(batch: Any) -> tuple[Any, Any, Any]:
    """Split a batch into ``(x, y, sample_weight)`` as Keras' ``fit`` does.

    A tuple or list of one to three elements is ``(x,)``, ``(x, y)`` or
    ``(x, y, sample_weight)``; anything else (a tensor, a dict) is ``x`` alone.

    Example:
        >>> import torch
        >>> x, y, sw = unpack_batch([torch.zeros(2, 3), torch.ones(2)])
        >>> tuple(x.shape), tuple(y.shape), sw
        ((2, 3), (2,), None)

    """
    if isinstance(batch, list | tuple):
        if len(batch) == 1:
            return batch[0], None, None
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        raise BatchError(
            f"A batch must be x, (x,), (x, y) or (x, y, sample_weight); received a "
            f"{type(batch).__name__} of {len(batch)} elements. For a model with several "
            "inputs, put them in one list or dict as the first element: ((x1, x2), y) or "
            "({'a': xa, 'b': xb}, y)."
        )
    return batch, None, None


def private_copy(sample_weight: Any) -> Any:
    """A copy of ``sample_weight`` for one consumer: Keras writes into the weights it gets.

    Keras' losses and weighted metrics multiply a masked output's ``sample_weight`` in place
    (``sample_weight *= mask`` on the torch backend), which would change the user's batch and,
    through it, the next consumer's weights and the next epoch's (a loader that keeps its
    tensors). Each loss and metric gets its own copy instead.

    Example:
        >>> import torch
        >>> weights = torch.ones(2)
        >>> private_copy(weights).mul_(3.0).tolist(), weights.tolist()
        ([3.0, 3.0], [1.0, 1.0])

    """
    if isinstance(sample_weight, torch.Tensor):
        return sample_weight.clone()
    if isinstance(sample_weight, Mapping):
        return {key: private_copy(value) for key, value in sample_weight.items()}
    if isinstance(sample_weight, list | tuple):
        return type(sample_weight)(private_copy(value) for value in sample_weight)
    return sample_weight


def weights_per_output(sample_weight: Any, names: list[str]) -> list[Any]:
    """``sample_weight`` spread over the outputs ``names``, as Keras' compiled loss does.

    One tensor weighs every output; a list (in output order) or a dict keyed by output name
    gives each output its own (an output a dict leaves out is unweighted).

    Raises:
        BatchError: A list of another length than the outputs, or a dict with unknown keys.

    Example:
        >>> weights_per_output("w", ["a", "b"]), weights_per_output({"b": "wb"}, ["a", "b"])
        (['w', 'w'], [None, 'wb'])

    """
    if sample_weight is None:
        return [None for _ in names]
    if isinstance(sample_weight, Mapping):
        unknown = [key for key in sample_weight if key not in names]
        if unknown:
            raise BatchError(
                f"sample_weight is a dict with keys {unknown} that match no model output; the "
                f"outputs are {names}. Key the weights by output name."
            )
        return [sample_weight.get(name) for name in names]
    if isinstance(sample_weight, list | tuple):
        if len(sample_weight) == len(names):
            return list(sample_weight)
        if len(sample_weight) == 1:
            return [sample_weight[0] for _ in names]
        raise BatchError(
            f"sample_weight holds {len(sample_weight)} weight tensors but the model has "
            f"{len(names)} outputs {names}. Give one per output (a list in output order or a "
            "dict keyed by output name), or one tensor for all."
        )
    return [sample_weight for _ in names]


def weights_for_output(sample_weight: Any, output: Any) -> Any:
    """The ``sample_weight`` one loss or metric of a masked ``output`` receives.

    Keras' ``apply_mask`` multiplies the weights by the output's mask in place on the torch
    backend (``sample_weight *= mask``): for a masked output each loss and metric gets its
    own copy (:func:`private_copy`), spread over the mask's shape, what ``apply_mask`` means
    (per-sequence weights of ``(batch,)`` or ``(batch, 1)`` for a ``(batch, steps)`` mask),
    which its in-place multiply cannot broadcast. Without a mask, nothing writes into them.
    """
    if sample_weight is None or not isinstance(output, torch.Tensor):
        return sample_weight
    mask = _private.keras_mask_of(output)
    if mask is None:
        return sample_weight
    weights = private_copy(sample_weight)
    if not isinstance(weights, torch.Tensor) or not 0 < weights.ndim <= mask.ndim:
        return weights
    shape = tuple(weights.shape) + (1,) * (mask.ndim - weights.ndim)
    try:
        return weights.reshape(shape).expand(tuple(mask.shape)).contiguous()
    except RuntimeError:  # not broadcastable: the loss names the shapes
        return weights


def batch_size_of(x: Any) -> int:
    """The number of samples in ``x`` (a tensor, or a list/dict of tensors)."""
    first = x
    while isinstance(first, Mapping | Sequence) and not isinstance(first, str):
        if isinstance(first, Mapping):
            if not first:
                break
            first = next(iter(first.values()))
        else:
            if not first:
                break
            first = first[0]
    shape = getattr(first, "shape", None)
    if not shape:
        raise BatchError(
            "Could not find the batch size: the model input x holds no tensor with a batch "
            f"dimension (received {type(x).__name__}). Yield tensors of shape (batch, ...)."
        )
    return int(shape[0])


def output_structure(y_pred: Any, model: Any) -> tuple[list[str], list[Any]]:
    """Name and flatten the model output: a tensor, a list/tuple or a dict of tensors."""
    if isinstance(y_pred, Mapping):
        names = list(y_pred.keys())
        return names, [y_pred[name] for name in names]
    if isinstance(y_pred, list | tuple):
        model_names = list(getattr(model, "output_names", None) or [])
        if len(model_names) != len(y_pred):
            model_names = [f"output_{i + 1}" for i in range(len(y_pred))]
        return model_names, list(y_pred)
    names = list(getattr(model, "output_names", None) or [])
    return (names[:1] if len(names) == 1 else ["output"]), [y_pred]


def align_targets(
    y: Any, names: list[str], argument: str = "y", expects: Sequence[bool] | None = None
) -> list[Any]:
    """Order targets like the outputs ``names``: ``y`` is a tensor, a list or a dict.

    ``expects`` marks the outputs that take a target (those with a loss). As in Keras'
    ``compile(loss=["mse", None])``, ``y`` may then hold just those targets, in output order;
    the other outputs get ``None``.

    Example:
        >>> align_targets("t", ["logits", "hidden"], expects=[True, False])
        ['t', None]

    """
    if expects is not None and len(names) > 1 and 0 < sum(expects) < len(names):
        wanted = [name for name, want in zip(names, expects, strict=True) if want]
        given = y if isinstance(y, list | tuple) else None if isinstance(y, Mapping) else [y]
        if given is not None and len(given) == len(wanted):
            targets = iter(given)
            return [next(targets) if want else None for want in expects]
    if len(names) == 1:
        if isinstance(y, Mapping):
            if names[0] in y:
                return [y[names[0]]]
            if len(y) == 1:
                return list(y.values())
        if isinstance(y, list | tuple) and len(y) == 1:
            return [y[0]]
        return [y]
    if isinstance(y, Mapping):
        unknown = [key for key in y if key not in names]
        if unknown:
            raise ShapeMismatchError(
                f"`{argument}` is a dict with keys {unknown} that match no model output; the "
                f"outputs are {names}. Key the targets by output name."
            )
        return [y.get(name) for name in names]
    if isinstance(y, list | tuple):
        if len(y) != len(names):
            raise ShapeMismatchError(
                f"`{argument}` holds {len(y)} targets but the model has {len(names)} outputs "
                f"{names}. Yield one target per output, as a list in output order or a dict "
                "keyed by output name."
            )
        return list(y)
    raise ShapeMismatchError(
        f"The model has {len(names)} outputs {names}, but `{argument}` is a single "
        f"{type(y).__name__}. Yield one target per output, as a list in output order or a "
        "dict keyed by output name."
    )


def per_output(spec: Any, names: list[str], argument: str) -> list[Any]:
    """Spread a per-output argument (``loss``, ``loss_weights``, ``metrics``) over outputs.

    A single value applies to every output; a list/tuple gives one value per output; a dict
    maps output names to values (outputs it does not name get ``None``).
    """
    if isinstance(spec, Mapping):
        unknown = [key for key in spec if key not in names]
        if unknown:
            raise ConfigurationError(
                f"`{argument}` has keys {unknown} that match no model output. The model's "
                f"outputs are {names}: write `{argument}={{{names[0]!r}: ...}}`."
            )
        return [spec.get(name) for name in names]
    if isinstance(spec, list | tuple) and len(names) > 1:
        if len(spec) != len(names):
            raise ConfigurationError(
                f"`{argument}` is a list of {len(spec)} entries but the model has "
                f"{len(names)} outputs {names}. Give one entry per output, or a dict keyed "
                "by output name."
            )
        return list(spec)
    return [spec for _ in names]


def class_weight_tensor(class_weight: Mapping[int, float]) -> torch.Tensor:
    """A lookup table ``weights[label]``: the given weight, 1.0 for classes not listed."""
    size = max(class_weight) + 1
    table = torch.ones(size, dtype=torch.float32)
    for label, weight in class_weight.items():
        table[label] = float(weight)
    return table


def class_weights_for(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-sample weights from labels, as Keras' ``class_weight`` defines them.

    One-hot (or probability) targets use their argmax; a trailing dimension of 1 is squeezed;
    labels are rounded to integers. Labels outside the table get weight 1.0.

    Example:
        >>> import torch
        >>> table = class_weight_tensor({0: 1.0, 1: 3.0})
        >>> class_weights_for(torch.tensor([0, 1, 1, 2]), table).tolist()
        [1.0, 3.0, 3.0, 1.0]
        >>> class_weights_for(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), table).tolist()
        [3.0, 1.0]

    """
    labels = y
    if labels.ndim > 1:
        labels = labels.argmax(dim=-1) if labels.shape[-1] != 1 else labels.squeeze(-1)
    if labels.is_floating_point():
        labels = labels.round()
    labels = labels.long().reshape(labels.shape[0], -1)[:, 0]
    table = table.to(labels.device)
    inside = (labels >= 0) & (labels < table.shape[0])
    weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    weights[inside] = table[labels[inside]]
    return weights


def validate_class_weight(class_weight: Any) -> dict[int, float] | None:
    """Check ``class_weight={class_index: weight}``."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise ConfigurationError(
            "`class_weight` must be a non-empty dict mapping class indices to weights, e.g. "
            f"class_weight={{0: 1.0, 1: 5.0}}. Received: class_weight={class_weight!r}."
        )
    checked: dict[int, float] = {}
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ConfigurationError(
                f"`class_weight` keys must be class indices (int >= 0); received key {label!r}. "
                "Write class_weight={0: 1.0, 1: 5.0}."
            )
        try:
            checked[label] = float(weight)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(
                f"`class_weight[{label}]` must be a number; received {weight!r}."
            ) from error
    return checked


def first_batch(loaders: Any) -> Any:
    """The first batch of a dataloader (the first of several, in a list or dict).

    Raises:
        BatchError: The dataloader yields no batch.

    """
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()))
    elif isinstance(loaders, list | tuple):
        loaders = loaders[0]
    try:
        return next(iter(loaders))
    except StopIteration:
        raise BatchError(
            "The dataloader yielded no batch, so the Keras model, which has no variables yet, "
            "cannot be built from its first batch. Pass a dataloader with data, or build the "
            "model first (a keras.Input, or call it once on a batch)."
        ) from None
