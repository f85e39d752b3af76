"""The client: input conversion and refusals, REST against a TF Serving stand-in, gRPC, CLI."""

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from components.photo import example_photos, render_digit
from serving.cli import main as client_main
from serving.client import GrpcClient, LocalPredictor, RestClient, ServerError
from serving.inputs import InputError, load_inputs, seen_images
from tests.helpers import ROOT, SHARED_MNIST, as_a_terminals_job, requires_mnist


def _digit_image():
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255  # a bright "1"
    return img


def _photo(path, digit=7, size=(240, 320), fmt="JPEG"):
    """A photo-like digit (dark ink, uneven light, noise) saved at `path`."""
    pixels = np.round(render_digit(digit, size, box=(0.2, 0.3, 0.6)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# ---------------------------------------------------------------------------- inputs


def test_a_photo_is_sent_as_it_is_and_normalised_by_the_graph(tmp_path):
    """No normalisation in the client: the bytes go to predict_image; what the model sees is
    computed by the graph's own function (components.photo) when asked for."""
    big = Image.fromarray(255 - _digit_image()).resize((112, 112)).convert("RGBA")
    big.save(tmp_path / "d.png")
    [loaded] = load_inputs([tmp_path / "d.png"])
    assert loaded.is_photo and loaded.image is None and loaded.notes == ()
    assert loaded.encoded == (tmp_path / "d.png").read_bytes()
    [seen] = seen_images([loaded])
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert seen[14, 14] > 200 and seen[1, 1] == 0  # white digit on black, centred


def test_an_image_already_in_mnist_format_is_kept_as_it_is(tmp_path):
    """28x28 grayscale, white digit on a black border: MNIST's format, sent unchanged (to
    predict_png) unless predict_image is asked for."""
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    Image.fromarray(255 - _digit_image()).save(tmp_path / "dark.png")  # not MNIST's polarity
    loaded, dark = load_inputs([tmp_path / "d.png", tmp_path / "dark.png"])
    assert loaded.mnist_format and loaded.encoded == (tmp_path / "d.png").read_bytes()
    np.testing.assert_array_equal(loaded.image, _digit_image())
    np.testing.assert_array_equal(seen_images([loaded])[0], _digit_image())
    assert dark.is_photo and not dark.mnist_format
    [seen] = seen_images([loaded], normalize=[True])  # as predict_image would see it
    assert seen[14, 14] > 200 and seen[:3].max() == 0


def test_a_digit_drawn_to_fill_a_28x28_canvas_goes_to_predict_image(tmp_path):
    """White on black and 28x28, but not normalised as MNIST's digits are (within 20x20,
    centred by mass): sent to predict_image, which normalises it, not to predict_png as is."""
    filled = np.zeros((28, 28), np.uint8)
    filled[2:5, 3:26] = 255  # a 7 from edge to edge: 23 pixels wide
    for row in range(5, 27):
        filled[row, 24 - row * 17 // 22 : 27 - row * 17 // 22] = 255
    off_centre = np.zeros((28, 28), np.uint8)
    off_centre[3:19, 2:6] = 255  # a "1" in the top-left corner
    for name, pixels in (("filled", filled), ("corner", off_centre)):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    filled_in, corner = load_inputs([tmp_path / "filled.png", tmp_path / "corner.png"])
    assert not filled_in.mnist_format and not corner.mnist_format
    assert filled_in.is_photo and corner.is_photo  # predict_image normalises them


@requires_mnist
def test_every_mnist_test_digit_counts_as_already_in_mnist_format():
    """The rule for "already in MNIST's format" holds for MNIST's own digits (through TFDS)."""
    from components import data
    from serving.inputs import _mnist_pixels

    test = data.load_split("test", manual_dir=SHARED_MNIST)
    kept = [_mnist_pixels(Image.fromarray(img.reshape(28, 28))) is not None for img in test.images]
    assert sum(kept) == len(test) == 10_000


def test_exif_orientation_is_applied_before_sending(tmp_path):
    """A phone stores the picture sideways with EXIF orientation 6 ("turn 90 degrees clockwise
    to view"); TensorFlow's decoders ignore EXIF, so the client turns it and sends a PNG."""
    upright = np.round(render_digit(7, (240, 180), box=(0.2, 0.2, 0.6)) * 255).astype(np.uint8)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as the sensor saw
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", format="JPEG", quality=95, exif=exif)
    [loaded] = load_inputs([tmp_path / "phone.jpg"])
    assert any("EXIF orientation 6" in n for n in loaded.notes)
    assert loaded.encoded[:4] == b"\x89PNG"
    sent = np.asarray(Image.open(io.BytesIO(loaded.encoded)).convert("RGB"), np.float64)
    assert sent.shape == upright.shape and np.abs(sent - upright).mean() < 8


def test_formats_the_graph_does_not_decode_are_sent_as_png(tmp_path):
    _photo(tmp_path / "d.tiff", fmt="TIFF")
    [loaded] = load_inputs([tmp_path / "d.tiff"])
    assert loaded.encoded[:4] == b"\x89PNG" and "read TIFF" in loaded.notes


def test_a_transparent_gif_is_sent_as_png(tmp_path):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    for y in range(10, 54):
        img.putpixel((32, y), 1)
    img.save(tmp_path / "d.gif", transparency=0)
    [loaded] = load_inputs([tmp_path / "d.gif"])
    assert loaded.encoded[:4] == b"\x89PNG" and any("transparency" in n for n in loaded.notes)


def test_an_animation_is_read_from_its_first_frame_and_says_so(tmp_path):
    digit = Image.fromarray(np.round(render_digit(7, (96, 96)) * 255).astype(np.uint8))
    blank = Image.new("L", (96, 96), 230)
    other = Image.new("L", (96, 96), 200)
    digit.save(tmp_path / "d.gif", save_all=True, append_images=[blank, other], duration=100)
    [loaded] = load_inputs([tmp_path / "d.gif"])
    assert "3 frames: only the first is read" in loaded.notes
    [seen] = seen_images([loaded])  # the 7, not the blank frames (which would be refused)
    assert seen.max() == 255


def test_a_photo_too_large_is_refused_from_its_header(tmp_path):
    import struct
    import zlib

    from serving.inputs import MAX_PIXELS

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    # A header saying 8000 x 6400 (51.2 million pixels) and no pixels: refused unread.
    (tmp_path / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8000, 6400, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    assert 8000 * 6400 > MAX_PIXELS
    with pytest.raises(InputError, match="more than the 50,000,000 pixels"):
        load_inputs([tmp_path / "big.png"])


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


def _truncated_npy(path):
    np.save(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])


def _huge_npy(path):
    """A valid header promising 10**13 bytes, and no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (10**7, 1000, 1000)}
    )
    path.write_bytes(buffer.getvalue())


def _corrupt_gzip(path):
    """An MNIST-style gzipped IDX file with its compressed stream garbled."""
    import gzip

    idx = b"\0\0\x08\x03" + struct.pack(">III", 2, 28, 28) + bytes(range(256)) * 7
    data = bytearray(gzip.compress(idx))
    data[12:40] = bytes(range(28))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: np.save(p / "x.npy", np.full((28, 28), 300)), "pixel value 300 outside 0..255"),
        (lambda p: np.save(p / "x.npy", np.full((28, 28), -1)), "pixel value -1 outside 0..255"),
        (lambda p: np.save(p / "x.npy", np.zeros((30, 30))), "shape \\(30, 30\\)"),
        (lambda p: (p / "x.npy").write_text("hello"), "not a readable .npy"),
        (lambda p: (p / "x.npy").write_bytes(b""), "x.npy: not a readable .npy array"),
        (lambda p: _truncated_npy(p / "x.npy"), "x.npy: not a readable .npy array"),
        (lambda p: _huge_npy(p / "x.npy"), "x.npy: not a readable .npy array"),
        (lambda p: _corrupt_gzip(p / "x-idx3-ubyte.gz"), "truncated or corrupt gzip"),
        (lambda p: (p / "x.gz").write_bytes(b"\x1f\x8b\x08" + bytes(20)), "corrupt gzip"),
        (lambda p: (p / "x.png").write_text("hello"), "not an image"),
        (lambda p: None, "no such file"),
    ],
)
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
    extra: dict = {}  # more outputs to answer with, e.g. {"uncertain": [...]}, like a newer model

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
            return self._send(
                200,
                {
                    "model_version_status": [
                        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}
                    ]
                },
            )
        if self.path == "/v1/models/mnist/metadata":
            return self._send(
                200,
                {
                    "model_spec": {"name": "mnist", "version": "1"},
                    "metadata": {"signature_def": {}},
                },
            )
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
            ((name, values),) = values.items()
            expected = {
                "serving_default": "images",
                "predict_png": "image_bytes",
                "predict_image": "image_bytes",
            }[signature]
            if name != expected:
                return self._send(400, {"error": f"input {name} not in signature"})
        if signature in ("predict_png", "predict_image"):
            if not all(isinstance(v, dict) and set(v) == {"b64"} for v in values):
                return self._send(400, {"error": 'binary input must be {"b64": ...}'})
            blobs = [base64.b64decode(v["b64"]) for v in values]
            try:
                result = (
                    self.predictor.predict_encoded(blobs)
                    if signature == "predict_png"
                    else self.predictor.predict_photos(blobs)
                )
            except ServerError as e:
                return self._send(400, {"error": str(e)})
        else:
            arr = np.asarray(values)
            if arr.ndim != 3 or arr.shape[1:] != (28, 28):
                return self._send(400, {"error": f"images must be [N, 28, 28], got {arr.shape}"})
            result = self.predictor.predict(arr.astype(np.uint8))
        extra = {k: v[: len(result.class_ids)] for k, v in self.extra.items()}
        if row:
            return self._send(
                200,
                {
                    "predictions": [
                        {
                            "probabilities": p.tolist(),
                            "class_ids": int(c),
                            **{k: v[i] for k, v in extra.items()},
                        }
                        for i, (p, c) in enumerate(zip(result.probabilities, result.class_ids))
                    ]
                },
            )
        self._send(
            200,
            {
                "outputs": {
                    "probabilities": result.probabilities.tolist(),
                    "class_ids": result.class_ids.tolist(),
                    **extra,
                }
            },
        )


@pytest.fixture(scope="module")
def rest_server(exported):
    FakeTFServing.predictor = LocalPredictor(exported)
    FakeTFServing.requests = []
    FakeTFServing.extra = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTFServing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("form", ["row", "columnar"])
@pytest.mark.parametrize("signature", ["serving_default", "predict_png", "predict_image"])
def test_rest_predict_matches_local(rest_server, exported, form, signature):
    local = LocalPredictor(exported)
    images = np.stack([_digit_image(), 255 - _digit_image()])
    client = RestClient(rest_server, form=form)
    if signature == "predict_png":
        from serving.inputs import encode_png

        blobs = [encode_png(i) for i in images]
        got, want = client.predict_encoded(blobs), local.predict_encoded(blobs)
    elif signature == "predict_image":
        blobs = example_photos()
        got, want = client.predict_photos(blobs), local.predict_photos(blobs)
    else:
        got, want = client.predict(images), local.predict(images)
    np.testing.assert_array_equal(got.class_ids, want.class_ids)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5)
    path, body = FakeTFServing.requests[-1]
    assert path == "/v1/models/mnist:predict"
    assert body["signature_name"] == signature


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
            if request.model_spec.signature_name == "predict_image":
                result = local.predict_photos(list(tf.make_ndarray(request.inputs["image_bytes"])))
            else:
                result = local.predict(tf.make_ndarray(request.inputs["images"]))
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
        photos = example_photos()
        got = GrpcClient(f"127.0.0.1:{port}").predict_photos(photos)
        np.testing.assert_allclose(
            got.probabilities, local.predict_photos(photos).probabilities, rtol=1e-6
        )
        with pytest.raises(ServerError, match="NOT_FOUND: Servable not found"):
            GrpcClient(f"127.0.0.1:{port}", model="other").predict(images)
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- CLI


def test_cli_predict_many_rows_each_with_its_own_top3(exported, tmp_path, capsys, monkeypatch):
    """An array file of many images: each row's top 3 is that row's, ranked from that row
    alone (ranking the whole batch again for every row made 10,000 images take over ten
    minutes)."""
    images = np.stack([np.roll(_digit_image(), k, axis=1) for k in range(-6, 7)] * 4)
    np.save(tmp_path / "many.npy", images)
    real_argsort = np.argsort
    ranked = []
    monkeypatch.setattr(
        np, "argsort", lambda a, *x, **k: ranked.append(np.size(a)) or real_argsort(a, *x, **k)
    )
    code = client_main(["predict", str(tmp_path / "many.npy"), "--local", str(exported), "--json"])
    assert code == 0
    monkeypatch.undo()
    assert ranked and max(ranked) == 10  # one row of 10 probabilities at a time
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert len(rows) == len(images)
    for row in rows:
        p = np.array(row["probabilities"])
        want = np.argsort(-p, kind="stable")[:3]
        assert [t["digit"] for t in row["top3"]] == want.tolist()
        assert [t["probability"] for t in row["top3"]] == p[want].tolist()


def test_cli_predict_local_json(exported, tmp_path, capsys):
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    assert (
        client_main(["predict", str(tmp_path / "d.png"), "--local", str(exported), "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    [row] = out["predictions"]
    assert row["input"] == "d.png" and 0 <= row["digit"] <= 9
    assert len(row["probabilities"]) == 10 and abs(sum(row["probabilities"]) - 1) < 1e-4
    assert row["signature"] == "predict_png" and isinstance(row.get("uncertain", False), bool)
    assert row["preprocessing"] == [
        "already in MNIST's format (28x28, white on black): sent unchanged"
    ]
    assert [t["digit"] for t in row["top3"]][0] == row["digit"] and len(row["top3"]) == 3
    want = LocalPredictor(exported).predict(_digit_image()[None])
    np.testing.assert_allclose(row["probabilities"], want.probabilities[0], atol=1e-5)
    assert (
        client_main(
            [
                "predict",
                str(tmp_path / "d.png"),
                "--local",
                str(exported),
                "--json",
                "--signature",
                "predict_image",
            ]
        )
        == 0
    )
    [row] = json.loads(capsys.readouterr().out)["predictions"]
    assert row["signature"] == "predict_image" and row["preprocessing"] == []


def test_cli_photos_to_predict_image_arrays_to_serving_default(exported, tmp_path, capsys):
    _photo(tmp_path / "a.jpg")
    np.save(tmp_path / "b.npy", np.stack([_digit_image()] * 2))
    assert (
        client_main(
            [
                "predict",
                str(tmp_path / "a.jpg"),
                str(tmp_path / "b.npy"),
                "--local",
                str(exported),
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [(r["input"], r["signature"]) for r in rows] == [
        ("a.jpg", "predict_image"),
        ("b.npy[0]", "serving_default"),
        ("b.npy[1]", "serving_default"),
    ]
    local = LocalPredictor(exported)
    want = local.predict_photos([(tmp_path / "a.jpg").read_bytes()])
    assert rows[0]["digit"] == int(want.class_ids[0])


@pytest.mark.parametrize("signature", ["serving_default", "predict_png"])
def test_cli_can_normalise_here_for_an_older_model(exported, tmp_path, capsys, signature):
    """Sent as 28x28s, normalised in the client by the graph's own function: the same
    probabilities as predict_image computes in the model."""
    _photo(tmp_path / "a.jpg")
    assert (
        client_main(
            [
                "predict",
                str(tmp_path / "a.jpg"),
                "--local",
                str(exported),
                "--signature",
                signature,
                "--json",
            ]
        )
        == 0
    )
    [row] = json.loads(capsys.readouterr().out)["predictions"]
    assert row["signature"] == signature
    want = LocalPredictor(exported).predict_photos([(tmp_path / "a.jpg").read_bytes()])
    np.testing.assert_allclose(row["probabilities"], want.probabilities[0], atol=1e-5)


def test_cli_show_writes_what_the_model_saw(exported, tmp_path, capsys):
    _photo(tmp_path / "a.jpg")
    np.save(tmp_path / "b.npy", _digit_image())
    sheet = tmp_path / "seen.png"
    assert (
        client_main(
            [
                "predict",
                str(tmp_path / "a.jpg"),
                str(tmp_path / "b.npy"),
                "--local",
                str(exported),
                "--show",
                str(sheet),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"what the model saw: {sheet}" in out and "top 3:" in out
    image = np.asarray(Image.open(sheet).convert("L"))
    assert image.shape[0] > 2 * 28 * 6  # one row per input, each 28x28 enlarged 6x
    seen = seen_images(load_inputs([tmp_path / "a.jpg"]))[0]
    enlarged = np.asarray(Image.fromarray(seen).resize((168, 168), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(image[8 : 8 + 168, 8 : 8 + 168], enlarged)


def test_cli_show_to_a_place_that_cannot_be_written_is_one_line(exported, tmp_path, capsys):
    np.save(tmp_path / "b.npy", _digit_image())
    common = ["predict", str(tmp_path / "b.npy"), "--local", str(exported), "--show"]
    assert client_main([*common, str(tmp_path)]) == 2  # a folder: refused before sending
    assert "is a folder" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert client_main([*common, str(blocked / "seen.png")]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "seen.png"  # a typo: no folders made behind it
    assert client_main([*common, str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: --show {missing}: there is no folder {missing.parent}; create it first\n"
    )
    assert not (tmp_path / "no").exists()
    assert client_main([*common, "/proc/seen.png"]) == 1  # the write itself fails
    out, err = capsys.readouterr()
    assert err.startswith("error: could not write --show") and len(err.splitlines()) == 1, err
    # The answer is given all the same (the picture is extra), without claiming the picture.
    assert "b.npy: digit " in out and "what the model saw" not in out


def test_cli_show_never_overwrites_an_input(exported, tmp_path, capsys):
    photo = tmp_path / "mine.png"
    Image.fromarray(_digit_image()).resize((112, 112)).save(photo)
    before = photo.read_bytes()
    for show in (photo, tmp_path / "." / "mine.png"):
        assert (
            client_main(["predict", str(photo), "--local", str(exported), "--show", str(show)]) == 2
        )
        assert capsys.readouterr().err == (
            f"error: --show {show} is one of the inputs: it would be overwritten\n"
        )
    assert photo.read_bytes() == before


def test_cli_shows_uncertain_and_the_top_3_when_the_model_says(rest_server, tmp_path, capsys):
    _photo(tmp_path / "a.jpg")
    _photo(tmp_path / "b.png", digit=4, fmt="PNG")
    FakeTFServing.extra = {"uncertain": [True, False]}
    try:
        assert (
            client_main(
                [
                    "predict",
                    str(tmp_path / "a.jpg"),
                    str(tmp_path / "b.png"),
                    "--server",
                    rest_server,
                    "--json",
                ]
            )
            == 0
        )
        rows = json.loads(capsys.readouterr().out)["predictions"]
        assert [r["uncertain"] for r in rows] == [True, False]
        assert (
            client_main(
                [
                    "predict",
                    str(tmp_path / "a.jpg"),
                    str(tmp_path / "b.png"),
                    "--server",
                    rest_server,
                    "--form",
                    "columnar",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
    finally:
        FakeTFServing.extra = {}
    first, second = out.split("b.png:")
    assert "UNCERTAIN" in first and "UNCERTAIN" not in second
    assert first.count("top 3:") == 1 and "sent to predict_image" in first


@pytest.mark.parametrize("show", [False, True])
def test_cli_a_photo_without_a_digit_is_a_clear_error(exported, tmp_path, capsys, show):
    """Alone or beside others, with or without --show: named in one line, exit 2 (the input
    is at fault, not the server), the other inputs answered."""
    Image.new("RGB", (200, 150), (235, 230, 220)).save(tmp_path / "blank.jpg")
    args = ["--local", str(exported)] + (["--show", str(tmp_path / "seen.png")] if show else [])
    assert client_main(["predict", str(tmp_path / "blank.jpg"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blank.jpg: refused by the model: no digit found" in err
    figures = r"\(contrast [-\d.e]+, ink/noise [-\d.e]+, pixels \d+, height \d+, width \d+\)$"
    assert re.search(figures, err.strip()), err  # each figure beside its name

    np.save(tmp_path / "digit.npy", _digit_image())
    Image.fromarray(255 - _digit_image()).resize((140, 140)).save(tmp_path / "photo.png")
    inputs = [str(tmp_path / n) for n in ("digit.npy", "blank.jpg", "photo.png")]
    assert client_main(["predict", *inputs, *args, "--json"]) == 2
    captured = capsys.readouterr()
    answered = json.loads(captured.out)["predictions"]
    assert [r["input"] for r in answered] == ["digit.npy", "photo.png"]
    assert "blank.jpg: refused by the model: no digit found" in captured.err
    if show:  # the picture has the two answered inputs
        assert Image.open(tmp_path / "seen.png").size[1] == 8 + 2 * (28 * 6 + 8)


@pytest.mark.parametrize("brand", [b"heic", b"mif1"])
def test_a_phones_heif_photo_is_refused_with_what_to_do(tmp_path, brand):
    """Neither Pillow nor TensorFlow decodes HEIC (an iPhone's default): say so, and how to
    get a JPEG, rather than only "not an image"."""
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(
        InputError, match=r"a HEIC/HEIF photo, as phones save by default; save it as JPEG"
    ):
        load_inputs([path])
    path.write_bytes(b"\x00\x00\x00\x1cftypavif" + bytes(64))
    with pytest.raises(InputError, match=r": an AVIF image; save it as JPEG or PNG first$"):
        load_inputs([path])
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))  # an MP4: no such advice
    with pytest.raises(InputError) as e:
        load_inputs([path])
    assert "HEIF" not in str(e.value) and "not an image the client can read" in str(e.value)


def test_cli_refuses_bad_pixel_before_sending(tmp_path):
    np.save(tmp_path / "x.npy", np.full((28, 28), 300))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "predict",
            str(tmp_path / "x.npy"),
            "--server",
            "127.0.0.1:9",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        f"input refused, nothing sent: {tmp_path / 'x.npy'}: pixel value 300 outside 0..255"
    )


def test_cli_server_down_is_a_clear_error(tmp_path, capsys):
    Image.fromarray(_digit_image()).save(tmp_path / "d.png")
    assert client_main(["predict", str(tmp_path / "d.png"), "--server", "127.0.0.1:9"]) == 1
    assert "connection refused (is TF Serving running?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((0, 28, 28), np.uint8), "holds no image"),
        (np.zeros((28, 28), np.uint8), "blank (no ink found)"),
        ((np.arange(784).reshape(28, 28) % 2).astype(np.float32), "looks scaled to [0, 1]"),
        (np.where(np.eye(28) > 0, np.nan, 0).astype(np.float32), "are NaN"),
    ],
)
def test_unusable_arrays_are_refused_with_the_reason(tmp_path, array, message):
    path = tmp_path / "x.npy"
    np.save(path, array)
    with pytest.raises(InputError, match=re.escape(message)):
        load_inputs([path])


@pytest.mark.parametrize("data", [b"\x00\x00\x08\x03", b"\x00\x00\x08\x03\x00\x00"])
def test_a_truncated_idx_header_is_one_line(tmp_path, data):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(InputError, match="truncated"):
        load_inputs([path])


@pytest.mark.parametrize("where", ["local", "rest"])
def test_one_refused_photo_is_named_and_the_others_answered(
    exported, rest_server, tmp_path, capsys, where
):
    """predict_image refuses a whole batch for one unusable photo: the client asks photo by
    photo, answers the others and names the refused one (exit 2), in-process or over REST
    (TF Serving's HTTP 400)."""
    _photo(tmp_path / "a.jpg")
    Image.new("L", (200, 200), 250).save(tmp_path / "blank.png")
    _photo(tmp_path / "c.png", digit=4, fmt="PNG")
    photos = [str(tmp_path / n) for n in ("a.jpg", "blank.png", "c.png")]
    target = ["--local", str(exported)] if where == "local" else ["--server", rest_server]
    assert client_main(["predict", *photos, *target]) == 2
    out, err = capsys.readouterr()
    assert "a.jpg: digit" in out and "c.png: digit" in out and "blank.png" not in out
    assert err.startswith("error: blank.png: refused by the model: "), err
    assert "no digit found" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------- inputs and flags nobody here made


def _mnist_png(path):
    Image.fromarray(_digit_image()).save(path, format="PNG")
    return path


def test_a_truncated_image_is_refused_in_one_line_and_the_others_answered(exported, tmp_path):
    """A 28x28 PNG that Pillow reads but TensorFlow's decoder does not (its end cut off): the
    graph's own message, without the stack TensorFlow puts before it; exit 2."""
    data = _mnist_png(tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-20])
    r = subprocess.run(
        [sys.executable, "-m", "serving", "predict", str(tmp_path / "cut.png"),
         str(tmp_path / "whole.png"), "--local", str(exported)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(
        r"error: cut.png: refused by the model: Invalid PNG data, size \d+", r.stderr.strip()
    )
    assert "whole.png: digit" in r.stdout


@pytest.mark.parametrize("mode", ["1", "P", "L"])
def test_a_bmp_the_graph_cannot_decode_is_sent_as_png(tmp_path, mode):
    """TensorFlow's BMP decoder refuses 1-bit BMPs and reads 8-bit ones as palette indices:
    those are re-encoded as PNG (and said so); 24-bit ones go as they are."""
    page = Image.fromarray(np.where(_digit_image() > 0, 0, 255).astype(np.uint8))
    page = page.resize((84, 84), Image.Resampling.NEAREST)  # two colours: exact in 1 bit
    page.convert(mode).save(tmp_path / "d.bmp")
    page.convert("RGB").save(tmp_path / "rgb.bmp")
    [item, rgb] = load_inputs([tmp_path / "d.bmp", tmp_path / "rgb.bmp"])
    assert item.photo.startswith(b"\x89PNG") and "sent as PNG" in item.notes
    assert rgb.photo == (tmp_path / "rgb.bmp").read_bytes() and rgb.notes == ()
    np.testing.assert_array_equal(*seen_images([item, rgb]))


def test_corrupt_exif_is_a_note_not_a_warning(tmp_path):
    import warnings

    Image.fromarray(255 - _digit_image()).resize((84, 84)).save(
        tmp_path / "e.jpg", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x01\x02"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "Corrupt EXIF data" would fail here
        [item] = load_inputs([tmp_path / "e.jpg"])
    assert "EXIF data unreadable: orientation ignored" in item.notes


def test_every_refused_file_is_named_at_once(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan))
    _mnist_png(tmp_path / "good.png")
    with pytest.raises(InputError) as e:
        load_inputs([tmp_path / "empty.png", tmp_path / "good.png", tmp_path / "nan.npy"])
    assert "empty.png: not an image" in str(e.value) and "nan.npy: 784 pixel(s) are NaN" in str(
        e.value
    )
    assert "good.png" not in str(e.value) and "\n" not in str(e.value)


def test_a_gzip_idx_bomb_is_refused_from_its_header(tmp_path):
    """A small .gz whose IDX header promises gigabytes: refused before decompressing them."""
    import gzip
    import struct

    header = struct.pack(">4B3I", 0, 0, 8, 3, 1_400_000, 28, 28)
    (tmp_path / "bomb.idx.gz").write_bytes(gzip.compress(header + bytes(2**20)))
    with pytest.raises(InputError, match=r"1,097,600,000 bytes, more than the 78,400,000"):
        load_inputs([tmp_path / "bomb.idx.gz"])
    images = np.stack([_digit_image()] * 3)
    header = struct.pack(">4B3I", 0, 0, 8, 3, 3, 28, 28)
    (tmp_path / "ok.idx.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "cut.idx.gz").write_bytes(gzip.compress(header + images.tobytes()[:-5]))
    (tmp_path / "long.idx.gz").write_bytes(gzip.compress(header + images.tobytes() + b"x"))
    assert len(load_inputs([tmp_path / "ok.idx.gz"])) == 3
    with pytest.raises(InputError, match=r"holds 2,347 bytes \(truncated\)"):
        load_inputs([tmp_path / "cut.idx.gz"])
    with pytest.raises(InputError, match="holds more bytes"):
        load_inputs([tmp_path / "long.idx.gz"])


@pytest.mark.parametrize(
    "printed, shown",
    [
        # a value just under its floor (MIN_CONTRAST 0.15) is never rounded up to it
        (
            "[no digit found: crop closer (contrast, ink/noise, pixels):] [0.149658203] [4] [12]",
            "no digit found: crop closer (contrast 0.149658203, ink/noise 4, pixels 12)",
        ),
        ("[bounds (lo, hi):] [nan] [-1e-05]", "bounds (lo nan, hi -1e-05)"),
        ("[bounds (lo, hi):] [1] [2] [3]", "bounds (lo, hi): 1 2 3"),  # not one value per name
        ("[see (the docs):] [x]", "see (the docs): x"),  # not figures
        ("[bounds (lo, hi):] " + "[-1] " * 30 + "[x]", "bounds (lo, hi): " + "-1 " * 30 + "x"),
    ],
)
def test_an_assertions_figures_are_named_as_the_graph_printed_them(printed, shown):
    from serving.client import assertion_text

    assert assertion_text(f"assertion failed: {printed}\n\t [[{{{{node Assert}}}}]]") == shown


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--server", "localhost:1", "--timeout", "nan"], "--timeout: expected seconds > 0"),
        (["--server", "localhost:1", "--timeout", "inf"], "--timeout: expected seconds > 0"),
        (["--server", "localhost:1", "--timeout", "1e309"], "--timeout: expected seconds > 0"),
        (["--server", "localhost:1", "--timeout", "0"], "--timeout: expected seconds > 0"),
        (["--server", "localhost:1", "--timeout", "-5"], "--timeout: expected seconds > 0"),
        (["--local", "m", "--grpc"], "--grpc: for --server only"),
        (["--local", "m", "--model", "x", "--form", "row"], "--form, --model: for --server only"),
        (["--local", "m", "--timeout", "5"], "--timeout: for --server only"),
        (["--local", "m", "--show", "seen.jpg"], "the picture is a PNG, name it *.png"),
        (["--server", "localhost:abc"], "--server: expected HOST:PORT with a port in 1..65535"),
        (["--server", "localhost:99999"], "--server: expected HOST:PORT"),
        (["--server", "[::1"], "--server: expected HOST:PORT"),
        (["--server", "ftp://x:1"], "--server: expected HOST:PORT"),
        (["--server", "local\nhost:1"], "--server: expected HOST:PORT"),
        (["--server", "http://localhost:8500", "--grpc"], "--grpc talks to HOST:PORT, not a URL"),
        ([], "error: say where the model is: --local DIR or --server HOST:PORT"),  # (not "input")
        (["--show", "s.png"], "error: say where the model is"),  # before the inputs are read
    ],
)
def test_client_flags_that_cannot_work_are_refused_in_one_line(tmp_path, flags, message):
    _mnist_png(tmp_path / "d.png")
    r = subprocess.run(
        [sys.executable, "-m", "serving", "predict", str(tmp_path / "d.png"), *flags],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_model_named_is_said_before_the_inputs_are_read(tmp_path):
    """Neither --local nor --server: that, not the state of an input (here a missing one)."""
    r = subprocess.run(
        [sys.executable, "-m", "serving", "predict", str(tmp_path / "missing.png")],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == "error: say where the model is: --local DIR or --server HOST:PORT\n"


@pytest.mark.slow
def test_make_predict_passes_file_names_as_they_are(exported, tmp_path):
    """`make predict IMAGE=...` with names the shell would mangle ( ( ) ' $ ) and a glob."""
    import shutil

    shutil.copytree(exported, tmp_path / "a" / "models" / "mnist" / "1")
    photos = tmp_path / "in"
    photos.mkdir()
    names = ["d(1).png", "it's.png", "a$b.png", "g1.png", "g2.png"]
    for name in names:
        _photo(photos / name, fmt="PNG")
    image = " ".join(str(photos / n) for n in names[:3]) + f" {photos}/g*.png"
    r = subprocess.run(
        ["make", "-s", "--no-print-directory", "predict", f"ARTIFACTS_DIR={tmp_path / 'a'}",
         f"IMAGE={image}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [
        line.split(": digit")[0] for line in r.stdout.splitlines() if ": digit" in line
    ] == names


def test_ctrl_c_during_a_prediction_is_one_line(exported, tmp_path):
    """Ctrl-C while TensorFlow is imported (the slow part): exit 130, no traceback from the
    client or its console filter."""
    import signal
    import time

    photo = _photo(tmp_path / "p.jpg")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "predict", str(photo), "--local", str(exported)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=as_a_terminals_job,
    )  # fmt: skip
    time.sleep(0.7)  # Python and NumPy are up, TensorFlow's import takes a second more
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err[-2000:]


def test_a_damaged_versions_message_says_which_damage_and_what_to_do():
    """A manifest that cannot be read is not called a mismatch; the advice works whether or
    not a label points at the version (a rollback needs an earlier stable: it may not exist)."""
    from pathlib import Path

    from serving.client import damaged_message

    invalid = damaged_message(
        Path("m/3"), ["assets.extra/files_sha256.json (invalid: not a JSON object)"]
    )
    assert invalid.startswith(
        "m/3 is damaged: assets.extra/files_sha256.json, the record of its files' SHA-256, is "
        "invalid (not a JSON object), so its files cannot be checked"
    )
    changed = damaged_message(Path("m/3"), ["saved_model.pb", "variables/v.index"])
    assert "saved_model.pb, variables/v.index no longer match the SHA-256 recorded" in changed
    for message in (invalid, changed):
        assert "no longer match" not in message or message is changed
        assert message.endswith(
            "Delete that folder and publish again (if a label points at it, first move it: "
            "`python -m pipeline models promote N` for stable, `models canary N` or `models "
            "canary none` for canary)"
        )
        assert "rollback" not in message
