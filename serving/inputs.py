"""Client-side inputs: photos of digits, .npy arrays and IDX files, checked before anything is sent.

Photos (PNG, JPEG, GIF, BMP, of any size; other formats Pillow reads are converted to PNG) are
sent as encoded bytes to the model's `predict_image` signature, which does MNIST's
normalisation inside the exported graph (components/photo.py: background, polarity, crop, fit
20x20, centre by mass). The client does not normalise photos itself; when it needs the 28x28
the model sees (`--show`, or sending to `predict_png`/`serving_default`) it runs that same
graph function in-process (`seen_images`), so there is one implementation.

What the client does to a photo, and says it did: turn it upright by its EXIF orientation
(phone cameras store pictures sideways and record the turn there; TensorFlow's decoders ignore
it) and re-encode it as PNG when it was turned, when its format is not one the graph decodes,
or when it is a GIF with transparency (TensorFlow's GIF decoder drops transparency).

Arrays (.npy: [28,28], [N,28,28], [N,28,28,1] or [N,784]; IDX, .gz or not) are raw MNIST pixels
0..255 and go to `serving_default` unchanged; so does, to `predict_png`, an image file already in
MNIST's format (28x28 grayscale, a bright digit on a black border). A pixel outside 0..255, a
missing file, a file that is not an image, or a photo above MAX_PIXELS is refused with the
reason, before anything is sent.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

SIDE = 28
MNIST_BOX = 20  # MNIST's digits were fit into 20x20, then centred by mass in 28x28
# The graph refuses more pixels than this (components.photo.MAX_PIXELS; a test keeps the two
# equal); the client refuses them before sending, without importing TensorFlow.
MAX_PIXELS = 50_000_000
GRAPH_FORMATS = ("PNG", "JPEG", "GIF", "BMP")  # what predict_image decodes itself
# An IDX file's pixels read at once: 100,000 28x28 images (MNIST's train file is 47 MB).
MAX_IDX_BYTES = 100_000 * SIDE * SIDE
EXIF_ORIENTATION = 0x0112


class InputError(ValueError):
    """An input the client refuses to send; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class LoadedInput:
    source: str  # file name, with an index for multi-image files
    # uint8 [28, 28], white digit on black: an array's pixels, or those of an image already in
    # MNIST's format; None for a photo (the graph normalises it)
    image: np.ndarray | None
    notes: tuple[str, ...]  # what the client did to it
    encoded: bytes | None = None  # a photo's bytes, as they will be sent

    @property
    def is_photo(self) -> bool:
        return self.encoded is not None

    @property
    def mnist_format(self) -> bool:
        """An image file already in MNIST's format (28x28 grayscale, white digit on black)."""
        return self.is_photo and self.image is not None

    @property
    def photo(self) -> bytes:
        if self.encoded is None:
            raise ValueError(f"{self.source} is an array, not a photo")
        return self.encoded

    @property
    def pixels(self) -> np.ndarray:
        if self.image is None:
            raise ValueError(f"{self.source} is a photo: see seen_images()")
        return self.image


def load_inputs(paths: list[str | Path]) -> list[LoadedInput]:
    """Every input read and checked; InputError naming each one refused (and why)."""
    loaded: list[LoadedInput] = []
    refused: list[str] = []
    for p in paths:
        try:
            loaded.extend(_load(Path(p)))
        except InputError as e:
            refused.append(str(e))
    if refused:
        raise InputError("; ".join(refused))
    return loaded


def _load(path: Path) -> list[LoadedInput]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if path.name.lower().endswith(".npy"):
        return _from_array(path, _read_npy(path, data))
    if _is_idx(data):
        return _from_array(path, _read_idx(path, data))
    return [_from_photo(path, data)]


def seen_images(inputs: list[LoadedInput], normalize: list[bool] | None = None) -> np.ndarray:
    """uint8 [N, 28, 28]: what the model sees for each input. Photos (and, where `normalize`
    says so, images already in MNIST's format) go through components.photo.normalize_photos,
    the function inside `predict_image`, in-process; the others are their own pixels."""
    if normalize is None:
        normalize = [i.image is None for i in inputs]
    photos = [i.photo for i, n in zip(inputs, normalize) if n]
    normalized = iter(())
    if photos:
        import tensorflow as tf

        from components.photo import normalize_photos

        try:
            normalized = iter(normalize_photos(tf.constant(photos)).numpy())
        except tf.errors.InvalidArgumentError as e:
            raise InputError(_graph_refusal(inputs, photos, e)) from None
    return np.stack([next(normalized) if n else i.pixels for i, n in zip(inputs, normalize)])


