"""From stored DICOM pixel values to a display-ready grey image in [0, 1].

Order: modality LUT (rescale slope/intercept or LUT sequence), then the VOI LUT or
window, then MONOCHROME1 inversion. The training PNGs are display-rendered 8-bit
images, so this is the step that makes a DICOM look like them.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput


def block_reduce_mean(image: np.ndarray, min_side: int) -> np.ndarray:
    """Shrink by the largest integer factor that keeps the short side >= ``min_side``.

    A box filter before the anti-aliased resize: it removes most of the pixels at the
    cost of one pass, so the Gaussian of the final resize runs on a small image.

    The block sums are built from ``factor`` strided slices per axis, accumulated in
    integers for integer pixels (exact) and in float32 otherwise: about 8x faster than
    ``reshape(...).mean(axis=(1, 3))`` on a 2,048 x 2,500 16-bit image (2 ms vs 16 ms),
    whose reduction over two short non-contiguous axes is slow in NumPy.
    """
    factor = min(image.shape[:2]) // min_side
    if factor < 2:
        return image.astype(np.float32, copy=False)
    rows = image.shape[0] // factor * factor
    cols = image.shape[1] // factor * factor
    cropped = image[:rows, :cols]
    if cropped.dtype.kind in "biu":
        accumulator: type[np.generic] = np.int32 if cropped.dtype.itemsize <= 2 else np.int64
    else:
        accumulator = np.float32
    column_sums = cropped[:, 0::factor].astype(accumulator)
    for offset in range(1, factor):
        column_sums += cropped[:, offset::factor]
    block_sums = column_sums[0::factor].copy()
    for offset in range(1, factor):
        block_sums += column_sums[offset::factor]
    return block_sums.astype(np.float32) * np.float32(1.0 / (factor * factor))


def display_gray(ds: Dataset, stored: np.ndarray, working_side: int) -> np.ndarray:
    """Stored values -> grey in [0, 1], MONOCHROME2 sense, short side >= ``working_side``.

    With a plain (linear) rescale the image is shrunk first, which is cheap and exact up
    to the pixels where the window clips; LUT sequences are not linear, so they are
    applied at full resolution before the shrink.
    """
    has_lut = "ModalityLUTSequence" in ds or "VOILUTSequence" in ds
    values = stored if has_lut else block_reduce_mean(stored, working_side)
    gray = voi_to_unit(ds, modality_values(ds, values))
    if has_lut:
        gray = block_reduce_mean(gray, working_side)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = 1.0 - gray
    return gray.astype(np.float32, copy=False)


def modality_values(ds: Dataset, values: np.ndarray) -> np.ndarray:
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(values, ds), dtype=np.float32)
    return values.astype(np.float32, copy=False)


def voi_to_unit(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """Apply the VOI LUT or the first window, or stretch when there is neither."""
    if "VOILUTSequence" in ds:
        return _voi_lut_sequence(ds, values)
    center, width = _first_window(ds)
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        return window(values, center, width, function)
    return _stretch(ds, values)


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions, output in [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        unit = (values - center) / width + 0.5
    else:
        if width < 1:
            raise RejectedInput(RejectCode.UNSUPPORTED, f"window width {width} below 1")
        unit = (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _voi_lut_sequence(ds: Dataset, values: np.ndarray) -> np.ndarray:
    mapped = np.asarray(apply_voi(values.astype(np.int64), ds), dtype=np.float32)
    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2])
    return np.clip(mapped / float(2**bits - 1), 0.0, 1.0)


def _first_window(ds: Dataset) -> tuple[float | None, float | None]:
    def first(keyword: str) -> float | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            return float(
                value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
            )
        except (TypeError, ValueError, IndexError):
            return None

    return first("WindowCenter"), first("WindowWidth")


def _stretch(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """No window: 8-bit data as is (like an 8-bit PNG); deeper data min-max scaled."""
    rescaled = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8 and not rescaled and int(ds.get("PixelRepresentation", 0) or 0) == 0:
        return (values / float(2**bits - 1)).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        raise RejectedInput(RejectCode.UNREADABLE, "image is blank (all pixels equal)")
    return ((values - low) / (high - low)).astype(np.float32)
