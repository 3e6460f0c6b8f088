"""A function of tensors captured once as one inductor graph, then called directly.

``jit_compile="step"`` compiles a whole training step: the Keras forward pass, the loss,
``torch.autograd.grad`` and the optimizer update. ``torch.compile`` captures it as one graph
(dynamo traces through ``torch.autograd.grad`` with ``trace_autograd_ops``), but calling the
result through ``torch.compile`` checks dynamo's guards on every call: over a thousand on a
small Keras model, costing more than the graph itself. :class:`Replay` instead keeps the graph
that inductor compiled and calls it directly, as ``jax.jit`` calls its executable: the graph's
inputs are the call's tensors (by position) and the tensors it read from the model and the
optimizer (by identity: parameters, optimizer slots, step counters, all updated in place).

What a direct call cannot see is a change made in Python after capture. The caller passes a
``key`` holding everything Python-side the step depends on (the batch's shapes and dtypes,
which layers train, the optimizer's hyper-parameters, the autocast state); a new key captures
again. A capture that is not one graph (a graph break) raises :class:`NotOneGraph`, and the
caller falls back (:mod:`keras_lightning.whole_step`).
"""

from __future__ import annotations

from keras_lightning import _private

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["NotOneGraph", "Replay", "ReplayStats"]


class NotOneGraph(RuntimeError):
    """The function did not capture as one graph; the message says why."""


@dataclass
class ReplayStats:
    """What capturing cost.

    Attributes:
        captures: Graphs captured (one per distinct key: the first batch shape, a smaller
            last batch, a change of which layers train).
        compile_seconds: Seconds spent capturing and compiling, in total.
        calls: Direct calls of a captured graph.
        keys: The keys captured, oldest first (for diagnostics).

    """

    captures: int = 0
    compile_seconds: float = 0.0
    calls: int = 0
    keys: list[Any] = field(default_factory=list)


@dataclass
class _Graph:
    compiled: Callable[..., Any]
    # per graph input: the position of the call's tensor, or None for a tensor held
    positions: list[int | None]
    held: list[torch.Tensor | None]
    # per output of the function: ("graph", i), ("input", position), ("value", object)
    outputs: list[tuple[str, Any]]


