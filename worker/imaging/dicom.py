"""Reading DICOM instances and deciding whether they are chest radiographs we can screen.

The gate follows the policy in ``shared/data/dicom/zoo/README.md``: metadata first (so a
broken MR is "not a chest radiograph", not "unreadable"), then the transfer syntax and
the pixel layout, then decoding.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # CR Image
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX Image for Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX Image for Processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (NIH, SIIM exports)
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    }
)
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "APS", "AP SUPINE", ""})
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
MIN_SIDE = 64  # pixels; below this a radiograph carries too little to screen
STANDARD_GROUPS = frozenset({0x0008, 0x0010, 0x0018, 0x0020, 0x0028})

# Real exports break value-length and VR rules all the time; that is not our gate.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


@dataclass(frozen=True)
class InstanceHeader:
    """What the results tables need to know of an instance, read from its header."""

    sop_instance_uid: str
    series_instance_uid: str | None
    study_instance_uid: str
    accession_number: str | None
    study_date: dt.date | None
    patient_id: str | None
    modality: str | None
    view_position: str | None


def read_dataset(path: str | Path, *, pixels: bool) -> Dataset:
    """Parse a file, tolerating a missing preamble; any parse failure is a rejection."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise RejectedInput(RejectCode.UNREADABLE, f"not a readable DICOM file ({exc})") from exc
    if len(ds) == 0:
        raise RejectedInput(
            RejectCode.UNREADABLE,
            "no DICOM data elements could be parsed (empty, truncated or not DICOM)",
        )
    if not looks_like_dicom(ds):
        raise RejectedInput(RejectCode.UNREADABLE, "not a DICOM file (no DICOM header found)")
    return ds


def looks_like_dicom(ds: Dataset) -> bool:
    """``force=True`` turns any bytes into "elements"; real DICOM has standard groups.

    A file without the preamble (ACR-NEMA style) still has identifying (0008), patient
    (0010), study (0020) or image (0028) elements; a text file or a PNG does not.
    """
    if getattr(ds, "preamble", None) is not None or getattr(ds, "file_meta", None):
        return True
    # keys(), not the Dataset itself: iterating a Dataset decodes every element's value.
    return any(tag.group in STANDARD_GROUPS for tag in ds.keys())  # noqa: SIM118


def is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def instance_header(ds: Dataset) -> InstanceHeader:
    """The identifying header of an image instance; missing UIDs are a rejection."""
    sop = _text(ds, "SOPInstanceUID")
    study = _text(ds, "StudyInstanceUID")
    if not sop or not study:
        raise RejectedInput(
            RejectCode.UNREADABLE, "missing SOPInstanceUID or StudyInstanceUID in the header"
        )
    return InstanceHeader(
        sop_instance_uid=sop,
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=study,
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_date(ds.get("StudyDate")),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
    )


def header_or_none(ds: Dataset) -> InstanceHeader | None:
    try:
        return instance_header(ds)
    except RejectedInput:
        return None


def check_has_pixels(ds: Dataset) -> None:
    if is_dicomdir(ds):
        raise RejectedInput(RejectCode.UNREADABLE, "DICOMDIR media directory, not an image")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RejectedInput(RejectCode.UNREADABLE, "no pixel data in the file")


def check_chest_radiograph(ds: Dataset) -> None:
    """Reject anything that is not a frontal chest radiograph, from metadata alone."""
    modality = _text(ds, "Modality")
    if modality not in RADIOGRAPH_MODALITIES:
        raise RejectedInput(
            RejectCode.NOT_CHEST, f"modality {modality or '(none)'} is not a radiograph (CR/DX)"
        )
    sop_class = _text(ds, "SOPClassUID")
    if sop_class and sop_class not in IMAGE_SOP_CLASSES:
        raise RejectedInput(
            RejectCode.NOT_CHEST, f"SOP class {sop_class} is not a radiograph image class"
        )
    body_part = (_text(ds, "BodyPartExamined") or "").upper()
    if body_part and not any(part in body_part for part in CHEST_BODY_PARTS):
        raise RejectedInput(RejectCode.NOT_CHEST, f"body part {body_part} is not the chest")
    view = (_text(ds, "ViewPosition") or "").upper()
    if view in LATERAL_VIEWS:
        raise RejectedInput(RejectCode.NOT_FRONTAL, f"view position {view} is not frontal")


def check_decodable(ds: Dataset, max_pixels: int) -> None:
    """Transfer syntax, photometric interpretation, frames and size we can screen."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None:
        try:
            available = get_decoder(UID(syntax)).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise RejectedInput(RejectCode.UNSUPPORTED, f"no decoder for transfer syntax {syntax}")
    photometric = _text(ds, "PhotometricInterpretation") or "(none)"
    if photometric not in GREYSCALE:
        raise RejectedInput(
            RejectCode.UNSUPPORTED, f"photometric interpretation {photometric} is not greyscale"
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise RejectedInput(RejectCode.UNSUPPORTED, "more than one sample per pixel")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"multi-frame image ({frames} frames)")
    check_dimensions(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), max_pixels)


def check_dimensions(rows: int, cols: int, max_pixels: int) -> None:
    """The size gate every image passes (DICOM or picture) before its pixels are decoded."""
    if rows * cols > max_pixels:
        raise RejectedInput(
            RejectCode.UNSUPPORTED,
            f"image of {rows}x{cols} pixels is over the limit of {max_pixels} pixels",
        )
    if rows < MIN_SIDE or cols < MIN_SIDE:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"image of {rows}x{cols} is too small")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values (signed or not, BitsStored honoured) as a 2-D array."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except NotImplementedError as exc:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"cannot decode pixel data ({exc})") from exc
    except Exception as exc:  # decoders raise many types on corrupt data
        raise RejectedInput(
            RejectCode.UNREADABLE, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if array.ndim != 2:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"decoded pixel array has shape {array.shape}")
    return array


def gate(ds: Dataset, max_pixels: int) -> None:
    """All checks before decoding, in the order of the zoo policy."""
    check_has_pixels(ds)
    check_chest_radiograph(ds)
    check_decodable(ds, max_pixels)


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not stop the header read
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _date(value: object) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
