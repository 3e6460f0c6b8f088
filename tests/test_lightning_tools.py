"""Lightning tools a Lightning user reaches for, on a Keras model, next to a plain LightningModule."""

from __future__ import annotations

import keras_lightning as kl

import keras
import lightning as L
import numpy as np
import pytest
import torch
from conftest import loader, make_trainer, mlp
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner


def _classification(n: int = 256, seed: int = 0) -> torch.utils.data.DataLoader:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype("float32")
    y = (x[:, :10].argmax(1)).astype("int64")
    return loader(x, y, batch_size=8)


def _module(optimizer, **kwargs) -> kl.KerasLightningModule:
    return kl.KerasLightningModule(
        mlp(hidden=16), optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs,
    )


class _Plain(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, kl.KerasOptimizer):
            self.seen.append(float(keras.ops.convert_to_numpy(optimizer.keras_optimizer.learning_rate)))
        else:
            self.seen.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize(
    "optimizer", [lambda: keras.optimizers.Adam(1e-3), lambda: torch.optim.Adam], ids=["keras", "torch"]
)
def test_lr_find_reaches_the_optimizer_and_the_next_fit_trains_at_the_suggestion(tmp_path, optimizer):
    # The reference: a plain LightningModule with self.lr trains at the suggestion.
    plain = _Plain()
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    found = Tuner(trainer).lr_find(plain, _classification(), min_lr=1e-5, max_lr=1.0, num_training=30)
    assert plain.lr == found.suggestion()

    module = _module(optimizer())
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    result = Tuner(trainer).lr_find(module, _classification(), min_lr=1e-5, max_lr=1.0, num_training=30)
    lrs, losses = result.results["lr"], result.results["loss"]
    assert len(lrs) == 30 and lrs[0] < lrs[-1]
    assert np.std(losses) > 0  # the curve moves with the learning rate
    suggestion = result.suggestion()
    assert module.learning_rate == suggestion
    recorder = _LearningRates()
    make_trainer(max_epochs=1, callbacks=[recorder]).fit(module, _classification())
    assert recorder.seen and all(lr == pytest.approx(suggestion, rel=1e-6) for lr in recorder.seen)


def test_learning_rate_reads_the_configured_optimizer():
    assert _module(keras.optimizers.SGD(0.05)).learning_rate == pytest.approx(0.05)
    assert _module("adam").learning_rate == pytest.approx(keras.optimizers.Adam().learning_rate.numpy())
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    module = _module(keras.optimizers.SGD(schedule))
    assert module.learning_rate is None
    module.learning_rate = 0.3
    with pytest.raises(kl.ConfigurationError, match=r"learning_rate=0.3 was set .* LearningRateSchedule"):
        make_trainer(max_epochs=1).fit(module, _classification())


def test_validate_then_fit_under_inference_mode():
    # Lightning's default Trainer(inference_mode=True): evaluation state built under
    # inference mode must stay usable by training afterwards, as for a plain module.
    module = _module("adam", metrics=["accuracy"])
    trainer = make_trainer(max_epochs=1, inference_mode=True)
    (before,) = trainer.validate(module, _classification(), verbose=False)
    trainer = make_trainer(max_epochs=2, inference_mode=True)
    trainer.fit(module, _classification(), _classification(seed=1))
    (after,) = trainer.validate(module, _classification(), verbose=False)
    assert after["val_loss"] < before["val_loss"]


class _BarePrinter(ProgressBar):
    """The documented pattern: a progress bar built on Lightning's base class."""

    def __init__(self) -> None:
        super().__init__()
        self.enable = True
        self.shown: list[dict] = []

    def disable(self) -> None:
        self.enable = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.shown.append(dict(self.get_metrics(trainer, pl_module)))


def test_a_custom_progress_bar_on_lightnings_base_class_shows_every_step_loss():
    bar = _BarePrinter()
    module = _module("sgd")
    trainer = make_trainer(max_epochs=1, callbacks=[bar], enable_progress_bar=True)
    trainer.fit(module, _classification())
    assert len(bar.shown) == trainer.num_training_batches
    losses = [row["loss"] for row in bar.shown]
    assert len(set(losses)) == len(losses)  # a fresh value on every step


def test_a_torchmetric_in_weighted_metrics_is_refused_not_silently_unweighted():
    import torchmetrics

    with pytest.raises(kl.ConfigurationError, match=r"torchmetrics take no sample weights.*metrics=\[MeanSquaredError"):
        kl.KerasLightningModule(
            mlp(hidden=4), optimizer="sgd", loss="mse",
            weighted_metrics=[torchmetrics.MeanSquaredError()],
        )


