"""Client CLI: predict digits in image/array files with a local SavedModel or a TF Serving.

    python -m serving predict digit.png --local artifacts/models/mnist
    python -m serving predict digit.png more.npy --server localhost:8501 [--json]
    python -m serving predict digit.png --server localhost:8500 --grpc
    python -m serving status --server localhost:8501
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from serving.client import GrpcClient, LocalPredictor, RestClient, ServerError
from serving.inputs import InputError, encode_png, load_inputs

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m serving", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("predict", help="predict the digit in each input")
    p.add_argument("inputs", nargs="+", help="PNG/JPEG (any size, RGB/RGBA/grayscale), .npy "
                   "([28,28], [N,28,28] or [N,784], values 0..255) or IDX files")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", type=Path, help="a SavedModel folder, or a models base "
                       "folder (its latest version); no server")
    where.add_argument("--server", help="TF Serving host:port (REST 8501, or gRPC 8500 with "
                       "--grpc)")
    p.add_argument("--grpc", action="store_true", help="talk gRPC instead of REST")
    p.add_argument("--form", choices=("row", "columnar"), default="row",
                   help="REST request form: row `instances` or columnar `inputs`")
    p.add_argument("--png", action="store_true",
                   help="send encoded PNGs to the predict_png signature (default: uint8 "
                        "arrays to serving_default)")
    _common(p)
    for name, text in (("status", "model version status over REST"),
                       ("metadata", "model signatures over REST")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--server", required=True, help="TF Serving REST host:port")
        _common(s)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mnist", help="model name in TF Serving (default mnist)")
    p.add_argument("--version", type=int, help="a specific version (default: the latest)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.command == "predict":
            return _predict(args)
        client = RestClient(args.server, args.model, args.version, args.timeout)
        answer = client.status() if args.command == "status" else client.metadata()
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    except InputError as e:
        print(f"error: input refused, nothing sent: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _predict(args: argparse.Namespace) -> int:
    inputs = load_inputs(args.inputs)  # every input checked before anything is sent
    if args.local is not None:
        client = LocalPredictor(args.local)
        where = f"local SavedModel {client.path}"
    elif args.server:
        client = (GrpcClient(args.server, args.model, args.version, args.timeout) if args.grpc
                  else RestClient(args.server, args.model, args.version, args.timeout, args.form))
        where = f"TF Serving {'gRPC' if args.grpc else 'REST'} at {args.server}"
    else:
        raise InputError("say where the model is: --local DIR or --server HOST:PORT")
    import numpy as np

    if args.png:
        result = client.predict_encoded([i.encoded or encode_png(i.image) for i in inputs])
    else:
        result = client.predict(np.stack([i.image for i in inputs]))
    rows = [{"input": i.source, "digit": int(c), "confidence": float(p[c]),
             "probabilities": [round(float(x), 6) for x in p], "preprocessing": list(i.notes)}
            for i, p, c in zip(inputs, result.probabilities, result.class_ids)]
    if args.json:
        print(json.dumps({"model": where, "predictions": rows}, indent=2))
        return EXIT_OK
    print(f"model: {where}")
    for r in rows:
        probs = " ".join(f"{d}:{p:.3f}" for d, p in enumerate(r["probabilities"]))
        print(f"{r['input']}: digit {r['digit']} (confidence {r['confidence']:.3f})")
        if r["preprocessing"]:
            print(f"  preprocessing: {'; '.join(r['preprocessing'])}")
        print(f"  probabilities: {probs}")
    return EXIT_OK
