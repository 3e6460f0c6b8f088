"""``jit_compile="step"``: the whole training step as one compiled graph (the fast mode).

The torch counterpart of the JAX guides' jitted ``train_step``: the Keras forward pass, the
loss (order handled, ``model.losses``, sample and class weights), ``torch.autograd.grad`` and
the Keras optimizer's update are captured by ``torch.compile`` as one inductor graph, then
replayed directly (:class:`~keras_lightning.replay.Replay`): no autograd engine, no Keras
dispatch, no dynamo guards at step time. Validation and test steps (forward and loss) are
captured the same way.

How the step meets Lightning (:func:`hosting`):

- ``"manual"``: the module runs under Lightning's manual optimization and the graph updates
  the weights (``"fused"``), or returns the gradients to a torch optimizer's own ``step``
  (``"grads"``). Lightning's step counters advance as for any update.
- ``"automatic"``, when the Trainer clips gradients (``gradient_clip_val``), accumulates them
  (``accumulate_grad_batches``) or steps learning-rate schedulers: the graph returns the
  gradients into ``.grad`` (divided by the accumulation count, as Lightning divides the loss)
  and Lightning clips, accumulates, steps and schedules as for a plain module.
- Otherwise (DDP and other multi-process strategies, a model's own ``train_step``, a module's
  own ``training_step``, a GradScaler) the step is not captured whole; the forward and loss
  are compiled with inductor (``jit_compile="inductor"``) and the reason is in
  :attr:`WholeStepStats.not_whole`.

Every Python-side input of the step is part of the capture key (:meth:`WholeStep.key`):
batch shapes and dtypes, which layers and weights train, the optimizer's hyper-parameters,
autocast and grad mode. A new key captures again (a smaller last batch: once). A step that
does not capture as one graph warns once with dynamo's reason and runs from then on through
``torch.compile`` with graph breaks (``"grads"`` is tried before that when ``"fused"`` fails).
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.compiled import CompiledStep, install_dynamo_shims
from keras_lightning.replay import NotOneGraph, Replay, ReplayStats
from keras_lightning.sharding import is_sharded

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

if TYPE_CHECKING:
    from keras_lightning.builtin_steps import BuiltinSteps

__all__ = [
    "WholeStep",
    "WholeStepStats",
    "gradient_carrier",
    "hosting",
    "not_whole_reason",
    "write_gradients",
]

#: Keras optimizer attributes a captured update reads as Python values.
_HYPERPARAMETERS = (
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
    "momentum",
    "nesterov",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "gradient_accumulation_steps",
    "loss_scale_factor",
)


def not_whole_reason(module: Any, trainer: Any) -> str | None:
    """Why this run's training step cannot be captured whole, or None when it can."""
    if trainer is None:
        return "no Trainer attached"
    if trainer.world_size > 1 and not _is_ddp(trainer.strategy):
        return (
            f"{type(trainer.strategy).__name__} with {trainer.world_size} processes: only DDP "
            "averages the graph's gradients (in the backward of the loss that carries them)"
        )
    if module._uses_keras_train_step():
        return "the Keras model defines its own train_step"
    if _overrides(module, "training_step"):
        return "the module overrides training_step"
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return "a GradScaler (16-mixed on CUDA) scales the loss outside the graph"
    if is_sharded(module.model):
        return "the model is sharded"
    return None


def hosting(module: Any, trainer: Any) -> str | None:
    """``"manual"``, ``"automatic"`` or None (not captured whole) for this run; see module doc."""
    if not_whole_reason(module, trainer) is not None:
        return None
    if trainer.world_size > 1:
        return "automatic"  # DDP's reducer averages .grad in Lightning's backward
    if trainer.gradient_clip_val or trainer.accumulate_grad_batches != 1:
        return "automatic"
    if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
        return "automatic"  # it changes accumulate_grad_batches per epoch
    if module._arguments.lr_scheduler is not None or _overrides(module, "configure_optimizers"):
        return "automatic"  # Lightning steps schedulers under automatic optimization only
    return "manual"


def _is_ddp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def _overrides(module: Any, name: str) -> bool:
    from keras_lightning.module import KerasLightningModule

    return getattr(type(module), name) is not getattr(KerasLightningModule, name)


