"""The one image pipeline: any picture or DICOM file -> the model's input tensor.

Training and the worker call ``load_gray`` (or ``read_dicom_image``) and ``model_input``;
nothing else touches pixels on the way to the network, so both see the same pixels.

Shortcut defences live here, so they hold in training and in production alike: the
outer border (where burnt-in text markers such as "DCHA." sit) is cropped away, and the
histogram is equalised, which removes one hospital's contrast and makes the input
invariant to any monotonic windowing of the same picture.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless
from scipy.ndimage import uniform_filter1d
from skimage.exposure import equalize_hist
from skimage.transform import resize

from config.settings import DEFAULT_MAX_PIXELS
from worker.imaging.dicom import (
    InstanceHeader,
    Reorientation,
    check_dimensions,
    check_regular_file,
    decode_pixels,
    describe_read_error,
    display_orientation,
    gate,
    header_or_none,
    instance_header,
    read_dataset,
    transfer_syntax,
)
from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput
from worker.imaging.pixels import (
    auto_window,
    block_reduce_mean,
    check_not_blank,
    display_gray,
    shrinks_before_display,
)
from worker.imaging.polarity import looks_inverted

# Versions model_input, the step from a display grey image to the network input. Fixes
# that bring a DICOM file to the display its PNG export shows (LUTs, padding, orientation)
# leave it alone: the PNG training inputs do not change.
PREPROCESSING_VERSION = "4"  # 3: wide uniform bands trimmed before the crop; 4: noisy ones too
WORKING_SIDE = 512
BORDER_FRACTION = 0.10
BAND_FRACTION = 0.05  # a uniform band at least this share of its side is not the film
BAND_TOLERANCE = 0.02  # grey standard deviation within a band's lines
BAND_SMOOTHING = 9  # pixels along a line averaged before its spread is measured
TWO_TONE_SHARE = 0.95  # of a picture's pixels on two grey tones: not a film
TWO_TONE_SPREAD = 4  # grey levels either side of a tone that count as that tone
DEEP_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})
PICTURE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
    | {".jp2", ".j2k", ".jpf", ".jpx"}  # JPEG 2000 files, not DICOM ones
)
# JPEG 2000 that Pillow's OpenJPEG can decode at a reduced resolution (not HTJ2K).
REDUCIBLE_JPEG2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
# Decoder plugins tried first where installed: CharLS (pyjpegls) decodes JPEG-LS about
# 3.5x faster than libjpeg (2,048 x 2,500 12-bit: 74 ms vs 269 ms), same values.
PREFERRED_PLUGINS: dict[str, str] = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


@dataclass(frozen=True)
class DicomImage:
    header: InstanceHeader
    gray: np.ndarray


def model_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Grey image in [0, 1] (any size) -> (size, size, 1) float32 network input."""
    core = crop_border(trimmed_film(gray), BORDER_FRACTION)
    resized = resize(core, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    equalised = equalize_hist(resized, nbins=256)
    return equalised.astype(np.float32)[..., np.newaxis]


def trimmed_film(gray: np.ndarray) -> np.ndarray:
    """The film at working size without its uniform edge bands: what the network input is
    cut from, and what the polarity check judges (judged with its bands, a film in a wide
    white surround was turned to white lungs, an inverted one in a black one was not)."""
    return trim_uniform_bands(block_reduce_mean(gray, WORKING_SIDE))


def trim_uniform_bands(image: np.ndarray) -> np.ndarray:
    """The image without uniform bands along its edges that are at least BAND_FRACTION
    of the side: padding to a 4:3 or square frame, a scanner's or a photograph's dark
    surround. The 10 % crop does not reach past them, and the equalisation then spent
    its range on the band: a 4:3 pillarbox took the test specificity from 0.957 to 0.824.
    Narrower bands (a few pixels of collimator edge) are left to the crop."""
    rows, cols = image.shape[:2]
    top, bottom = _band(image, rows), _band(image[::-1], rows)
    left, right = _band(image.T, cols), _band(image.T[::-1], cols)
    if top + bottom >= rows // 2 or left + right >= cols // 2:
        return image  # mostly uniform: the blank check, not a crop, deals with it
    return image[top : rows - bottom, left : cols - right]


def _band(image: np.ndarray, side: int) -> int:
    """How many leading rows are nearly uniform and alike, if that is a wide band.

    A row's spread is measured after a short moving average along it: the noisy surround
    of a scanned or photographed film (a few grey levels of noise) is not structure, and
    padding a film to 16:9 with it took the validation specificity from 0.95 to 0.19.
    """
    narrowest = math.ceil(BAND_FRACTION * side)
    if _leading_alike(image[:narrowest]) < narrowest:
        return 0  # most films: their first rows already differ, so the rest is not read
    return _leading_alike(image[: max(side // 2, narrowest)])  # none past the middle


def _leading_alike(rows: np.ndarray) -> int:
    """How many leading rows are nearly uniform and alike the first."""
    means = rows.mean(axis=1)
    spreads = uniform_filter1d(rows, BAND_SMOOTHING, axis=1, mode="nearest").std(axis=1)
    alike = (spreads <= BAND_TOLERANCE) & (np.abs(means - means[0]) <= 2 * BAND_TOLERANCE)
    return len(alike) if alike.all() else int(np.argmin(alike))


def crop_border(image: np.ndarray, fraction: float) -> np.ndarray:
    rows, cols = image.shape[:2]
    dr, dc = round(rows * fraction), round(cols * fraction)
    return image[dr : rows - dr, dc : cols - dc]


def read_dicom_image(path: str | Path, max_pixels: int) -> DicomImage:
    """One read of a DICOM file: header, gate, decode, display grey, turned and mirrored
    to the chest display where the header says the film is stored otherwise.

    A rejection after the header was read carries the header, so it can be recorded
    against the instance.
    """
    ds = read_dataset(path, pixels=True)
    header = header_or_none(ds)
    try:
        gate(ds, max_pixels)
        if header is None:
            header = instance_header(ds)
        stored = decode_jpeg2000_reduced(ds, WORKING_SIDE)
        if stored is None:
            stored = decode_fastest(ds)
        gray = display_gray(ds, stored, WORKING_SIDE)
        check_not_two_tone(gray)  # a mask in a DICOM header is no more a film than a PNG
        gray = reorient(gray, display_orientation(ds))
    except RejectedInput as exc:
        exc.header = header
        raise
    return DicomImage(header=header, gray=gray)


def reorient(gray: np.ndarray, how: Reorientation) -> np.ndarray:
    turned = np.rot90(gray, how.quarter_turns)
    return np.ascontiguousarray(turned[:, ::-1] if how.mirror else turned)


def decode_fastest(ds: Dataset) -> np.ndarray:
    """``decode_pixels`` with the fastest installed plugin first, then pydicom's order."""
    syntax = transfer_syntax(ds)
    plugin = PREFERRED_PLUGINS.get(syntax)
    if plugin is not None and plugin in _available_plugins(syntax):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return decode_pixels(ds)
        except RejectedInput:
            ds.pixel_array_options()  # back to every available plugin
    return decode_pixels(ds)


@functools.cache
def _available_plugins(syntax: str) -> tuple[str, ...]:
    try:
        return tuple(get_decoder(UID(syntax)).available_plugins)
    except (NotImplementedError, ValueError):
        return ()


def decode_jpeg2000_reduced(ds: Dataset, working_side: int) -> np.ndarray | None:
    """A large JPEG 2000 image decoded at a lower resolution level, or None.

    JPEG 2000 is a wavelet code: the image at 1/2, 1/4, ... of the size is in the
    stream, low-pass filtered by the wavelet, and decoding only those levels skips most
    of the work (a 2,048 x 2,500 12-bit lossless image: about 40 ms instead of 500 ms).
    It is taken only where it stands in for the box-filter shrink that follows anyway:
    whole halvings that keep the short side >= ``working_side``, where display_gray
    would shrink first too (``shrinks_before_display``), unsigned single-sample data whose
    codestream precision is BitsStored. Anything else, or any error, returns None and
    the file is decoded the usual way (which also reports a corrupt stream).
    """
    syntax = transfer_syntax(ds)
    if syntax not in REDUCIBLE_JPEG2000_SYNTAXES or not shrinks_before_display(ds):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.BitsStored)
        if int(ds.get("PixelRepresentation", 0) or 0) != 0 or rows < 2 * working_side:
            return None
        levels = int(math.log2(min(rows, cols) // working_side))
        if levels < 1:
            return None
        import openjpeg

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        params = openjpeg.get_parameters(frame)
        if (
            params["samples_per_pixel"] != 1
            or params["is_signed"]
            or params["precision"] != bits_stored
            or (params["rows"], params["columns"]) != (rows, cols)
            or bits_stored > 16
        ):
            return None
        with Image.open(io.BytesIO(frame)) as img:
            # Pillow's OpenJPEG decoder: the resolution levels to skip (a property there).
            # Pillow also scales samples of fewer than 8 bits up to 8, hence "== 8" below.
            img.reduce = levels  # type: ignore[method-assign, assignment]
            img.load()
            mode, array = img.mode, np.asarray(img)
    except Exception:  # the usual decoder will try, and report, the same stream
        return None
    expected = (-(-rows // 2**levels), -(-cols // 2**levels))
    if array.shape != expected:
        return None
    if mode == "L" and bits_stored == 8:
        return array
    if mode == "I;16" and bits_stored > 8:
        # Pillow scales n-bit samples to 16 bits (shift left by 16 - n); undo it.
        return array >> (16 - bits_stored)
    return None


def load_picture(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PNG/JPEG/TIFF as grey in [0, 1], shown as a viewer shows it, after the same size
    gate as DICOM (read from the header, before the pixels are decoded), the right way
    round (white lungs turned back); a blank picture is rejected as a blank DICOM
    image is."""
    try:
        with Image.open(path) as img:
            check_dimensions(img.height, img.width, max_pixels)
            gray = picture_gray(ImageOps.exif_transpose(img))
        check_not_blank(gray, where="")
        if looks_inverted(trimmed_film(gray)):  # a picture has no header to say so
            gray = 1.0 - gray
    except Image.DecompressionBombError as exc:
        raise RejectedInput(
            RejectCode.UNSUPPORTED, f"image is over the size limit ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:  # its message quotes the path
        raise RejectedInput(RejectCode.UNREADABLE, "not an image format Pillow reads") from exc
    except (OSError, ValueError) as exc:
        raise RejectedInput(
            RejectCode.UNREADABLE, f"not a readable image ({describe_read_error(exc)})"
        ) from exc
    check_not_two_tone(gray)
    return gray


def check_not_two_tone(gray: np.ndarray) -> None:
    """A segmentation mask or a drawing, not a film: nearly every pixel within
    TWO_TONE_SPREAD grey levels of two tones (JPEG ringing spreads a mask's two values;
    the most of any of the 4,899 shared films is 83 %, one in a wide black frame)."""
    levels = np.rint(gray[::4, ::4] * 255).astype(np.uint8).ravel()
    width = 2 * TWO_TONE_SPREAD + 1
    near = np.convolve(np.bincount(levels, minlength=256), np.ones(width), mode="same")
    first = int(np.argmax(near))
    others = near.copy()
    others[max(0, first - width + 1) : first + width] = 0  # a second tone, not the first's edge
    share = float(near[first] + others.max()) / levels.size
    if share >= TWO_TONE_SHARE:
        raise RejectedInput(
            RejectCode.NOT_CHEST,
            f"a two-tone picture ({share:.0%} of its pixels on two grey tones): a "
            "segmentation mask or a drawing, not a radiograph",
        )


def picture_gray(img: Image.Image) -> np.ndarray:
    """8-bit grey or colour as value / 255; deeper grey (16-bit, 32-bit, float) shown
    from its DEEP_GREY_RANGE percentiles. The EXIF orientation is applied by the caller;
    transparent areas are flattened on black, as the training PNGs were."""
    if img.mode in DEEP_GREY_MODES:
        return auto_window(np.asarray(img, dtype=np.float32))
    if "A" in img.getbands() or "transparency" in img.info:
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def is_picture(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


def load_gray(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported file -> grey in [0, 1]; DICOM goes through the full gate. The
    reader is chosen by content, the name only breaking a tie: a DICOM file named
    ``.png`` (with or without the preamble), or a PNG with no extension or named
    ``.dcm``, is read by its content, as the worker reads it."""
    check_regular_file(path)  # before the content is read: reading a named pipe blocks
    if not has_dicom_preamble(path) and (
        pillow_reads(path) or (is_picture(path) and not parses_as_dicom(path))
    ):
        return load_picture(path, max_pixels)  # a broken picture: Pillow's reason
    return read_dicom_image(path, max_pixels).gray


def parses_as_dicom(path: str | Path) -> bool:
    """Whether the file's header parses as DICOM (a file without the preamble too)."""
    try:
        read_dataset(path, pixels=False)
    except RejectedInput:
        return False
    return True


def has_dicom_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def pillow_reads(path: str | Path) -> bool:
    """Whether Pillow identifies the file from its header (no pixels decoded)."""
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # a picture: load_picture rejects it with the size
    except (OSError, ValueError):
        return False