def seen_each(
    inputs: list[LoadedInput], normalize: list[bool]
) -> tuple[list[np.ndarray | None], dict[int, str]]:
    """As seen_images, but a photo the graph refuses does not fail the others: its image is
    None and its index maps to the graph's reason (the model would refuse it the same way)."""
    try:
        return list(seen_images(inputs, normalize)), {}
    except InputError:
        pass
    import tensorflow as tf

    from components.photo import normalize_photos

    images: list[np.ndarray | None] = []
    reasons: dict[int, str] = {}
    for k, (item, n) in enumerate(zip(inputs, normalize)):
        if not n:
            images.append(item.pixels)
            continue
        try:
            images.append(normalize_photos(tf.constant([item.photo])).numpy()[0])
        except tf.errors.InvalidArgumentError as e:
            images.append(None)
            reasons[k] = _assertion_text(e)
    return images, reasons


def _graph_refusal(inputs: list[LoadedInput], photos: list[bytes], error: Exception) -> str:
    """Name the photo the graph refused (it fails the whole batch) and why."""
    import tensorflow as tf

    from components.photo import normalize_photos

    for item in inputs:
        if item.is_photo:
            try:
                normalize_photos(tf.constant([item.encoded]))
            except tf.errors.InvalidArgumentError as e:
                return f"{item.source}: {_assertion_text(e)}"
    return _assertion_text(error)


def _assertion_text(error: Exception) -> str:
    from serving.client import assertion_text

    return assertion_text(getattr(error, "message", str(error)))


def _read_npy(path: Path, data: bytes) -> np.ndarray:
    """A .npy file's array. A file of any length, however damaged (empty: EOFError; a garbled
    header: ValueError or SyntaxError; a shape no memory holds: MemoryError), is refused."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, MemoryError) as e:
        reason = str(e) or type(e).__name__
        raise InputError(f"{path}: not a readable .npy array ({reason})") from None


def _is_idx(data: bytes) -> bool:
    """An IDX file, or a gzip that cannot be read far enough to tell (_read_idx then says it
    is corrupt: a damaged MNIST .gz, not "not an image")."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(4)
        except (OSError, EOFError, zlib.error):
            return True
    return len(data) >= 4 and data[:2] == b"\0\0" and data[2] == 0x08 and data[3] in (1, 2, 3)


def _read_idx(path: Path, data: bytes) -> np.ndarray:
    """An IDX file's array; a gzipped one is decompressed only as far as its header says
    (a small .gz that would expand to gigabytes is refused from its header)."""
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else None
    try:
        head = stream.read(4) if stream else data[:4]
        ndim = head[3]
        dims_bytes = stream.read(4 * ndim) if stream else data[4 : 4 + 4 * ndim]
        if len(dims_bytes) < 4 * ndim:
            raise InputError(f"{path}: IDX file ends inside its header (truncated)")
        dims = struct.unpack(f">{ndim}I", dims_bytes)
        expected = int(np.prod(dims, dtype=np.int64))
        if expected > MAX_IDX_BYTES:
            raise InputError(
                f"{path}: IDX header says {dims}: {expected:,} bytes, more than the "
                f"{MAX_IDX_BYTES:,} the client reads at once; split it"
            )
        body_bytes = stream.read(expected + 1) if stream else data[4 + 4 * ndim :]
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: truncated or corrupt gzip ({e})") from None
    body = np.frombuffer(body_bytes, np.uint8)
    if body.size != expected:
        held = f"{body.size:,} bytes (truncated)" if body.size < expected else "more bytes"
        raise InputError(f"{path}: IDX header says {dims} ({expected:,} bytes) but holds {held}")
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
        raise InputError(
            f"{path}: shape {original_shape}, expected [28, 28], [N, 28, 28], "
            f"[N, 28, 28, 1] or [N, 784]"
        )
    if array.shape[0] == 0:
        raise InputError(f"{path}: shape {original_shape} holds no image")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise InputError(f"{path}: {int(np.isnan(array).sum())} pixel(s) are NaN")
    if array.dtype.kind == "f" and np.isinf(array).any():
        raise InputError(f"{path}: {int(np.isinf(array).sum())} pixel(s) are infinite")
    if array.size and (array.min() < 0 or array.max() > 255):
        bad = array.max() if array.max() > 255 else array.min()
        raise InputError(f"{path}: pixel value {bad} outside 0..255")
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise InputError(
            f"{path}: pixels must be whole numbers 0..255 (raw MNIST pixels), "
            f"got fractions; multiply [0, 1] data by 255"
        )
    peaks = array.reshape(len(array), -1).max(axis=1)
    if (peaks == 0).any():
        raise InputError(
            f"{path}: image {int(np.argmax(peaks == 0))} is blank (no ink found): "
            f"nothing to classify"
        )
    if (peaks <= 1).all():
        raise InputError(
            f"{path}: every pixel is 0 or 1: the array looks scaled to [0, 1]; "
            f"MNIST pixels are 0..255 (multiply by 255)"
        )
    images = array.astype(np.uint8)
    return [
        LoadedInput(f"{path.name}[{i}]" if len(images) > 1 else path.name, img, ())
        for i, img in enumerate(images)
    ]


