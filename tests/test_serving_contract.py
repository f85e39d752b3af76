"""The export as TF Serving sees it: saved_model_cli, the graph-level loader, warmup, bad input."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from components import exporter
from components.data import preprocess

SAVED_MODEL_CLI = [
    sys.executable,
    "-c",
    "import sys; from tensorflow.python.tools.saved_model_cli import main; "
    "sys.argv[0] = 'saved_model_cli'; sys.exit(main())",
]


def saved_model_cli(*args):
    r = subprocess.run(SAVED_MODEL_CLI + list(args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_saved_model_cli_show_lists_the_contract(exported):
    out = saved_model_cli("show", "--dir", str(exported), "--all")
    blocks = {
        name: out.split(f"signature_def['{name}']:")[1].split("signature_def[")[0]
        for name in ("serving_default", "predict_png")
    }
    assert (
        "inputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 28, 28)"
        in blocks["serving_default"]
    )
    assert (
        "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)"
        in blocks["predict_png"]
    )
    for block in blocks.values():
        assert (
            "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n"
            "        shape: (-1, 10)" in block
        )
        assert (
            "outputs['class_ids'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)"
            in block
        )
    assert "args_0" not in out and "output_0" not in out


def test_saved_model_cli_run_both_signatures(exported, model, tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    expected = model(preprocess(images)).numpy().argmax(1)
    np.save(tmp_path / "images.npy", images)
    saved_model_cli(
        "run",
        "--dir",
        str(exported),
        "--tag_set",
        "serve",
        "--signature_def",
        "serving_default",
        "--inputs",
        f"images={tmp_path / 'images.npy'}",
        "--outdir",
        str(tmp_path / "out1"),
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out1" / "class_ids.npy"), expected)
    pngs = np.array([tf.io.encode_png(i[..., None]).numpy() for i in images], dtype=object)
    np.save(tmp_path / "pngs.npy", pngs, allow_pickle=True)
    saved_model_cli(
        "run",
        "--dir",
        str(exported),
        "--tag_set",
        "serve",
        "--signature_def",
        "predict_png",
        "--inputs",
        f"image_bytes={tmp_path / 'pngs.npy'}",
        "--outdir",
        str(tmp_path / "out2"),
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out2" / "class_ids.npy"), expected)


class GraphLoader:
    """Loads the SavedModel the way TF Serving's C++ server does (restore op + signature
    tensors) and feeds tensors *without* the Python client's shape check, as TF Serving would."""

    def __init__(self, path):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.session = tf.compat.v1.Session(graph=self.graph)
            meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(path))
        self.signatures = meta.signature_def

    def run(self, signature, inputs):
        sig = self.signatures[signature]
        feeds = {
            self.graph.get_tensor_by_name(sig.inputs[k].name).ref(): v for k, v in inputs.items()
        }
        names = sorted(sig.outputs)
        fetches = [self.graph.get_tensor_by_name(sig.outputs[k].name) for k in names]
        # Session._do_run is below Session.run's feed checks: the raw C++ Session::Run.
        return dict(zip(names, self.session._do_run(None, [], fetches, feeds, None, None)))


@pytest.fixture(scope="module")
def graph_loader(exported):
    return GraphLoader(exported)


def test_graph_loader_matches_the_in_memory_model(graph_loader, model):
    images = np.random.default_rng(6).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = graph_loader.run("serving_default", {"images": images})
    np.testing.assert_allclose(
        out["probabilities"], model(preprocess(images)).numpy(), rtol=1e-5, atol=1e-6
    )


def _png(shape, dtype=np.uint8):
    return tf.io.encode_png(np.zeros(shape, dtype)).numpy()


@pytest.mark.parametrize(
    "signature,inputs",
    [
        ("serving_default", {"images": np.zeros((1, 28, 28, 1), np.uint8)}),
        ("serving_default", {"images": np.zeros((1, 784), np.uint8)}),
        ("serving_default", {"images": np.zeros((2, 32, 32), np.uint8)}),
        ("serving_default", {"images": np.zeros((1, 28, 28), np.float32)}),
        ("predict_png", {"image_bytes": np.array([b"not an image"], dtype=object)}),
        ("predict_png", {"image_bytes": np.array([b""], dtype=object)}),
        ("predict_png", {"image_bytes": np.array([_png((32, 32, 1))], dtype=object)}),
    ],
)
def test_bad_requests_fail_with_invalid_argument_and_the_next_one_works(
    graph_loader, signature, inputs
):
    with pytest.raises(tf.errors.InvalidArgumentError):
        graph_loader.run(signature, inputs)
    ok = graph_loader.run(
        "predict_png", {"image_bytes": np.array([_png((28, 28, 1))], dtype=object)}
    )
    assert ok["class_ids"].shape == (1,)


def test_warmup_requests_all_succeed_against_the_export(exported, graph_loader):
    from tensorflow_serving.apis import prediction_log_pb2

    path = exported / "assets.extra" / exporter.WARMUP_FILE
    count = 0
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        assert request.model_spec.name == "mnist"
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = graph_loader.run(request.model_spec.signature_name, inputs)
        assert out["probabilities"].shape == (len(next(iter(inputs.values()))), 10)
        count += 1
    assert count >= 6
