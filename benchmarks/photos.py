"""Photos of MNIST test digits, and how `predict_image` does on them (issue #14).

    .venv/bin/python -m benchmarks.photos MODEL_DIR [--n 300] [--seed 0] [--save-failures DIR]

`generate(n, seed)` renders MNIST *test* digits (loaded through TFDS, offline from the manual dir)
as photos of handwriting: dark or blue ink (or pencil) on an off-white page, lit unevenly (a
gradient, a vignette, sometimes a hard shadow), with paper texture, sensor noise, sometimes ruled
lines or a margin line; a thick or thin pen; sometimes low contrast; the digit off-centre at a
random size, sometimes touching the border; a slight rotation (+-10 degrees) and blur; saved as
JPEG (quality 35..95) or PNG (some grayscale), on canvases whose longer side is 120..1000 px.
`generate(..., ballpoint=True)` renders phone-sized photos instead (longer side 1000..2000 px)
of digits written with a ballpoint: MNIST's strokes thinned to their skeleton and drawn again
with a pen 1-4% of the digit's height wide, a hairline at MNIST's scale once fitted to 20x20.
`generate(..., desk=True)` photographs the page lying on a darker surface (a dark or grey desk,
wood grain) that fills 15-60% of the frame, the page slightly turned and sometimes cut by the
frame's edge: the surface and the page's edge must not be taken for ink.
`generate(..., small=True)`: a ballpoint digit only 6-12% of a 1500-2400 px photo's height, as
when a whole page is photographed: its strokes are a fraction of a pixel at the analysis size.
Everything is drawn from seeded generators, so the same (n, seed) gives the same bytes, and
photo k is the same whatever n. `generate_blank` renders the same pages with no digit.

`main` loads a SavedModel and prints: the accuracy of its `predict_image` signature on the photos
(overall and by condition); the accuracy of `serving_default` on the same digits as clean 28x28
arrays (the model's own ceiling here) and on the whole clean test split (which photo support must
not change); how many blank pages `predict_image` refuses; and its batch-1 latency on a 1000x1000
JPEG photo.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"

Photo = tuple[bytes, int, str]  # (encoded image, true label, what was done to it)


def load_test_digits(
    manual_dir: Path | None = None, data_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images uint8 [10000, 28, 28] and labels, through TFDS (offline manual dir)."""
    from components.data import load_split

    split = load_split("test", manual_dir=Path(manual_dir or SHARED_MNIST), data_dir=data_dir)
    return split.images.reshape(-1, 28, 28), split.labels.astype(np.int64)


def generate(
    n: int,
    seed: int = 0,
    *,
    digits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    ballpoint: bool = False,
    desk: bool = False,
    small: bool = False,
) -> list[Photo]:
    """`n` photo-like renderings of distinct MNIST test digits, deterministic in (n, seed).

    `digits`/`labels` default to the MNIST test split; `size` (width, height) fixes the canvas;
    `ballpoint`: phone-sized photos of a thin pen; `desk`: the page on a desk; `small`: a
    ballpoint digit small in a large photo (the module's docstring).
    """
    if digits is None or labels is None:
        digits, labels = load_test_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))  # a prefix of one order: photo k does not depend on n
    chosen = [order[k % len(order)] for k in range(n)]
    photos = []
    for k, i in enumerate(chosen):
        sample_rng = np.random.default_rng([seed, k])
        data, description = render(
            digits[i], sample_rng, size=size, ballpoint=ballpoint, desk=desk, small=small
        )
        photos.append((data, int(labels[i]), f"test[{i}] {description}"))
    return photos