@dataclass
class WholeStepStats:
    """What the fast mode did.

    Attributes:
        mode: ``"fused"`` (forward, loss, gradients and update in one graph), ``"grads"``
            (the graph returns gradients to the optimizer), ``"compiled"`` (through
            ``torch.compile``, after a fallback), or None before the first captured step.
        hosting: ``"manual"`` or ``"automatic"`` (see :mod:`keras_lightning.whole_step`).
        train: Captures, compile seconds and direct calls of the training graphs.
        evaluate: The same for validation / test graphs.
        fallback: Why a step was not captured as one graph, or None.
        not_whole: Why this run does not capture the step whole at all, or None.

    """

    mode: str | None = None
    hosting: str | None = None
    train: ReplayStats = field(default_factory=ReplayStats)
    evaluate: ReplayStats = field(default_factory=ReplayStats)
    fallback: str | None = None
    not_whole: str | None = None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent capturing and compiling graphs, training and evaluation together."""
        return self.train.compile_seconds + self.evaluate.compile_seconds


@dataclass
class _Batch:
    """A batch flattened: its tensors, and what rebuilds it around them."""

    tensors: list[torch.Tensor]
    spec: Any
    leaves: list[Any]  # the leaves, each tensor replaced by None
    positions: list[int]  # where the tensors go among the leaves
    signature: tuple[Any, ...]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.leaves)
        for position, tensor in zip(self.positions, tensors, strict=True):
            leaves[position] = tensor
        return _private.tree_unflatten(leaves, self.spec)


def flatten_batch(x: Any, y: Any, sample_weight: Any) -> _Batch:
    """The tensors of ``(x, y, sample_weight)`` and a hashable description of the rest."""
    leaves, spec = _private.tree_flatten((x, y, sample_weight))
    tensors: list[torch.Tensor] = []
    positions: list[int] = []
    kinds: list[Any] = []
    first: dict[int, int] = {}
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            # the same tensor twice (an autoencoder's (x, x)) is one graph input
            alias = first.setdefault(id(leaf), len(tensors))
            kinds.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, alias))
            tensors.append(leaf)
            positions.append(index)
            leaves[index] = None
        else:
            kinds.append(("value", _hashable(leaf)))
    return _Batch(tensors, spec, leaves, positions, (str(spec), tuple(kinds)))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, id(value))
    return value


class WholeStep:
    """The captured training and evaluation steps of one :class:`BuiltinSteps`.

    Args:
        steps: The built-in steps whose forward and loss (``_forward_and_loss``) it compiles.
        backend: ``"inductor"``, or ``"aot_eager"`` (no code generation; quicker to compile).

    """

    def __init__(self, steps: BuiltinSteps, backend: str = "inductor") -> None:
        install_dynamo_shims()
        self.steps = steps
        self.backend = backend
        self.stats = WholeStepStats()
        self._train = Replay(self._train_graph, backend)
        self._evaluate = Replay(self._evaluate_graph, backend)
        self.stats.train = self._train.stats
        self.stats.evaluate = self._evaluate.stats
        self._fallback: CompiledStep | None = None
        self._eval_fallback: CompiledStep | None = None
        self._layers: list[Any] | None = None
        self._warned = False
        # set before each call; read while tracing (and fixed by the key)
        self._batch: _Batch | None = None
        self.params: list[torch.Tensor] = []
        self._optimizer: Any = None
        self._fusing = False  # this step's graph applies the update
        self._fused_failed = False
        self._out: dict[str, Any] = {}  # the output structure of the step last traced
        self._outs: dict[Any, dict[str, Any]] = {}  # ... of each captured graph

    # ------------------------------------------------------------ keys

    def key(self, stage: str, batch: _Batch, params: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Everything Python-side the captured step depends on."""
        model = self.steps.host._require_model()
        if self._layers is None:
            self._layers = _private.flatten_layers(model)
        optimizer = self._optimizer if stage == "fused" else None
        return (
            stage,
            batch.signature,
            # trainable, and every scalar a layer holds (Dropout.rate, a flag a callback sets)
            tuple(_scalars(layer) for layer in self._layers),
            tuple((id(p), p.requires_grad) for p in params),
            _optimizer_key(optimizer),
            _autocast_key(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
        )

    # ------------------------------------------------------------ what is captured

    def _forward(self, tensors: Sequence[torch.Tensor], training: bool) -> tuple[Any, ...]:
        assert self._batch is not None
        x, y, sample_weight = self._batch.rebuild(tensors)
        y_pred, loss, output_losses = self.steps._forward_and_loss(x, y, sample_weight, training)
        leaves, spec = _private.tree_flatten(y_pred)
        masks = [_private.keras_mask_of(leaf) for leaf in leaves]
        names = sorted(output_losses)
        self._out = {"spec": spec, "names": names, "count": len(leaves)}
        return (
            loss,
            *(leaf.detach() for leaf in leaves),
            *(output_losses[name].detach() for name in names),
            *masks,
        )

    def _train_graph(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        loss, *rest = self._forward(tensors, training=True)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if self._fusing:
            with torch.no_grad():
                self._optimizer.apply_captured(self.params, list(grads))
            return (loss.detach(), *rest)
        return (loss.detach(), *rest, *grads)

    def _evaluate_graph(self, *tensors: torch.Tensor) -> tuple[Any, ...]:
        return self._forward(tensors, training=False)

    def _unpack(
        self, outputs: Sequence[Any]
    ) -> tuple[Any, torch.Tensor, dict[str, Any], list[Any]]:
        out = self._out
        count, names = out["count"], out["names"]
        loss = outputs[0]
        leaves = list(outputs[1 : 1 + count])
        losses = dict(zip(names, outputs[1 + count : 1 + count + len(names)], strict=True))
        masks = outputs[1 + count + len(names) : 1 + 2 * count + len(names)]
        leaves = [
            _private.with_keras_mask(leaf, mask)
            for leaf, mask in zip(leaves, masks, strict=True)
        ]
        rest = list(outputs[1 + 2 * count + len(names) :])
        return _private.tree_unflatten(leaves, out["spec"]), loss, losses, rest

    # ------------------------------------------------------------ steps

    def train(
        self, x: Any, y: Any, sample_weight: Any, optimizer: Any, first: bool, fuse: bool
    ) -> tuple[Any, torch.Tensor, dict[str, Any], list[Any] | None]:
        """One training step: the output, loss, per-output losses, and the gradients (over
        :attr:`params`) for the optimizer, or None when the graph applied the update itself.

        ``first``: run eagerly (the first batch resolves the objective and builds the
        optimizer); ``fuse``: the update may be captured in the graph (manual hosting).
        """
        from keras_lightning.optimizers import KerasOptimizer

        self._optimizer = optimizer
        if not first and self.stats.mode != "compiled" and not self._fused_failed:
            # decided on every step: a later fit may clip (automatic hosting: never fused)
            fused = (
                fuse and isinstance(optimizer, KerasOptimizer) and optimizer.can_apply_captured()
            )
            self.stats.mode = "fused" if fused else "grads"
        self._fusing = self.stats.mode == "fused" and not first
        if self._fusing:
            optimizer.prepare_captured()
            self.params = optimizer.trained_params()
        else:
            self.params = _trained(optimizer)
        batch = flatten_batch(x, y, sample_weight)
        self._batch = batch
        try:
            if first or self.stats.mode == "compiled":
                outputs = self._run_fallback(batch, first)
            else:
                try:
                    key = self.key(str(self.stats.mode), batch, self.params)
                    outputs = self._train(key, batch.tensors)
                    self._out = self._outs.setdefault(key, self._out)
                except NotOneGraph as error:
                    outputs = self._after_failure(batch, error)
        finally:
            self._batch = None  # nothing of the batch is kept between steps
        if self._fusing:
            optimizer.after_captured()
        y_pred, loss, losses, grads = self._unpack(outputs)
        return y_pred, loss, losses, (None if self._fusing else grads)

    def _after_failure(self, batch: _Batch, error: NotOneGraph) -> tuple[Any, ...]:
        if self._fusing:  # the update may be what breaks: try gradients only
            self.stats.fallback = f"fused: {error}"
            self.stats.mode = "grads"
            self._fusing = False
            self._fused_failed = True
            self.params = _trained(self._optimizer)
            try:
                return self._train(self.key("grads", batch, self.params), batch.tensors)
            except NotOneGraph as second:
                error = second
        self.stats.fallback = str(error)
        self.stats.mode = "compiled"
        self._warn(str(error))
        return self._run_fallback(batch, first=False)

    def _run_fallback(self, batch: _Batch, first: bool) -> tuple[Any, ...]:
        if first:  # eager: it resolves the objective and builds the optimizer
            with _private.tracing_autograd():
                return self._train_graph(*batch.tensors)
        if self._fallback is None:
            self._fallback = CompiledStep(self._train_graph, "eager")
        with _private.tracing_autograd():
            return self._fallback(*batch.tensors)

    def evaluate(
        self, x: Any, y: Any, sample_weight: Any
    ) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        """One validation / test step (``training=False``): output, loss, per-output losses."""
        batch = flatten_batch(x, y, sample_weight)
        self._batch = batch
        try:
            if self._eval_fallback is not None:
                outputs = self._eval_fallback(*batch.tensors)
            else:
                try:
                    key = self.key("evaluate", batch, ())
                    outputs = self._evaluate(key, batch.tensors)
                    self._out = self._outs.setdefault(key, self._out)
                except NotOneGraph as error:
                    self._warn(f"evaluation: {error}")
                    self._eval_fallback = CompiledStep(self._evaluate_graph, "eager")
                    outputs = self._eval_fallback(*batch.tensors)
        finally:
            self._batch = None
        y_pred, loss, losses, _ = self._unpack(outputs)
        return y_pred, loss, losses

    def _warn(self, reason: str) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            "jit_compile='step' could not capture the Keras step as one graph "
            f"({reason[:400]}); it runs through torch.compile with graph breaks from now on "
            "(module.compile_stats.fallback keeps the reason). Pass jit_compile=True to "
            "compile the forward pass only, or jit_compile=False.",
            RuntimeWarning,
            stacklevel=4,
        )


_SCALAR_TYPES = (bool, int, float, str, type(None))


def _scalars(layer: Any) -> tuple[Any, ...]:
    return (layer.trainable,) + tuple(
        (name, value) for name, value in vars(layer).items() if type(value) in _SCALAR_TYPES
    )


def _trained(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _optimizer_key(optimizer: Any) -> Any:
    if optimizer is None:
        return None
    return tuple(
        (
            type(keras_optimizer).__name__,
            tuple(getattr(keras_optimizer, name, None) for name in _HYPERPARAMETERS),
            # the rest of its configuration (rho, l1 / l2, ...); the learning rate is a tensor
            tuple(_scalars_of_config(keras_optimizer.get_config())),
        )
        for keras_optimizer in optimizer.keras_optimizers
    ) + (optimizer.captured_layout(),)


def _scalars_of_config(config: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (name, value) for name, value in sorted(config.items())
        if name != "learning_rate" and type(value) in _SCALAR_TYPES
    ]


def _autocast_key() -> tuple[Any, ...]:
    return tuple(
        (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
    )


def write_gradients(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Put ``grads`` in ``.grad``, as ``backward`` would (None: no gradient)."""
    for param, grad in zip(params, grads, strict=True):
        if grad is not None:
            param.grad = grad


def gradient_carrier(
    loss: torch.Tensor, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """A tensor equal to ``loss`` whose gradient with respect to ``params`` is ``grads``.

    Under automatic optimization Lightning zeroes ``.grad`` after ``training_step`` and
    fills it by ``backward`` of the returned loss (divided by ``accumulate_grad_batches``).
    The backward of ``sum(p * g)`` is ``g``: one multiply per weight, instead of the model's
    backward, which the graph already ran.

    Example:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> carrier = gradient_carrier(torch.tensor(5.0), [w], [torch.tensor([3.0, 4.0])])
        >>> carrier.backward()
        >>> float(carrier), w.grad.tolist()
        (5.0, [3.0, 4.0])

    """
    link = sum(
        ((param * grad.detach()).sum() for param, grad in zip(params, grads, strict=True)
         if grad is not None),
        torch.zeros((), device=loss.device),
    )
    return loss.detach() + (link - link.detach())