def _lr_monitor_rows(module, tmp_path) -> list[dict[str, str]]:
    import csv

    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True, log_weight_decay=True)
    trainer = make_trainer(
        max_epochs=1, callbacks=[monitor], logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    trainer.fit(module, _classification())
    with open(f"{trainer.logger.log_dir}/metrics.csv") as file:
        return [row for row in csv.DictReader(file) if any(k.startswith("lr-") and v for k, v in row.items())]


class _PlainAdamW(_Plain):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.8, 0.999), weight_decay=0.01)


def test_learning_rate_monitor_logs_what_a_plain_module_logs(tmp_path):
    ours = _lr_monitor_rows(
        _module(keras.optimizers.AdamW(1e-3, beta_1=0.8, weight_decay=0.01)), tmp_path / "ours"
    )
    plain = _lr_monitor_rows(_PlainAdamW(), tmp_path / "plain")
    keys = {k for k in plain[0] if k.startswith("lr-")}
    assert keys == {"lr-AdamW", "lr-AdamW-momentum", "lr-AdamW-weight_decay"}
    assert {k for k in ours[0] if k.startswith("lr-")} == keys  # the same keys, not lr-KerasOptimizer
    assert len(ours) == len(plain) == 32
    for key in keys:
        assert float(ours[0][key]) == pytest.approx(float(plain[0][key]))  # 1e-3, beta_1, decay


def test_a_keras_optimizer_pickles_under_its_keras_class_name():
    import pickle

    adapter = kl.KerasOptimizer(keras.optimizers.Adam(1e-2), mlp(hidden=4).trainable_variables)
    assert type(adapter).__name__ == "Adam" and isinstance(adapter, kl.KerasOptimizer)
    assert type(kl.KerasOptimizer(keras.optimizers.Adam(), mlp(hidden=4).trainable_variables)) is type(adapter)
    assert type(pickle.loads(pickle.dumps(type(adapter)))) is type(type(adapter))
    assert pickle.loads(pickle.dumps(type(adapter))) is type(adapter)


def test_a_momentum_cycling_scheduler_reaches_the_keras_optimizer():
    # OneCycleLR cycles betas[0] in the param groups: the Keras Adam's beta_1 follows.
    keras_adam = keras.optimizers.Adam(1e-3)
    module = _module(
        keras_adam,
        lr_scheduler={
            "scheduler": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=1e-2, total_steps=32, base_momentum=0.85, max_momentum=0.95
            ),
            "interval": "step",
        },
    )
    seen: list[float] = []

    class Beta(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(keras_adam.beta_1)

    make_trainer(max_epochs=1, callbacks=[Beta()]).fit(module, _classification())
    reference = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    cycle = torch.optim.lr_scheduler.OneCycleLR(
        reference, max_lr=1e-2, total_steps=32, base_momentum=0.85, max_momentum=0.95
    )
    expected = []
    for _ in range(len(seen)):
        expected.append(reference.param_groups[0]["betas"][0])  # what the step used
        reference.step()
        cycle.step()
    # the Keras beta_1 each step used is the one torch's Adam used at the same step
    assert len(seen) == 32 and seen == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------- several dataloaders


def _two_sets():
    def make(n, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, 64)).astype("float32")
        return x, x[:, :10].argmax(1).astype("int64")

    return make(40, 1), make(24, 2)


