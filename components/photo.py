"""Photos of digits -> MNIST's 28x28 format, in the graph (the `predict_image` signature).

MNIST's digits were size-normalised by NIST and LeCun et al.: white ink on black, the digit's
bounding box scaled to fit 20x20 keeping its aspect ratio (anti-aliased), then placed in a 28x28
field so that its centre of mass is at the centre. A photo of a digit written on paper is none
of that: dark (or blue) ink on an off-white page, lit unevenly, with texture, noise, sometimes
ruled lines and shadows, the digit anywhere and at any size. `normalize_photos` turns each photo
into what MNIST would have made of the same digit, with standard TensorFlow ops only, so the
same function runs in the exported SavedModel under tensorflow_model_server, in the client, and
in the tests (there is no second implementation to drift).

Per image, independently (tf.map_fn):

1. Bounded work. The size is read from the header before anything is decoded (PNG IHDR, JPEG
   SOF through tf.image.extract_jpeg_shape, GIF logical screen, BMP info header): more than
   MAX_PIXELS pixels is refused with InvalidArgument, so a decompression bomb is never
   decoded. A JPEG larger than 4x ANALYSIS_SIDE is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
   DCT scaling); then any image whose longer side is above ANALYSIS_SIDE (256 px) is
   area-downscaled to it, and all the work below is done at that size.
2. Decode PNG, JPEG, GIF (first frame) or BMP; grayscale by luminance. Transparency is
   composited over white, as a drawing exported with a dark digit on a transparent canvas is
   meant to be seen (over black when what is opaque is light: a light digit on transparent).
   TensorFlow's GIF decoder makes transparent pixels black, so a GIF's transparency is lost
   here (the client sends such GIFs as PNG). EXIF orientation is not applied (the client does).
3. The surface under the page: a page photographed lying on a desk leaves a darker surface
   around it (or on some sides), and the page's edge is a long, sharp step. Found at
   BACKGROUND_SIDE with the strokes closed and opened away: a region darker than SURFACE_RATIO
   of the page, much darker than the page just across its edge (a vignette or a shadow darkens
   gradually or less), running along at least SURFACE_BORDER of the image's border (a digit
   touching the border does not). It and the page's edge are filled with the page's own level
   spread from that edge, so neither is taken for ink. A digit written across the page's edge
   loses what lies outside it.
4. Polarity: is the ink darker or lighter than the page? Against the local mean (a box a
   quarter of the image wide) the lighting is gone, the page is the bulk of the distribution
   and the ink its long tail: the sign of the third moment says which side. The image is
   turned so that the ink is bright.
5. The page (uneven light, vignette, shadows, paper texture) is estimated by a morphological
   opening with a window wider than any stroke, at BACKGROUND_SIDE, and taken out: for dark ink
   as a fraction of the page's brightness (light multiplies), for light ink as a difference.
6. Threshold: the noise level (median absolute deviation) and Otsu's threshold of what stands
   above it. The ink mask is opened (drops speckles and ruled lines thinner than the strokes),
   dilated (joins broken strokes) and labelled (connected components by max pooling with
   pointer jumping); the component with the most ink is the digit, with any other piece that
   is near it and holds a fair share of ink (a 5's detached bar). When the opening broke the
   digit (a thin pen photographed large has strokes as thin as ruled lines there: most of its
   pixels do not survive), it is labelled again without the opening, unless that joins it to a
   line across the page.
7. Evidence: too little contrast or signal over noise, too few pixels, too small, or a flat
   sliver (a ruled line) is "no digit found". A thin pen small in a large photo (a digit on a
   whole page) is averaged with its paper by the downscale and often refused so: the message
   says to crop closer. (Letting ink far above the noise pass with less contrast read 2-5 more
   of 40 such photos, but also answered large blank pages, a hair, a pencil tick, a smudge.)
8. The digit's ink, soft (anti-aliased edges kept), is cropped to its bounding box, fitted into
   20x20 keeping the aspect ratio with an anti-aliased resize (strokes thinner than MNIST's
   median width thickened to it, measured at 4x that scale), stretched to 0..255 and placed in
   28x28 with its centre of mass at (14, 14), as in MNIST.

Bytes that are not a PNG/JPEG/GIF/BMP, that do not decode, or an image with no digit in it
(blank, or too little contrast) fail with InvalidArgument: never a silent guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    import numpy as np

MAX_PIXELS = 50_000_000  # width x height above this is refused before decoding
ANALYSIS_SIDE = 256  # a longer side above this is area-downscaled first; all work at this size
BACKGROUND_SIDE = 64  # the page's lighting is estimated at this size (longer side)
LABEL_SIDE = 128  # connected components at this size
MIN_CONTRAST = 0.15  # ink less than this much darker than its page (or lighter) is "no digit"
MIN_SNR = 4.0  # ... or standing less than this many noise standard deviations above it
MIN_PIXELS = 12  # a digit covers at least this many pixels at ANALYSIS_SIDE
MIN_EXTENT = 0.04  # ... and spans at least this fraction of the image's longer side
MAX_FLATNESS = 2.5  # ... and is at most this many times wider than high (not a ruled line)
SURFACE_RATIO = 0.45  # a surface under the page is darker than this fraction of the page
SURFACE_EDGE = 0.5  # ... and than this fraction of the page just across its edge (not a vignette)
SURFACE_BORDER = 0.05  # ... and runs along at least this fraction of the image's border
SURFACE_WIDTH = 11  # ... and is at least this wide at BACKGROUND_SIDE (wider than a stroke)
POLARITY_BOX = 0.25  # polarity is judged against the mean over a box this wide (of the side)
OPENING_WINDOW = 0.3  # the page: an opening with a window this wide (of BACKGROUND_SIDE)
SOFT_LOW = 0.25  # the digit's soft ink starts at this fraction of the mask's threshold
BBOX_LEVEL = 0.2  # ... and its box holds every pixel of it above this (as MNIST's holds all)
MERGE_MASS, MERGE_GAP = 0.08, 0.35  # other pieces of the digit: see _digit_components
WHOLE_GAIN, WHOLE_SPAN, WHOLE_SURVIVAL = 0.8, 0.9, 0.5  # see _whole_if_thin
FIT, SIDE = 20, 28  # MNIST: the digit fits 20x20, centred by mass in 28x28
# MNIST's stroke widths at the 20x20 scale (stroke_width at 4x, on 3,000 test digits): 5th
# percentile 1.36 px, 10th 1.51, median 2.03. Thinner strokes are thickened to the median, in
# steps of 1/STROKE_SCALE px: a stroke just under it barely changes (no jump at the threshold).
# (At 1.5 an MNIST-style output is thickened again when normalised a second time.)
STROKE_SCALE, MIN_STROKE = 4, 2.0


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
def normalize_photos(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded photos (string [N]) -> uint8 [N, 28, 28], white digit on black, like MNIST."""
    return tf.map_fn(
        normalize_photo, image_bytes, fn_output_signature=tf.TensorSpec([SIDE, SIDE], tf.uint8)
    )