class Replay:
    """``fn(*tensors) -> tuple`` captured per key, then called without dynamo.

    Args:
        fn: The function; it takes tensors and returns a flat tuple of tensors (or Nones).
        backend: ``"inductor"`` (fused kernels) or ``"aot_eager"`` (no code generation).

    Example:
        >>> import torch
        >>> def make_step():
        ...     w = torch.ones(3)  # state the step reads and updates in place
        ...     def step(x):
        ...         w.mul_(2)
        ...         return ((x * w).sum(),)
        ...     return w, step
        >>> w, step = make_step()
        >>> replay = Replay(step, backend="aot_eager")
        >>> float(replay("k", [torch.ones(3)])[0]), float(replay("k", [torch.ones(3)])[0])
        (6.0, 12.0)
        >>> w.tolist(), replay.stats.captures, replay.stats.calls
        ([4.0, 4.0, 4.0], 1, 1)

    """

    #: The most keys captured; more raise :class:`NotOneGraph` (as dynamo's recompile limit).
    limit = 16

    def __init__(self, fn: Callable[..., tuple[Any, ...]], backend: str = "inductor") -> None:
        self.fn = fn
        self.backend = backend
        self.stats = ReplayStats()
        self._graphs: dict[Hashable, _Graph] = {}
        self._refused: dict[Hashable, str] = {}  # keys whose capture ran but cannot replay

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_graphs"] = {}  # compiled code does not pickle: capture again on the other side
        return state

    def __call__(self, key: Hashable, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Run the graph captured for ``key`` on ``tensors`` (capturing it first if new).

        Raises:
            NotOneGraph: ``key`` does not capture as one graph that can be replayed (before
                anything ran), or more than :attr:`limit` keys were captured.

        """
        graph = self._graphs.get(key)
        if graph is None:
            reason = self._refused.get(key)
            if reason is not None:
                raise NotOneGraph(reason)
            if len(self._graphs) >= self.limit:
                raise NotOneGraph(
                    f"{self.limit} graphs captured already (a new batch shape or setting each "
                    "time: pad batches to a few shapes)"
                )
            return self._capture(key, tensors)
        self.stats.calls += 1
        inputs = [
            tensors[p] if p is not None else h
            for p, h in zip(graph.positions, graph.held, strict=True)
        ]
        results = graph.compiled(*inputs)
        return tuple(
            results[ref] if kind == "graph" else tensors[ref] if kind == "input" else ref
            for kind, ref in graph.outputs
        )

    def _capture(self, key: Hashable, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        started = time.perf_counter()
        captured: list[tuple[list[Any], Callable[..., Any], list[Any]]] = []

        def backend(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            compiled = _private.graph_compiler(self.backend)(graph_module, example_inputs)
            record: tuple[list[Any], Callable[..., Any], list[Any]] = (
                list(example_inputs), compiled, []
            )
            captured.append(record)

            def run(*args: Any) -> Any:
                results = compiled(*args)
                record[2].append(results)
                return results

            return run

        fn = self.fn

        def whole(*args: torch.Tensor) -> tuple[Any, ...]:
            return fn(*args)

        compiled_fn = torch.compile(whole, backend=backend, fullgraph=True, dynamic=False)
        with _private.tracing_autograd():
            try:
                outputs = compiled_fn(*tensors)
            except Exception as error:
                if not _private.is_dynamo_error(error):
                    raise  # the step's own error (a bad batch, a loss that fails): as eager
                raise NotOneGraph(f"{type(error).__name__}: {_reason(error)}") from error
            finally:
                _private.forget_compiled(whole)  # the graph is kept here, not in dynamo
        self.stats.compile_seconds += time.perf_counter() - started
        # the step ran (its update too): from here on, refuse the key rather than raise
        try:
            if len(captured) != 1 or len(captured[0][2]) != 1:
                raise NotOneGraph(f"captured {len(captured)} graphs, expected one")
            example_inputs, compiled, runs = captured[0]
            graph = _Graph(compiled, *_input_slots(example_inputs, tensors), [])
            results = list(runs[0])
            for value in outputs:
                graph.outputs.append(_output_slot(value, results, tensors, graph.held))
        except NotOneGraph as error:
            self._refused[key] = str(error)
            return tuple(outputs)
        self._graphs[key] = graph
        self.stats.captures += 1
        self.stats.keys.append(key)
        return tuple(outputs)


def _input_slots(
    example_inputs: list[Any], tensors: Sequence[torch.Tensor]
) -> tuple[list[int | None], list[torch.Tensor | None]]:
    by_id: dict[int, int] = {}
    for index, tensor in enumerate(tensors):
        by_id.setdefault(id(tensor), index)
    positions: list[int | None] = []
    held: list[torch.Tensor | None] = []
    for value in example_inputs:
        if not isinstance(value, torch.Tensor):
            raise NotOneGraph(f"the graph takes a {type(value).__name__} input (dynamic shape)")
        position = by_id.get(id(value))
        positions.append(position)
        held.append(value if position is None else None)
    return positions, held


def _output_slot(
    value: Any, results: list[Any], tensors: Sequence[torch.Tensor], held: list[Any]
) -> tuple[str, Any]:
    if not isinstance(value, torch.Tensor):
        return ("value", value)
    for index, result in enumerate(results):
        if result is value:
            return ("graph", index)
    for index, tensor in enumerate(tensors):
        if tensor is value:
            return ("input", index)
    if any(value is tensor for tensor in held):
        return ("value", value)  # a weight or state the graph reads, returned as it is
    raise NotOneGraph("an output of the step is neither a graph output nor an input")


def _reason(error: BaseException) -> str:
    """Dynamo's explanation and the user code it stopped in, shortened."""
    text = str(error)
    head = text.split("\n  Hint:")[0][:500]
    frames = [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]
    return head + ("\n  last frames: " + " | ".join(frames[-3:]) if frames else "")