class _PlainEval(_Plain):
    """A plain module logging its validation / test loss per dataloader, as Lightning documents."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self.net(x), y))


def _keras_eval(model, data) -> dict[str, float]:
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return {k: float(v) for k, v in model.evaluate(*data, batch_size=16, verbose=0, return_dict=True).items()}


def test_several_validation_dataloaders_are_logged_apart_as_on_a_plain_module():
    a, b = _two_sets()
    module = _module("adam", metrics=["accuracy"])
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, _classification(64), [loader(*a, batch_size=16), loader(*b, batch_size=16)])
    ours = trainer.validate(module, [loader(*a, batch_size=16), loader(*b, batch_size=16)], verbose=False)
    plain = make_trainer().validate(_PlainEval(), [loader(*a, batch_size=16), loader(*b, batch_size=16)], verbose=False)
    # the same layout as Lightning gives a plain module: one dict per dataloader, suffixed keys
    assert [sorted(d) for d in plain] == [["val_loss/dataloader_idx_0"], ["val_loss/dataloader_idx_1"]]
    assert [sorted(d) for d in ours] == [
        ["val_accuracy/dataloader_idx_0", "val_loss/dataloader_idx_0"],
        ["val_accuracy/dataloader_idx_1", "val_loss/dataloader_idx_1"],
    ]
    # each dataloader's values are Keras' evaluate() of that data alone, never pooled
    for index, data in enumerate((a, b)):
        expected = _keras_eval(module.model, data)
        assert ours[index][f"val_loss/dataloader_idx_{index}"] == pytest.approx(expected["loss"], rel=1e-5)
        assert ours[index][f"val_accuracy/dataloader_idx_{index}"] == pytest.approx(expected["accuracy"])
    assert trainer.callback_metrics["val_loss/dataloader_idx_1"] == pytest.approx(ours[1]["val_loss/dataloader_idx_1"])


def test_several_test_dataloaders_of_a_keras_test_step_are_kept_apart():
    from test_keras_steps import EvalStepModel

    a, b = _two_sets()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = EvalStepModel(inputs, keras.layers.Dense(10)(inputs))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    results = make_trainer().test(
        kl.KerasLightningModule(model), [loader(*a, batch_size=16), loader(*b, batch_size=16)], verbose=False
    )
    for index, data in enumerate((a, b)):
        logs = model.evaluate(*data, batch_size=16, verbose=0, return_dict=True)  # nested on Keras 3.13
        expected = {k: float(v) for k, v in kl.flatten_logs(logs).items()}
        assert sorted(results[index]) == [f"test_accuracy/dataloader_idx_{index}", f"test_loss/dataloader_idx_{index}"]
        assert results[index][f"test_loss/dataloader_idx_{index}"] == pytest.approx(expected["loss"], rel=1e-5)
        assert results[index][f"test_accuracy/dataloader_idx_{index}"] == pytest.approx(expected["accuracy"])


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        for start in range(0, len(self.x), 16):
            yield torch.as_tensor(self.x[start : start + 16]), torch.as_tensor(self.y[start : start + 16])


def test_several_dataloaders_without_a_length_are_logged_apart_at_epoch_end():
    a, b = _two_sets()
    module = _module("adam")
    trainer = make_trainer()
    loaders = [torch.utils.data.DataLoader(_Stream(*data), batch_size=None) for data in (a, b)]
    trainer.validate(module, loaders, verbose=False)
    for index, data in enumerate((a, b)):
        expected = _keras_eval(module.model, data)["loss"]
        assert float(trainer.callback_metrics[f"val_loss/dataloader_idx_{index}"]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- ModelSummary


def _summarized_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    backbone = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, name="d1"), keras.layers.BatchNormalization(name="bn"),
         keras.layers.Dropout(0.1, seed=1, name="drop")],
        name="backbone",
    )
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)))


class _SummaryRecorder(L.Callback):
    """Reads what the Trainer's summary callback builds, as it builds it."""

    def __init__(self, summary_callback) -> None:
        self.summary_callback = summary_callback
        self.summary = None

    def on_fit_start(self, trainer, pl_module):
        self.summary = self.summary_callback._summary(trainer, pl_module)


@pytest.mark.parametrize("rich", [False, True], ids=["ModelSummary", "RichModelSummary"])
def test_model_summary_has_a_row_per_keras_layer_with_keras_counts(rich):
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

    model = _summarized_model()
    model.get_layer("backbone").get_layer("d1").trainable = False
    callback = (RichModelSummary if rich else ModelSummary)(max_depth=3)
    recorder = _SummaryRecorder(callback)
    module = kl.KerasLightningModule(model, optimizer="adam", loss="mse")
    x = np.zeros((16, 8), "float32")
    make_trainer(max_steps=1, callbacks=[callback, recorder], enable_model_summary=True).fit(
        module, loader(x, np.zeros((16, 3), "float32"), batch_size=8)
    )
    summary = recorder.summary
    backbone = model.get_layer("backbone")
    expected = {
        "model": ("Functional", model.count_params()),
        f"model.{model.layers[0].name}": ("InputLayer", 0),
        "model.backbone": ("Sequential", backbone.count_params()),
        "model.backbone.d1": ("Dense", backbone.get_layer("d1").count_params()),
        "model.backbone.bn": ("BatchNormalization", backbone.get_layer("bn").count_params()),
        "model.backbone.drop": ("Dropout", 0),
        "model.head": ("Dense", model.get_layer("head").count_params()),
    }
    rows = {n: (t, p) for n, t, p in zip(summary.layer_names, summary.layer_types, summary.param_nums, strict=True)}
    assert {n: rows[n] for n in expected} == expected
    assert "torchmetrics" in rows and not any("_torch_params" in n for n in rows)
    # Keras' own totals: weights and moving statistics, no seed state; frozen d1 not trainable
    assert summary.total_parameters == model.count_params() == 259
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert summary.trainable_parameters == trainable == 259 - 144 - 32
    # Lightning's own summary of the same module counts Keras internals and the seed
    from lightning.pytorch.utilities.model_summary import summarize

    assert summarize(module, max_depth=1).total_parameters == model.count_params() + 2


