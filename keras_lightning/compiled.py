"""The forward pass and loss of a step, captured once with ``torch.compile``.

Keras' per-layer Python machinery (``Layer.__call__``, the functional graph walk, the loss
wrappers) costs far more than the math of a small model. ``torch.compile`` traces it once and
replays the captured torch graph; autograd computes the backward of that graph as usual, and
the optimizer step stays outside. This is the torch counterpart of the JAX guides' compiled,
stateless train step.

Backends, fastest warm-up first:

- ``"eager"`` (``jit_compile=True``): dynamo captures the graph and runs it with eager torch ops.
  No code generation: warm-up of about a second or two, and the Keras overhead is gone. The
  graph is first cleared of the conversions Keras wraps around every op that return their
  input unchanged (:func:`drop_no_op_conversions`).
- ``"aot_eager"``: also traces the backward ahead of time; mostly for debugging.
- ``"inductor"``: generates fused kernels. Warm-up of tens of seconds on CPU; worth it on
  large models and GPUs.

If capturing fails, the step warns once and runs eagerly from then on.
"""

from __future__ import annotations

from keras_lightning import _private
from keras_lightning.exceptions import ConfigurationError, KerasLightningError

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import torch

COMPILE_BACKENDS = ("eager", "aot_eager", "inductor")
#: ``jit_compile`` values that compile the whole training step (``whole_step.py``): with
#: inductor, or with ``aot_eager`` (no code generation: seconds to compile).
WHOLE_STEP_MODES = ("step", "step:aot_eager")


def resolve_compile(spec: Any) -> str | None:
    """The ``torch.compile`` backend for ``KerasLightningModule(jit_compile=spec)``, or None.

    Example:
        >>> resolve_compile(True), resolve_compile(False), resolve_compile("step")
        ('eager', None, 'step')

    """
    if spec is None or spec is False:
        return None
    if spec is True:
        return "eager"
    if isinstance(spec, str) and (spec in COMPILE_BACKENDS or spec in WHOLE_STEP_MODES):
        return spec
    raise ConfigurationError(
        f"`jit_compile` must be True, False, 'step', 'step:aot_eager' or a torch.compile "
        "backend name among "
        f"{', '.join(repr(b) for b in COMPILE_BACKENDS)}; received jit_compile={spec!r}. "
        "jit_compile='step' compiles the whole training step (forward, loss, backward and "
        "update) as one inductor graph, the fastest steady state ('step:aot_eager': the same "
        "graph without code generation, compiled in seconds); jit_compile=True uses "
        "'eager' (the forward pass and loss captured without code generation, fast warm-up); "
        "jit_compile='inductor' compiles the forward pass and loss with fused kernels."
    )


_SHIMS_INSTALLED = False


