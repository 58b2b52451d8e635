"""Reading DICOM instances and deciding whether they are chest radiographs we can screen.

The gate follows the policy in ``shared/data/dicom/zoo/README.md``: metadata first (so a
broken MR is "not a chest radiograph", not "unreadable"), then the transfer syntax and
the pixel layout, then decoding.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
    UID_dictionary,
    UncompressedTransferSyntaxes,
)

from config.settings import DEFAULT_MAX_PIXELS
from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput
from worker.privacy import file_error

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
# BodyPartExamined is free text in practice, often in the site's language (CS allows no
# accents, but exports carry them).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORAX", "TÓRAX", "TORACE", "BRUST", "POITRINE")
# ViewPosition defined terms (PS3.3 C.8.11.5) and the spellings exports use; a value is
# free text in practice ("AP ERECT PORTABLE"), in the site's language like the body part,
# so each word is checked.
NON_FRONTAL_VIEWS = frozenset(
    {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
    | {"LATERALE", "LATÉRAL", "LATÉRALE", "PERFIL", "SEITLICH"}
    | {"RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBL", "OBLIQUE"}
    | {"OBLICUA", "OBLICUO", "OBLÍCUA", "OBLIQUA", "OBLIQUO", "SCHRÄG", "SCHRAEG"}
)
SAGITTAL_DIRECTIONS = frozenset({"A", "P"})
NATIVE_SYNTAXES: dict[tuple[bool | None, bool | None], UID] = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
OPPOSITE_DIRECTION = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
MIN_SIDE = 64  # pixels; below this a radiograph carries too little to screen
MAX_ASPECT = 3  # a chest film is 1:1 to 1:1.3; 3:1 is a spine, a strip or a scout
STANDARD_GROUPS = frozenset({0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
JPEG_SYNTAXES = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes)
JPEG2000_SYNTAXES = frozenset(JPEG2000TransferSyntaxes)  # with HTJ2K
NATIVE_OR_UNNAMED_SYNTAXES = frozenset({"", *UncompressedTransferSyntaxes})
WHOLE_CELL_SYNTAXES = NATIVE_OR_UNNAMED_SYNTAXES | {RLELossless}  # RLE codes the cells' bytes
# Syntaxes that may be lossy: their decoders can overshoot the stored range a little.
LOSSY_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)
SIZED_STREAM_SYNTAXES = JPEG_SYNTAXES | JPEG2000_SYNTAXES  # stream size checked by the gate
# The largest image the default size gate lets through, at 32 bits a pixel.
MAX_INFLATED_BYTES = 4 * DEFAULT_MAX_PIXELS
INFLATE_STEP = 1 << 20
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# SOF0-3, 5-7, 9-11, 13-15 (ITU T.81) and SOF55 (JPEG-LS, T.87)
JPEG_START_OF_FRAME = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
)

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
    check_regular_file(path)
    try:
        check_inflated_size(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
    except RejectedInput:
        raise
    except Exception as exc:  # pydicom raises many types on truncated or corrupt files
        raise RejectedInput(
            RejectCode.UNREADABLE, f"not a readable DICOM file ({describe_read_error(exc)})"
        ) from exc
    if len(ds) == 0:
        raise RejectedInput(
            RejectCode.UNREADABLE,
            "no DICOM data elements could be parsed (empty, truncated or not DICOM)",
        )
    if not looks_like_dicom(ds):
        raise RejectedInput(RejectCode.UNREADABLE, "not a DICOM file (no DICOM header found)")
    if pixels:
        name_native_encoding(ds)
    return ds


def check_regular_file(path: str | Path) -> None:
    """A named pipe or a device would block the read for ever (a missing file is left to
    the read, which names it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):  # one the walk could not list
        raise RejectedInput(RejectCode.UNREADABLE, "a folder whose files cannot be listed")
    if not stat.S_ISREG(mode):
        raise RejectedInput(RejectCode.UNREADABLE, "not a regular file")


