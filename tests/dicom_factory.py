"""Synthetic DICOM for tests: real shared PNG pixels wrapped with pydicom.

Each variant stores the same picture differently (photometric, bit depth, window,
rescale, compression) so tests can check that normalisation undoes the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def base_dataset(
    pixels: np.ndarray,
    *,
    study_uid: str | None = None,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-PATIENT-0001"
    ds.PatientName = "Test^Patient"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20261126"
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}
    ds.PixelData = pixels.astype(dtype[(ds.BitsAllocated, signed)]).tobytes()
    return ds


def variants(png: Path) -> dict[str, Dataset]:
    """The same picture stored in ways the worker must normalise back to the PNG."""
    p8 = png_pixels(png)
    out: dict[str, Dataset] = {"mono2_8bit": base_dataset(p8)}
    out["mono1_8bit"] = base_dataset(255 - p8, photometric="MONOCHROME1")

    # 12-bit stored, a window that maps 0..4080 back onto the display range.
    v12 = p8.astype(np.uint16) * 16
    ds = base_dataset(v12, bits=12)
    ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
    out["mono2_12bit_window"] = ds

    # Signed values with a rescale: stored = (p8*16 - 2048), slope 1, intercept 2048.
    signed = p8.astype(np.int16) * 16 - 2048
    ds = base_dataset(signed, bits=12, signed=True)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 2048, "US"
    ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
    out["signed_12bit_rescale_window"] = ds

    # MONOCHROME1, 12-bit, no window: auto-windowed (percentiles) and inverted.
    out["mono1_12bit_nowindow"] = base_dataset(
        4095 - p8.astype(np.uint16) * 16, bits=12, photometric="MONOCHROME1"
    )

    # A VOI LUT Sequence with 8-bit entries on 12-bit data (4096 entries, v -> v // 16):
    # inputs above 255 must not wrap in the entries' 8-bit type.
    ds = base_dataset(p8.astype(np.uint16) * 16, bits=12)
    ds.VOILUTSequence = [lut_item(4096, 0, 8, np.arange(4096) // 16)]
    out["voi_lut_8bit_entries"] = ds

    # Empty LUT and rescale elements, as in real NEMA exports: they count as absent.
    ds = base_dataset(p8.astype(np.uint16) * 16, bits=12)
    ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
    ds.VOILUTSequence = []
    ds.add_new(0x00281052, "DS", None)  # RescaleIntercept
    ds.add_new(0x00281053, "DS", None)  # RescaleSlope
    out["empty_lut_and_rescale"] = ds

    # Inversion said by the Presentation LUT Shape instead of MONOCHROME1.
    ds = base_dataset(255 - p8)
    ds.PresentationLUTShape = "INVERSE"
    out["mono2_presentation_inverse"] = ds

    rle = base_dataset(p8.astype(np.uint16) * 16, bits=12)
    rle.WindowCenter, rle.WindowWidth = 2040.5, 4081
    rle.compress(RLELossless)
    out["rle_12bit_window"] = rle

    j2k = base_dataset(255 - p8, photometric="MONOCHROME1")
    j2k.compress(JPEG2000Lossless)
    out["j2k_mono1_8bit"] = j2k
    return out


def lut_item(entries: int, first_mapped: int, bits: int, table: np.ndarray) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    item.add_new(0x00283006, "US", [int(v) for v in table])  # LUTData
    return item


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
