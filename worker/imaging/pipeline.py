"""The one image pipeline: any picture or DICOM file -> the model's input tensor.

Training and the worker call ``load_gray`` (or ``read_dicom_image``) and ``model_input``;
nothing else touches pixels on the way to the network, so both see the same pixels.

Shortcut defences live here, so they hold in training and in production alike: the
outer border (where burnt-in text markers such as "DCHA." sit) is cropped away, and the
histogram is equalised, which removes one hospital's contrast and makes the input
invariant to any monotonic windowing of the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.exposure import equalize_hist
from skimage.transform import resize

from worker.imaging.dicom import (
    InstanceHeader,
    decode_pixels,
    gate,
    header_or_none,
    instance_header,
    read_dataset,
)
from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput
from worker.imaging.pixels import block_reduce_mean, display_gray

PREPROCESSING_VERSION = "2"
WORKING_SIDE = 512
BORDER_FRACTION = 0.10
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class DicomImage:
    header: InstanceHeader
    gray: np.ndarray


def model_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Grey image in [0, 1] (any size) -> (size, size, 1) float32 network input."""
    small = block_reduce_mean(gray, WORKING_SIDE)
    core = crop_border(small, BORDER_FRACTION)
    resized = resize(core, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    equalised = equalize_hist(resized, nbins=256)
    return equalised.astype(np.float32)[..., np.newaxis]


def crop_border(image: np.ndarray, fraction: float) -> np.ndarray:
    rows, cols = image.shape[:2]
    dr, dc = round(rows * fraction), round(cols * fraction)
    return image[dr : rows - dr, dc : cols - dc]


def read_dicom_image(path: str | Path, max_pixels: int) -> DicomImage:
    """One read of a DICOM file: header, gate, decode, display grey.

    A rejection after the header was read carries the header, so it can be recorded
    against the instance.
    """
    ds = read_dataset(path, pixels=True)
    header = header_or_none(ds)
    try:
        gate(ds, max_pixels)
        if header is None:
            header = instance_header(ds)
        gray = display_gray(ds, decode_pixels(ds), WORKING_SIDE)
    except RejectedInput as exc:
        exc.header = header
        raise
    return DicomImage(header=header, gray=gray)


def load_picture(path: str | Path) -> np.ndarray:
    """A PNG/JPEG (8- or 16-bit greyscale or colour) as grey in [0, 1]."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I"):
                array = np.asarray(img, dtype=np.float32)
                return array / max(float(array.max()), 1.0)
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RejectedInput(RejectCode.UNREADABLE, f"not a readable image ({exc})") from exc


def is_picture(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


def load_gray(path: str | Path, max_pixels: int = 50_000_000) -> np.ndarray:
    """Any supported file -> grey in [0, 1]; DICOM goes through the full gate."""
    if is_picture(path):
        return load_picture(path)
    return read_dicom_image(path, max_pixels).gray