def _from_photo(path: Path, data: bytes) -> LoadedInput:
    """A photo's bytes as they will be sent; what Pillow warns of (corrupt EXIF data) becomes
    one of its notes, not lines on the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = _read_photo(path, data)
    said = {
        "EXIF data unreadable: orientation ignored"
        if "EXIF" in str(w.message)
        else f"Pillow: {' '.join(str(w.message).split())}"
        for w in caught
    }
    return dataclasses.replace(item, notes=(*item.notes, *sorted(said))) if said else item


HEIC_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
AVIF_BRANDS = (b"avif", b"avis")


def _heif_advice(data: bytes) -> str:
    """What to do with a HEIC/HEIF photo (an iPhone's default format) or an AVIF, which
    neither Pillow nor TensorFlow decodes: its ISO-BMFF `ftyp` box names the brand."""
    if data[4:8] != b"ftyp":
        return ""
    if data[8:12] in HEIC_BRANDS:
        return (
            ": a HEIC/HEIF photo, as phones save by default; save it as JPEG first "
            "(iPhone: Settings > Camera > Formats > Most Compatible)"
        )
    if data[8:12] in AVIF_BRANDS:
        return ": an AVIF image; save it as JPEG or PNG first"
    return ""


def _read_photo(path: Path, data: bytes) -> LoadedInput:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(
            f"{path}: more than the {MAX_PIXELS:,} pixels the model accepts ({e})"
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{path}: not an image the client can read "
            f"(PNG, JPEG, GIF, BMP, .npy or IDX expected)"
            + (": the file is empty" if not data else _heif_advice(data))
        ) from None
    except OSError as e:
        raise InputError(
            f"{path}: not an image the client can read "
            f"(PNG, JPEG, GIF, BMP, .npy or IDX expected): {e}"
        ) from None
    width, height = img.size
    if width * height > MAX_PIXELS:  # read from the header: nothing decoded yet
        raise InputError(
            f"{path}: {width}x{height} is {width * height:,} pixels, more than "
            f"the {MAX_PIXELS:,} pixels the model accepts; scale it down"
        )
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: the image does not decode: {e}") from None
    notes: list[str] = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":  # an animation; PIL and TensorFlow read frame 1
        notes.append(f"{frames} frames: only the first is read")
    fmt = "JPEG" if img.format == "MPO" else img.format  # MPO: a camera's JPEG (+ extras)
    reencode = False
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
        notes.append(f"turned upright (EXIF orientation {orientation})")
        reencode = True
    if fmt not in GRAPH_FORMATS:
        notes.append(f"read {fmt}")
        reencode = True
    elif fmt == "BMP" and not _graph_decodes_bmp(data):
        notes.append("read a BMP that TensorFlow's decoder does not take (not 24/32-bit RGB)")
        reencode = True
    elif fmt == "GIF" and "transparency" in img.info:
        notes.append("GIF with transparency (TensorFlow would drop it)")
        reencode = True
    if not reencode:
        return LoadedInput(path.name, _mnist_pixels(img), tuple(notes), data)
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    notes.append("sent as PNG")
    return LoadedInput(path.name, None, tuple(notes), buf.getvalue())


def _graph_decodes_bmp(data: bytes) -> bool:
    """Whether TensorFlow's BMP decoder reads these pixels as they are: uncompressed 24- or
    32-bit only (it takes 1, 2 and 4 bits for 0 channels, and 8 bits as palette indices)."""
    if len(data) < 34 or int.from_bytes(data[14:18], "little") < 40:  # an OS/2 header
        return False
    bits = int.from_bytes(data[28:30], "little")
    compression = int.from_bytes(data[30:34], "little")
    return bits in (24, 32) and compression == 0


def _mnist_pixels(img: Image.Image) -> np.ndarray | None:
    """The pixels of an image already in MNIST's format (what predict_png takes as it is),
    else None: 28x28 grayscale, a bright digit on black, normalised as MNIST's are (its ink
    within 20x20, its centre of mass within 2 pixels of the middle: true of all 10,000 MNIST
    test digits, whose longest side is 20 and mass at most 1.41 px off). A digit drawn to fill
    a 28x28 canvas is not: it goes to predict_image, which normalises it."""
    if img.size != (SIDE, SIDE) or img.mode != "L":
        return None
    pixels = np.asarray(img, np.uint8)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if not (ring.mean() < 16 and pixels.max() > 128):
        return None
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 > MNIST_BOX:
        return None
    weights = pixels.astype(np.float64)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    centre = ((weights * ys).sum() / weights.sum(), (weights * xs).sum() / weights.sum())
    middle = (SIDE - 1) / 2
    return pixels if np.hypot(centre[0] - middle, centre[1] - middle) <= 2.0 else None


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()
