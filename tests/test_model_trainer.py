"""Model architecture, strategy choice, and a short training run on tiny data."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from components import data, strategy, trainer
from components.model import build_model
from components.strategy import DeviceError, choose_strategy, parse_tf_config
from tests.helpers import make_digits


def test_documented_architecture():
    model = build_model()
    assert [type(l).__name__ for l in model.layers] == ["Flatten", "Dense", "Dense"]
    hidden, out = model.layers[1], model.layers[2]
    assert (hidden.units, hidden.activation.__name__) == (128, "relu")
    assert (out.units, out.activation.__name__) == (10, "softmax")
    assert model.count_params() == 101_770
    assert model.input_shape == (None, 28, 28)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert model.loss == "sparse_categorical_crossentropy"


def test_config_drives_units_lr_and_dropout():
    model = build_model(hidden_units=64, learning_rate=0.01, dropout=0.2)
    assert [type(l).__name__ for l in model.layers] == ["Flatten", "Dense", "Dropout", "Dense"]
    assert model.layers[1].units == 64
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "device,gpus,tf_config,kind,used",
    [
        ("auto", 0, None, "default", "cpu"),
        ("cpu", 2, None, "default", "cpu"),
        ("auto", 1, None, "one_device", "gpu"),
        ("gpu", 1, None, "one_device", "gpu"),
        ("auto", 4, None, "mirrored", "gpu"),
        ("auto", 0, {"cluster": {"worker": ["a:1", "b:2"]}}, "multi_worker", "cpu"),
        ("cpu", 2, {"cluster": {"worker": ["a:1", "b:2"]}}, "multi_worker", "cpu"),
    ],
)
def test_choose_strategy(device, gpus, tf_config, kind, used):
    choice = choose_strategy(device, gpus, tf_config)
    assert (choice.kind, choice.device) == (kind, used)


def test_gpu_demanded_but_absent():
    with pytest.raises(DeviceError, match="--device gpu was requested but TensorFlow sees no GPU"):
        choose_strategy("gpu", 0)


def test_tf_config_single_task_is_not_a_cluster():
    assert (
        parse_tf_config('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}')
        is None
    )
    assert parse_tf_config(None) is None
    assert parse_tf_config('{"cluster": {"chief": ["a:1"], "worker": ["b:1"]}}') is not None
    with pytest.raises(DeviceError, match="TF_CONFIG is not valid JSON"):
        parse_tf_config("{")
    for cluster in ('["a:1", "b:2"]', '{"worker": 3}', '{"worker": "h:1"}', '{"worker": [1, 2]}'):
        with pytest.raises(DeviceError, match="must map each job to a list"):
            parse_tf_config(f'{{"cluster": {cluster}}}')


def _fit(tmp_path, epochs=2, n=512, extra_callbacks=None, **kw):
    train = data.validate_split(make_digits(n, seed=1))
    val = data.validate_split(make_digits(128, seed=2, name="test"))
    return trainer.train(
        lambda: build_model(**kw),
        lambda epoch, k: data.make_train_dataset(
            train, 32, seed=0, epoch=epoch, steps_per_element=k
        ),
        data.make_dataset(val, 128),
        batch_size=32,
        epochs=epochs,
        strategy=tf.distribute.get_strategy(),
        tensorboard_dir=tmp_path / "tb",
        backup_dir=tmp_path / "backup",
        verbose=0,
        extra_callbacks=extra_callbacks,
    )


def _default_model_kw():
    """The model settings a default run trains with (steps_per_execution 100, XLA)."""
    from pipeline.config import TrainConfig

    defaults = TrainConfig()
    return dict(steps_per_execution=defaults.steps_per_execution, jit_compile=defaults.jit_compile)


def _fit_at_defaults(tmp_path, epochs, extra_callbacks=None):
    """`_fit` at the defaults on 1,001 examples: a partial last batch and a partial element."""
    return _fit(
        tmp_path, epochs=epochs, n=1001, extra_callbacks=extra_callbacks, **_default_model_kw()
    )


class _StepsPerEpoch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_end(self, epoch, logs=None):
        self.steps.append(int(self.model.optimizer.iterations.numpy()))


def test_an_epoch_is_one_pass_at_the_default_steps_per_execution(tmp_path, recwarn):
    """1,001 examples at batch 32 = 32 steps (the last one of 9 examples) per epoch, with the
    product's defaults (100 steps per execution, XLA): no overshoot into the next pass, no
    "ran out of data" warning."""
    counter = _StepsPerEpoch()
    _fit_at_defaults(tmp_path, 3, [counter])
    assert counter.steps == [32, 64, 96]
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]


def test_step_scalars_at_the_defaults_come_every_100_steps_of_an_epoch_and_at_its_end(tmp_path):
    """At the defaults (100 steps per execution, a point every 100 steps) with epochs of 250
    steps (8,000 examples): the points are where the README says, read by TensorBoard's own
    event loader, each holding the loss Keras reported at that step."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    from pipeline.config import TrainConfig

    assert TrainConfig().tensorboard_update_freq == 100
    seen = {}

    class Reported(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[int(self.model.optimizer.iterations.numpy())] = float(logs["loss"])

    _fit(tmp_path, epochs=2, n=8000, extra_callbacks=[Reported()], **_default_model_kw())
    acc = ea.EventAccumulator(str(tmp_path / "tb" / "steps"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    points = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("step_loss")}
    assert sorted(points) == [100, 200, 250, 350, 450, 500]
    for step, loss in points.items():
        assert loss == pytest.approx(seen[step])
    assert [e.step for e in acc.Tensors("step_learning_rate")] == sorted(points)


def test_steps_split_in_the_graph_update_as_keras_own_multi_step_loop(tmp_path):
    """The trainer's one-replica path (an element of k batches, split into batches in the
    graph) against plain Keras fit at steps_per_execution k over one-batch elements: the same
    weights and the same epoch logs, with a partial last batch (1,001 examples: 31 of 32 and
    one of 9) and a partial last element (32 steps at k = 100, the default)."""
    kw = _default_model_kw()
    keras.utils.set_random_seed(0)
    ours = _fit(tmp_path / "ours", epochs=2, n=1001, **kw)

    train = data.validate_split(make_digits(1001, seed=1))
    val = data.validate_split(make_digits(128, seed=2, name="test"))
    keras.utils.set_random_seed(0)
    model = build_model(**kw)
    epoch = tf.Variable(0, dtype=tf.int64)
    history = model.fit(
        data.make_train_dataset(train, 32, seed=0, epoch=epoch),
        validation_data=data.make_dataset(val, 128),
        epochs=2,
        callbacks=[trainer.PassNumber(epoch)],
        verbose=0,
        shuffle=False,
    )
    assert int(model.optimizer.iterations.numpy()) == 64
    assert int(ours.model.optimizer.iterations.numpy()) == 64
    for a, b in zip(ours.model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for key, values in history.history.items():
        np.testing.assert_allclose(ours.history[key], values, rtol=1e-5)


def test_the_train_step_is_traced_once(tmp_path, monkeypatch):
    """Keras would create the optimizer's slots and the metrics' state inside the first trace,
    and tf.function traces a function that created variables a second time."""
    traces = []
    keras_train_step = keras.Sequential.train_step

    def counted(self, data):
        traces.append(1)
        return keras_train_step(self, data)

    monkeypatch.setattr(keras.Sequential, "train_step", counted)
    _fit_at_defaults(tmp_path, 2)
    assert len(traces) == 1


def test_autograph_converts_nothing_of_ours_or_the_train_step(tmp_path, monkeypatch):
    """AutoGraph re-parses and rewrites a function's source when it traces it (~0.1 s each
    here): the dataset functions and the train step have no Python control flow over tensors,
    so none of them goes through it."""
    from tensorflow.python.autograph.pyct import transpiler

    converted = []
    real = transpiler.PyToPy.transform

    def recorded(self, obj, user_context):
        converted.append(getattr(obj, "__qualname__", repr(obj)))
        return real(self, obj, user_context)

    monkeypatch.setattr(transpiler.PyToPy, "transform", recorded)
    _fit_at_defaults(tmp_path, 1)
    assert not [
        name for name in converted if "train_step" in name or "gather" in name or "one_pass" in name
    ], converted


def test_the_terminal_progress_bar_counts_steps_not_elements(tmp_path, capsys):
    """At the defaults an element holds 100 steps; the bar must still say 32/32 for an epoch of
    1,001 examples (Keras's own would say 1/1)."""
    _fit_at_defaults(tmp_path, 2, [trainer.StepProgress(2, 32)])
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert out.count("32/32") >= 2 and "1/1 " not in out


def test_steps_in_the_graph_only_on_one_replica_and_for_bounded_elements():
    model = build_model(steps_per_execution=100)
    one = tf.distribute.get_strategy()
    assert trainer.steps_per_element(model, one, 32) == 100
    assert trainer.steps_per_element(model, one, 1024) == 1  # 102,400 examples an element
    assert trainer.steps_per_element(build_model(steps_per_execution=4), one, 32) == 4
    assert trainer.steps_per_element(build_model(), one, 32) == 1

    class TwoReplicas:  # the strategy's only attribute read here (real ones: test_strategy.py)
        num_replicas_in_sync = 2

    assert trainer.steps_per_element(model, TwoReplicas(), 32) == 1


def test_training_learns_the_tiny_task(tmp_path):
    result = _fit(tmp_path, epochs=3, learning_rate=0.01, steps_per_execution=4)
    h = result.history
    assert len(result.epoch_seconds) == 3
    assert h["loss"][-1] < h["loss"][0]
    assert h["val_accuracy"][-1] > 0.8
    assert list((tmp_path / "tb").glob("train/events.out.tfevents.*"))
    # kept after fit: the train stage deletes it only once train/model.keras is saved
    assert (tmp_path / "backup" / trainer.WEIGHTS_FILE).is_file()


def test_nan_loss_stops_training(tmp_path):
    with pytest.raises(trainer.TrainingDiverged, match="loss became"):
        _fit(tmp_path, epochs=1, learning_rate=1e30)


def test_mixed_precision_computes_in_float16_with_a_float32_softmax():
    try:
        strategy.set_precision(True)
        model = build_model()
        assert model.layers[1].compute_dtype == "float16"
        assert model.layers[1].variable_dtype == "float32"
        assert model.layers[-1].compute_dtype == "float32"
        out = model(np.zeros((2, 28, 28), np.float32))
        assert out.dtype == "float32"
    finally:
        keras.config.set_dtype_policy("float32")


def test_test_loss_is_kerass_loss_even_for_a_confidently_wrong_model():
    """val_loss comes from the logits behind the softmax; a loss from clipped probabilities
    would cap each confidently wrong example at 16.1 and disagree with it."""
    from components import evaluator

    model = build_model(jit_compile=False)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(0, 3.0, weight.shape).astype(np.float32))
    images = rng.integers(0, 256, (500, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 500)
    keras_loss = model.evaluate(images / 255.0, labels, batch_size=64, verbose=0)[0]
    probabilities, losses = evaluator.predict_with_loss(model, images, labels, batch_size=128)
    assert keras_loss > 100  # extreme: far beyond what clipped probabilities can express
    metrics = evaluator.compute_metrics(probabilities, labels, losses)
    assert metrics["test_loss"] == pytest.approx(keras_loss, rel=1e-4)
    assert evaluator.compute_metrics(probabilities, labels)["test_loss"] < 16.2


def test_the_epoch_line_counts_its_steps_in_words():
    from types import SimpleNamespace

    from components.trainer import EpochLine

    for steps, said in ((1, "(1 step)"), (1782, "(1782 steps)")):
        counter = SimpleNamespace(numpy=iter((0, steps)).__next__)  # iterations at begin, end
        lines: list[str] = []
        line = EpochLine(5, out=lines.append)
        line.set_model(SimpleNamespace(optimizer=SimpleNamespace(iterations=counter)))
        line.on_epoch_begin(0)
        line.on_epoch_end(0, {"loss": 0.25, "accuracy": 0.9})
        assert lines[0].startswith("epoch 1/5  loss 0.2500  accuracy 0.9000  (")
        assert lines[0].endswith(f" s, {said[1:]}"), lines


def test_each_epochs_points_are_on_disk_before_its_backup(tmp_path):
    """At an epoch's end, before its backup is saved (backups come last), every TensorBoard
    point of that epoch is already in the event files (TensorFlow's writers flush as their
    `as_default()` block ends; ours at the epoch end), so a SIGKILL after the backup loses
    none of them. Read with TensorBoard's loader."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    seen = []

    class Reader(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            counts = {}
            for run, tag in (("train", "epoch_loss"), ("validation", "epoch_loss"),
                             ("steps", "step_loss")):  # fmt: skip
                acc = ea.EventAccumulator(str(tmp_path / "tb" / run), {ea.TENSORS: 0})
                acc.Reload()
                counts[run] = len(acc.Tensors(tag)) if tag in acc.Tags()["tensors"] else 0
            metadata = tmp_path / "backup" / trainer.METADATA_FILE
            backed_up = json.loads(metadata.read_text())["epoch"] if metadata.exists() else None
            seen.append((epoch, counts, backed_up))

    _fit(tmp_path, epochs=2, extra_callbacks=[Reader()])
    assert [(e, c["train"], c["validation"], b) for e, c, b in seen] == [
        (0, 1, 1, None),
        (1, 2, 2, 1),  # the backup says 1 epoch done: epoch 2's is saved after this
    ]
    assert seen[1][1]["steps"] > seen[0][1]["steps"] > 0