def generate_blank(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """`n` photos of blank pages (lighting, texture, lines, noise; no digit), deterministic."""
    return [render(None, np.random.default_rng([seed, 1_000_000 + k])) for k in range(n)]


# --------------------------------------------------------------------------------------------
# Rendering


def render(
    digit: np.ndarray | None,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
    ballpoint: bool = False,
    desk: bool = False,
    small: bool = False,
) -> tuple[bytes, str]:
    """One MNIST digit (uint8 [28, 28], white on black) as an encoded photo of handwriting;
    `digit` None gives a blank page under the same conditions (which must be refused)."""
    # Each step appends what it did to `notes` and draws from `rng` in a fixed order: the same
    # generator gives the same bytes.
    notes: list[str] = []
    sides = (1500, 2400) if small else (1000, 2000) if ballpoint else (120, 1000)
    width, height = _canvas_size(rng, size, sides)
    notes.append(f"{width}x{height}")
    paper, page = _paper(rng, width, height)
    page = _ruled(rng, page, notes)
    pen = ballpoint or small
    trace = _ballpoint_trace(digit, rng, notes) if pen else _pen_trace(digit, rng, notes)
    alpha = _place(trace, rng, width, height, notes, (0.06, 0.12) if small else (0.25, 0.85))
    ink = _ink(rng, paper, notes)
    opacity = rng.uniform(0.85, 1.0)
    a = (opacity * alpha)[..., None]
    image = page * (1 - a) + ink * a
    if desk:
        image = _on_a_desk(rng, image, notes)
    image = _light(rng, image, notes)
    return _encode(rng, _camera(rng, image, notes), notes), ", ".join(notes)


def _canvas_size(
    rng: np.random.Generator, size: tuple[int, int] | None, long_sides: tuple[int, int]
) -> tuple[int, int]:
    """(width, height): `size`, or a random photo shape, landscape or portrait, its longer
    side within `long_sides`."""
    if size is not None:
        return size
    long_side = int(rng.integers(long_sides[0], long_sides[1] + 1))
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
    short_side = max(96, int(round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _paper(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The page: off-white, a little tinted, with paper texture; (its colour, the page)."""
    paper = np.array([rng.uniform(222, 250), 0, 0])
    paper[1] = paper[0] - rng.uniform(0, 10)
    paper[2] = paper[0] - rng.uniform(0, 28)
    page = np.broadcast_to(paper, (height, width, 3)).astype(np.float64).copy()
    page *= (
        1
        + _smooth_noise(
            rng, (height, width), cells=int(rng.integers(4, 12)), amplitude=rng.uniform(0.01, 0.04)
        )
    )[..., None]
    page *= (
        1
        + _smooth_noise(
            rng, (height, width), cells=max(8, width // 6), amplitude=rng.uniform(0.005, 0.025)
        )
    )[..., None]
    return paper, page


def _ruled(rng: np.random.Generator, page: np.ndarray, notes: list[str]) -> np.ndarray:
    """Ruled lines (light blue or grey, thinner and fainter than ink), maybe a red margin."""
    if rng.random() >= 0.35:
        return page
    height, width = page.shape[:2]
    spacing = rng.uniform(0.07, 0.14) * height
    thickness = max(1, int(round(height * rng.uniform(0.002, 0.005))))
    color = np.array([150, 180, 225]) if rng.random() < 0.7 else np.array([165, 165, 165])
    tilt = rng.uniform(-3, 3)
    strength = rng.uniform(0.4, 0.8)
    lines = _ruled_lines((height, width), spacing, thickness, tilt, rng.uniform(0, spacing))
    page = page * (1 - strength * lines[..., None]) + color * strength * lines[..., None]
    notes.append(f"ruled(every {spacing:.0f}px, {thickness}px, tilt {tilt:+.1f})")
    if rng.random() < 0.25:
        margin = np.zeros((height, width))
        x = int(rng.uniform(0.03, 0.12) * width)
        margin[:, x : x + thickness] = 1
        page = (
            page * (1 - 0.6 * margin[..., None])
            + np.array([220, 110, 110]) * 0.6 * margin[..., None]
        )
        notes.append("margin line")
    return page


def _pen_trace(digit: np.ndarray | None, rng: np.random.Generator, notes: list[str]) -> Any:
    """The digit: MNIST's strokes upscaled into a pen trace, thicker or thinner, rotated and
    cropped to its ink (a PIL image, 0..255 ink)."""
    from PIL import Image, ImageFilter

    if digit is None:
        digit = np.zeros((28, 28), np.uint8)
        digit[14, 14] = 1  # a trace too faint to draw: the same random draws, no ink
        notes.append("blank page")
    ys, xs = np.nonzero(digit)
    crop = digit[max(0, ys.min() - 1) : ys.max() + 2, max(0, xs.min() - 1) : xs.max() + 2]
    pen_scale = 6  # strokes are shaped at 6x MNIST resolution, then resized
    trace = Image.fromarray(crop).resize(
        (crop.shape[1] * pen_scale, crop.shape[0] * pen_scale), Image.Resampling.BICUBIC
    )
    trace = Image.fromarray(
        np.clip((np.asarray(trace, np.float64) - 64) * 255 / 128, 0, 255).astype(np.uint8)
    )
    pen = rng.choice(["normal", "thick", "thin"], p=[0.5, 0.25, 0.25])
    if pen == "thick":
        r = int(rng.integers(1, 4))
        trace = trace.filter(ImageFilter.MaxFilter(2 * r + 1))
        notes.append(f"thick pen (+{2 * r}px at 6x)")
    elif pen == "thin":
        r = int(rng.integers(1, 3))
        trace = trace.filter(ImageFilter.MinFilter(2 * r + 1))
        notes.append(f"thin pen (-{2 * r}px at 6x)")
    angle = rng.uniform(-10, 10)
    trace = trace.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    notes.append(f"rotated {angle:+.1f}")
    bbox = trace.getbbox() or (0, 0, trace.width, trace.height)
    return trace.crop(bbox)


def _ballpoint_trace(digit: np.ndarray | None, rng: np.random.Generator, notes: list[str]) -> Any:
    """The digit written with a ballpoint: the skeleton of MNIST's strokes (upscaled 6x) drawn
    again, 600 px high, with a round pen 1-4% of that wide; rotated and cropped like _pen_trace."""
    from PIL import Image, ImageDraw, ImageFilter

    if digit is None:
        notes.append("blank page")
        return Image.new("L", (8, 8))
    ys, xs = np.nonzero(digit)
    crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    up = Image.fromarray(crop).resize(
        (crop.shape[1] * 6, crop.shape[0] * 6), Image.Resampling.BICUBIC
    )
    skeleton = _thinned(np.pad(np.asarray(up) > 100, 1))
    scale = 600 / skeleton.shape[0]
    width = rng.uniform(0.01, 0.04) * 600
    canvas = Image.new("L", (int(skeleton.shape[1] * scale) + 1, 601))
    draw = ImageDraw.Draw(canvas)
    points = {(int(y), int(x)) for y, x in zip(*np.nonzero(skeleton))}
    r = width / 2
    for y, x in points:
        cy, cx = (y + 0.5) * scale, (x + 0.5) * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (y + dy, x + dx) in points:
                end = ((x + dx + 0.5) * scale, (y + dy + 0.5) * scale)
                draw.line([(cx, cy), end], fill=255, width=max(1, round(width)))
    # Smoothed: the skeleton's pixel steps would show as a wobble at this scale.
    canvas = canvas.filter(ImageFilter.GaussianBlur(width / 3)).point(lambda v: 255 * (v > 110))
    notes.append(f"ballpoint ({100 * width / 600:.1f}% of the digit's height)")
    angle = rng.uniform(-10, 10)
    trace = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    notes.append(f"rotated {angle:+.1f}")
    return trace.crop(trace.getbbox() or (0, 0, trace.width, trace.height))


def _thinned(mask: np.ndarray) -> np.ndarray:
    """Zhang and Suen's thinning (1984) of a boolean image: its one-pixel-wide skeleton."""
    img = mask.astype(np.uint8)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p = np.pad(img, 1)
            # the 8 neighbours clockwise from the top: P2..P9
            nb = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:]]
            nb += [p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(n.astype(int) for n in nb)
            ring = nb + [nb[0]]
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(int) for i in range(8))
            p2, p4, p6, p8 = nb[0], nb[2], nb[4], nb[6]
            if step == 0:
                side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            drop = (img == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if drop.any():
                img[drop] = 0
                changed = True
    return img.astype(bool)


def _place(
    trace: Any,
    rng: np.random.Generator,
    width: int,
    height: int,
    notes: list[str],
    share: tuple[float, float] = (0.25, 0.85),
) -> np.ndarray:
    """The trace at a random size (`share` of the shorter side) and place on the page
    (sometimes touching a border), as ink coverage [height, width] in 0..1."""
    from PIL import Image

    digit_height = rng.uniform(*share) * min(width, height)
    scale = min(
        digit_height / trace.height, 0.95 * width / trace.width, 0.95 * height / trace.height
    )
    dw, dh = max(4, int(round(trace.width * scale))), max(4, int(round(trace.height * scale)))
    alpha = np.asarray(trace.resize((dw, dh), Image.Resampling.BILINEAR), np.float64) / 255
    notes.append(f"digit {dh}px high")
    if rng.random() < 0.15:  # touching a border
        side = rng.integers(4)
        x0 = 0 if side == 0 else width - dw if side == 1 else int(rng.integers(0, width - dw + 1))
        y0 = 0 if side == 2 else height - dh if side == 3 else int(rng.integers(0, height - dh + 1))
        notes.append("touching the border")
    else:
        x0, y0 = int(rng.integers(0, width - dw + 1)), int(rng.integers(0, height - dh + 1))
    full_alpha = np.zeros((height, width))
    full_alpha[y0 : y0 + dh, x0 : x0 + dw] = alpha
    return full_alpha


def _on_a_desk(rng: np.random.Generator, page: np.ndarray, notes: list[str]) -> np.ndarray:
    """The page (float RGB, 0..255) shrunk, turned a little and laid on a darker surface that
    fills the rest of the same frame (15-60% of it), sometimes running off one side."""
    from PIL import Image

    height, width = page.shape[:2]
    kind = str(rng.choice(["dark desk", "grey desk", "wood"]))
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "wood":
        angle = rng.uniform(0, np.pi)
        along = np.cos(angle) * xx + np.sin(angle) * yy
        across = -np.sin(angle) * xx + np.cos(angle) * yy
        period = rng.uniform(0.02, 0.08) * max(width, height)
        grain = np.sin(2 * np.pi * (across + 3 * np.sin(along / period)) / period)
        tone = rng.uniform(60, 90) * (1 + 0.2 * grain)
        surface = tone[..., None] * np.array([1.25, 0.9, 0.6])
    else:
        level = rng.uniform(15, 50) if kind == "dark desk" else rng.uniform(50, 90)
        surface = np.broadcast_to(level * np.array([1.0, 1.0, 1.05]), (height, width, 3))
    surface = (
        surface * (1 + _smooth_noise(rng, (height, width), cells=8, amplitude=0.05))[..., None]
    )
    covered = rng.uniform(0.4, 0.85)  # of the frame's area
    scale = float(np.sqrt(covered))
    w, h = max(8, int(width * scale)), max(8, int(height * scale))
    turned = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.LANCZOS
    )
    angle = rng.uniform(-8, 8)
    turned = turned.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    mask = Image.new("L", (w, h), 255).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    x0 = int(rng.uniform(-0.1 * w, width - 0.9 * turned.width))  # may run off one side
    y0 = int(rng.uniform(-0.1 * h, height - 0.9 * turned.height))
    frame = Image.fromarray(np.clip(surface, 0, 255).astype(np.uint8))
    frame.paste(turned, (x0, y0), mask)
    notes.append(f"on a {kind} ({1 - covered:.0%} of the frame), turned {angle:.0f} deg")
    return np.asarray(frame, dtype=np.float64)


def _ink(rng: np.random.Generator, paper: np.ndarray, notes: list[str]) -> np.ndarray:
    """The ink's colour: black, blue or pencil, sometimes faint against the paper."""
    kind = rng.choice(["black", "blue", "pencil"], p=[0.5, 0.3, 0.2])
    if kind == "black":
        ink = np.full(3, rng.uniform(15, 60))
    elif kind == "blue":
        ink = np.array([rng.uniform(10, 50), rng.uniform(30, 70), rng.uniform(120, 180)])
    else:
        ink = np.full(3, rng.uniform(80, 120))
    notes.append(f"{kind} ink")
    if rng.random() < 0.2:
        c = rng.uniform(0.35, 0.6)
        ink = paper * (1 - c) + ink * c
        notes.append(f"low contrast ({c:.2f})")
    return ink


def _light(rng: np.random.Generator, image: np.ndarray, notes: list[str]) -> np.ndarray:
    """Lighting: a gradient, a vignette, sometimes a shadow with a soft edge; a colour cast."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    u, v = xx / max(width - 1, 1) - 0.5, yy / max(height - 1, 1) - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 0.5)
    light = rng.uniform(0.7, 1.05) * (
        1 + gradient * (np.cos(direction) * u + np.sin(direction) * v)
    )
    vignette = rng.uniform(0, 0.5)
    light *= 1 - vignette * (u**2 + v**2) * 2
    notes.append(f"gradient {gradient:.2f}, vignette {vignette:.2f}")
    if rng.random() < 0.4:
        theta = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-0.35, 0.35)
        softness = rng.uniform(0.01, 0.08)
        d = np.cos(theta) * u + np.sin(theta) * v - offset
        depth = rng.uniform(0.25, 0.55)
        light *= 1 - depth / (1 + np.exp(-d / softness))
        notes.append(f"shadow {depth:.2f}")
    cast = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 1.0)])
    return image * light[..., None] * cast


def _camera(rng: np.random.Generator, image: np.ndarray, notes: list[str]) -> Any:
    """Optics and sensor: blur, noise; the photo as a PIL image."""
    from PIL import Image, ImageFilter

    height, width = image.shape[:2]
    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    blur = rng.uniform(0, 1.5) * max(width, height) / 500
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    noise = rng.uniform(2, 10)
    pixels = np.asarray(img, np.float64)
    pixels = (
        pixels
        + rng.normal(0, noise, pixels.shape)
        + rng.normal(0, noise / 2, pixels.shape[:2])[..., None]
    )
    img = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    notes.append(f"blur {blur:.1f}px, noise {noise:.1f}")
    return img


def _encode(rng: np.random.Generator, img: Any, notes: list[str]) -> bytes:
    """The photo as a JPEG (some quality) or a PNG (sometimes grayscale)."""
    buf = io.BytesIO()
    if rng.random() < 0.7:
        quality = int(rng.integers(35, 96))
        img.save(buf, format="JPEG", quality=quality)
        notes.append(f"JPEG q{quality}")
    else:
        if rng.random() < 0.2:
            img = img.convert("L")
            notes.append("grayscale")
        img.save(buf, format="PNG")
        notes.append("PNG")
    return buf.getvalue()


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: int, amplitude: float
) -> np.ndarray:
    """Random values on a coarse grid, bicubically upsampled: blotches of about shape/cells."""
    from PIL import Image

    h, w = shape
    gh, gw = max(2, int(cells * h / max(h, w))), max(2, int(cells * w / max(h, w)))
    grid = rng.normal(0, 1, (gh, gw)).astype(np.float32)
    resized = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    up = np.asarray(resized, np.float64)
    return np.asarray(amplitude * up / (np.abs(up).max() or 1))


def _ruled_lines(
    shape: tuple[int, int], spacing: float, thickness: int, tilt: float, phase: float
) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.tan(np.radians(tilt))
    pos = (yy - t * (xx - w / 2) - phase) % spacing
    return np.clip(thickness + 0.5 - np.minimum(pos, spacing - pos), 0, 1)


# --------------------------------------------------------------------------------------------
# Measuring


def evaluate(signature: Any, photos: list[Photo], batch_size: int = 32) -> dict[str, Any]:
    """Run `predict_image` over the photos; accuracy overall and by condition. A photo the
    signature refuses (InvalidArgument: "no digit found") counts as wrong, with its reason."""
    import tensorflow as tf

    predicted: list[int] = []
    flagged: list[bool] = []  # the model's `uncertain` output (a refused photo counts as flagged)
    refused: dict[int, str] = {}
    for start in range(0, len(photos), batch_size):
        batch = [p[0] for p in photos[start : start + batch_size]]
        try:
            out = signature(image_bytes=tf.constant(batch))
            predicted.extend(int(c) for c in out["class_ids"].numpy())
            flagged.extend(_flags(out, len(batch)))
        except tf.errors.InvalidArgumentError:  # one bad photo fails its batch: go one by one
            for i, data in enumerate(batch, start):
                try:
                    one = signature(image_bytes=tf.constant([data]))
                    predicted.append(int(one["class_ids"].numpy()[0]))
                    flagged.extend(_flags(one, 1))
                except tf.errors.InvalidArgumentError as e:
                    predicted.append(-1)
                    flagged.append(True)
                    refused[i] = e.message.split("assertion failed:")[-1].strip()[:300]
    right = [p == label for p, (_, label, _) in zip(predicted, photos)]
    wrong_flagged = [f for f, ok in zip(flagged, right) if not ok]
    right_flagged = [f for f, ok in zip(flagged, right) if ok]
    by_condition: dict[str, list[bool]] = {}
    for ok, (_, _, description) in zip(right, photos):
        for condition in _conditions(description):
            by_condition.setdefault(condition, []).append(ok)
    return {
        "photos": len(photos),
        "correct": int(sum(right)),
        "accuracy": sum(right) / max(1, len(right)),
        "refused": len(refused),
        # the `uncertain` flag: how much of what is wrong it catches, how much right it doubts
        "mistakes_flagged": sum(wrong_flagged) / len(wrong_flagged) if wrong_flagged else None,
        "correct_flagged": sum(right_flagged) / max(1, len(right_flagged)),
        "by_condition": {
            k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_condition.items())
        },
        "failures": [
            {
                "index": i,
                "label": photos[i][1],
                "predicted": predicted[i],
                "description": photos[i][2],
                **({"refused": refused[i]} if i in refused else {}),
            }
            for i, ok in enumerate(right)
            if not ok
        ],
    }


def through_client(model_dir: Path, photos: list[Photo]) -> dict[str, Any]:
    """The photos as a user sends them: written as files, then `python -m serving predict FILES
    --local MODEL --json` in its own process (what `make predict IMAGE=...` runs: the client
    reads them, applies EXIF orientation, and sends them to predict_image). A photo the model
    refuses counts as wrong and flagged, as in `evaluate`."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="photos-") as tmp:
        files = []
        for i, (data, label, _) in enumerate(photos):
            suffix = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            path = Path(tmp) / f"{i:04d}-{label}{suffix}"
            path.write_bytes(data)
            files.append(path)
        proc = subprocess.run(
            [sys.executable, "-m", "serving", "predict", *map(str, files), "--local",
             str(model_dir), "--json"],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode not in (0, 2) or not proc.stdout.strip():
        raise RuntimeError(f"the client failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    answer = json.loads(proc.stdout)
    rows = {row["input"]: row for row in answer["predictions"]}
    right, flagged = [], []
    for path, (_, label, _) in zip(files, photos):
        row = rows.get(path.name)
        right.append(row is not None and row["digit"] == label)
        flagged.append(row is None or bool(row["uncertain"]))
    wrong = [f for r, f in zip(right, flagged) if not r]
    correct = [f for r, f in zip(right, flagged) if r]
    return {
        "photos": len(photos),
        "correct": int(sum(right)),
        "accuracy": float(np.mean(right)),
        "refused": len(answer.get("refused", [])),
        "mistakes_flagged": float(np.mean(wrong)) if wrong else None,
        "correct_flagged": float(np.mean(correct)) if correct else None,
    }


def _flags(out: Any, n: int) -> list[bool]:
    if "uncertain" not in out:
        return [False] * n
    return [bool(x) for x in out["uncertain"].numpy()]


def refusals(signature: Any, pages: list[tuple[bytes, str]]) -> int:
    """How many of these (blank) photos `predict_image` refuses with InvalidArgument."""
    import tensorflow as tf

    count = 0
    for data, _ in pages:
        try:
            signature(image_bytes=tf.constant([data]))
        except tf.errors.InvalidArgumentError:
            count += 1
    return count


def _conditions(description: str) -> list[str]:
    keys = [
        "JPEG",
        "PNG",
        "thick pen",
        "thin pen",
        "ballpoint",
        "blue ink",
        "pencil ink",
        "black ink",
        "low contrast",
        "ruled",
        "margin line",
        "shadow",
        "touching the border",
        "grayscale",
    ]
    return ["all"] + [k for k in keys if k in description]


def latency(signature: Any, data: bytes, runs: int = 50) -> dict[str, float]:
    import tensorflow as tf

    x = tf.constant([data])
    for _ in range(5):
        signature(image_bytes=x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        signature(image_bytes=x)["class_ids"].numpy()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (runs - 1))],
        "max_ms": times[-1],
        "runs": runs,
    }


def latency_photo(digits: np.ndarray, labels: np.ndarray, seed: int = 0) -> bytes:
    """A 1000x1000 photo, always as a JPEG (quality 85), for timing."""
    from PIL import Image

    [(data, _, _)] = generate(1, seed + 1, digits=digits, labels=labels, size=(1000, 1000))
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def clean_accuracy(model: Any, digits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of `serving_default` on clean 28x28 digits."""
    import tensorflow as tf

    sig = model.signatures["serving_default"]
    predicted = np.concatenate(
        [
            sig(images=tf.constant(digits[i : i + 2000]))["class_ids"].numpy()
            for i in range(0, len(digits), 2000)
        ]
    )
    return float((predicted == labels).mean())


def _test_indices(photos: list[Photo]) -> list[int]:
    return [int(p[2].split("]", 1)[0].removeprefix("test[")) for p in photos]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from components import console

    console.setup(verbose=False)  # refused photos are expected here: no native log lines

    import tensorflow as tf

    digits, labels = load_test_digits(args.manual_dir)
    model = tf.saved_model.load(str(args.model_dir))
    if "predict_image" not in model.signatures:
        print(
            f"error: {args.model_dir} has no predict_image signature (export it again)",
            file=sys.stderr,
        )
        return 2
    photos, result = _measure(model, digits, labels, args)
    _print_result(result, args.n, args.seed)
    if args.save_failures:
        _save_failures(args.save_failures, photos, result["failures"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.photos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", type=Path, help="a SavedModel with predict_image")
    parser.add_argument("--n", type=int, default=300, help="photos (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ballpoint",
        type=int,
        default=60,
        help="phone-sized photos of a ballpoint pen (default 60; 0 skips them)",
    )
    parser.add_argument(
        "--desk",
        type=int,
        default=60,
        help="photos of the page lying on a desk (default 60; 0 skips them)",
    )
    parser.add_argument(
        "--small",
        type=int,
        default=40,
        help="photos of a small ballpoint digit in a large photo (default 40; 0 skips them)",
    )
    parser.add_argument(
        "--blank",
        type=int,
        default=50,
        help="blank pages (no digit) that should be refused (default 50)",
    )
    parser.add_argument(
        "--manual-dir",
        type=Path,
        default=SHARED_MNIST,
        help="MNIST manual dir for TFDS (default ../shared/datasets/mnist)",
    )
    parser.add_argument(
        "--save-failures",
        type=Path,
        help="write each misread photo and the 28x28 the model saw here",
    )
    parser.add_argument(
        "--current-graph",
        action="store_true",
        help="normalise photos with this checkout's components.photo in-process, then the "
        "model's serving_default, instead of the model's own predict_image",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser


def _measure(
    model: Any, digits: np.ndarray, labels: np.ndarray, args: argparse.Namespace
) -> tuple[list[Photo], dict[str, Any]]:
    """The photos, and every figure `main` prints about the model on them."""
    signature = _current_graph(model) if args.current_graph else model.signatures["predict_image"]
    start = time.perf_counter()
    photos = generate(args.n, args.seed, digits=digits, labels=labels)
    generated_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(signature, photos)
    result["predict_seconds"] = time.perf_counter() - start
    result["through_client"] = through_client(args.model_dir, photos)
    result["clean_28x28_accuracy_serving_default"] = clean_accuracy(model, digits, labels)
    same = _test_indices(photos)
    result["same_digits_clean_accuracy"] = clean_accuracy(model, digits[same], labels[same])
    if args.ballpoint:
        pens = generate(args.ballpoint, args.seed, digits=digits, labels=labels, ballpoint=True)
        result["ballpoint"] = evaluate(signature, pens)
    if args.desk:
        desks = generate(args.desk, args.seed, digits=digits, labels=labels, desk=True)
        result["desk"] = evaluate(signature, desks)
    if args.small:
        smalls = generate(args.small, args.seed, digits=digits, labels=labels, small=True)
        result["small"] = evaluate(signature, smalls)
    blanks = generate_blank(args.blank, args.seed)
    result["blank_pages"] = {"n": len(blanks), "refused": refusals(signature, blanks)}
    big = latency_photo(digits, labels, args.seed)
    result["latency_batch1_1000x1000_jpeg"] = {**latency(signature, big), "bytes": len(big)}
    result["settings"] = {
        "n": args.n,
        "ballpoint": args.ballpoint,
        "desk": args.desk,
        "small": args.small,
        "seed": args.seed,
        "model_dir": str(args.model_dir),
        "generate_seconds": generated_s,
    }
    return photos, result


def _current_graph(model: Any) -> Any:
    """`predict_image` as this checkout would export it: components.photo's normalisation,
    in-process, then the model's `serving_default` (to compare normalisations on one model)."""
    import tensorflow as tf

    from components.photo import normalize_photos

    serve = model.signatures["serving_default"]

    def predict_image(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return serve(images=normalize_photos(image_bytes))

    return predict_image


OTHER_SETS = {
    "ballpoint": "ballpoint photos (1000-2000 px, a pen 1-4% of the digit's height)",
    "desk": "the page on a desk (a dark, grey or wooden surface fills 15-60% of the frame)",
    "small": "small in a large photo (a ballpoint digit 6-12% of a 1500-2400 px photo's height)",
}


def _set_line(title: str, r: dict[str, Any]) -> str:
    """One line of a second photo set's figures."""
    flagged_wrong = f"{r['mistakes_flagged']:.0%} of the wrong answers, " if r["failures"] else ""
    return (
        f"{title}: {r['correct']}/{r['photos']} right = {r['accuracy']:.1%} "
        f"({r['refused']} refused); flagged uncertain: {flagged_wrong}"
        f"{r['correct_flagged']:.1%} of the right ones"
    )


def _print_result(result: dict[str, Any], n: int, seed: int) -> None:
    """What a person reads: the figures of `_measure`, then each misread photo."""
    print(
        f"photos: {result['correct']}/{result['photos']} right through predict_image = "
        f"{result['accuracy']:.1%}  (n={n}, seed={seed}; {result['refused']} "
        f"refused as no digit; {result['predict_seconds']:.1f} s)"
    )
    if result["mistakes_flagged"] is not None:
        print(
            f"flagged uncertain: {result['mistakes_flagged']:.0%} of the wrong answers (refusals "
            f"included), {result['correct_flagged']:.1%} of the right ones"
        )
    client = result["through_client"]
    print(
        f"the same photos as files through the client (python -m serving predict ... --local, "
        f"as make predict runs it): {client['correct']}/{client['photos']} right = "
        f"{client['accuracy']:.1%} ({client['refused']} refused)"
    )
    print(
        f"the same {n} digits as clean 28x28 arrays through serving_default: "
        f"{result['same_digits_clean_accuracy']:.1%} (the model's own ceiling here)"
    )
    for condition, v in result["by_condition"].items():
        print(f"  {condition:<20} {v['accuracy']:6.1%}  of {v['n']}")
    print(
        f"clean 28x28 test digits through serving_default: "
        f"{result['clean_28x28_accuracy_serving_default']:.2%} (10,000)"
    )
    for key, title in OTHER_SETS.items():
        if key in result:
            print(_set_line(title, result[key]))
    blank = result["blank_pages"]
    print(
        f"blank pages (same conditions, no digit) refused with InvalidArgument: "
        f"{blank['refused']}/{blank['n']}"
    )
    lat = result["latency_batch1_1000x1000_jpeg"]
    print(
        f"predict_image batch-1 latency, 1000x1000 JPEG ({lat['bytes']} bytes): "
        f"p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
        f"({lat['runs']} runs)"
    )
    others = [f for key in OTHER_SETS for f in result.get(key, {}).get("failures", [])]
    for f in result["failures"] + others:
        what = "refused" if "refused" in f else f"read {f['predicted']}"
        print(f"  miss #{f['index']}: true {f['label']} {what}: {f['description']}")


def _save_failures(folder: Path, photos: list[Photo], failures: list[dict[str, Any]]) -> None:
    import tensorflow as tf
    from PIL import Image

    from components.photo import normalize_photos

    folder.mkdir(parents=True, exist_ok=True)
    for f in failures:
        data = photos[f["index"]][0]
        stem = f"{f['index']:04d}-true{f['label']}-read{f['predicted']}"
        ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
        (folder / f"{stem}.{ext}").write_bytes(data)
        if "refused" not in f:
            seen = normalize_photos(tf.constant([data])).numpy()[0]
            Image.fromarray(seen).resize((112, 112), Image.Resampling.NEAREST).save(
                folder / f"{stem}-seen.png"
            )


if __name__ == "__main__":
    sys.exit(main())
