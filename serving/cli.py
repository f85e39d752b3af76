"""Client CLI: predict the digits in photos and arrays with a local SavedModel or a TF Serving.

    python -m serving predict photo.jpg --local artifacts/models/mnist
    python -m serving predict photo.jpg more.npy --server localhost:8501 [--json]
    python -m serving predict photo.jpg --server localhost:8500 --grpc --show seen.png
    python -m serving status --server localhost:8501

Photos (PNG/JPEG/GIF/BMP of any size) go to the `predict_image` signature, which normalises them
as MNIST did inside the model; .npy/IDX arrays (raw 28x28 pixels) go to `serving_default`, and
an image file already in MNIST's format (28x28 grayscale, white digit on a black border) to
`predict_png` unchanged. `--signature predict_image` sends every image file to predict_image;
`--signature predict_png|serving_default` sends 28x28s, photos normalised here by the same
graph function (components.photo), for a model exported before `predict_image` existed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from serving.client import (
    MODEL_NAME,
    FlagError,
    GrpcClient,
    LocalPredictor,
    Prediction,
    Refusal,
    RestClient,
    ServerError,
    local_model_dir,
)
from serving.inputs import InputError, LoadedInput, encode_png, load_inputs, seen_each

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SIGNATURES = ("auto", "predict_image", "predict_png", "serving_default")
TOP_K = 3


DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S = 10.0, 3600.0


def _path(text: str) -> Path:
    """argparse type of a path: an empty one would silently be the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _server(text: str) -> str:
    """argparse type of --server: HOST:PORT (REST may add http:// or https://), a port in
    1..65535; anything else would fail inside urllib or gRPC with a traceback."""
    import re

    match = re.fullmatch(r"(https?://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})/?", text)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port in 1..65535 (e.g. localhost:8501), got {text!r}"
        )
    return text.rstrip("/")