def test_model_summary_depth_one_lists_the_keras_model_and_prints():
    module = kl.KerasLightningModule(_summarized_model(), optimizer="adam", loss="mse")
    module.example_input_array = torch.zeros(4, 8)  # sizes shown: Keras' symbolic shapes
    summary = kl.KerasModelSummary(module, max_depth=1)
    assert summary.layer_names == ["model", "torchmetrics"]
    assert summary.in_sizes[0] == [None, 8] and summary.out_sizes[0] == [None, 3]
    assert "Functional" in str(summary)


def test_model_pruning_is_refused_on_a_keras_model():
    from lightning.pytorch.callbacks import ModelPruning

    module = kl.KerasLightningModule(mlp(hidden=4), optimizer="adam", loss="mse")
    with pytest.raises(kl.ConfigurationError, match="ModelPruning cannot prune a Keras model"):
        make_trainer(max_steps=1, callbacks=[ModelPruning("l1_unstructured", amount=0.5)]).fit(
            module, loader(np.zeros((8, 64), "float32"), np.zeros((8, 10), "float32"))
        )


# ---------------------------------------------------------------------- batches


def _arrays(n: int = 64):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 64))  # float64, as NumPy makes them
    return x, x[:, :10].argmax(1).astype("int64"), rng.uniform(0.5, 2.0, size=n).astype("float32")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, keys, arrays) -> None:
        self.keys, self.arrays = keys, arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, i):
        return {key: array[i] for key, array in zip(self.keys, self.arrays, strict=True)}


def _numpy_collate(items):
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


def _trained(loss, data) -> list[np.ndarray]:
    module = kl.KerasLightningModule(mlp(hidden=8), optimizer="adam", loss=loss)
    make_trainer(max_epochs=1).fit(module, data)
    return module.model.get_weights()


