"""Speed must never silently change results: the fast path against a straightforward one.

The fast path (``read_dicom_image`` + ``model_input``) shrinks a large image by an
integer box filter *before* the linear rescale and window, then crops, resizes and
equalises a ~512 px image. The reference does everything the plain way at full
resolution: pydicom's ``apply_modality_lut`` and ``apply_voi_lut`` on every pixel,
MONOCHROME1 inversion, the 10 % border crop, a scikit-image anti-aliased resize of the
full-resolution image straight to the model size, and the same histogram equalisation.

Tolerance, per image: mean |input difference| < 0.01 (inputs are in [0, 1]) and
|probability difference| < 0.02 with the model of the ``model_dir`` fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from skimage.exposure import equalize_hist
from skimage.transform import resize

from tests.conftest import shared
from worker.imaging.pipeline import BORDER_FRACTION, crop_border, model_input, read_dicom_image
from worker.model import Classifier

MAX_INPUT_DIFFERENCE = 0.01  # mean |delta| over the model input
MAX_PROBABILITY_DIFFERENCE = 0.02
SHAPE = (2500, 2048)  # a typical detector: Rows x Columns
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
# (photometric, encoding, signed with a rescale) per wrapped PNG
LAYOUTS = [
    ("MONOCHROME2", None, False),
    ("MONOCHROME1", None, False),
    ("MONOCHROME2", RLELossless, False),
    ("MONOCHROME1", RLELossless, True),
    ("MONOCHROME2", JPEG2000Lossless, False),
    ("MONOCHROME1", JPEG2000Lossless, False),
    ("MONOCHROME1", JPEGLSLossless, False),
]


def large_dicom(png: Path, photometric: str, syntax: str | None, signed: bool) -> Dataset:
    """A shared PNG upsampled to 2,048 x 2,500, 12-bit with noise, windowed, maybe inverted."""
    with Image.open(png) as img:
        p8 = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    big = resize(p8, SHAPE, order=1, anti_aliasing=False)
    noise = np.random.default_rng(len(png.name)).normal(0.0, 6.0, SHAPE)
    values = np.clip(np.rint(200 + big * 3600 + noise), 0, 4095)
    center = 2000.0
    if photometric == "MONOCHROME1":
        values, center = 4095 - values, 4095 - center
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = SHAPE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.WindowCenter, ds.WindowWidth = center, 3600.0
    if signed:  # stored = value - 2048, rescaled back by the intercept
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 2048, "US"
        ds.PixelData = (values - 2048).astype(np.int16).tobytes()
    else:
        ds.PixelRepresentation = 0
        ds.PixelData = values.astype(np.uint16).tobytes()
    if syntax is not None:
        ds.compress(syntax)
    return ds


def straightforward_input(path: Path, size: int) -> np.ndarray:
    """Every step at full resolution, with pydicom's own LUT functions."""
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    gray = apply_voi_lut(values, ds) / float(2 ** int(ds.BitsStored) - 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 1.0 - gray
    core = crop_border(gray, BORDER_FRACTION)
    resized = resize(core, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return equalize_hist(resized, nbins=256).astype(np.float32)[..., np.newaxis]


@pytest.fixture(scope="module")
def pngs() -> list[Path]:
    covid = sorted(shared("cxr", "test", "covid").glob("*.png"))[:4]
    normal = sorted(shared("cxr", "test", "normal").glob("*.png"))[:3]
    return covid + normal


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> Classifier:
    return Classifier(model_dir)


def test_fast_path_matches_full_resolution_reference(
    pngs: list[Path], classifier: Classifier, tmp_path: Path
) -> None:
    size = classifier.input_size
    fast, reference, names = [], [], []
    for png, (photometric, syntax, signed) in zip(pngs, LAYOUTS, strict=True):
        path = tmp_path / f"{png.stem}.dcm"
        large_dicom(png, photometric, syntax, signed).save_as(path, enforce_file_format=True)
        image = read_dicom_image(path, 50_000_000)
        assert image.gray.shape[0] < SHAPE[0] // 2, "the fast path shrinks before windowing"
        fast.append(model_input(image.gray, size))
        reference.append(straightforward_input(path, size))
        names.append(f"{png.parent.name}/{png.name} {photometric} {syntax or 'raw'}")
    fast_batch, reference_batch = np.stack(fast), np.stack(reference)
    input_delta = np.abs(fast_batch - reference_batch).mean(axis=(1, 2, 3))
    p_fast = classifier.predict(fast_batch)
    p_reference = classifier.predict(reference_batch)
    p_delta = np.abs(p_fast - p_reference)
    for name, d_input, d_p in zip(names, input_delta, p_delta, strict=True):
        assert d_input < MAX_INPUT_DIFFERENCE, f"{name}: mean |input delta| {d_input:.4f}"
        assert d_p < MAX_PROBABILITY_DIFFERENCE, f"{name}: |p delta| {d_p:.4f}"


def test_fast_path_predictions_do_not_depend_on_the_encoding(
    pngs: list[Path], classifier: Classifier, tmp_path: Path
) -> None:
    """Lossless encodings of one picture give one input, except JPEG 2000 (within tolerance).

    Uncompressed, RLE, inverted and signed-with-rescale copies decode to the same values
    and must give the same input. A large JPEG 2000 image is decoded at a lower wavelet
    resolution level (the fast path's early shrink), a slightly different low-pass
    filter than the box shrink: it is held to the reference tolerances.
    """
    tensors, is_j2k = [], []
    for photometric, syntax, signed in LAYOUTS:
        path = tmp_path / f"{photometric}-{syntax}-{signed}.dcm"
        large_dicom(pngs[0], photometric, syntax, signed).save_as(path, enforce_file_format=True)
        tensors.append(model_input(read_dicom_image(path, 50_000_000).gray, classifier.input_size))
        is_j2k.append(syntax == JPEG2000Lossless)
    batch = np.stack(tensors)
    probabilities = classifier.predict(batch)
    first = batch[0]
    for tensor, p, j2k in zip(batch, probabilities, is_j2k, strict=True):
        delta = float(np.abs(tensor - first).mean())
        if j2k:
            assert delta < MAX_INPUT_DIFFERENCE, delta
            assert abs(p - probabilities[0]) < MAX_PROBABILITY_DIFFERENCE, probabilities
        else:
            assert delta < 1e-3, delta  # float rounding at histogram-bin edges
            assert abs(p - probabilities[0]) < 1e-3, probabilities
