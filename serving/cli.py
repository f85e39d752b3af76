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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from serving.client import (
    FlagError,
    GrpcClient,
    LocalPredictor,
    Prediction,
    Refusal,
    RestClient,
    ServerError,
    local_model_dir,
)
from serving.inputs import InputError, LoadedInput, encode_png, load_inputs, seen_images

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SIGNATURES = ("auto", "predict_image", "predict_png", "serving_default")
TOP_K = 3


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
        type=Path,
        help="a SavedModel folder, or a models base folder (the version TF Serving would "
        "answer with: --version, --label, else the newest served); no server",
    )
    where.add_argument(
        "--server", help="TF Serving host:port (REST 8501, or gRPC 8500 with --grpc)"
    )
    p.add_argument("--grpc", action="store_true", help="talk gRPC instead of REST")
    p.add_argument(
        "--form",
        choices=("row", "columnar"),
        default="row",
        help="REST request form: row `instances` or columnar `inputs`",
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
        type=Path,
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
        s.add_argument("--server", required=True, help="TF Serving REST host:port")
        _common(s)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mnist", help="model name in TF Serving (default mnist)")
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
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from components import console

    console.setup(args.verbose)
    try:
        if args.command == "predict":
            return _predict(args)
        client = RestClient(args.server, args.model, args.version, args.timeout, label=args.label)
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
    if args.show is not None:
        _check_writable(args.show)
    if args.local is not None:  # the model runs here: TensorFlow is needed, imported fast
        from components.tf_import import import_tensorflow

        import_tensorflow()
    inputs = load_inputs(args.inputs)  # every input checked before anything is sent
    signature = "predict_png" if args.png else args.signature
    routes = _routes(inputs, signature)
    # What the model sees, computed here when it is needed: to send 28x28s, or to show them.
    needed = args.show or any(
        sig != "predict_image" and item.image is None for item, sig in zip(inputs, routes)
    )
    seen = (
        seen_images(
            inputs, [sig == "predict_image" or i.image is None for i, sig in zip(inputs, routes)]
        )
        if needed
        else None
    )
    client, where = _client(args)
    results = _send(client, inputs, routes, seen)
    refused = [
        f"{item.source}: refused by the model: {r.reason}"
        for item, r in zip(inputs, results)
        if isinstance(r, Refused)
    ]
    rows = [
        _row(item, *result)
        for item, result in zip(inputs, results)
        if result and not isinstance(result, Refused)
    ]
    if args.show and seen is not None:
        _write_sheet(args.show, seen, rows)
        for r in rows:
            r["seen"] = str(args.show)
    if args.json:
        print(json.dumps({"model": where, "predictions": rows, "refused": refused}, indent=2))
        return _report_refused(refused)
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
    if args.show:
        print(f"what the model saw: {args.show}")
    return _report_refused(refused)


def _report_refused(refused: list[str]) -> int:
    for line in refused:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE if refused else EXIT_OK


def _client(args: argparse.Namespace) -> tuple[LocalPredictor | RestClient | GrpcClient, str]:
    """The client --local or --server asks for, and where it runs the model (for people)."""
    client: LocalPredictor | RestClient | GrpcClient
    if args.version is not None and args.label is not None:
        raise FlagError("give --version or --label, not both")
    if args.local is not None:
        client = LocalPredictor(local_model_dir(args.local, args.version, args.label))
        where = f"local SavedModel {client.path}"
    elif args.server:
        client = (
            GrpcClient(args.server, args.model, args.version, args.timeout, label=args.label)
            if args.grpc
            else RestClient(
                args.server, args.model, args.version, args.timeout, args.form, label=args.label
            )
        )
        where = f"TF Serving {'gRPC' if args.grpc else 'REST'} at {args.server}"
    else:
        raise InputError("say where the model is: --local DIR or --server HOST:PORT")
    return client, where


def _send(
    client: LocalPredictor | RestClient | GrpcClient,
    inputs: list[LoadedInput],
    routes: list[str],
    seen: np.ndarray | None,
) -> list[tuple[str, Prediction, int] | Refused | None]:
    """One request per signature, with all the inputs routed to it; for each input, the
    signature, the prediction of its request and its row in it."""
    results: list[tuple[str, Prediction, int] | Refused | None] = [None] * len(inputs)
    groups: dict[str, list[int]] = {}
    for i, sig in enumerate(routes):
        groups.setdefault(sig, []).append(i)
    for sig, indices in groups.items():
        if sig == "predict_image":
            try:
                prediction = client.predict_photos([inputs[i].photo for i in indices])
            except Refusal as e:
                # The graph refuses a whole batch for one photo it cannot use: ask photo by
                # photo, to answer the others and name the one refused.
                if len(indices) == 1:
                    raise
                for i in indices:
                    results[i] = _alone(client, inputs[i], e)
                continue
        elif sig == "predict_png":
            prediction = client.predict_encoded(
                [
                    inputs[i].photo
                    if inputs[i].mnist_format
                    else encode_png(seen[i] if seen is not None else inputs[i].pixels)
                    for i in indices
                ]
            )
        else:
            prediction = client.predict(
                np.stack([seen[i] if seen is not None else inputs[i].pixels for i in indices])
            )
        for row, i in enumerate(indices):
            results[i] = (sig, prediction, row)
    return results


class Refused:
    """A photo the model refused (alone, after its batch was refused)."""

    def __init__(self, reason: str):
        self.reason = reason


def _alone(
    client: LocalPredictor | RestClient | GrpcClient, item: LoadedInput, batch_error: Refusal
) -> tuple[str, Prediction, int] | Refused:
    try:
        return ("predict_image", client.predict_photos([item.photo]), 0)
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
        "top3": [{"digit": d, "probability": round(q, 6)} for d, q in prediction.top(TOP_K)[i]],
        "probabilities": [round(float(x), 6) for x in p],
        "signature": signature,
        "preprocessing": notes,
    }
    uncertain = prediction.uncertain
    if uncertain is not None:
        row["uncertain"] = bool(uncertain[i])
    return row


def _write_sheet(path: Path, seen: np.ndarray, rows: list[dict[str, Any]]) -> None:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the predictions were printed; the picture is not
        tmp.unlink(missing_ok=True)
        raise ServerError(f"could not write --show {path}: {e.strerror or e}") from None


def _check_writable(path: Path) -> None:
    """--show must name a file that can be written, checked before anything is sent."""
    if path.is_dir():
        raise FlagError(f"--show {path} is a folder: give a file name, e.g. {path / 'seen.png'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise FlagError(f"--show {path}: {folder} is not a writable folder")