def describe_read_error(exc: Exception) -> str:
    """The error without the file's path (export paths often hold patient names) and
    without the values it quotes, UIDs aside: a parser quotes the element it could not
    read (``invalid literal for int(): 'DOE^JOHN'``), and a corrupt element can run on
    into the patient's name. The UIDs kept are the standard's own (transfer syntaxes, SOP
    classes): a dotted date reads as a UID too."""
    if isinstance(exc, OSError):
        return file_error(exc)
    return f"{type(exc).__name__}: {shown(QUOTED.sub(_unless_uid, str(exc)), 120)}"


# A quoted value as Python's repr writes it (escaped quotes inside); not an apostrophe
# inside a word ("dataset's").
QUOTED = re.compile(r"(?<!\w)'((?:[^'\\]|\\.)*)'(?!\w)" r'|"((?:[^"\\]|\\.)*)"')


def _unless_uid(quoted: re.Match[str]) -> str:
    value = quoted.group(1) if quoted.group(1) is not None else quoted.group(2)
    return quoted.group(0) if value in UID_dictionary else "'...'"


def shown(value: str, limit: int = 32) -> str:
    """A header value as a reason may quote it: printable and short, since a corrupt
    element can run on into the patient's name."""
    if not value.isprintable():
        return "(unprintable value)"
    return value if len(value) <= limit else value[:limit] + "..."


def name_native_encoding(ds: Dataset) -> None:
    """A data set without a file meta group (ACR-NEMA style, some C-STORE receivers)
    cannot name its transfer syntax, and pydicom will not decode pixels without one.
    For native pixel data the encoding the parser found is the transfer syntax."""
    if transfer_syntax(ds) or "PixelData" not in ds or ds["PixelData"].is_undefined_length:
        return
    implicit, little = ds.original_encoding
    syntax = NATIVE_SYNTAXES.get((implicit, little))
    if syntax is not None:
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax


def check_inflated_size(path: str | Path, limit: int = MAX_INFLATED_BYTES) -> None:
    """A Deflated Explicit VR Little Endian file (PS3.5 A.5) is inflated whole by pydicom
    before any element can be looked at, header-only reads included: a 0.6 MB file took
    1.2 GB. Count what it inflates to first, in bounded steps."""
    with open(path, "rb") as fp:
        read_preamble(fp, force=True)
        try:
            # pydicom's own meta reader (private, pinned <4) leaves fp where the data set
            # starts, as dcmread does.
            meta = _read_file_meta_info(fp)
        except Exception:  # a broken meta group: dcmread reports it
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while not inflater.eof and (chunk := fp.read(INFLATE_STEP)):
            # after the end of the stream (pydicom pads it to an even length) zlib keeps
            # the rest as an unconsumed tail for ever
            while chunk and not inflater.eof:
                inflated += len(inflater.decompress(chunk, INFLATE_STEP))
                if inflated > limit:
                    raise RejectedInput(
                        RejectCode.UNSUPPORTED,
                        f"deflated data set inflates to more than {limit / 1e6:.0f} MB",
                    )
                chunk = inflater.unconsumed_tail


def looks_like_dicom(ds: Dataset) -> bool:
    """``force=True`` turns any bytes into "elements"; real DICOM has standard groups.

    A file without the preamble (ACR-NEMA style) still has identifying (0008), patient
    (0010), study (0020) or image (0028) elements; a text file or a PNG does not.
    """
    if getattr(ds, "preamble", None) is not None or getattr(ds, "file_meta", None):
        return True
    # keys(), not the Dataset itself: iterating a Dataset decodes every element's value.
    return any(tag.group in STANDARD_GROUPS for tag in ds.keys())  # noqa: SIM118