@pytest.mark.parametrize("loss", ["torch", "keras"])
def test_numpy_and_dict_batches_train_as_tuples_of_tensors(loss):
    def make_loss():
        if loss == "torch":
            return torch.nn.CrossEntropyLoss(reduction="none")
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    x, y, w = _arrays()
    keys = ("x", "y", "sample_weight")
    reference = _trained(make_loss(), loader(x.astype("float32"), y, w, batch_size=16))
    numpy_dicts = torch.utils.data.DataLoader(_Rows(keys, (x, y, w)), batch_size=16, collate_fn=_numpy_collate)
    tensor_dicts = torch.utils.data.DataLoader(_Rows(keys, (x.astype("float32"), y, w)), batch_size=16)
    for data in (numpy_dicts, tensor_dicts):
        for got, want in zip(_trained(make_loss(), data), reference, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_dict_batch_is_the_inputs_of_a_model_with_an_input_named_y():
    xa, xb = keras.Input((2,), name="x"), keras.Input((2,), name="y")
    model = keras.Model([xa, xb], keras.layers.Dense(1)(keras.layers.Concatenate()([xa, xb])))
    module = kl.KerasLightningModule(model)
    batch = {"x": torch.ones(3, 2), "y": torch.zeros(3, 2)}
    assert module._standard_batch(batch) is batch  # both inputs, as Keras' fit reads it
    predictions = make_trainer().predict(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert tuple(predictions[0].shape) == (3, 1)


def test_a_keras_train_step_receives_a_dict_batch_as_x_y():
    seen = []

    class Recording(keras.Model):
        def train_step(self, data):
            seen.append(type(data).__name__)
            x, y = data
            return super().train_step((x, y))

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = Recording(inputs, keras.layers.Dense(10)(inputs))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, _ = _arrays(32)
    make_trainer(max_epochs=1).fit(
        kl.KerasLightningModule(model),
        torch.utils.data.DataLoader(_Rows(("x", "y"), (x.astype("float32"), y)), batch_size=16),
    )
    assert seen == ["tuple", "tuple"]


# ---------------------------------------------------------------------- hyperparameters, logged series


def _csv_rows(trainer) -> list[dict[str, str]]:
    import csv

    with open(f"{trainer.logger.log_dir}/metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("optimizer", ["keras", "torch"])
def test_loggers_get_hyperparameters_that_describe_the_keras_arguments(tmp_path, optimizer):
    import torchmetrics
    import yaml

    spec = keras.optimizers.AdamW(3e-3, weight_decay=0.01) if optimizer == "keras" else torch.optim.AdamW
    model = mlp(hidden=8)
    module = kl.KerasLightningModule(
        model, optimizer=spec, loss=torch.nn.CrossEntropyLoss(),
        metrics=["accuracy", torchmetrics.Accuracy(task="multiclass", num_classes=10)],
    )
    assert module.hparams["keras"]["model_class"] == "Sequential"  # before any Trainer
    trainer = make_trainer(max_epochs=1, logger=CSVLogger(tmp_path))
    trainer.fit(module, _classification(32))
    with open(f"{trainer.logger.log_dir}/hparams.yaml") as file:
        logged = yaml.safe_load(file)["keras"]
    optimizer_object = trainer.optimizers[0]
    assert logged["optimizer"] == type(optimizer_object).__name__ == "AdamW"
    assert logged["learning_rate"] == pytest.approx(optimizer_object.param_groups[0]["lr"])
    assert logged["learning_rate"] == pytest.approx(3e-3 if optimizer == "keras" else 1e-3)
    assert logged["optimizer_weight_decay"] == pytest.approx(0.01)
    assert logged["model_params"] == model.count_params() and logged["model_name"] == model.name
    assert logged["loss"] == "CrossEntropyLoss"
    assert logged["metrics"] == "accuracy, MulticlassAccuracy"
    # in the checkpoint too, and load_from_checkpoint is not confused by it
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["hyper_parameters"]["keras"] == logged
    if optimizer == "keras":
        restored = kl.KerasLightningModule.load_from_checkpoint(path, loss=torch.nn.CrossEntropyLoss(), metrics=["accuracy"])
        assert restored.hparams["keras"]["model_params"] == model.count_params()


def test_a_subclass_keeps_its_own_saved_hyperparameters():
    class Tuned(kl.KerasLightningModule):
        def __init__(self, hidden: int = 8, dropout: float = 0.25) -> None:
            super().__init__(mlp(hidden=hidden), optimizer="adam", loss="mse")
            self.save_hyperparameters()

    module = Tuned()
    make_trainer(max_steps=1).fit(module, loader(np.zeros((8, 64), "float32"), np.zeros((8, 10), "float32")))
    assert module.hparams["hidden"] == 8 and module.hparams["dropout"] == 0.25
    assert module.hparams["keras"]["optimizer"] == "Adam"
    assert module.hparams_initial["keras"]["model_params"] == module.model.count_params()


def test_the_logged_loss_series_holds_step_values_and_the_epoch_mean_its_own(tmp_path):
    trainer = make_trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    module = _module("adam")
    trainer.fit(module, _classification(64))
    rows = _csv_rows(trainer)
    step_rows = [row for row in rows if row.get("loss")]
    epoch_rows = [row for row in rows if row.get("loss_epoch")]
    assert len(step_rows) == trainer.global_step == 16  # one per step, no epoch value mixed in
    assert [int(row["epoch"]) for row in epoch_rows] == [0, 1]
    # callbacks (EarlyStopping(monitor="loss")) see the epoch mean, as Keras' History holds it
    assert float(trainer.callback_metrics["loss"]) == pytest.approx(float(epoch_rows[-1]["loss_epoch"]))
    steps = [float(row["loss"]) for row in step_rows[8:]]
    assert float(epoch_rows[-1]["loss_epoch"]) == pytest.approx(np.mean(steps), rel=1e-5)  # equal batches


def test_a_single_dataloader_after_several_logs_plain_names_again():
    a, b = _two_sets()
    module = _module("adam")
    trainer = make_trainer()
    trainer.validate(module, [loader(*a, batch_size=16), loader(*b, batch_size=16)], verbose=False)
    (single,) = trainer.validate(module, loader(*a, batch_size=16), verbose=False)
    assert sorted(single) == ["val_loss"]
    assert single["val_loss"] == pytest.approx(_keras_eval(module.model, a)["loss"], rel=1e-5)


def test_load_from_checkpoint_of_a_subclass_taking_kwargs(tmp_path):
    class WithKwargs(kl.KerasLightningModule):
        def __init__(self, units: int = 4, model=None, **kwargs) -> None:
            super().__init__(model or mlp(hidden=units), **kwargs)
            self.save_hyperparameters(ignore=["model"])

    module = WithKwargs(optimizer="adam", loss="mse")
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, loader(np.zeros((8, 64), "float32"), np.zeros((8, 10), "float32")))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = WithKwargs.load_from_checkpoint(tmp_path / "m.ckpt")  # hparams["keras"] not passed on
    assert restored.hparams["units"] == 4
