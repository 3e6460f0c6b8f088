"""Private Keras / Lightning / torch internals: used only in ``_private.py``, each one tested.

The scan keeps every private access in one place; the tests below check each named function
of ``_private`` against what it stands for on the installed versions, so a release that moves
a name fails here, by name.
"""

from __future__ import annotations

import keras_lightning as kl
from keras_lightning import _private

import ast
import copy
import inspect
from pathlib import Path

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp

PACKAGE = Path(kl.__file__).parent
# torch's foreach ops are what torch.optim and Keras' own torch optimizers call; the exact
# fast update (fast_update.py) must run the same ops to stay bit-identical.
ALLOWED_PREFIXES = ("_foreach_",)


def _sources() -> dict[str, ast.AST]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _own_private_names(trees: dict[str, ast.AST]) -> set[str]:
    """Underscored names this package defines: its functions, classes and attributes."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {name for name in names if name.startswith("_")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(module: str) -> bool:
    if module.startswith("keras_lightning"):
        return False
    return ".src" in module or any(_is_private(part) for part in module.split("."))


def _violations() -> list[str]:
    trees = _sources()
    own = _own_private_names(trees)
    found = []
    for where, tree in trees.items():
        if where == "_private.py":
            continue
        for node in ast.walk(tree):
            line = f"{where}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module:
                if _private_module(node.module):
                    found.append(f"{line} imports {node.module}")
                elif not node.module.startswith("keras_lightning"):
                    found += [
                        f"{line} imports {node.module}.{a.name}"
                        for a in node.names
                        if _is_private(a.name)
                    ]
            elif isinstance(node, ast.Import):
                found += [
                    f"{line} imports {a.name}" for a in node.names if _private_module(a.name)
                ]
            elif isinstance(node, ast.Attribute) and _is_private(node.attr):
                if node.attr not in own and not node.attr.startswith(ALLOWED_PREFIXES):
                    found.append(f"{line} reads .{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _is_private(node.args[1].value)
                and node.args[1].value not in own
            ):
                found.append(f"{line} reads .{node.args[1].value} by name")
    return found


def test_private_internals_are_touched_only_in_private_py():
    assert _violations() == []


def test_the_scan_finds_private_access():
    # The scan itself must be able to fail: run it over a source that reaches in.
    tree = ast.parse(
        "from keras.src.losses import x\nimport torch._dynamo\n"
        "def f(model):\n    return model._flatten_layers(), getattr(model, '_value')\n"
    )
    own: set[str] = set()
    hits = [
        n
        for n in ast.walk(tree)
        if (isinstance(n, ast.ImportFrom) and _private_module(n.module or ""))
        or (isinstance(n, ast.Import) and any(_private_module(a.name) for a in n.names))
        or (isinstance(n, ast.Attribute) and _is_private(n.attr) and n.attr not in own)
        or (isinstance(n, ast.Constant) and n.value == "_value")
    ]
    assert len(hits) == 4


def test_private_py_imports_nothing_private_at_import_time():
    tree = ast.parse((PACKAGE / "_private.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    for node in top_level:
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        assert not _private_module(module or ""), module


def test_every_private_function_is_tested_here():
    source = Path(__file__).read_text()
    untested = [name for name in _private.iter_private_names() if f"_private.{name}(" not in source]
    assert untested == []


# ---------------------------------------------------------------------- each function


def _dropout_model() -> keras.Model:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    outputs = keras.layers.Dropout(0.5, seed=1)(hidden)
    return keras.Model(inputs, outputs)


def test_parameter_of_is_the_parameter_autograd_writes_to():
    model = mlp(hidden=3)
    variable = model.trainable_variables[0]
    param = _private.parameter_of(variable)
    assert isinstance(param, torch.nn.Parameter)
    assert any(param is p for p in model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    assert param.grad is not None


def test_flatten_layers_and_seed_generators():
    model = _dropout_model()
    layers = _private.flatten_layers(model)
    assert layers[0] is model and {type(layer).__name__ for layer in layers[1:]} >= {
        "Dense",
        "Dropout",
    }
    (dropout,) = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    (generator,) = _private.seed_generators_of(dropout)
    assert isinstance(generator, keras.random.SeedGenerator)
    assert _private.seed_generators_of(model.layers[1]) == []


def test_weights_that_can_train_keep_frozen_weights_and_drop_state():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dropout(0.5)]
    )
    dense, batchnorm = model.layers[0], model.layers[1]
    dense.trainable = False  # frozen: still a weight that can train
    found = _private.weights_that_can_train(model)
    expected = [dense.kernel, dense.bias, batchnorm.gamma, batchnorm.beta]
    assert [id(v) for v in found] == [id(v) for v in expected]
    assert model.trainable_weights == [batchnorm.gamma, batchnorm.beta]  # the public lists differ
    assert len(model.variables) == 7  # + moving mean, moving variance, the seed state


def test_compile_config_holds_the_compile_arguments():
    model = mlp(hidden=3)
    assert _private.compile_config(model) == {}
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"], loss_weights=[2.0])
    config = _private.compile_config(model)
    assert config["loss"] == "mse" and config["metrics"] == ["mae"]
    assert config["loss_weights"] == [2.0]


def test_keras_fit_trackers_are_what_compile_made_for_keras_own_loop():
    model = mlp(hidden=3)
    assert _private.keras_fit_trackers(model) == []
    model.compile(optimizer="sgd", loss=["mse"], metrics=["mae"])
    trackers = _private.keras_fit_trackers(model)
    assert [m.name for m in trackers][:2] == ["loss", "compile_metrics"]
    assert all(any(t is m for m in model.metrics) for t in trackers)


def test_track_variables_registers_variables_added_after_the_build():
    model = mlp(hidden=3)
    assert _private.track_variables(model) is False  # all registered already
    model.layers[0].enable_lora(2)  # new variables after the build
    names = {name for name, _ in model.named_parameters()}
    assert not any("lora" in name for name in names)
    assert _private.track_variables(model) is True
    params = {id(p) for p in model.parameters()}
    assert all(id(_private.parameter_of(v)) in params for v in model.variables)
    assert any("lora" in name for name, _ in model.named_parameters())


def test_keras_mask_of_and_with_keras_mask_carry_an_embedding_mask():
    embedding = keras.layers.Embedding(5, 2, mask_zero=True)
    output = embedding(torch.tensor([[1, 0, 3]]))
    mask = _private.keras_mask_of(output)
    assert mask.tolist() == [[True, False, True]]
    assert _private.keras_mask_of(output.detach()) is None  # detaching drops it
    assert _private.keras_mask_of(_private.with_keras_mask(output.detach(), mask)) is mask
    plain = torch.ones(1)
    assert _private.with_keras_mask(plain, None) is plain


def test_symbolic_build_creates_variables_without_moving_random_state():
    class Noisy(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)
            self.seed = keras.random.SeedGenerator(3)

        def call(self, x):
            return self.dense(x + keras.random.normal(keras.ops.shape(x), seed=self.seed))

    for compiled in (False, True):
        model = Noisy()
        if compiled:
            model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        before = model.seed.state.value.tolist()
        _private.symbolic_build(model, (torch.ones(4, 3), torch.ones(4, 2)), compiled)
        assert [tuple(v.shape) for v in model.dense.weights] == [(3, 2), (2,)]
        assert len(list(model.parameters())) == len(model.variables)  # torch sees them
        assert model.seed.state.value.tolist() == before
        model(torch.ones(4, 3))  # an eager call draws
        assert model.seed.state.value.tolist() != before


def test_keras_default_device_name_is_where_keras_puts_tensors():
    assert torch.device(_private.keras_default_device_name()).type == keras.ops.ones(1).device.type


def test_keras_torch_backend_modules():
    torch_nn, torch_numpy = _private.keras_torch_backend_modules()
    assert callable(torch_nn.moments) and callable(torch_numpy.max)
    assert float(torch_numpy.max(torch.tensor([1.0, 3.0]))) == 3.0


def test_global_seed_generator_is_the_one_keras_random_uses():
    generator = _private.global_seed_generator(create=True)
    assert _private.global_seed_generator(create=False) is generator
    before = generator.state.value.clone()
    keras.random.uniform((2,))  # no seed: draws from the global generator
    assert not torch.equal(generator.state.value, before)


def test_safe_mode_scope_refuses_lambda_layers():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2)])
    config = keras.saving.serialize_keras_object(model)
    with pytest.raises(ValueError, match="safe_mode"), _private.safe_mode_scope(True):
        keras.saving.deserialize_keras_object(config)
    with _private.safe_mode_scope(False):
        rebuilt = keras.saving.deserialize_keras_object(config)
    assert float(rebuilt(torch.ones(1, 2))[0, 0]) == 2.0


def test_loss_function_wrapper_calls_fn_in_keras_order():
    loss = _private.loss_function_wrapper(lambda y_true, y_pred: y_true - y_pred, "diff")
    assert isinstance(loss, keras.losses.Loss) and loss.name == "diff"
    assert float(loss(torch.tensor([[3.0]]), torch.tensor([[1.0]]))) == 2.0


def test_loss_and_metric_names_are_what_keras_get_accepts():
    losses, metrics = _private.keras_loss_names(), _private.keras_metric_names()
    assert {"mse", "categorical_crossentropy", "huber"} <= set(losses)
    assert {"accuracy", "mae", "auc"} <= set(metrics) or {"accuracy", "mae"} <= set(metrics)
    for name in losses[:5]:
        keras.losses.get(name)
    for name in metrics[:5]:
        keras.metrics.get(name)


def test_compile_loss_and_metric_resolve_from_shapes_as_compile_does():
    y_sparse, y_pred = torch.tensor([[1], [0]]), torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    loss = _private.compile_loss("crossentropy", y_sparse, y_pred)
    assert loss.fn is keras.losses.sparse_categorical_crossentropy
    metric = _private.compile_metric("accuracy", y_sparse, y_pred)
    assert isinstance(metric, keras.metrics.SparseCategoricalAccuracy)


def _built_adam(model: keras.Model) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.Adam(0.1, amsgrad=True)
    optimizer.build(model.trainable_variables)
    return optimizer


def test_learning_rate_spec_and_current_learning_rate():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([keras.Variable([1.0])])
    assert _private.learning_rate_spec(optimizer) is schedule
    optimizer.iterations.assign(2)
    assert float(_private.current_learning_rate(optimizer)) == pytest.approx(0.25)


def test_optimizer_variables_updated_and_knows():
    model = mlp(hidden=3)
    optimizer = _built_adam(model)
    assert _private.optimizer_variables_updated(optimizer) == list(model.trainable_variables)
    assert _private.optimizer_knows(optimizer, model.trainable_variables)
    assert not _private.optimizer_knows(optimizer, mlp(hidden=3).trainable_variables)


def test_uses_base_apply():
    assert _private.uses_base_apply(keras.optimizers.Adam())
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    assert not _private.uses_base_apply(scaled)


def _apply_both_ways(kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    results = []
    for use_backend in (False, True):
        keras.utils.set_random_seed(0)
        model = mlp(hidden=3)
        optimizer = keras.optimizers.Adam(0.1) if kind == "adam" else keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
        grads = [torch.full_like(_private.parameter_of(v), 0.5) for v in model.trainable_variables]
        with torch.no_grad():
            if use_backend:
                _private.backend_apply_gradients(optimizer, grads, model.trainable_variables)
            else:
                optimizer.apply(grads, model.trainable_variables)
        assert int(optimizer.iterations) == 1
        results.append([v.numpy() for v in model.trainable_variables])
    return results[0], results[1]


def test_backend_apply_gradients_is_apply_without_its_set_up():
    applied, backend = _apply_both_ways("adam")
    for a, b in zip(applied, backend, strict=True):
        np.testing.assert_array_equal(a, b)


def test_iterations_parameter_and_weight_decay():
    variable = keras.Variable(np.ones(3, dtype="float32"))
    optimizer = keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.1)
    optimizer.build([variable])
    _private.iterations_parameter(optimizer).add_(1)
    assert int(optimizer.iterations) == 1
    with torch.no_grad():
        _private.apply_weight_decay(optimizer, [variable])
    np.testing.assert_allclose(variable.numpy(), 1 - 0.5 * 0.1, rtol=1e-6)


def test_adam_and_sgd_slots():
    model = mlp(hidden=3)
    variables = model.trainable_variables
    momentums, velocities, hats = _private.adam_slots(_built_adam(model), variables)
    assert [tuple(m.shape) for m in momentums] == [tuple(v.shape) for v in variables]
    assert len(velocities) == len(hats) == len(variables)
    sgd = keras.optimizers.SGD(momentum=0.9)
    sgd.build(variables)
    assert len(_private.sgd_slots(sgd, variables)) == len(variables)
    plain = keras.optimizers.SGD()
    plain.build(variables)
    assert _private.sgd_slots(plain, variables) == []


def test_direct_update_kind_and_source_digest():
    assert _private.direct_update_kind(keras.optimizers.Adam()) == "adam"
    assert _private.direct_update_kind(keras.optimizers.AdamW()) == "adam"
    assert _private.direct_update_kind(keras.optimizers.SGD()) == "sgd"
    assert _private.direct_update_kind(keras.optimizers.RMSprop()) is None

    class Tweaked(keras.optimizers.Adam):
        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            return super()._backend_update_step(grads, trainable_variables, learning_rate)

    assert _private.direct_update_kind(Tweaked()) is None
    assert _private.source_digest(_private.source_digest) != _private.source_digest(
        _private.direct_update_kind
    )
    assert _private.source_digest(len) is None  # a builtin has no source


def test_a_changed_keras_update_body_is_not_taken_for_the_checked_one(monkeypatch):
    # The digest, not the method's identity, decides: a Keras whose Adam body differs from
    # the one fast_update.py copies gets no "adam" path.
    monkeypatch.setitem(_private.CHECKED_UPDATE_BODIES, "adam", frozenset({"not-this-body"}))
    assert _private.direct_update_kind(keras.optimizers.Adam()) is None
    model = mlp(hidden=3)
    adapter = kl.KerasOptimizer(keras.optimizers.Adam(), model.trainable_variables)
    for _ in range(2):
        adapter.zero_grad()
        model(torch.ones(2, 64)).sum().backward()
        adapter.step()
    assert adapter.update_path == "short"


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.writes: list[bool] = []
        self.dataloaders = None
        self.mid_epoch: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert _private.fitting(trainer)
        self.writes.append(_private.logger_writes_this_step(trainer))
        self.dataloaders = _private.stage_dataloaders(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mid_epoch.append(_private.mid_epoch(trainer))

    def on_train_epoch_end(self, trainer, pl_module):
        self.mid_epoch.append(_private.mid_epoch(trainer))


def test_lightning_internals_on_a_real_trainer(tmp_path):
    module = kl.KerasLightningModule(mlp(hidden=3), optimizer="sgd", loss="mse")
    assert _private.attached_trainer(module) is None
    recorder = _Recorder()
    data = loader(torch.randn(16, 64), torch.randn(16, 10), batch_size=2)
    trainer = make_trainer(
        max_epochs=1, callbacks=[recorder], logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=3,
    )
    assert _private.chosen_checkpoint_io(trainer.strategy) is None  # nothing chosen yet
    trainer.fit(module, data)
    assert _private.attached_trainer(module) is trainer
    # Lightning's loggers write when (step + 1) % log_every_n_steps == 0
    assert recorder.writes == [(step + 1) % 3 == 0 for step in range(8)]
    assert recorder.dataloaders is data
    # between batches of the epoch: mid-epoch; after its last batch and at its end: not
    assert recorder.mid_epoch == [True] * 7 + [False, False]
    assert _private.mid_epoch(None) is False and _private.fitting(None) is False
    trainer.validate(module, data, verbose=False)
    assert not _private.fitting(trainer)
    step = trainer.global_step
    _private.count_manual_optimizer_step(trainer)
    assert trainer.global_step == step  # counted under manual optimization only
    assert trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed == 1
    # a fast-mode update counts on both counters; a manual counter behind the automatic one
    # (an eager run's checkpoint, resumed in fast mode) catches up
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    before = automatic.completed
    _private.count_whole_step(trainer)
    assert automatic.completed == before + 1
    assert epoch_loop.manual_optimization.optim_step_progress.total.completed == 2
    _private.align_step_counters(trainer)
    assert epoch_loop.manual_optimization.optim_step_progress.total.completed == before + 1


def test_checkpoint_reader_and_module_state(tmp_path):
    module = kl.KerasLightningModule(mlp(hidden=3), optimizer="sgd", loss="mse")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, loader(torch.randn(4, 64), torch.randn(4, 10), batch_size=2))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = _private.load_checkpoint_file(path, "cpu", True)
    assert checkpoint["global_step"] == trainer.global_step
    restored = _private.restore_module_state(
        kl.KerasLightningModule, checkpoint, strict=True, model=mlp(hidden=3),
        optimizer="sgd", loss="mse",
    )
    for ours, theirs in zip(
        module.model.get_weights(), restored.model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_torch_internals():
    assert _private.is_torch_loss_module(torch.nn.CrossEntropyLoss())
    assert not _private.is_torch_loss_module(torch.nn.functional.cross_entropy)
    assert not _private.is_torch_loss_module(torch.nn.Linear(1, 1))
    assert _private.in_bad_cuda_fork() is False  # this process was not forked from CUDA
    counters = _private.dynamo_counters()
    before = int(counters["frames"]["total"])
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: t * 3, backend="eager")
    assert float(compiled(torch.ones(1))) == 3.0
    assert int(_private.dynamo_counters()["frames"]["total"]) > before


def test_iter_private_names_lists_the_public_functions():
    names = set(_private.iter_private_names())
    assert {"parameter_of", "direct_update_kind", "count_manual_optimizer_step"} <= names
    assert all(inspect.isfunction(getattr(_private, n)) for n in names)


def test_use_summary_replaces_one_callbacks_summary_once():
    import lightning as L
    from lightning.pytorch.callbacks import ModelSummary

    class Marker:
        def __init__(self, module, max_depth):
            self.module, self.max_depth = module, max_depth

    callback, other = ModelSummary(max_depth=3), ModelSummary()
    _private.use_summary(callback, Marker)
    first = callback._summary
    _private.use_summary(callback, Marker)
    assert callback._summary is first  # a second call changes nothing
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    made = callback._summary(trainer, "module")
    assert isinstance(made, Marker) and made.max_depth == 3 and made.module == "module"
    assert "_summary" not in vars(other)  # other callbacks keep Lightning's


def test_refresh_average_model_copies_a_module_whose_copy_has_no_model():
    import keras_lightning as kl

    from lightning.pytorch.callbacks import StochasticWeightAveraging

    module = kl.KerasLightningModule(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    swa = StochasticWeightAveraging(swa_lrs=0.1)
    swa._average_model = copy.deepcopy(module)  # what Lightning's setup does, before the build
    _private.refresh_average_model(swa, module)
    assert swa._average_model.model is None  # the module itself is not built yet either
    module._build_model()
    _private.refresh_average_model(swa, module)
    built = swa._average_model
    assert built.model is not None and built.model is not module.model
    _private.refresh_average_model(swa, module)
    assert swa._average_model is built  # a copy that has its model is kept


def test_registered_slots_follow_registered_and_replace_variable_tensors():
    model = mlp(hidden=3)
    slots = _private.registered_slots(model)
    assert [v for v, _, _ in slots] == list(model.variables)
    variable, module, name = slots[0]
    assert module._parameters[name] is _private.parameter_of(variable)
    swapped = torch.nn.Parameter(torch.zeros(tuple(variable.shape)))
    module._parameters[name] = swapped  # what FSDP2 does between shard and gathered weight
    _private.follow_registered(slots)
    assert _private.parameter_of(variable) is swapped
    again = torch.nn.Parameter(torch.ones(tuple(variable.shape)))
    _private.replace_variable_tensors(model, {0: again})
    assert _private.parameter_of(model.variables[0]) is again
    assert any(p is again for p in model.parameters())


def test_local_shard_and_tensor_parallel_size():
    from lightning.pytorch.strategies import ModelParallelStrategy

    plain = torch.ones(3)
    assert _private.local_shard(plain) is plain
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    assert _private.tensor_parallel_size(strategy) == 1
    assert _private.tensor_parallel_size(ModelParallelStrategy()) == "auto"


def test_tracing_autograd_and_forget_compiled():
    import torch._dynamo

    weight = torch.ones(3, requires_grad=True)

    def grad_of(x):
        return torch.autograd.grad((weight * x).sum(), [weight])[0]

    with _private.tracing_autograd():
        assert torch._dynamo.config.trace_autograd_ops
        compiled = torch.compile(grad_of, backend="eager", fullgraph=True)
        assert torch.equal(compiled(torch.full((3,), 2.0)), torch.full((3,), 2.0))
    assert not torch._dynamo.config.trace_autograd_ops
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    assert len(_debug_get_cache_entry_list(grad_of.__code__)) == 1
    _private.forget_compiled(grad_of)
    assert len(_debug_get_cache_entry_list(grad_of.__code__)) == 0


def test_keras_modules_the_dynamo_substitutes_replace():
    random, rnn = _private.keras_torch_random_and_rnn_modules()
    assert callable(random.dropout) and callable(rnn.rnn)  # modules, not the rnn function
    assert callable(_private.keras_torchtree_module()._dict_to_ordered_dict)
    assert _private.keras_backend_utils_module().in_tf_graph() is False


def test_pytree_helpers_round_trip_and_name_nodes():
    tree = ({"b": torch.ones(1), "a": [torch.zeros(2), None]}, 3)
    leaves, spec = _private.tree_flatten(tree)
    assert len(leaves) == 4 and leaves[2] is None  # dict keys sorted: a's list, then b
    rebuilt = _private.tree_unflatten(leaves, spec)
    assert rebuilt[1] == 3 and torch.equal(rebuilt[0]["a"][0], torch.zeros(2))
    assert _private.pytree_node(torch.ones(1)) is None
    children, _ = _private.pytree_node([1, 2]).flatten_fn([1, 2])
    assert list(children) == [1, 2]


def test_graph_compiler_and_the_functions_substituted():
    graph = torch.fx.symbolic_trace(lambda x: x * 2)
    compiled = _private.graph_compiler("eager")(graph, [torch.ones(2)])
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
    assert callable(_private.graph_compiler("inductor"))
    functions = _private.keras_functions_to_substitute()
    assert set(functions) == {"can_use_flash_attention", "dict_to_ordered_dict",
                              "concrete_noise_shape"}
    assert functions["dict_to_ordered_dict"]({"b": 1, "a": 2}) == {"a": 2, "b": 1}
    seeded, unseeded = keras.random.SeedGenerator(3), keras.random.SeedGenerator()
    assert not _private.is_unseeded_generator(seeded, keras.random.SeedGenerator)
    assert _private.is_unseeded_generator(unseeded, keras.random.SeedGenerator)


def test_is_dynamo_error_tells_compiler_errors_from_the_steps_own():
    def breaks(x):
        return x * (2.0 if float(x.sum()) > 0 else 1.0)

    try:
        torch.compile(breaks, backend="eager", fullgraph=True)(torch.ones(2))
    except Exception as error:  # noqa: BLE001 - the graph break under fullgraph
        assert _private.is_dynamo_error(error)
    else:
        raise AssertionError("fullgraph did not refuse the data-dependent branch")
    assert not _private.is_dynamo_error(ValueError("a bad batch"))
    assert not _private.is_dynamo_error(kl.ConfigurationError("bad"))