def normalize_photo(data: tf.Tensor) -> tf.Tensor:
    """One encoded photo (string scalar) -> uint8 [28, 28]. See the module's docstring."""
    small = _blur3(_decode_gray(data))  # float32 [H, W] in 0..1, longer side <= ANALYSIS_SIDE
    small = _without_surface(small)
    ink_is_dark = _ink_is_dark(small)
    small = tf.where(ink_is_dark, 1.0 - small, small)  # ink bright from here on
    page = _background(small)
    # Light multiplies: dark ink on a page in shadow is as dark *relative to that page* as in
    # full light, so its contrast is measured as a fraction of the page's brightness there.
    # Light ink on a dark ground (a screenshot, a blackboard) is measured as a difference.
    scale = tf.where(ink_is_dark, 1.0 / tf.maximum(1.0 - page, 0.1), tf.ones_like(page))
    return _digit_from_residual((small - page) * scale)


# --------------------------------------------------------------------------------------------
# Header, size limits, decoding


def _bytes_at(head: tf.Tensor, start: int, count: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer in head[start:start + count] (int64 bytes), in that byte order."""
    weights = [256**k for k in range(count)]
    return tf.reduce_sum(head[start : start + count] * (weights[::-1] if big_endian else weights))


def image_format_and_size(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(format 0..4, height, width) from the first bytes, without decoding the pixels.

    Format 0 is "not a PNG, JPEG, GIF or BMP". JPEG's size comes from its SOF marker
    (tf.image.extract_jpeg_shape, which fails with InvalidArgument on a corrupt header).
    """
    padded = tf.strings.join([data, tf.constant(b"\0" * 32)])
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, 32), tf.uint8), tf.int64)

    def starts_with(magic: bytes) -> tf.Tensor:
        return tf.reduce_all(tf.equal(head[: len(magic)], list(magic)))

    is_png = tf.logical_and(starts_with(b"\x89PNG\r\n\x1a\n"), tf.strings.length(data) >= 24)
    is_jpeg = starts_with(b"\xff\xd8\xff")
    is_gif = tf.logical_and(starts_with(b"GIF8"), tf.strings.length(data) >= 10)
    is_bmp = tf.logical_and(starts_with(b"BM"), tf.strings.length(data) >= 26)
    fmt = tf.cast(tf.argmax(tf.stack([False, is_png, is_jpeg, is_gif, is_bmp])), tf.int32)
    fmt = tf.where(tf.reduce_any(tf.stack([is_png, is_jpeg, is_gif, is_bmp])), fmt, 0)

    bmp_core = tf.equal(_bytes_at(head, 14, 4, False), 12)  # BITMAPCOREHEADER: 16-bit sizes
    bmp_w = tf.where(
        bmp_core, _bytes_at(head, 18, 2, False), _signed32(_bytes_at(head, 18, 4, False))
    )
    bmp_h = tf.where(
        bmp_core, _bytes_at(head, 20, 2, False), _signed32(_bytes_at(head, 22, 4, False))
    )
    jpeg_hw = tf.cond(
        is_jpeg,
        lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
        lambda: tf.zeros([2], tf.int64),
    )
    # (height, width) by format: none, PNG (IHDR, big-endian 32-bit), JPEG (SOF), GIF
    # (little-endian 16-bit), BMP (a negative height means top-down rows)
    sizes = tf.stack(
        [
            tf.zeros([2], tf.int64),
            tf.stack([_bytes_at(head, 20, 4, True), _bytes_at(head, 16, 4, True)]),
            jpeg_hw,
            tf.stack([_bytes_at(head, 8, 2, False), _bytes_at(head, 6, 2, False)]),
            tf.abs(tf.stack([bmp_h, bmp_w])),
        ]
    )
    return fmt, sizes[fmt][0], sizes[fmt][1]


def _signed32(v: tf.Tensor) -> tf.Tensor:
    return tf.where(v >= 2**31, v - 2**32, v)