def install_dynamo_shims() -> None:
    """Make Keras ops that dynamo cannot trace traceable, without changing what they compute.

    Only affects code traced by ``torch.compile`` (``torch.compiler.substitute_in_graph``);
    eager Keras is untouched. Installed once per process, on the first compiled step. Each
    substitute is the Keras function (torch backend) with one untraceable probe removed:

    - ``keras.ops.max`` probes ``getattr(result, "values", None)``, on which dynamo (torch
      2.13) breaks the graph: ``GlobalMaxPooling2D`` split the GAN discriminator into 9 graphs
      with 15 breaks. ``torch.max(x)`` and ``torch.amax`` return a dense tensor, so the probe
      never applies.
    - ``binary_crossentropy`` calls ``torch.backends.mps.is_available()`` (an ``lru_cache``
      wrapper dynamo cannot trace) on every call; the substitute reads it once.
    - ``moments`` (``BatchNormalization``) passes the layer's reduction axes, a Keras
      ``TrackedList``, to ``torch.mean``; dynamo cannot pass that list to an op. The
      substitute passes the same axes as a tuple.
    - ``_can_use_flash_attention`` (``MultiHeadAttention``, ``ops.dot_product_attention``)
      builds a ``torch.backends.cuda.SDPAParams``, a pybind object dynamo cannot create. Flash
      attention runs on CUDA only: off CUDA the substitute answers False, as the check does;
      on CUDA it also answers False, which calls the same ``scaled_dot_product_attention``
      without pinning its backend (torch's dispatcher still picks flash attention where the
      inputs allow it).
    - Keras' ``tree.flatten`` (every ``Layer.__call__``, e.g. an RNN cell's) sorts dicts with
      ``tree_flatten(s, is_leaf=lambda x: x is not s)``; dynamo cannot evaluate that ``is not``
      on a tuple (``Failed to trace builtin operator``). The substitute walks the same pytree
      nodes one level at a time without the identity test.
    - Seeded ``Dropout`` (``Dropout(seed=...)``, attention dropout, keras_hub layers) draws its
      mask with a ``torch.Generator`` seeded in Python from the layer's ``SeedGenerator``
      (``@dynamo.disable``). The substitute advances the ``SeedGenerator`` just the same and
      draws the mask from a counter-based hash of its seed (SplitMix64), inside the graph:
      reproducible from the seed and the same keep rate, but not the mask eager Keras draws
      (unseeded dropout is torch's own and unchanged).
    - ``rnn`` (``LSTM``, ``GRU``, ``SimpleRNN`` off cuDNN) loops ``while time < steps`` over a
      tensor counter, a data-dependent branch dynamo cannot trace. The substitute runs Keras'
      own unrolled path (``unroll=True``: the same cell calls and masking, step by step) over
      the sequence length, which is fixed in a captured graph.
    - ``in_tf_graph`` (``Rescaling`` and the other preprocessing layers, when TensorFlow is
      installed) asks TensorFlow whether it runs eagerly, which dynamo refuses to trace. A
      torch step that dynamo traces is never inside a ``tf.function``: the substitute keeps
      only Keras' own ``in_tf_graph_scope`` flag.
    - ``importlib.import_module``, which Keras' ``DynamicBackend`` (the preprocessing layers'
      ``self.backend``: ``Rescaling`` in ``MobileNetV3``) calls on every attribute read, and
      which dynamo refuses to trace. For Keras' backend modules already imported it returns
      the module, which is what ``import_module`` returns; any other call is Python's own
      (dynamo breaks the graph there, as before).
    """
    global _SHIMS_INSTALLED
    if _SHIMS_INSTALLED:
        return
    _SHIMS_INSTALLED = True
    try:
        torch_nn, torch_numpy = _private.keras_torch_backend_modules()

        private = _private.keras_functions_to_substitute()
        backend_utils = _private.keras_backend_utils_module()
        torch_random, torch_rnn = _private.keras_torch_random_and_rnn_modules()
        substitutes = [
            (torch_random.dropout, _traceable_dropout(torch_random, private)),
            (torch_rnn.rnn, _unrolled_rnn(torch_rnn.rnn)),
            (torch_numpy.max, _traceable_max(torch_numpy)),
            (torch_nn.binary_crossentropy, _traceable_binary_crossentropy(torch_nn)),
            (torch_nn.moments, _traceable_moments(torch_nn)),
            (private["can_use_flash_attention"], _traceable_can_use_flash_attention()),
            (private["dict_to_ordered_dict"], _traceable_dict_to_ordered_dict()),
            (backend_utils.in_tf_graph, _traceable_in_tf_graph(backend_utils)),
            (importlib.import_module, _traceable_import_module()),
        ]
    except (ImportError, AttributeError) as error:  # another Keras: say so, trace as it is
        warnings.warn(
            f"Could not prepare the dynamo substitutes for Keras ops ({error}); compiled steps "
            "may have graph breaks.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for original, substitute in substitutes:
        try:
            torch.compiler.substitute_in_graph(original)(substitute)
        except (TypeError, ValueError, AttributeError) as error:  # another torch or Keras
            warnings.warn(
                f"Could not register the dynamo substitute for {original.__name__} ({error}); "
                "compiled steps that use it may have graph breaks.",
                RuntimeWarning,
                stacklevel=2,
            )


def _traceable_max(torch_numpy: Any) -> Callable[..., Any]:
    convert_to_tensor = torch_numpy.convert_to_tensor
    to_torch_dtype = torch_numpy.to_torch_dtype
    amax = torch_numpy.amax

    def traceable_max(x: Any, axis: Any = None, keepdims: bool = False, initial: Any = None) -> Any:
        x = convert_to_tensor(x)
        if 0 in x.shape:
            if initial is None:
                raise ValueError("Cannot compute the max of an empty tensor.")
            if keepdims:
                return torch.full((1,) * len(x.shape), initial)
            return torch.tensor(initial)
        result = torch.max(x) if axis is None else amax(x, axis=axis, keepdims=keepdims)
        if initial is not None:
            dtype = to_torch_dtype(result.dtype)
            initial = convert_to_tensor(initial, dtype=dtype)
            return torch.maximum(result, torch.full(result.shape, initial, dtype=dtype))
        return result

    return traceable_max


def _traceable_moments(torch_nn: Any) -> Callable[..., Any]:
    convert_to_tensor = torch_nn.convert_to_tensor
    standardize_dtype = torch_nn.backend.standardize_dtype
    cast = torch_nn.cast

    def traceable_moments(
        x: Any, axes: Any, keepdims: bool = False, synchronized: bool = False
    ) -> Any:
        if synchronized:
            raise NotImplementedError("Argument synchronized=True is not supported with PyTorch.")
        if isinstance(axes, list):  # a Keras TrackedList (layer attribute) dynamo cannot pass
            axes = tuple(axes)
        x = convert_to_tensor(x)
        ori_dtype = standardize_dtype(x.dtype)
        need_cast = ori_dtype == "float16"
        if need_cast:
            x = cast(x, "float32")
        mean = torch.mean(x, dim=axes, keepdim=True)
        variance = torch.mean(torch.square(x), dim=axes, keepdim=True) - torch.square(mean)
        if not keepdims:
            mean = torch.squeeze(mean, axes)
            variance = torch.squeeze(variance, axes)
        if need_cast:
            low, high = torch.finfo(torch.float16).min, torch.finfo(torch.float16).max
            mean = cast(torch.clip(mean, low, high), ori_dtype)
            variance = cast(torch.clip(variance, low, high), ori_dtype)
        return mean, variance

    return traceable_moments


def _traceable_dropout(torch_random: Any, private: dict[str, Any]) -> Callable[..., Any]:
    seed_generator_class = torch_random.SeedGenerator
    draw_seed = torch_random.draw_seed
    get_device = torch_random.get_device
    concrete_noise_shape = private["concrete_noise_shape"]
    unseeded = _private.is_unseeded_generator

    def traceable_dropout(inputs: Any, rate: Any, noise_shape: Any = None, seed: Any = None) -> Any:
        if rate == 1.0:
            return torch.zeros_like(inputs, device=get_device())
        if rate == 0.0:
            return inputs
        if not (
            seed is not None and not unseeded(seed, seed_generator_class)
            or noise_shape is not None
        ):
            return torch.nn.functional.dropout(inputs, p=rate, training=True, inplace=False)
        keep_prob = 1.0 - rate
        shape = concrete_noise_shape(inputs, noise_shape)
        if isinstance(seed, seed_generator_class):  # SeedGenerator.next(), without numpy
            state = seed.state
            seeds = state.value * 1
            state.assign(state.value + torch.tensor([0, 1], dtype=state.value.dtype))
        else:
            seeds = draw_seed(seed)
        mask = uniform_from_seed(seeds, tuple(shape), inputs.device) < keep_prob
        mask = torch.broadcast_to(mask, inputs.shape)
        return torch.where(mask, inputs / keep_prob, torch.zeros_like(inputs, dtype=inputs.dtype))

    return traceable_dropout


def uniform_from_seed(seed: torch.Tensor, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    """Uniform [0, 1) float32 values from a Keras seed pair, by a SplitMix64 hash of the index.

    Pure tensor arithmetic (traceable): the same seed gives the same values.

    Example:
        >>> import torch
        >>> a = uniform_from_seed(torch.tensor([3, 1]), (1000,), "cpu")
        >>> bool(torch.equal(a, uniform_from_seed(torch.tensor([3, 1]), (1000,), "cpu")))
        True
        >>> bool(torch.equal(a, uniform_from_seed(torch.tensor([3, 2]), (1000,), "cpu")))
        False
        >>> 0.45 < float(a.mean()) < 0.55 and 0.0 <= float(a.min()) and float(a.max()) < 1.0
        True

    """
    count = 1
    for size in shape:
        count *= int(size)
    seed = seed.to(device=device, dtype=torch.int64)
    key = seed[0] * _GOLDEN + seed[1] * _MIX_2 + _MIX_1
    x = torch.arange(count, dtype=torch.int64, device=device) * _GOLDEN + key
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)  # SplitMix64's constants, as wrapping int64
_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_2 = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _unrolled_rnn(rnn: Callable[..., Any]) -> Callable[..., Any]:
    import types

    # a copy of Keras' function: the substitute calls it, and dynamo would substitute the
    # original again
    unrolled = types.FunctionType(
        rnn.__code__, rnn.__globals__, "rnn_unrolled", rnn.__defaults__, rnn.__closure__
    )
    unrolled.__kwdefaults__ = rnn.__kwdefaults__

    def traceable_rnn(
        step_function: Any,
        inputs: Any,
        initial_states: Any,
        go_backwards: bool = False,
        mask: Any = None,
        constants: Any = None,
        unroll: bool = False,
        input_length: Any = None,
        time_major: bool = False,
        zero_output_for_mask: bool = False,
        return_all_outputs: bool = True,
    ) -> Any:
        if go_backwards and mask is not None:
            # Keras' unrolled path cannot reverse a mask (torch.flip of a tuple): reverse the
            # sequence and its mask along time here and run it forwards, which is what
            # go_backwards does
            axis = 0 if time_major else 1
            inputs = keras.tree.map_structure(lambda t: torch.flip(t, dims=[axis]), inputs)
            mask = torch.flip(mask, dims=[axis])
            go_backwards = False
        return unrolled(
            step_function, inputs, initial_states, go_backwards=go_backwards, mask=mask,
            constants=constants, unroll=True, input_length=input_length, time_major=time_major,
            zero_output_for_mask=zero_output_for_mask, return_all_outputs=return_all_outputs,
        )

    return traceable_rnn


def _traceable_import_module() -> Callable[..., Any]:
    import sys
    import types

    original = importlib.import_module
    # a copy: calling the original from its substitute would be substituted again
    imported_by_python = types.FunctionType(
        original.__code__, original.__globals__, "import_module", original.__defaults__,
        original.__closure__,
    )

    # Keras' backend modules, the ones DynamicBackend imports (dynamo cannot read sys.modules)
    known = {
        name: module for name, module in sys.modules.items()
        if name.startswith("keras.src.backend.") and name.count(".") == 3
    }

    def traceable_import_module(name: str, package: str | None = None) -> Any:
        module = known.get(name)
        if module is not None:
            return module
        return imported_by_python(name, package)

    return traceable_import_module


def _traceable_in_tf_graph(backend_utils: Any) -> Callable[..., Any]:
    global_state = backend_utils.global_state

    def traceable_in_tf_graph() -> bool:
        return bool(global_state.get_global_attribute("in_tf_graph_scope", False))

    return traceable_in_tf_graph


def _traceable_can_use_flash_attention() -> Callable[..., Any]:
    def traceable_can_use_flash_attention(
        query: Any, key: Any, value: Any, mask: Any = None, is_causal: bool = False,
        raise_error: bool = False,
    ) -> bool:
        if raise_error:
            raise RuntimeError(
                "Flash attention is not supported with the provided inputs (in a graph "
                "compiled by jit_compile, flash attention is left to torch's dispatcher)."
            )
        return False

    return traceable_can_use_flash_attention


def _traceable_dict_to_ordered_dict() -> Callable[..., Any]:
    from collections import defaultdict

    pytree_node = _private.pytree_node

    def traceable_dict_to_ordered_dict(structure: Any) -> Any:
        kind = type(structure)
        if kind is dict:
            return {k: structure[k] for k in sorted(structure.keys())}
        if kind is defaultdict:
            return defaultdict(
                structure.default_factory, {k: structure[k] for k in sorted(structure.keys())}
            )
        node = pytree_node(structure)
        if node is None:
            return structure  # a leaf
        children, context = node.flatten_fn(structure)
        return node.unflatten_fn(
            [traceable_dict_to_ordered_dict(child) for child in children], context
        )

    return traceable_dict_to_ordered_dict


def _traceable_binary_crossentropy(torch_nn: Any) -> Callable[..., Any]:
    convert_to_tensor = torch_nn.convert_to_tensor
    epsilon = torch_nn.backend.epsilon
    mps = bool(torch.backends.mps.is_available())
    functional = torch.nn.functional

    def traceable_binary_crossentropy(target: Any, output: Any, from_logits: bool = False) -> Any:
        target = convert_to_tensor(target)
        output = convert_to_tensor(output)
        if (
            mps
            and target.ndim > 1
            and output.ndim == target.ndim
            and target.shape[-1] == 1
            and output.shape[-1] == 1
        ):
            target = torch.squeeze(target, -1).contiguous()
            output = torch.squeeze(output, -1).contiguous()
        if target.shape != output.shape:
            raise ValueError(
                "Arguments `target` and `output` must have the same shape. Received: "
                f"target.shape={target.shape}, output.shape={output.shape}"
            )
        if from_logits:
            return functional.binary_cross_entropy_with_logits(output, target, reduction="none")
        output = torch.clip(output, epsilon(), 1.0 - epsilon())
        return functional.binary_cross_entropy(output, target, reduction="none")

    return traceable_binary_crossentropy


def drop_no_op_conversions(graph_module: torch.fx.GraphModule) -> int:
    """Remove the ``x.to(...)`` calls that return ``x`` itself, and unused ``x.is_meta`` reads.

    Keras' torch backend converts every operand (``convert_to_tensor``: ``.to(device)``,
    ``.to(dtype)``) and probes ``is_meta``; dynamo records those calls, and on the guides' MLP
    they were 60 of the graph's 91 nodes. A ``.to()`` whose input already has the output's
    dtype and device returns that same tensor (no copy, no autograd node), so using the input
    instead changes nothing; a ``.to()`` that converts, or asks for a copy, stays. The dtypes
    and devices are those dynamo recorded while tracing, for which the graph's guards hold.
    Returns the number of nodes removed.

    Example:
        >>> import torch
        >>> def f(x):
        ...     return (x.to(torch.float32).to("cpu") * 2).to(torch.float64)
        >>> graph = torch.fx.symbolic_trace(f)
        >>> x = torch.ones(2)
        >>> for node in graph.graph.nodes:  # what dynamo records on each node
        ...     converts = node.op == "call_method" and node.args[1] is torch.float64
        ...     node.meta["example_value"] = x.double() if converts else x
        >>> drop_no_op_conversions(graph)
        2
        >>> graph(x).dtype
        torch.float64

    """
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_method" and node.target == "to" and _returns_its_input(node):
            node.replace_all_uses_with(node.args[0])
        elif not (
            node.op == "call_function"
            and node.target is getattr
            and node.args[1:] == ("is_meta",)
        ):
            continue
        if not node.users:
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.recompile()
    return removed


def _returns_its_input(node: torch.fx.Node) -> bool:
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or node.kwargs.get("copy"):
        return False
    before, after = source.meta.get("example_value"), node.meta.get("example_value")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    if any(isinstance(arg, bool) and arg for arg in node.args[1:]):
        return False  # .to(dtype, non_blocking, copy=True) given positionally
    if "memory_format" in node.kwargs:
        return False
    return before.dtype == after.dtype and before.device == after.device


def _eager_without_no_op_conversions(
    graph_module: torch.fx.GraphModule, example_inputs: Any
) -> Callable[..., Any]:
    """Dynamo's ``"eager"`` backend, run on the graph without its no-op conversions."""
    drop_no_op_conversions(graph_module)
    return graph_module.forward


def _compile(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    target = _eager_without_no_op_conversions if backend == "eager" else backend
    return torch.compile(fn, backend=target)


def _dynamo_totals() -> tuple[int, int]:
    counters = _private.dynamo_counters()
    return int(counters["frames"]["total"]), int(sum(counters["graph_break"].values()))


@dataclass
class CompileStats:
    """What dynamo did for one compiled step.

    Attributes:
        backend: The ``torch.compile`` backend.
        calls: Calls of the compiled step.
        frames_compiled: Frames dynamo compiled during those calls: one per distinct call
            signature (e.g. ``training`` on or off), plus one per recompile and per graph break.
        graph_breaks: Graph breaks dynamo reported during those calls.
        signatures: Distinct ``(training, input shapes)`` seen; a change of batch size (the
            last, smaller batch of an epoch) costs one recompile, after which the batch
            dimension is dynamic.
        fallback: Why the step fell back to eager, or None.
        graph_break_reasons: The reasons dynamo gave for the graph breaks.

    """

    backend: str
    calls: int = 0
    frames_compiled: int = 0
    graph_breaks: int = 0
    signatures: int = 0
    fallback: str | None = None
    graph_break_reasons: list[str] = field(default_factory=list)


class CompiledStep:
    """``fn`` compiled with ``torch.compile(backend=...)``, falling back to ``fn`` on failure.

    Args:
        fn: The function to compile, e.g. the forward pass and loss of a step.
        backend: A name from :data:`COMPILE_BACKENDS`.

    Example:
        >>> import torch
        >>> step = CompiledStep(lambda x: (x * 2).sum(), backend="eager")
        >>> float(step(torch.ones(3)))
        6.0
        >>> step.stats.calls, step.stats.graph_breaks
        (1, 0)

    """

    def __init__(self, fn: Callable[..., Any], backend: str) -> None:
        if backend not in COMPILE_BACKENDS:
            resolve_compile(backend)
        install_dynamo_shims()
        self._eager = fn
        self._compiled: Callable[..., Any] | None = _compile(fn, backend)
        self._signatures: set[Any] = set()
        self.stats = CompileStats(backend=backend)

    def __getstate__(self) -> dict[str, Any]:
        # A torch.compile'd function does not pickle (ddp_spawn, deepcopy): compile again.
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.stats.fallback is None:
            self._compiled = _compile(self._eager, self.stats.backend)

    @property
    def active(self) -> bool:
        """False once the step has fallen back to eager."""
        return self._compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled ``fn`` (eager ``fn`` after a fallback); count what dynamo did."""
        compiled = self._compiled
        if compiled is None:
            return self._eager(*args, **kwargs)
        self.stats.calls += 1
        frames, breaks = _dynamo_totals()
        try:
            result = compiled(*args, **kwargs)
        except KerasLightningError:
            raise  # a user error (bad batch, bad loss): eager would raise it just the same
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            self._fall_back(error)
            return self._eager(*args, **kwargs)
        new_frames, new_breaks = _dynamo_totals()
        if new_frames != frames:
            self._record_compile(new_frames - frames, new_breaks - breaks, args, kwargs)
        return result

    def _record_compile(self, frames: int, breaks: int, args: Any, kwargs: Any) -> None:
        self.stats.frames_compiled += frames
        self.stats.graph_breaks += breaks
        self._signatures.add(_signature(args, kwargs))
        self.stats.signatures = len(self._signatures)
        if breaks:
            self.stats.graph_break_reasons = sorted(_private.dynamo_counters()["graph_break"])

    def _fall_back(self, error: BaseException) -> None:
        self._compiled = None
        self.stats.fallback = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"torch.compile(backend={self.stats.backend!r}) could not compile the Keras step "
            f"({type(error).__name__}: {str(error)[:300]}); running it eagerly from now on. "
            "Pass jit_compile=False to KerasLightningModule to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )


def _signature(args: Any, kwargs: Any) -> Any:
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, list | tuple):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, describe(v)) for k, v in value.items()))
        return value if isinstance(value, bool | int | float | str | None) else type(value)

    return describe((args, kwargs))