def transfer_syntax(ds: Dataset) -> str:
    """The file's TransferSyntaxUID, "" when it has no file meta or no such element."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


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
    for keyword, uid in (("SOPInstanceUID", sop), ("StudyInstanceUID", study)):
        if not is_dicom_uid(uid):
            raise RejectedInput(
                RejectCode.UNREADABLE,
                f"{keyword} is not a DICOM UID (digits and dots, at most 64 characters)",
            )
    series = _text(ds, "SeriesInstanceUID")
    return InstanceHeader(
        sop_instance_uid=sop,
        series_instance_uid=series if is_dicom_uid(series) else None,
        study_instance_uid=study,
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_date(_text(ds, "StudyDate")),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
    )


def is_dicom_uid(value: object) -> TypeGuard[str]:
    """A UID the results tables and the queue carry: PS3.5 9.1 digits and dots, at most
    64 characters (leading zeros in a component, seen in real exports, are let be).
    The one test for every side: what discovery accepts, ingest queues and a worker
    takes."""
    return isinstance(value, str) and len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


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
            RejectCode.NOT_CHEST,
            f"modality {shown(modality or '(none)')} is not a radiograph (CR/DX)",
        )
    sop_class = _text(ds, "SOPClassUID")
    if sop_class and sop_class not in IMAGE_SOP_CLASSES:
        raise RejectedInput(
            RejectCode.NOT_CHEST,
            f"SOP class {shown(sop_class, 64)} is not a radiograph image class",
        )
    body_part = (_text(ds, "BodyPartExamined") or "").upper()
    if body_part and not any(part in body_part for part in CHEST_BODY_PARTS):
        raise RejectedInput(RejectCode.NOT_CHEST, f"body part {shown(body_part)} is not the chest")
    check_frontal(ds)
    if (_text(ds, "PresentationIntentType") or "").upper() == "FOR PROCESSING":
        raise RejectedInput(
            RejectCode.UNSUPPORTED,
            "a For Processing image (raw detector data, PS3.3 C.8.11.1.1.1), not one for display",
        )


def check_frontal(ds: Dataset) -> None:
    """The view position says lateral, oblique or decubitus; or, with none, the patient
    orientation puts the film in a sagittal plane (rows running anterior-posterior)."""
    view = (_text(ds, "ViewPosition") or "").upper()
    if NON_FRONTAL_VIEWS.intersection(re.findall(r"[^\W\d_]+", view)):
        raise RejectedInput(RejectCode.NOT_FRONTAL, f"view position {shown(view)} is not frontal")
    if not view and SAGITTAL_DIRECTIONS.intersection(principal_directions(ds)):
        raise RejectedInput(
            RejectCode.NOT_FRONTAL, "patient orientation is of a lateral film (anterior-posterior)"
        )


def check_decodable(ds: Dataset, max_pixels: int) -> None:
    """Transfer syntax, photometric interpretation, frames and size we can screen."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None:
        try:
            available = get_decoder(UID(syntax)).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise RejectedInput(
                RejectCode.UNSUPPORTED, f"no decoder for transfer syntax {shown(str(syntax), 64)}"
            )
    photometric = _text(ds, "PhotometricInterpretation") or "(none)"
    if photometric not in GREYSCALE:
        raise RejectedInput(
            RejectCode.UNSUPPORTED,
            f"photometric interpretation {shown(photometric)} is not greyscale",
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise RejectedInput(RejectCode.UNSUPPORTED, "more than one sample per pixel")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"multi-frame image ({frames} frames)")
    check_bit_layout(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_dimensions(rows, cols, max_pixels)
    check_encoded_size(ds, rows, cols)


def check_bit_layout(ds: Dataset) -> None:
    """Pixel cells must hold their bits from bit 0 (HighBit = BitsStored - 1, as PS3.5
    8.1.1 now requires). Legacy exports put 12 bits at the top of the word (HighBit 15);
    decoders keep the low bits, and a scrambled film would be screened. Native and RLE
    data carry the whole cell; JPEG and JPEG 2000 streams are checked in
    ``check_encoded_size``, where their own precision is read."""
    if transfer_syntax(ds) in WHOLE_CELL_SYNTAXES and (message := retired_layout(ds)):
        raise RejectedInput(RejectCode.UNSUPPORTED, message)


def retired_layout(ds: Dataset) -> str | None:
    stored, high = ds.get("BitsStored"), ds.get("HighBit")
    if stored is None or high is None or int(high) == int(stored) - 1:
        return None
    return (
        f"high bit {int(high)} with {int(stored)} bits stored (pixel cells with the bits "
        "not from bit 0, a retired layout)"
    )


def check_dimensions(rows: int, cols: int, max_pixels: int) -> None:
    """The size gate every image passes (DICOM or picture) before its pixels are decoded."""
    if rows * cols > max_pixels:
        raise RejectedInput(
            RejectCode.UNSUPPORTED,
            f"image of {rows}x{cols} pixels is over the limit of {max_pixels} pixels",
        )
    if rows < MIN_SIDE or cols < MIN_SIDE:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"image of {rows}x{cols} is too small")
    if max(rows, cols) > MAX_ASPECT * min(rows, cols):
        # also a cost gate: the resize's anti-aliasing filter grows with the long side
        # (a 64 x 780,000 picture took 136 s)
        raise RejectedInput(
            RejectCode.UNSUPPORTED,
            f"image of {rows}x{cols} is not a chest film's shape (sides more than "
            f"{MAX_ASPECT}:1 apart)",
        )