def _decode_gray(data: tf.Tensor) -> tf.Tensor:
    """Encoded image -> float32 [H, W] gray in 0..1 over white (or black, see below), its
    longer side at most ANALYSIS_SIDE; refuses what is not an image or is too large first."""
    fmt, height, width = image_format_and_size(data)
    with tf.control_dependencies(_header_checks(data, fmt, height, width)):
        data = tf.identity(data)  # nothing is decoded before the checks pass
    longest = tf.maximum(height, width)
    # libjpeg's DCT scaling: a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size, keeping
    # at least twice ANALYSIS_SIDE, which is far cheaper than decoding it whole.
    ratio_index = tf.add_n([tf.cast(longest >= f * ANALYSIS_SIDE, tf.int32) for f in (4, 8, 16)])

    def jpeg(ratio: int):
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio)

    # Only the decoders are branches, and what follows them is built once per kind (opaque RGB,
    # RGBA): every branch is a graph of its own to trace, and to optimise when served.
    def rgb() -> tuple[tf.Tensor, tf.Tensor]:  # JPEG (at its DCT scale) or GIF
        gif = lambda: tf.io.decode_image(data, channels=3, expand_animations=False)  # noqa: E731
        index = tf.where(tf.equal(fmt, 3), 4, ratio_index)
        return _opaque(tf.switch_case(index, [jpeg(1), jpeg(2), jpeg(4), jpeg(8), gif]))

    def rgba() -> tuple[tf.Tensor, tf.Tensor]:  # PNG or BMP
        return _with_alpha(
            tf.cond(
                tf.equal(fmt, 4),
                lambda: tf.io.decode_bmp(data, channels=4),
                lambda: decode_png_rgba(data),
            )
        )

    gray, alpha = tf.cond(tf.logical_or(tf.equal(fmt, 2), tf.equal(fmt, 3)), rgb, rgba)
    # Over white, unless what is opaque is light (a light digit on transparent): over black.
    backdrop = tf.where(tf.reduce_sum(gray) > 0.5 * tf.reduce_sum(alpha), 0.0, 1.0)
    return gray + backdrop * (1.0 - alpha)


def _header_checks(
    data: tf.Tensor, fmt: tf.Tensor, height: tf.Tensor, width: tf.Tensor
) -> list[tf.Operation]:
    return [
        _assert(
            fmt > 0,
            [
                "not a PNG, JPEG, GIF or BMP image; first bytes:",
                _printable(tf.strings.substr(tf.strings.join([data, " " * 8]), 0, 8)),
            ],
        ),
        _assert(
            tf.logical_and(height > 0, width > 0),
            ["image header gives an empty size:", height, "x", width],
        ),
        _assert(
            height * width <= MAX_PIXELS,
            [f"image too large: more than {MAX_PIXELS} pixels; header says", width, "x", height],
        ),
    ]


def _assert(condition: tf.Tensor, data: list) -> tf.Operation:
    """tf.debugging.Assert with its values as text (floats to 9 significant digits, as it
    prints float32: 0.14999999 is not shown as 0.15): an Assert on strings alone is one op,
    while one on numbers is guarded by a cond, two more graphs to build and optimise per
    check."""
    texts = [
        x
        if isinstance(x, str) or x.dtype == tf.string
        else tf.strings.as_string(x, shortest=True, precision=9)
        if x.dtype.is_floating
        else tf.strings.as_string(x)
        for x in data
    ]
    return tf.debugging.Assert(condition, texts)


def _printable(raw: tf.Tensor) -> tf.Tensor:
    """Bytes as text an error message can carry: what is not UTF-8, or a control character,
    becomes U+FFFD (TensorFlow's Python and TF Serving's JSON errors need UTF-8)."""
    return tf.strings.unicode_transcode(
        raw, "UTF-8", "UTF-8", errors="replace", replace_control_characters=True
    )


LUMA = (0.299, 0.587, 0.114)


def _checked(image: tf.Tensor) -> tf.Tensor:
    """What was decoded is within MAX_PIXELS too (a GIF's frames may differ from its header)."""
    shape = tf.shape(image, out_type=tf.int64)
    with tf.control_dependencies(
        [
            _assert(
                shape[0] * shape[1] <= MAX_PIXELS,
                [f"image too large: more than {MAX_PIXELS} pixels decoded:", shape],
            )
        ]
    ):
        return tf.identity(image)


def decode_png_rgba(data: tf.Tensor) -> tf.Tensor:
    """uint8 RGBA of a PNG. TensorFlow (2.21) fills the alpha of a grayscale or palette PNG of
    1, 2 or 4 bits per pixel with no transparency (fully opaque) with 1, 3 or 15 instead of 255,
    which would make a bilevel scan, or a drawing saved with a 2- or 4-colour palette, nearly
    transparent; such an alpha is set right (tRNS transparency is kept: a grayscale one is 0
    where transparent, a palette one is expanded by libpng and has no filler)."""
    rgba = tf.io.decode_png(data, channels=4)
    ihdr = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 24, 2), tf.uint8), tf.int32)
    depth, colour_type = ihdr[0], ihdr[1]
    low_bit = depth < 8
    low_bit_gray = tf.logical_and(tf.equal(colour_type, 0), low_bit)
    alpha = rgba[..., 3:]
    fixed = tf.where(alpha > 0, tf.constant(255, tf.uint8), alpha)
    filler = tf.cast(tf.bitwise.left_shift(1, tf.minimum(depth, 7)) - 1, tf.uint8)
    low_bit_palette_opaque = tf.logical_and(
        tf.logical_and(tf.equal(colour_type, 3), low_bit), tf.reduce_all(tf.equal(alpha, filler))
    )
    opaque = tf.where(low_bit_palette_opaque, tf.constant(255, tf.uint8), alpha)
    alpha = tf.where(low_bit_gray, fixed, opaque)
    return tf.concat([rgba[..., :3], alpha], -1)


