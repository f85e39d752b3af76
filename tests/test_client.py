"""The client: input conversion and refusals, REST against a TF Serving stand-in, gRPC, CLI."""

import base64
import json
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from serving.cli import main as client_main
from serving.client import GrpcClient, LocalPredictor, RestClient, ServerError
from serving.inputs import InputError, load_inputs
from tests.helpers import ROOT


def _digit_image():
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255  # a bright "1"
    return img


# ---------------------------------------------------------------------------- inputs

def test_rgba_large_dark_on_light_png_is_converted_and_says_so(tmp_path):
    big = Image.fromarray(255 - _digit_image()).resize((112, 112)).convert("RGBA")
    big.save(tmp_path / "d.png")
    [loaded] = load_inputs([tmp_path / "d.png"])
    assert loaded.image.shape == (28, 28) and loaded.image.dtype == np.uint8
    assert loaded.image[14, 14] > 200 and loaded.image[1, 1] == 0  # white digit on black now
    notes = " ".join(loaded.notes)
    assert "grayscale" in notes and "inverted" in notes and "resized 112x112" in notes


def test_grayscale_28x28_png_is_sent_as_is(tmp_path):
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    [loaded] = load_inputs([tmp_path / "d.png"])
    assert loaded.notes == () and loaded.encoded == (tmp_path / "d.png").read_bytes()
    np.testing.assert_array_equal(loaded.image, _digit_image())


def test_npy_and_idx_inputs(tmp_path):
    import gzip
    import struct

    arr = np.stack([_digit_image()] * 3)
    np.save(tmp_path / "a.npy", arr.reshape(3, 784).astype(np.int64))
    idx = struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 28, 28) + arr.tobytes()
    (tmp_path / "imgs-idx3-ubyte.gz").write_bytes(gzip.compress(idx))
    loaded = load_inputs([tmp_path / "a.npy", tmp_path / "imgs-idx3-ubyte.gz"])
    assert [x.source for x in loaded][:2] == ["a.npy[0]", "a.npy[1]"] and len(loaded) == 6
    for x in loaded:
        np.testing.assert_array_equal(x.image, _digit_image())


@pytest.mark.parametrize("make,message", [
    (lambda p: np.save(p / "x.npy", np.full((28, 28), 300)), "pixel value 300 outside 0..255"),
    (lambda p: np.save(p / "x.npy", np.full((28, 28), -1)), "pixel value -1 outside 0..255"),
    (lambda p: np.save(p / "x.npy", np.zeros((30, 30))), "shape \\(30, 30\\)"),
    (lambda p: (p / "x.npy").write_text("hello"), "not a readable .npy"),
    (lambda p: (p / "x.png").write_text("hello"), "not an image"),
    (lambda p: None, "no such file"),
])
def test_bad_inputs_are_refused_with_the_reason(tmp_path, make, message):
    make(tmp_path)
    target = next(iter(tmp_path.iterdir()), tmp_path / "missing.png")
    with pytest.raises(InputError, match=message):
        load_inputs([target])


# ---------------------------------------------------------------------------- REST stand-in

class FakeTFServing(BaseHTTPRequestHandler):
    """Answers like TF Serving's REST API, after checking the body against its documented forms
    (https://www.tensorflow.org/tfx/serving/api_rest). Predictions come from a real export."""

    predictor: LocalPredictor
    requests: list

    def log_message(self, *args):
        pass

    def _send(self, code, value):
        body = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models/mnist":
            return self._send(200, {"model_version_status": [
                {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}]})
        if self.path == "/v1/models/mnist/metadata":
            return self._send(200, {"model_spec": {"name": "mnist", "version": "1"},
                                    "metadata": {"signature_def": {}}})
        self._send(404, {"error": f"Servable not found for request: {self.path}"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, body))
        if not self.path.startswith("/v1/models/mnist") or not self.path.endswith(":predict"):
            return self._send(404, {"error": "Servable not found"})
        signature = body.get("signature_name", "serving_default")
        row = "instances" in body
        if row == ("inputs" in body):
            return self._send(400, {"error": "Missing 'instances' or 'inputs' key"})
        values = body["instances"] if row else body["inputs"]
        if not row:
            if not isinstance(values, dict) or len(values) != 1:
                return self._send(400, {"error": "columnar inputs must name the input"})
            (name, values), = values.items()
            expected = {"serving_default": "images", "predict_png": "image_bytes"}[signature]
            if name != expected:
                return self._send(400, {"error": f"input {name} not in signature"})
        if signature == "predict_png":
            if not all(isinstance(v, dict) and set(v) == {"b64"} for v in values):
                return self._send(400, {"error": "binary input must be {\"b64\": ...}"})
            result = self.predictor.predict_encoded([base64.b64decode(v["b64"]) for v in values])
        else:
            arr = np.asarray(values)
            if arr.ndim != 3 or arr.shape[1:] != (28, 28):
                return self._send(400, {"error": f"images must be [N, 28, 28], got {arr.shape}"})
            result = self.predictor.predict(arr.astype(np.uint8))
        if row:
            return self._send(200, {"predictions": [
                {"probabilities": p.tolist(), "class_ids": int(c)}
                for p, c in zip(result.probabilities, result.class_ids)]})
        self._send(200, {"outputs": {"probabilities": result.probabilities.tolist(),
                                     "class_ids": result.class_ids.tolist()}})