def check_encoded_size(ds: Dataset, rows: int, cols: int) -> None:
    """A compressed frame must be the size, and have the one sample, the header says.

    Decoders allocate for what the compressed stream's own header says, not for Rows,
    Columns and SamplesPerPixel: a 200 kB file whose stream claims 60,000 x 60,000
    pixels, or a 1 kB JPEG 2000 stream that claims 16,384 components, would pass the
    header's size gate and take tens of GB while decoding.
    """
    syntax = transfer_syntax(ds)
    if syntax not in SIZED_STREAM_SYNTAXES or "PixelData" not in ds:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # a broken encapsulation is reported by the decoder
        return
    reader = _jpeg_frame_shape if syntax in JPEG_SYNTAXES else _jpeg2000_frame_shape
    shape = reader(frame)
    if shape is None:
        return
    if shape.size != (rows, cols):
        raise RejectedInput(
            RejectCode.UNREADABLE,
            f"compressed frame is {shape.rows}x{shape.cols} pixels but the header says "
            f"{rows}x{cols}",
        )
    if shape.components != 1:
        raise RejectedInput(
            RejectCode.UNREADABLE,
            f"compressed frame has {shape.components} components but the header says "
            "1 sample per pixel",
        )
    allocated = int(ds.get("BitsAllocated") or 0)
    if shape.precision > allocated:  # its low bits alone would be screened: noise
        raise RejectedInput(
            RejectCode.UNREADABLE,
            f"compressed frame has {shape.precision}-bit samples but the header says "
            f"{allocated} bits allocated",
        )
    # A stream that codes the whole cell holds the retired layout as it is.
    if shape.precision > int(ds.get("BitsStored") or 0) and (message := retired_layout(ds)):
        raise RejectedInput(RejectCode.UNSUPPORTED, message)


@dataclass(frozen=True)
class FrameShape:
    """What a compressed stream's own header says it holds."""

    rows: int
    cols: int
    components: int
    precision: int  # bits per sample

    @property
    def size(self) -> tuple[int, int]:
        return self.rows, self.cols


def _jpeg2000_frame_shape(frame: bytes) -> FrameShape | None:
    """From the SIZ marker of a codestream, bare or in a JP2 file (ITU T.800 A.5.1)."""
    start = 0
    if frame.startswith(JP2_SIGNATURE):
        box = frame.find(b"jp2c")
        start = box + 4 if box >= 0 else len(frame)
    if frame[start : start + 4] != b"\xff\x4f\xff\x51" or len(frame) < start + 43:
        return None
    width, height, x_offset, y_offset = struct.unpack(">4I", frame[start + 8 : start + 24])
    (components,) = struct.unpack(">H", frame[start + 40 : start + 42])
    precision = (frame[start + 42] & 0x7F) + 1  # Ssiz of the first component
    return FrameShape(height - y_offset, width - x_offset, components, precision)