def _timeout(text: str) -> float:
    """argparse type of --timeout: seconds, > 0 and finite (a socket timeout)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses NaN
        raise argparse.ArgumentTypeError(
            f"expected seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {text!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("predict", help="predict the digit in each input")
    p.add_argument(
        "inputs",
        nargs="+",
        help="photos (PNG/JPEG/GIF/BMP, any size; other "
        "formats Pillow reads are sent as PNG), .npy ([28,28], [N,28,28] or "
        "[N,784], values 0..255) or IDX files",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--local",
        type=_path,
        help="a SavedModel folder, or a models base folder (the version TF Serving would "
        "answer with: --version, --label, else the newest served); no server",
    )
    where.add_argument(
        "--server", type=_server, help="TF Serving host:port (REST 8501, or gRPC 8500 with --grpc)"
    )
    p.add_argument("--grpc", action="store_true", help="talk gRPC instead of REST")
    p.add_argument(
        "--form",
        choices=("row", "columnar"),
        help="REST request form: row `instances` (default) or columnar `inputs`",
    )
    p.add_argument(
        "--signature",
        choices=SIGNATURES,
        default="auto",
        help="auto (default): photos to predict_image (normalised in the model), arrays to "
        "serving_default, 28x28 images already in MNIST's format to predict_png unchanged. "
        "predict_image: every image file to predict_image. predict_png / serving_default: "
        "every input as a 28x28 PNG / uint8 array, photos normalised here by the same graph "
        "function (for a model without predict_image)",
    )
    p.add_argument("--png", action="store_true", help="same as --signature predict_png")
    p.add_argument(
        "--show",
        type=_path,
        metavar="PATH",
        help="write a PNG of the 28x28 image the model saw for each input, beside "
        "its prediction (photos: computed here with components.photo, the "
        "function inside predict_image)",
    )
    _common(p)
    for name, text in (
        ("status", "model version status over REST"),
        ("metadata", "model signatures over REST"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--server", type=_server, required=True, help="TF Serving REST host:port")
        _common(s)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"model name in TF Serving (default {MODEL_NAME})")
    p.add_argument("--version", type=int, help="a specific version (default: the newest served)")
    p.add_argument(
        "--label",
        help="a version label TF Serving serves (stable, canary: see "
        "`python -m pipeline models`); instead of --version",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show TensorFlow's native start-up lines (hidden by default)",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        help=f"seconds to wait for the server (default 10, at most {MAX_TIMEOUT_S:g})",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


NO_MODEL = "say where the model is: --local DIR or --server HOST:PORT"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from components import console

    console.setup(args.verbose)
    code = _command(args)
    lost = console.output_lost()  # the answers are the output: not written, not answered
    if lost is None:
        return code
    print(f"error: {lost}", file=sys.stderr)
    return code or EXIT_FAILED


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "predict":
            return _predict(args)
        client = RestClient(args.server, *_server_settings(args), label=args.label)
        answer = client.status() if args.command == "status" else client.metadata()
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as e:
        print(f"error: input refused, nothing sent: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _predict(args: argparse.Namespace) -> int:
    if args.local is None and args.server is None:  # (before the inputs are read)
        raise FlagError(NO_MODEL)
    if args.show is not None:
        _check_writable(args.show, args.inputs)
    if args.local is not None:  # the model runs here: TensorFlow is needed, imported fast
        from components.tf_import import import_tensorflow

        import_tensorflow()
    inputs = load_inputs(args.inputs)  # every input checked before anything is sent
    signature = "predict_png" if args.png else args.signature
    routes = _routes(inputs, signature)
    # What the model sees, computed here when it is needed: to send 28x28s, or to show them.
    # A photo the graph refuses here is not sent: the model would refuse it the same way.
    needed = args.show or any(
        sig != "predict_image" and item.image is None for item, sig in zip(inputs, routes)
    )
    seen, unusable = (
        seen_each(
            inputs, [sig == "predict_image" or i.image is None for i, sig in zip(inputs, routes)]
        )
        if needed
        else (None, {})
    )
    client, where = _client(args)
    results = _send(client, inputs, routes, seen, unusable)
    refused = [
        f"{item.source}: refused by the model: {r.reason}"
        for item, r in zip(inputs, results)
        if isinstance(r, Refused)
    ]
    answered = [
        (k, result)
        for k, result in enumerate(results)
        if result and not isinstance(result, Refused)
    ]
    rows = [_row(inputs[k], *result) for k, result in answered]
    show_failed = None
    if args.show and seen is not None and rows:
        try:
            _write_sheet(args.show, [_shown(seen[k]) for k, _ in answered], rows)
        except ServerError as e:  # the answers are given all the same, then this error
            show_failed = e
        else:
            for r in rows:
                r["seen"] = str(args.show)
    _print_answers(args, where, rows, refused)
    code = _report_refused(refused)
    if show_failed is None:
        return code
    print(f"error: {show_failed}", file=sys.stderr)
    return code or EXIT_FAILED


def _print_answers(
    args: argparse.Namespace, where: str, rows: list[dict[str, Any]], refused: list[str]
) -> None:
    if args.json:
        print(json.dumps({"model": where, "predictions": rows, "refused": refused}, indent=2))
        return
    print(f"model: {where}")
    for r in rows:
        flag = "  UNCERTAIN" if r.get("uncertain") else ""
        print(f"{r['input']}: digit {r['digit']} (confidence {r['confidence']:.3f}){flag}")
        top = ", ".join(f"{t['digit']} {t['probability']:.3f}" for t in r["top3"])
        print(f"  top {TOP_K}: {top}")
        print(
            f"  sent to {r['signature']}"
            + (f"; preprocessing: {'; '.join(r['preprocessing'])}" if r["preprocessing"] else "")
        )
        probs = " ".join(f"{d}:{p:.3f}" for d, p in enumerate(r["probabilities"]))
        print(f"  probabilities: {probs}")
    if rows and "seen" in rows[0]:
        print(f"what the model saw: {args.show}")


def _report_refused(refused: list[str]) -> int:
    for line in refused:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE if refused else EXIT_OK


def _server_settings(args: argparse.Namespace) -> tuple[str, int | None, float]:
    """Model name, version and timeout for a TF Serving client, defaults filled in."""
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    return args.model or MODEL_NAME, args.version, timeout


def _client(args: argparse.Namespace) -> tuple[LocalPredictor | RestClient | GrpcClient, str]:
    """The client --local or --server asks for, and where it runs the model (for people)."""
    client: LocalPredictor | RestClient | GrpcClient
    if args.version is not None and args.label is not None:
        raise FlagError("give --version or --label, not both")
    if args.local is not None:
        given = [
            flag
            for flag, value in (
                ("--grpc", args.grpc),
                ("--form", args.form is not None),
                ("--model", args.model is not None),
                ("--timeout", args.timeout is not None),
            )
            if value
        ]
        if given:
            raise FlagError(f"{', '.join(given)}: for --server only (--local runs the model here)")
        client = LocalPredictor(local_model_dir(args.local, args.version, args.label))
        where = f"local SavedModel {client.path}"
    elif args.server:
        if args.grpc and args.server.startswith("http"):
            raise FlagError(f"--grpc talks to HOST:PORT, not a URL: got {args.server!r}")
        client = (
            GrpcClient(args.server, *_server_settings(args), label=args.label)
            if args.grpc
            else RestClient(
                args.server, *_server_settings(args), args.form or "row", label=args.label
            )
        )
        where = f"TF Serving {'gRPC' if args.grpc else 'REST'} at {args.server}"
    else:
        raise FlagError(NO_MODEL)
    return client, where


def _send(
    client: LocalPredictor | RestClient | GrpcClient,
    inputs: list[LoadedInput],
    routes: list[str],
    seen: list[np.ndarray | None] | None,
    unusable: dict[int, str],
) -> list[tuple[str, Prediction, int] | Refused | None]:
    """One request per signature, with all the inputs routed to it (but those in `unusable`:
    refused, with its reason); for each input, the signature, the prediction of its request
    and its row in it."""
    results: list[tuple[str, Prediction, int] | Refused | None] = [None] * len(inputs)
    groups: dict[str, list[int]] = {}
    for i, sig in enumerate(routes):
        if i in unusable:
            results[i] = Refused(unusable[i])
        else:
            groups.setdefault(sig, []).append(i)
    for sig, indices in groups.items():
        try:
            prediction = _request(client, sig, [inputs[i] for i in indices], seen, indices)
        except Refusal as e:
            # The graph refuses a whole batch for one input it cannot use: ask input by input,
            # to answer the others and name the ones refused.
            for i in indices:
                results[i] = (
                    Refused(e.reason)
                    if len(indices) == 1
                    else _alone(client, sig, inputs, seen, i, e)
                )
            continue
        for row, i in enumerate(indices):
            results[i] = (sig, prediction, row)
    return results


def _request(
    client: LocalPredictor | RestClient | GrpcClient,
    sig: str,
    items: list[LoadedInput],
    seen: list[np.ndarray | None] | None,
    indices: list[int],
) -> Prediction:
    """One request to `sig` with `items` (the inputs at `indices`)."""

    def pixels(item: LoadedInput, i: int) -> np.ndarray:
        image = seen[i] if seen is not None else None
        return image if image is not None else item.pixels

    if sig == "predict_image":
        return client.predict_photos([item.photo for item in items])
    if sig == "predict_png":
        return client.predict_encoded(
            [
                item.photo if item.mnist_format else encode_png(pixels(item, i))
                for item, i in zip(items, indices)
            ]
        )
    return client.predict(np.stack([pixels(item, i) for item, i in zip(items, indices)]))


class Refused:
    """A photo the model refused (alone, after its batch was refused)."""

    def __init__(self, reason: str):
        self.reason = reason


def _alone(
    client: LocalPredictor | RestClient | GrpcClient,
    sig: str,
    inputs: list[LoadedInput],
    seen: list[np.ndarray | None] | None,
    i: int,
    batch_error: Refusal,
) -> tuple[str, Prediction, int] | Refused:
    try:
        return (sig, _request(client, sig, [inputs[i]], seen, [i]), 0)
    except Refusal as e:
        return Refused(e.reason)
    except ServerError:
        raise batch_error from None  # not a refusal (the server went away): the first error


def _routes(inputs: list[LoadedInput], signature: str) -> list[str]:
    """The signature each input goes to."""
    routes = []
    for item in inputs:
        if signature in ("auto", "predict_image") and not item.is_photo:
            routes.append("serving_default")  # arrays are 28x28 pixels already
        elif signature == "auto":
            routes.append("predict_png" if item.mnist_format else "predict_image")
        else:
            routes.append(signature)
    return routes


def _row(item: LoadedInput, signature: str, prediction: Prediction, i: int) -> dict[str, Any]:
    p = prediction.probabilities[i]
    c = int(prediction.class_ids[i])
    notes = list(item.notes)
    if item.mnist_format and signature != "predict_image":
        notes.append("already in MNIST's format (28x28, white on black): sent unchanged")
    elif item.is_photo and signature != "predict_image":
        notes.append("normalised here like MNIST (components.photo)")
    row: dict[str, Any] = {
        "input": item.source,
        "digit": c,
        "confidence": float(p[c]),
        "top3": [  # ranked from this row alone (not the whole batch again for every row)
            {"digit": int(d), "probability": round(float(p[d]), 6)}
            for d in np.argsort(-p, kind="stable")[:TOP_K]
        ],
        "probabilities": [round(float(x), 6) for x in p],
        "signature": signature,
        "preprocessing": notes,
    }
    uncertain = prediction.uncertain
    if uncertain is not None:
        row["uncertain"] = bool(uncertain[i])
    return row


def _write_sheet(path: Path, seen: list[np.ndarray], rows: list[dict[str, Any]]) -> None:
    """One PNG: each input's 28x28 (pixels as the model saw them, enlarged 6x, on a grey
    frame) with its prediction written beside it."""
    from PIL import Image, ImageDraw

    scale, pad, text_width = 6, 8, 360
    cell = 28 * scale
    sheet = Image.new(
        "RGB", (pad * 3 + cell + text_width, pad + len(rows) * (cell + pad)), (96, 96, 96)
    )
    draw = ImageDraw.Draw(sheet)
    for k, (image, r) in enumerate(zip(seen, rows)):
        top = pad + k * (cell + pad)
        sheet.paste(
            Image.fromarray(image, mode="L")
            .resize((cell, cell), Image.Resampling.NEAREST)
            .convert("RGB"),
            (pad, top),
        )
        lines = [r["input"], f"digit {r['digit']}  ({r['confidence']:.3f})"]
        if r.get("uncertain"):
            lines[-1] += "  uncertain"
        lines.append("top: " + ", ".join(f"{t['digit']} {t['probability']:.2f}" for t in r["top3"]))
        lines.append(f"via {r['signature']}")
        for j, line in enumerate(lines):
            draw.text((pad * 2 + cell, top + 4 + 18 * j), line, fill=(255, 255, 255))
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the predictions are printed; the picture is not
        tmp.unlink(missing_ok=True)
        raise ServerError(f"could not write --show {path}: {e.strerror or e}") from None


def _shown(image: np.ndarray | None) -> np.ndarray:
    assert image is not None, "an answered input has the image the model saw"
    return image


def _check_writable(path: Path, inputs: list[str]) -> None:
    """--show must name a file that can be written, and none of the inputs (it would be
    overwritten), checked before anything is sent."""
    for given in inputs:
        if path.exists() and os.path.exists(given) and os.path.samefile(given, path):
            raise FlagError(f"--show {path} is one of the inputs: it would be overwritten")
    if path.is_dir():
        raise FlagError(f"--show {path} is a folder: give a file name, e.g. {path / 'seen.png'}")
    if path.suffix.lower() != ".png":
        raise FlagError(f"--show {path}: the picture is a PNG, name it *.png")
    folder = path.parent
    if not folder.exists():  # (a typo would otherwise leave folders behind it)
        raise FlagError(f"--show {path}: there is no folder {folder}; create it first")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise FlagError(f"--show {path}: {folder} is not a writable folder")