def _opaque(rgb: tf.Tensor, checked: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 RGB -> (gray, alpha 1) at ANALYSIS_SIDE."""
    rgb = rgb if checked else _checked(rgb)
    gray = tf.tensordot(_resize_within(rgb, ANALYSIS_SIDE) / 255.0, tf.constant(LUMA), 1)
    return gray, tf.ones_like(gray)


def _with_alpha(rgba: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 RGBA -> (gray, alpha) at ANALYSIS_SIDE; fully opaque images as _opaque."""

    def transparent():  # premultiplied: downscaling then mixes colours as compositing does
        x = tf.cast(rgba, tf.float32) / 255.0
        alpha = x[..., 3:]
        small = _resize_within(tf.concat([x[..., :3] * alpha, alpha], -1), ANALYSIS_SIDE)
        return tf.tensordot(small[..., :3], tf.constant(LUMA), 1), small[..., 3]

    rgba = _checked(rgba)
    return tf.cond(
        tf.reduce_min(rgba[..., 3]) < 255, transparent, lambda: _opaque(rgba[..., :3], checked=True)
    )


def _resize_within(image: tf.Tensor, side: int) -> tf.Tensor:
    """Area-downscale so that the longer side is at most `side` (never upscale); float32."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.minimum(1.0, side / tf.maximum(h, w))
    size = tf.cast(tf.maximum(1.0, tf.round(tf.stack([h, w]) * scale)), tf.int32)

    def shrink():
        x = image if image.shape.rank == 3 else image[..., None]
        x = tf.image.resize(x, size, method="area")
        return x if image.shape.rank == 3 else x[..., 0]

    return tf.cond(scale < 1.0, shrink, lambda: tf.cast(image, tf.float32))


# --------------------------------------------------------------------------------------------
# Polarity and the page


def _as4(x: tf.Tensor) -> tf.Tensor:
    return x[None, :, :, None]


def _dilate(x: tf.Tensor, k: tf.Tensor | int) -> tf.Tensor:
    """Max over a k x k window (separable), same size."""
    k = tf.cast(k, tf.int32)
    y = tf.raw_ops.MaxPoolV2(
        input=_as4(x), ksize=tf.stack([1, 1, k, 1]), strides=[1, 1, 1, 1], padding="SAME"
    )
    y = tf.raw_ops.MaxPoolV2(
        input=y, ksize=tf.stack([1, k, 1, 1]), strides=[1, 1, 1, 1], padding="SAME"
    )
    return y[0, :, :, 0]


def _erode(x: tf.Tensor, k: tf.Tensor | int) -> tf.Tensor:
    return -_dilate(-x, k)


def _blur3(x: tf.Tensor) -> tf.Tensor:
    kernel = tf.constant([1.0, 2.0, 1.0]) / 4.0
    k2 = tf.tensordot(kernel, kernel, 0)[:, :, None, None]
    padded = tf.pad(_as4(x), [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    return tf.nn.conv2d(padded, k2, 1, "VALID")[0, :, :, 0]


def _quantile(
    x: tf.Tensor, q: float | tf.Tensor, lo: float, hi: float, bins: int = 2048
) -> tf.Tensor:
    """The q-quantile of x's values (clipped to [lo, hi]), from a histogram."""
    x = tf.reshape(x, [-1])
    hist = tf.histogram_fixed_width(tf.clip_by_value(x, lo, hi), [lo, hi], nbins=bins)
    cdf = tf.cumsum(hist)
    target = tf.cast(q, tf.float32) * tf.cast(tf.size(x), tf.float32)
    index = tf.argmax(tf.cast(cdf, tf.float32) >= target)
    return lo + (tf.cast(index, tf.float32) + 0.5) * (hi - lo) / bins


def _coarse(x: tf.Tensor) -> tf.Tensor:
    """[H, W] resized (anti-aliased) so that its longer side is BACKGROUND_SIDE."""
    shape = tf.shape(x)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    size = tf.maximum(1.0, tf.round(tf.stack([h, w]) * BACKGROUND_SIDE / tf.maximum(h, w)))
    return tf.image.resize(x[..., None], tf.cast(size, tf.int32), antialias=True)[..., 0]


def _without_surface(gray: tf.Tensor) -> tf.Tensor:
    """`gray` with the surface the page lies on (and the page's edge) replaced by the page's
    own level, continued from its edge; unchanged when there is none. See the module's
    docstring (step 3)."""
    coarse = _coarse(gray)
    # Dark strokes gone (a closing; the edges replicated first, so that a thin strip of
    # surface along the border stays); the page's level without light strokes (an opening).
    level = _erode(_dilate(_pad_edge(coarse, 5), 5), 5)
    page = _quantile(_dilate(_erode(level, 5), 5)[5:-5, 5:-5], 0.9, 0.0, 1.0)
    level = level[5:-5, 5:-5]
    # Wide only: a dark stroke that survived the closing (a thick pen) and touches the surface
    # is cut off from it here, and stays ink (edges replicated: a strip along the border stays).
    dark = _pad_edge(tf.cast(level < SURFACE_RATIO * page, tf.float32), SURFACE_WIDTH)
    wide = (_dilate(_erode(dark, SURFACE_WIDTH), SURFACE_WIDTH) > 0)[
        SURFACE_WIDTH:-SURFACE_WIDTH, SURFACE_WIDTH:-SURFACE_WIDTH
    ]
    surface = _along_the_border(_label(wide))
    grown = _dilate(tf.cast(surface, tf.float32), 5)  # with the page's (blurred) edge
    ring = tf.logical_and(_dilate(grown, 5) > 0, grown <= 0)
    inside, across = _mean_where(level, surface), _mean_where(level, ring)
    found = tf.reduce_all(
        tf.stack(
            [
                tf.reduce_any(surface),
                inside < SURFACE_EDGE * across,
                tf.reduce_mean(grown) < 0.75,  # a page is in the picture
            ]
        )
    )

    def filled() -> tf.Tensor:
        shape = tf.shape(gray)
        fill = tf.image.resize(_spread(level, grown <= 0)[..., None], shape, "bilinear")[..., 0]
        mask = tf.image.resize(grown[..., None], shape, "bilinear")[..., 0] > 0
        return tf.where(mask, fill, gray)

    return tf.cond(found, filled, lambda: gray)


def _mean_where(x: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    m = tf.cast(mask, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(x * m), tf.reduce_sum(m))


def _along_the_border(labels: tf.Tensor) -> tf.Tensor:
    """The components (of `_label`) that touch at least SURFACE_BORDER of the image's border."""
    shape = tf.shape(labels)
    flat = tf.reshape(labels, [-1])
    ids, index = tf.unique(flat)
    inner = tf.ones(shape - 2)
    border = tf.reshape(1.0 - tf.pad(inner, [[1, 1], [1, 1]]), [-1])
    contact = tf.math.unsorted_segment_sum(border, index, tf.size(ids))
    long = tf.logical_and(contact >= SURFACE_BORDER * tf.reduce_sum(border), tf.not_equal(ids, 0.0))
    return tf.reshape(tf.gather(long, index), shape)


def _spread(x: tf.Tensor, known: tf.Tensor) -> tf.Tensor:
    """`x` where `known`; elsewhere the mean of the known neighbours, spread outwards a ring of
    pixels at a time until every pixel has a value (a flat fill continuing the known edge)."""
    known_f = tf.cast(known, tf.float32)
    start = x * known_f

    def body(values, have, i):
        total = _box(values * have, 3)
        count = _box(have, 3)
        new = tf.where(have > 0, values, tf.math.divide_no_nan(total, count))
        return new, tf.cast(tf.logical_or(have > 0, count > 0), tf.float32), i + 1

    values, _, _ = tf.while_loop(
        lambda _v, have, i: tf.logical_and(tf.reduce_min(have) < 1.0, i < 2 * BACKGROUND_SIDE),
        body,
        [start, known_f, tf.constant(0)],
    )
    return values


def _ink_is_dark(gray: tf.Tensor) -> tf.Tensor:
    """Is the ink darker than the page? Against the local mean (a box a quarter of the image
    wide) lighting and vignette vanish and a shadow's edge leaves about equal bands on both
    sides; the page is the bulk of what remains and the ink its long tail, so the sign of the
    third moment about the median says which side the ink is on."""
    side = tf.cast(tf.reduce_max(tf.shape(gray)), tf.float32)
    k = tf.maximum(3, tf.cast(POLARITY_BOX * side, tf.int32)) // 2 * 2 + 1
    detrended = gray - _box(gray, k)
    deviation = (detrended - _quantile(detrended, 0.5, -1.0, 1.0)) * 10.0
    return tf.reduce_sum(deviation * deviation * deviation) <= 0.0


def _background(bright_ink: tf.Tensor) -> tf.Tensor:
    """The page under bright ink: a morphological opening (min then max) with a window wider
    than any stroke keeps lighting, vignette and shadow edges and removes the strokes. Done on
    the image resized to BACKGROUND_SIDE (so the window is a fixed size), then resized back."""
    shape = tf.shape(bright_ink)
    coarse = _coarse(bright_ink)[..., None]
    k = int(round(OPENING_WINDOW * BACKGROUND_SIDE)) // 2 * 2 + 1
    # Edges replicated a window wide first: an opening cuts ramps short at the border otherwise.
    padded = _pad_edge(coarse[..., 0], k)[None, :, :, None]
    eroded = -tf.nn.max_pool2d(tf.nn.max_pool2d(-padded, [1, k], 1, "SAME"), [k, 1], 1, "SAME")
    opened = tf.nn.max_pool2d(tf.nn.max_pool2d(eroded, [1, k], 1, "SAME"), [k, 1], 1, "SAME")
    smooth = tf.nn.avg_pool2d(opened, k // 4 // 2 * 2 + 1, 1, "SAME")
    smooth = smooth[0, k : k + tf.shape(coarse)[0], k : k + tf.shape(coarse)[1], :]
    return tf.image.resize(smooth, shape[:2], method="bilinear")[..., 0]


def _pad_edge(x: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """Pad a [H, W] by `p` on every side, repeating the edge pixels."""
    shape = tf.shape(x)
    rows = tf.clip_by_value(tf.range(-p, shape[0] + p), 0, shape[0] - 1)
    cols = tf.clip_by_value(tf.range(-p, shape[1] + p), 0, shape[1] - 1)
    return tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)


def _box(x: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """Mean over a k x k window (separable), edges replicated."""
    k = tf.cast(k, tf.int32)
    pad = k // 2
    c = tf.cumsum(tf.cumsum(_pad_edge(x, pad), 0), 1)
    c = tf.pad(c, [[1, 0], [1, 0]])
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return s / tf.cast(k * k, tf.float32)


# --------------------------------------------------------------------------------------------
# The digit


def _otsu(values: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, bins: int = 256) -> tf.Tensor:
    """Otsu's threshold of `values` within [lo, hi]."""
    hi = tf.maximum(hi, lo + 1e-4)
    hist = tf.cast(tf.histogram_fixed_width(values, tf.stack([lo, hi]), nbins=bins), tf.float32)
    centres = lo + (tf.range(bins, dtype=tf.float32) + 0.5) * (hi - lo) / bins
    w0 = tf.cumsum(hist)
    m0 = tf.cumsum(hist * centres)
    total, mass = w0[-1], m0[-1]
    w1 = total - w0
    between = tf.math.divide_no_nan(tf.square(mass * w0 - total * m0), w0 * w1)
    return lo + (tf.cast(tf.argmax(between), tf.float32) + 1.0) * (hi - lo) / bins


def _label(mask: tf.Tensor) -> tf.Tensor:
    """Connected components (8-connected) of a boolean [H, W]: each pixel of a component gets
    the largest pixel id (1-based flat index) in it, 0 outside. Ids spread by 3x3 max pooling
    within the mask, and jump: a pixel takes the label that its label's pixel already has."""
    shape = tf.shape(mask)
    n = shape[0] * shape[1]
    maskf = tf.cast(mask, tf.float32)
    labels = tf.reshape(tf.range(1, n + 1, dtype=tf.float32), shape) * maskf

    def body(labels, _changed, i):
        spread = tf.nn.max_pool2d(_as4(labels), 3, 1, "SAME")[0, :, :, 0] * maskf
        flat = tf.reshape(spread, [-1])
        jumped = tf.gather(flat, tf.maximum(tf.cast(flat, tf.int32) - 1, 0))
        new = tf.reshape(tf.maximum(flat, jumped), shape) * maskf
        return new, tf.reduce_any(tf.not_equal(new, labels)), i + 1

    labels, _, _ = tf.while_loop(
        lambda _l, changed, i: tf.logical_and(changed, i < n),
        body,
        [labels, tf.constant(True), tf.constant(0)],
    )
    return labels


def _digit_from_residual(residual: tf.Tensor) -> tf.Tensor:
    """Ink above the page (bright ink minus the page, [H, W]) -> the 28x28 of its main digit."""
    soft, digit_mask, evidence = _find_digit(residual)
    with tf.control_dependencies(
        [
            _assert(
                _is_digit(evidence),
                [
                    "no digit found: the image is blank, or its ink is too faint or too small; "
                    "a digit should fill a good part of the photo: crop closer to it "
                    "(contrast, ink/noise, pixels, height, width):",
                    evidence["contrast"],
                    evidence["snr"],
                    evidence["pixels"],
                    evidence["height"],
                    evidence["width"],
                ],
            )
        ]
    ):
        return _fit_and_centre(soft, digit_mask)


def _is_digit(e: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all(
        tf.stack(
            [
                e["pixels"] >= MIN_PIXELS,
                e["contrast"] >= MIN_CONTRAST,
                e["snr"] >= MIN_SNR,
                tf.maximum(e["height"], e["width"]) >= MIN_EXTENT * e["side"],
                e["width"] <= MAX_FLATNESS * e["height"],
            ]
        )
    )


def _find_digit(residual: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """(soft ink of the digit [H, W] in 0..1, its mask, the evidence that it is one)."""
    med = _quantile(residual, 0.5, -1.0, 1.0)
    sigma = 1.4826 * _quantile(tf.abs(residual - med), 0.5, 0.0, 1.0) + 0.5 / 255
    residual = tf.nn.relu(residual - med)
    noise_floor = 4.0 * sigma
    peak = tf.maximum(tf.reduce_max(_box(residual, 3)), noise_floor + 1e-3)
    above = tf.boolean_mask(residual, residual > noise_floor)
    threshold = tf.maximum(noise_floor, _otsu(above, noise_floor, peak))
    mask = residual > threshold

    # Components at LABEL_SIDE: speckles and lines thinner than 2 px there are opened away,
    # broken strokes joined by a dilation, then the component with the most ink is the digit.
    shape = tf.shape(residual)
    ink = residual * tf.cast(mask, tf.float32)
    coarse_ink = _resize_within(ink[..., None], LABEL_SIDE)[..., 0]
    coarse_mask = _resize_within(tf.cast(mask, tf.float32)[..., None], LABEL_SIDE)[..., 0] > 0.3
    opened = _dilate(_erode(tf.cast(coarse_mask, tf.float32), 2), 2) > 0
    keep = tf.cond(
        tf.reduce_sum(tf.cast(opened, tf.float32))
        >= 0.3 * tf.reduce_sum(tf.cast(coarse_mask, tf.float32)),
        lambda: opened,
        lambda: coarse_mask,
    )
    region = _digit_components(_label(_dilate(tf.cast(keep, tf.float32), 3) > 0), coarse_ink)
    region = _whole_if_thin(region, coarse_mask, opened, coarse_ink)
    region = (
        tf.image.resize(tf.cast(region, tf.float32)[..., None], shape[:2], method="nearest")[..., 0]
        > 0
    )
    digit_mask = tf.logical_and(mask, region)

    # Soft ink of the digit: anti-aliased edges kept, strokes' cores at full strength.
    values = tf.boolean_mask(residual, digit_mask)
    level = _quantile(values, 0.9, 0.0, 1.0)
    low = tf.maximum(noise_floor, SOFT_LOW * threshold)
    soft = tf.clip_by_value((residual - low) / tf.maximum(level - low, 1e-3), 0.0, 1.0)
    soft = soft * tf.cast(region, tf.float32)

    rows = tf.cast(tf.reduce_any(digit_mask, 1), tf.float32)
    cols = tf.cast(tf.reduce_any(digit_mask, 0), tf.float32)
    pixels = tf.reduce_sum(tf.cast(digit_mask, tf.float32))
    evidence = {
        "pixels": pixels,
        "contrast": level,
        "snr": tf.math.divide_no_nan(tf.reduce_sum(values), pixels) / sigma,
        "height": _extent(rows),
        "width": _extent(cols),
        "side": tf.cast(tf.reduce_max(shape), tf.float32),
        "sigma": sigma,
        "share": tf.math.divide_no_nan(tf.reduce_sum(values), tf.reduce_sum(ink)),
    }
    return soft, digit_mask, evidence


def _whole_if_thin(
    region: tf.Tensor, coarse_mask: tf.Tensor, opened: tf.Tensor, ink: tf.Tensor
) -> tf.Tensor:
    """The digit's region again without the opening when the opening broke it.

    A thin pen photographed large (a ballpoint on a phone photo) leaves strokes about a pixel
    wide at LABEL_SIDE, as thin as the ruled lines the opening is there to drop: the opening
    cuts such a digit into pieces and keeps one. Labelled without it, the digit's component
    holds clearly more ink; it is used unless it spans the page (a ruled line joined to it).
    """
    # Broken by the opening: most of the found digit's own pixels did not survive it (a felt
    # pen's strokes do, and a thin line beside them is then rightly left out). Only then is the
    # mask labelled a second time (a while loop per photo).
    found = tf.logical_and(region, coarse_mask)
    survived = tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(tf.logical_and(found, opened), tf.float32)),
        tf.reduce_sum(tf.cast(found, tf.float32)),
    )

    def ink_in(r: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(ink * tf.cast(r, tf.float32))

    def relabelled() -> tf.Tensor:
        whole = _digit_components(_label(_dilate(tf.cast(coarse_mask, tf.float32), 3) > 0), ink)
        shape = tf.cast(tf.shape(whole), tf.float32)
        spans = tf.logical_or(
            _extent(tf.cast(tf.reduce_any(whole, 1), tf.float32)) >= WHOLE_SPAN * shape[0],
            _extent(tf.cast(tf.reduce_any(whole, 0), tf.float32)) >= WHOLE_SPAN * shape[1],
        )
        gains = ink_in(region) < WHOLE_GAIN * ink_in(whole)
        return tf.where(tf.logical_and(gains, tf.logical_not(spans)), whole, region)

    return tf.cond(survived < WHOLE_SURVIVAL, relabelled, lambda: region)


def _extent(flags: tf.Tensor) -> tf.Tensor:
    """Length of the span from the first to the last 1 in a 0/1 vector (0 when none)."""
    n = tf.cast(tf.size(flags), tf.float32)
    idx = tf.range(n)
    first = tf.reduce_min(tf.where(flags > 0, idx, n))
    last = tf.reduce_max(tf.where(flags > 0, idx, -1.0))
    return tf.maximum(0.0, last - first + 1.0)


def _digit_components(labels: tf.Tensor, ink: tf.Tensor) -> tf.Tensor:
    """The digit's pixels: the component with the most ink, and with it every component holding
    at least MERGE_MASS of that ink whose bounding box is within MERGE_GAP of the main one's
    size (a 5's detached bar, a stroke broken by a dry pen), dilated by one pixel."""
    shape = tf.shape(labels)
    flat = tf.reshape(labels, [-1])
    ids, index = tf.unique(flat)
    n = tf.size(ids)
    yy, xx = tf.meshgrid(
        tf.range(shape[0], dtype=tf.float32), tf.range(shape[1], dtype=tf.float32), indexing="ij"
    )
    yy, xx = tf.reshape(yy, [-1]), tf.reshape(xx, [-1])
    mass = tf.math.unsorted_segment_sum(tf.reshape(ink, [-1]), index, n)
    mass = tf.where(tf.equal(ids, 0.0), 0.0, mass)
    y0 = tf.math.unsorted_segment_min(yy, index, n)
    y1 = tf.math.unsorted_segment_max(yy, index, n)
    x0 = tf.math.unsorted_segment_min(xx, index, n)
    x1 = tf.math.unsorted_segment_max(xx, index, n)
    main = tf.argmax(mass)
    size = tf.maximum(y1[main] - y0[main], x1[main] - x0[main]) + 1.0
    gap = tf.reduce_max(
        tf.stack([y0 - y1[main], y0[main] - y1, x0 - x1[main], x0[main] - x1, tf.zeros_like(y0)]), 0
    )
    keep = tf.logical_and(mass >= MERGE_MASS * mass[main], gap <= MERGE_GAP * size)
    keep = tf.logical_and(keep, tf.not_equal(ids, 0.0))
    region = tf.reshape(tf.gather(tf.cast(keep, tf.float32), index), shape)
    return _dilate(region, 3) > 0


def _bbox(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    rows = tf.where(tf.reduce_any(mask, 1))[:, 0]
    cols = tf.where(tf.reduce_any(mask, 0))[:, 0]
    return (
        tf.cast(rows[0], tf.int32),
        tf.cast(rows[-1], tf.int32) + 1,
        tf.cast(cols[0], tf.int32),
        tf.cast(cols[-1], tf.int32) + 1,
    )


def _fit(image: tf.Tensor, mask: tf.Tensor, box: int) -> tf.Tensor:
    """Crop `image` to the bounding box of `mask` and resize it (anti-aliased) so that its
    longer side is `box`, keeping the aspect ratio."""
    y0, y1, x0, x1 = _bbox(mask)
    h, w = tf.cast(y1 - y0, tf.float32), tf.cast(x1 - x0, tf.float32)
    size = tf.cast(
        tf.clip_by_value(tf.round(tf.stack([h, w]) * box / tf.maximum(h, w)), 1, box), tf.int32
    )
    crop = image[y0:y1, x0:x1, None]
    return tf.image.resize(crop, size, method="bilinear", antialias=True)[..., 0]


def stroke_width(image: tf.Tensor) -> tf.Tensor:
    """Mean stroke width in pixels of the ink (> 0.5) of a [H, W] image in 0..1: area over
    half the perimeter (a stroke w wide and L long: w * L / L)."""
    ink = tf.pad(tf.cast(image > 0.5, tf.float32), [[1, 1], [1, 1]])
    edge = ink * (1.0 - _erode(ink, 3))
    return tf.math.divide_no_nan(tf.reduce_sum(ink), tf.reduce_sum(edge) / 2.0)


def digit_stroke_width(digit: tf.Tensor) -> tf.Tensor:
    """Stroke width of a 28x28 digit (uint8) at the 20x20 scale, measured as `_thickened`
    measures a photo's: its box fitted to STROKE_SCALE x 20 (how MIN_STROKE was calibrated on
    MNIST's test digits)."""
    x = tf.cast(digit, tf.float32) / 255.0
    big = _fit(x, x > BBOX_LEVEL, FIT * STROKE_SCALE)
    return stroke_width(big / tf.maximum(tf.reduce_max(big), 1e-6)) / STROKE_SCALE


def _thickened(soft: tf.Tensor, box_mask: tf.Tensor) -> tf.Tensor:
    """The digit fitted into 20x20 with its strokes at least MIN_STROKE wide: a thin pen
    photographed large would be a hairline at that scale, a digit MNIST never shows the model.
    Fitted at STROKE_SCALE x that size first, where the strokes are measured and dilated (not
    at all when wide enough), then fitted again: the box grows with the strokes, as MNIST's
    boxes include theirs."""
    big = _fit(soft, box_mask, FIT * STROKE_SCALE)
    big = big / tf.maximum(tf.reduce_max(big), 1e-6)
    width = stroke_width(big) / STROKE_SCALE
    k = tf.maximum(tf.cast(tf.round((MIN_STROKE - width) * STROKE_SCALE), tf.int32), 0) + 1
    # A k-wide max (SAME) moves ink up to (k-1)//2 one way and the rest of k-1 the other.
    before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
    grown = tf.ensure_shape(
        _dilate(tf.pad(big, [[after, before], [after, before]]), k), [None, None]
    )
    return _fit(grown, tf.ones_like(grown, tf.bool), FIT)


def _fit_and_centre(soft: tf.Tensor, digit_mask: tf.Tensor) -> tf.Tensor:
    """MNIST's last steps: the digit's box fitted into 20x20 keeping its aspect ratio
    (anti-aliased; hairline strokes thickened), then placed in 28x28 with its centre of mass at
    the centre (clamped so that nothing is cut)."""
    fitted = _thickened(soft, tf.logical_or(digit_mask, soft > BBOX_LEVEL))
    fitted = tf.clip_by_value(fitted / tf.maximum(tf.reduce_max(fitted), 1e-6), 0.0, 1.0)
    size = tf.shape(fitted)
    total = tf.reduce_sum(fitted) + 1e-6
    cy = tf.reduce_sum(tf.reduce_sum(fitted, 1) * tf.range(size[0], dtype=tf.float32)) / total
    cx = tf.reduce_sum(tf.reduce_sum(fitted, 0) * tf.range(size[1], dtype=tf.float32)) / total
    top = tf.clip_by_value(tf.cast(tf.round(SIDE / 2 - cy), tf.int32), 0, SIDE - size[0])
    left = tf.clip_by_value(tf.cast(tf.round(SIDE / 2 - cx), tf.int32), 0, SIDE - size[1])
    placed = tf.pad(fitted, [[top, SIDE - size[0] - top], [left, SIDE - size[1] - left]])
    return tf.cast(tf.round(tf.reshape(placed, [SIDE, SIDE]) * 255.0), tf.uint8)


# --------------------------------------------------------------------------------------------
# Examples (for warmup records and tests; not part of the graph)

# A "7" and a "4" as polylines in a unit box (x, y from the top left).
_STROKES = {
    7: [[(0.15, 0.1), (0.85, 0.1), (0.4, 0.95)]],
    4: [[(0.6, 0.05), (0.1, 0.65), (0.9, 0.65)], [(0.65, 0.3), (0.65, 0.95)]],
    1: [[(0.45, 0.2), (0.6, 0.05), (0.6, 0.95)]],
}


def render_digit(
    digit: int,
    size: tuple[int, int] = (240, 320),
    *,
    box: tuple[float, ...] = (0.3, 0.25, 0.5),
    pen: float = 0.06,
    seed: int = 0,
) -> np.ndarray:
    """A photo-like float RGB image [H, W, 3] in 0..1 of a hand-drawn 1, 4 or 7: dark ink on
    an off-white page lit from one side, with noise. `box` = (top, left, height) of the digit
    as fractions of the image height; `pen` the stroke width as a fraction of the digit."""
    import numpy as np

    h, w = size
    top, left, height = (box[0] * h, box[1] * h, box[2] * h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    distance = np.full((h, w), np.inf)
    for line in _STROKES[digit]:
        for (x0, y0), (x1, y1) in zip(line[:-1], line[1:]):
            ax, ay = left + x0 * 0.7 * height, top + y0 * height
            bx, by = left + x1 * 0.7 * height, top + y1 * height
            dx, dy = bx - ax, by - ay
            t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy), 0, 1)
            distance = np.minimum(distance, np.hypot(xx - ax - t * dx, yy - ay - t * dy))
    ink = np.clip(pen * height / 2 + 0.5 - distance, 0, 1)
    rng = np.random.default_rng(seed)
    light = 0.75 + 0.25 * (xx / w) - 0.1 * ((yy / h - 0.5) ** 2)
    page = np.array([0.93, 0.91, 0.86]) * light[..., None]
    image = page * (1 - 0.8 * ink[..., None]) + rng.normal(0, 0.02, (h, w, 3))
    return np.clip(image, 0, 1)


def example_photos() -> list[bytes]:
    """Three small encoded photos of digits (JPEG and PNG, colour and grayscale)."""
    import numpy as np

    def u8(x):
        return tf.constant(np.round(x * 255).astype(np.uint8))

    seven = render_digit(7, (240, 320))
    four = render_digit(4, (200, 160), box=(0.2, 0.2, 0.6), seed=1)
    one = render_digit(1, (96, 72), box=(0.15, 0.3, 0.7), seed=2).mean(-1, keepdims=True)
    return [
        tf.io.encode_jpeg(u8(seven), quality=80).numpy(),
        tf.io.encode_png(u8(four)).numpy(),
        tf.io.encode_png(u8(one)).numpy(),
    ]
