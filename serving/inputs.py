"""Client-side inputs: PNG/JPEG, .npy and IDX files -> uint8 [N, 28, 28], saying what was done.

Everything is checked here, before anything is sent: a pixel outside 0..255, a missing file or a
file that is not an image is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import struct
from pathlib import Path

import numpy as np

SIDE = 28


class InputError(ValueError):
    """An input the client refuses to send; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class LoadedInput:
    source: str  # file name, with an index for multi-image files
    image: np.ndarray  # uint8 [28, 28], white digit on black, as in MNIST
    notes: tuple[str, ...]  # what the client did to it
    encoded: bytes | None = None  # the original PNG/JPEG bytes when sent as-is is possible


def load_inputs(paths: list[str | Path]) -> list[LoadedInput]:
    loaded: list[LoadedInput] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a file")
        data = path.read_bytes()
        name = path.name.lower()
        if name.endswith(".npy"):
            loaded.extend(_from_array(path, _read_npy(path, data)))
        elif _is_idx(data):
            loaded.extend(_from_array(path, _read_idx(path, data)))
        else:
            loaded.append(_from_image(path, data))
    return loaded


def _read_npy(path: Path, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None


def _is_idx(data: bytes) -> bool:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(4)
        except (OSError, EOFError):
            return False
    return len(data) >= 4 and data[:2] == b"\0\0" and data[2] == 0x08 and data[3] in (1, 2, 3)


def _read_idx(path: Path, data: bytes) -> np.ndarray:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path}: IDX header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _from_array(path: Path, array: np.ndarray) -> list[LoadedInput]:
    if array.dtype.kind not in "uif":
        raise InputError(f"{path}: array of {array.dtype}, expected numbers")
    original_shape = array.shape
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 and array.shape[-1] == SIDE * SIDE:
        array = array.reshape(-1, SIDE, SIDE)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (SIDE, SIDE):
        raise InputError(f"{path}: shape {original_shape}, expected [28, 28], [N, 28, 28], "
                         f"[N, 28, 28, 1] or [N, 784]")
    if array.size and (array.min() < 0 or array.max() > 255):
        bad = array.max() if array.max() > 255 else array.min()
        raise InputError(f"{path}: pixel value {bad} outside 0..255")
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise InputError(f"{path}: pixels must be whole numbers 0..255 (raw MNIST pixels), "
                         f"got fractions; multiply [0, 1] data by 255")
    images = array.astype(np.uint8)
    return [LoadedInput(f"{path.name}[{i}]" if len(images) > 1 else path.name, img, ())
            for i, img in enumerate(images)]


def _from_image(path: Path, data: bytes) -> LoadedInput:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not an image the client can read "
                         f"(PNG, JPEG, .npy or IDX expected): {e}") from None
    notes = []
    if img.format not in ("PNG", "JPEG"):
        notes.append(f"read {img.format}")
    if img.mode not in ("L",):
        if img.mode in ("RGBA", "LA") or "transparency" in img.info:
            # Transparent pixels become the background (white), as most viewers show them.
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
            notes.append("flattened alpha onto white")
        notes.append(f"converted {img.mode} to grayscale")
        img = img.convert("L")
    pixels = np.asarray(img, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        pixels = 255 - pixels
        notes.append("inverted (dark digit on light background)")
    if pixels.shape != (SIDE, SIDE):
        notes.append(f"resized {pixels.shape[1]}x{pixels.shape[0]} to 28x28 "
                     f"(digit fitted to 20x20 and centred, as in MNIST)")
        pixels = _fit_like_mnist(pixels)
    sendable = data if not notes and img.format in ("PNG", "JPEG") else None
    return LoadedInput(path.name, pixels, tuple(notes), sendable)


def _fit_like_mnist(pixels: np.ndarray) -> np.ndarray:
    """MNIST's own normalisation: crop to the ink, scale to fit 20x20 keeping the aspect ratio,
    and centre by centre of mass in a 28x28 black field."""
    from PIL import Image

    ink = pixels > max(30, int(pixels.max()) // 4)
    if not ink.any():
        return np.asarray(Image.fromarray(pixels).resize((SIDE, SIDE), Image.LANCZOS))
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.LANCZOS),
                       dtype=np.float64)
    total = small.sum() or 1.0
    cy = (small.sum(1) * np.arange(new_h)).sum() / total
    cx = (small.sum(0) * np.arange(new_w)).sum() / total
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - new_h))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - new_w))
    out = np.zeros((SIDE, SIDE), np.uint8)
    out[top:top + new_h, left:left + new_w] = np.clip(small, 0, 255).astype(np.uint8)
    return out


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()