def _jpeg_frame_shape(frame: bytes) -> FrameShape | None:
    """From the frame header of a JPEG (ITU T.81 B.2.2) or JPEG-LS (T.87) stream."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 10 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in JPEG_START_OF_FRAME:
            precision = frame[position + 4]
            height, width, components = struct.unpack(">HHB", frame[position + 5 : position + 10])
            # height 0: the number of lines comes later (DNL marker)
            return FrameShape(height, width, components, precision) if height else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        position += 2 + length
    return None


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values (signed or not, BitsStored honoured) as a 2-D array."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except NotImplementedError as exc:
        raise RejectedInput(
            RejectCode.UNSUPPORTED, f"cannot decode pixel data ({shown(str(exc), 120)})"
        ) from exc
    except Exception as exc:  # decoders raise many types on corrupt data, quoting values
        raise RejectedInput(
            RejectCode.UNREADABLE, f"pixel data cannot be decoded ({describe_read_error(exc)})"
        ) from exc
    if array.ndim != 2:
        raise RejectedInput(RejectCode.UNSUPPORTED, f"decoded pixel array has shape {array.shape}")
    return keep_bits_stored(array, ds)


def keep_bits_stored(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Values within BitsStored, as pydicom gives native data. A lossless stream may
    carry the whole cell (a transcoder encodes all 16 bits of a 12-bit image whose high
    bits hold a legacy overlay or garbage), and pydicom returns those values as they
    are: they showed as white patches in the lungs; only the low bits are kept
    (sign-extended when signed). A lossy decoder overshoots the range a little where
    the film is brightest: those values are clipped (masked, white wrapped to black).
    Native data pydicom has masked already: not again on the per-image path."""
    syntax = transfer_syntax(ds)
    if syntax in UncompressedTransferSyntaxes:
        return array
    try:
        bits = int(header_value(ds, "BitsStored", 0) or 0)
    except (TypeError, ValueError):
        return array
    cell = array.dtype.itemsize * 8
    if array.dtype.kind not in "iu" or not 0 < bits < cell:
        return array
    signed = array.dtype.kind == "i"
    if syntax in LOSSY_SYNTAXES:
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        return np.clip(array, low, high).astype(array.dtype, copy=False)
    if not signed:
        return array & array.dtype.type((1 << bits) - 1)
    shift = cell - bits
    return (array << shift) >> shift


def gate(ds: Dataset, max_pixels: int) -> None:
    """All checks before decoding, in the order of the zoo policy."""
    try:
        check_has_pixels(ds)
        check_chest_radiograph(ds)
        check_decodable(ds, max_pixels)
    except RejectedInput:
        raise
    except Exception as exc:  # pydicom parses an element on first access; it may be corrupt
        raise malformed(exc) from exc


def header_value(ds: Dataset, keyword: str, default: object = None) -> Any:
    """``ds.get(keyword, default)``, with an element pydicom cannot parse (it parses on
    first access) as the malformed-element rejection rather than a crash."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:
        raise malformed(exc) from exc


def malformed(exc: Exception) -> RejectedInput:
    """The rejection for an element that cannot be parsed (an unknown VR, a bad value)."""
    return RejectedInput(
        RejectCode.UNREADABLE,
        f"malformed header element ({describe_read_error(exc)})",
    )


@dataclass(frozen=True)
class Reorientation:
    """How to bring a stored film to the chest display: counter-clockwise quarter turns
    (``np.rot90``'s k), then an optional left-right mirror."""

    quarter_turns: int = 0
    mirror: bool = False


def display_orientation(ds: Dataset) -> Reorientation:
    """The turn (and mirror) that shows the film as a chest radiograph is read - feet at
    the bottom, the patient's left on the image's right (``L\\F``) - from
    PatientOrientation: the patient directions along the rows and down the columns, the
    principal one first in each value (PS3.3 C.7.6.1.1.1). Nothing when the header does
    not say, or names no head-feet direction."""
    directions = principal_directions(ds)
    if len(directions) != 2:
        return Reorientation()
    along_row, down_column = directions
    for turns in range(4):
        if down_column == "F":
            return Reorientation(turns, mirror=along_row == "R")
        # np.rot90(k=1): the old column direction runs along the new rows, and the new
        # columns run against the old rows
        along_row, down_column = down_column, OPPOSITE_DIRECTION.get(along_row, "")
    return Reorientation()


def principal_directions(ds: Dataset) -> tuple[str, ...]:
    """The principal letter of each PatientOrientation value (along the rows, down the
    columns): () when the element is absent, malformed or not two values."""
    try:
        value = ds.get("PatientOrientation")
    except Exception:  # a malformed element must not stop the read
        return ()
    if value is None:
        return ()
    parts = [str(v) for v in value] if isinstance(value, MultiValue) else str(value).split("\\")
    if len(parts) != 2:
        return ()
    return tuple(part.strip().upper()[:1] for part in parts)


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