@pytest.fixture(scope="module")
def rest_server(exported):
    FakeTFServing.predictor = LocalPredictor(exported)
    FakeTFServing.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTFServing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("form", ["row", "columnar"])
@pytest.mark.parametrize("png", [False, True])
def test_rest_predict_matches_local(rest_server, exported, form, png):
    local = LocalPredictor(exported)
    images = np.stack([_digit_image(), 255 - _digit_image()])
    client = RestClient(rest_server, form=form)
    if png:
        from serving.inputs import encode_png
        blobs = [encode_png(i) for i in images]
        got, want = client.predict_encoded(blobs), local.predict_encoded(blobs)
    else:
        got, want = client.predict(images), local.predict(images)
    np.testing.assert_array_equal(got.class_ids, want.class_ids)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5)
    path, body = FakeTFServing.requests[-1]
    assert path == "/v1/models/mnist:predict"
    assert body["signature_name"] == ("predict_png" if png else "serving_default")


def test_rest_status_metadata_and_errors(rest_server):
    assert RestClient(rest_server).status()["model_version_status"][0]["state"] == "AVAILABLE"
    assert RestClient(rest_server).metadata()["model_spec"]["name"] == "mnist"
    with pytest.raises(ServerError, match="HTTP 404: Servable not found"):
        RestClient(rest_server, model="other").predict(np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ServerError, match="HTTP 400: images must be"):
        RestClient(rest_server).predict(np.zeros((1, 27, 28), np.uint8))


def test_rest_refused_connection_and_timeout():
    with pytest.raises(ServerError, match="connection refused"):
        RestClient("127.0.0.1:9").status()
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)  # accepts, never answers
    try:
        with pytest.raises(ServerError, match="timed out after 0.5 s"):
            RestClient(f"127.0.0.1:{sock.getsockname()[1]}", timeout=0.5).status()
    finally:
        sock.close()


# ---------------------------------------------------------------------------- gRPC stand-in

def test_grpc_predict_against_a_prediction_service(exported):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    local = LocalPredictor(exported)

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            if request.model_spec.name != "mnist":
                context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found")
            x = tf.make_ndarray(request.inputs["images"])
            result = local.predict(x)
            response = predict_pb2.PredictResponse()
            response.outputs["probabilities"].CopyFrom(tf.make_tensor_proto(result.probabilities))
            response.outputs["class_ids"].CopyFrom(tf.make_tensor_proto(result.class_ids))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        images = np.stack([_digit_image()])
        got = GrpcClient(f"127.0.0.1:{port}").predict(images)
        np.testing.assert_array_equal(got.class_ids, local.predict(images).class_ids)
        with pytest.raises(ServerError, match="NOT_FOUND: Servable not found"):
            GrpcClient(f"127.0.0.1:{port}", model="other").predict(images)
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- CLI

def test_cli_predict_local_json(exported, tmp_path, capsys):
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    assert client_main(["predict", str(tmp_path / "d.png"), "--local", str(exported),
                        "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [row] = out["predictions"]
    assert row["input"] == "d.png" and 0 <= row["digit"] <= 9
    assert len(row["probabilities"]) == 10 and abs(sum(row["probabilities"]) - 1) < 1e-4


def test_cli_refuses_bad_pixel_before_sending(tmp_path):
    np.save(tmp_path / "x.npy", np.full((28, 28), 300))
    r = subprocess.run([sys.executable, "-m", "serving", "predict", str(tmp_path / "x.npy"),
                        "--server", "127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("input refused, nothing sent: "
                                     f"{tmp_path / 'x.npy'}: pixel value 300 outside 0..255")


def test_cli_server_down_is_a_clear_error(tmp_path, capsys):
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    assert client_main(["predict", str(tmp_path / "d.png"), "--server", "127.0.0.1:9"]) == 1
    assert "connection refused (is TF Serving running?" in capsys.readouterr().err
