"""Labelled file lists and tf.data streams.

Layout: ``DATA_DIR/<split>/<label>/...`` with labels ``normal``, ``covid`` and optionally
``pneumonia``; files are PNG/JPEG (any picture ``load_gray`` reads) or DICOM (``.dcm``,
``.dicom``, no suffix, a UID name such as ``CR.1.2.840.1002`` whose suffix is digits, or
any name with the "DICM" prefix), found recursively (linked folders included). A listed
file that cannot be read counts as unreadable.

Every image reaches the network as ``model_input(load_gray(path), size)`` - the worker's
own pipeline (border crop, resize, histogram equalisation). Augmentation is applied on
top of that tensor, in training only.

Pneumonia policy: ``pneumonia/`` images are LEFT OUT of training, early stopping and
threshold choice. In this data set they are all web-published paper figures (ieee8023 /
Figure1), so as extra negatives they would teach "web-figure style means not COVID",
while the external COVID cases are exactly such figures. ``evaluate`` reports the
pneumonia images separately (how many the model flags).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training import CLASS_NAMES
from worker.discovery import tree_files
from worker.imaging.dicom import describe_read_error
from worker.imaging.errors import RejectedInput
from worker.imaging.pipeline import (
    PREPROCESSING_VERSION,
    has_dicom_preamble,
    is_picture,
    load_gray,
    model_input,
)

log = logging.getLogger(__name__)

LABELS = {"normal": 0, "covid": 1}
# Label folders as other data sets name them (compared without case, spaces or
# punctuation: "COVID-19", "Viral Pneumonia", "Lung_Opacity"). Other findings join the
# pneumonia group, which evaluate reports apart from the binary figures.
LABEL_FOLDERS = {
    "normal": "normal",
    "negative": "normal",
    "nofinding": "normal",
    "healthy": "normal",
    "covid": "covid",
    "covid19": "covid",
    "sarscov2": "covid",
    "positive": "covid",
    "pneumonia": "pneumonia",
    "viralpneumonia": "pneumonia",
    "bacterialpneumonia": "pneumonia",
    "lungopacity": "pneumonia",
}
# Folders of segmentation masks, compared as folder_key does ("Lung Masks", "lung_masks").
MASK_FOLDERS = frozenset(
    {"mask", "masks", "lungmask", "lungmasks", "infectionmask", "infectionmasks"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})
PNEUMONIA_POLICY = (
    "excluded: pneumonia/ images (all web-published ieee8023/Figure1 figures) are not used "
    "for training, early stopping or the threshold, to avoid teaching 'web-figure style = "
    "not COVID'; evaluate reports them separately"
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str  # "normal", "covid" or "pneumonia"

    @property
    def target(self) -> int:
        return LABELS.get(self.label, 0)


def is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def missing_reason(path: Path) -> str:
    what = "broken symbolic link" if is_broken_link(path) else "no such file"
    return f"unreadable: FileNotFoundError: {what}"


def is_image_file(path: Path) -> bool:
    """An image by its name, or a DICOM file by its "DICM" prefix (``.IMA`` files and
    others); a broken symbolic link counts, so it is reported unreadable instead of
    vanishing from the counts."""
    if path.name.startswith(".") or not (path.is_file() or is_broken_link(path)):
        return False
    if is_picture(path) or path.suffix.lower() in DICOM_SUFFIXES or is_uid_name(path):
        return True
    return has_dicom_preamble(path)


def is_uid_name(path: Path) -> bool:
    """PACS exports name files by their SOP Instance UID (``1.2.840...1002``, or with a
    prefix: ``CR.1.2.840.1002``), whose last part reads as an all-digit suffix. Such a
    file need not have the "DICM" prefix: files without a preamble still read."""
    suffix = path.suffix[1:]
    return suffix.isascii() and suffix.isdigit()


def walk_images(folder: Path) -> list[Path]:
    return [p for p in walk_files(folder) if is_image_file(p)]


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but pipes, devices and sockets, sorted, hidden names
    left out, linked folders walked once each; broken symbolic links and folders that
    cannot be listed are included, so they are reported rather than lost."""
    files = tree_files(folder, skip_hidden_files=True)
    return sorted(p for p in files if _reportable(p))


def _reportable(path: Path) -> bool:
    """Not a pipe, device or socket; a path the system refuses to look at (longer than
    PATH_MAX) is kept, so it is reported rather than stopping the walk."""
    try:
        return path.is_file() or path.is_dir() or not path.exists()
    except OSError:
        return True


def folder_key(name: str) -> str:
    return "".join(c for c in name.casefold() if c.isalnum())


def subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(folder).iterdir() if p.is_dir())
    except OSError:
        return []


def child_folder(folder: Path, name: str) -> Path | None:
    """``folder/name`` whatever its case ("Test/", "VAL/"), also when ``name`` is
    written so (``--split Val``)."""
    key = folder_key(name)
    return next((p for p in subfolders(folder) if folder_key(p.name) == key), None)


def label_folders(folder: Path) -> dict[Path, str]:
    """The sub-folders that name a label, and the label each names."""
    found = {p: LABEL_FOLDERS.get(folder_key(p.name)) for p in subfolders(folder)}
    return {p: label for p, label in found.items() if label is not None}


def other_folders(folder: Path) -> list[str]:
    """Sub-folders whose images no label takes: said, so a class left out is seen."""
    return [p.name for p in subfolders(folder) if folder_key(p.name) not in LABEL_FOLDERS]


def warn_left_out(folder: Path) -> None:
    if ignored := other_folders(folder):
        log.warning(
            "left out: %s under %s (no label folder: normal, covid or pneumonia, or the "
            "names other data sets use for them)",
            ", ".join(f"{name}/" for name in ignored),
            folder,
        )


def split_dir(data_dir: Path, split: str) -> Path:
    """``DATA_DIR/split`` if present, else DATA_DIR itself when it holds label folders
    (for ``evaluate`` only: training needs distinct train/ and val/ folders)."""
    data_dir = Path(data_dir)
    candidate = child_folder(data_dir, split)
    if candidate is not None:
        return candidate
    if any(label in LABELS for label in label_folders(data_dir).values()):
        return data_dir
    raise FileNotFoundError(f"{data_dir} has neither {split}/ nor normal/ and covid/ folders")


def list_samples(folder: Path, include: Iterable[str] = tuple(LABELS)) -> list[Sample]:
    """Sorted (path, label) pairs of one split folder; images in mask folders left out."""
    wanted = set(include)
    samples: list[Sample] = []
    masks: list[Sample] = []
    for sub, label in label_folders(Path(folder)).items():
        if label in wanted:
            for path in walk_images(sub):
                (masks if in_mask_folder(path, sub) else samples).append(Sample(path, label))
    if masks:
        log.warning(
            "left out: %d images in mask folders under %s (segmentation masks, not films)",
            len(masks),
            folder,
        )
    return sorted(samples, key=lambda s: (str(s.path), s.label))


def in_mask_folder(path: Path, label_folder: Path) -> bool:
    """Under a folder named for masks ("masks/", "lung masks/", "infection_masks/"): the
    COVID-19 Radiography Database and COVID-QU-Ex keep them beside "images/" in each
    label folder, and scored as films they took a 12-film set's AUC from 1.0 to 0.83."""
    folders = path.relative_to(label_folder).parts[:-1]
    return any(folder_key(name) in MASK_FOLDERS for name in folders)


def list_split(data_dir: Path, split: str, include: Iterable[str] = tuple(LABELS)) -> list[Sample]:
    """The samples of ``DATA_DIR/split``, which must exist: no fallback to DATA_DIR, where
    train and val would be the same images. Folders no label takes are named (a class
    under a name of its own, ``covid_confirmed/``, went unused unsaid)."""
    folder = child_folder(Path(data_dir), split)
    if folder is None:
        raise FileNotFoundError(
            f"{data_dir} has no {split}/ folder (training needs DATA_DIR/train/ and "
            "DATA_DIR/val/, each with normal/ and covid/ folders)"
        )
    warn_left_out(folder)
    samples = list_samples(folder, include)
    if not samples:
        raise FileNotFoundError(f"no images under {folder}")
    return samples


def counts(samples: Sequence[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.label] = out.get(s.label, 0) + 1
    return dict(sorted(out.items()))


def manifest_sha256(samples: Sequence[Sample], root: Path) -> str:
    """SHA-256 of the sorted ``relative/path<TAB>label`` lines (location independent)."""
    lines = sorted(f"{_relative(s.path, root)}\t{s.label}\n" for s in samples)
    return hashlib.sha256(name_bytes("".join(lines))).hexdigest()


def name_bytes(text: str) -> bytes:
    """UTF-8, with a file name that is not UTF-8 given back as its own bytes (Python
    holds those as surrogate escapes, which plain ``encode()`` refuses)."""
    return text.encode("utf-8", "surrogateescape")


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as listed, symbolic links not followed: a data set
    whose images are links into a shared store hashes the same wherever the store is."""
    relative = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    return (Path(path) if relative.parts[:1] == ("..",) else relative).as_posix()


def class_weights(per_label: Mapping[str, int]) -> dict[int, float]:
    """Inverse-frequency weights from images per label, normalised so a balanced set gets
    1.0 for each class."""
    n = sum(per_label.get(name, 0) for name in CLASS_NAMES)
    weights = {}
    for cls, name in enumerate(CLASS_NAMES):
        k = per_label.get(name, 0)
        weights[cls] = float(n / (len(CLASS_NAMES) * k)) if k else 1.0
    return weights


def readable_counts(
    samples: Sequence[Sample], size: int, cache_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, int]:
    """Images per label that decode, read from the input cache (built here, or found there:
    ``make_dataset`` reuses it). Unreadable files never reach training, so they must not
    count in the class weights or the model card."""
    return label_counts(InputCache.build(samples, size, Path(cache_dir), max_pixels).targets)


def label_counts(targets: Iterable[float]) -> dict[str, int]:
    """Images per label name from 0/1 targets (what was actually read or scored)."""
    return dict(sorted(Counter(CLASS_NAMES[int(t)] for t in targets).items()))


def load_input(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The network input of one file: exactly what the worker computes (``max_pixels``:
    its ``CXR_MAX_PIXELS``)."""
    return model_input(load_gray(path, max_pixels), size)


def load_or_reason(
    path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray | None, str]:
    """``(input, "")``, or ``(None, why)`` for a file the pipeline rejects or cannot read.

    Never raises: one corrupt file must not stop a long run.
    """
    try:
        if not Path(path).exists():
            return None, missing_reason(Path(path))
        return load_input(path, size, max_pixels), ""
    except RejectedInput as exc:
        return None, f"{exc.code.value}: {exc.reason}"
    except Exception as exc:
        return None, f"unreadable: {describe_read_error(exc)}"


def try_load(
    path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, bool]:
    """The input and True, or zeros and False for a file that is skipped. Not logged one
    by one: a path can name the patient (the callers log how many)."""
    x, _ = load_or_reason(path, size, max_pixels)
    if x is None:
        return np.zeros((size, size, 1), np.float32), False
    return x, True


# --------------------------------------------------------------------------- tf.data


@dataclass(frozen=True)
class Augmentation:
    """Geometry (small), intensity and image-processing jitter, applied after ``model_input``.

    ``unsharp_*``: hospitals' detectors apply their own edge and local-contrast
    enhancement (unsharp masking at several scales). With probability ``unsharp_prob``
    an image gets ``x + a * (x - blur_sigma(x))`` with ``a ~ U(unsharp_amount)`` (negative
    values smooth) and ``sigma`` log-uniform in ``unsharp_sigma`` pixels at 160 px (scaled
    with the input size), so that no one hospital's processing can stand for a label.

    ``text_prob``: share of images given burnt-in white text (side markers, "PORTABLE",
    a date, the covid hospital's "DCHA.") anywhere in the input, drawn from a fixed bank
    of TEXT_MASKS renderings, so that text inside the field cannot stand for a label
    either (a "DCHA." inside the field took the test sensitivity from 0.939 to 0.899)."""

    rotation_deg: float = 7.0
    zoom: float = 0.08
    translate: float = 0.05
    gamma_log: float = 0.3  # gamma = exp(U(-g, g)), 0.74..1.35
    contrast: float = 0.25  # (x - mean) * U(1 - c, 1 + c) + mean
    brightness: float = 0.08
    noise_max: float = 0.03  # gaussian sigma ~ U(0, noise_max)
    blur_prob: float = 0.2
    unsharp_prob: float = 0.0
    unsharp_amount: tuple[float, float] = (-0.5, 1.0)
    unsharp_sigma: tuple[float, float] = (1.0, 8.0)
    text_prob: float = 0.0


def make_dataset(
    samples: Sequence[Sample],
    size: int,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
    augmentation: Augmentation | None = None,
    with_weights: dict[int, float] | None = None,
    cache_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Any:
    """A tf.data pipeline streaming from disk: list -> (shuffle) -> parallel decode ->
    drop unreadable -> batch -> (augment) -> prefetch. Yields (x, y) or (x, y, w).

    With ``cache_dir`` the decoded inputs are computed once into an ``InputCache`` file
    there and read back row by row (still one image at a time, reshuffled every epoch):
    the decode is most of an epoch's data cost and gives the same pixels every time."""
    import tensorflow as tf

    if cache_dir is not None:
        cache = InputCache.build(samples, size, Path(cache_dir), max_pixels)
        ds = _cached_inputs(cache, training, seed)
    else:
        ds = _decoded_inputs(samples, size, training, seed, max_pixels)
    ds = ds.batch(batch_size, drop_remainder=False)
    if training:
        augment = build_augmenter(size, augmentation or Augmentation())
        # One seed per batch from a seeded stream redrawn every epoch: the augmentation is
        # stateless in it, so the parallel map's thread order cannot change the draws.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

        def _augment(batch: tuple[Any, Any], batch_seed: Any) -> tuple[Any, Any]:
            x, y = batch
            return augment(x, batch_seed), y

        ds = tf.data.Dataset.zip((ds, seeds)).map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    if with_weights is not None:
        w0, w1 = float(with_weights[0]), float(with_weights[1])

        def _weigh(x: Any, y: Any) -> tuple[Any, Any, Any]:
            return x, y, tf.where(y > 0.5, w1, w0)

        ds = ds.map(_weigh)
    return ds.prefetch(tf.data.AUTOTUNE)


def _decoded_inputs(
    samples: Sequence[Sample], size: int, training: bool, seed: int, max_pixels: int
) -> Any:
    import tensorflow as tf

    paths = [os.fsencode(s.path) for s in samples]  # bytes: a name need not be UTF-8
    targets = np.array([s.target for s in samples], np.float32)
    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def _load(path: Any) -> tuple[np.ndarray, bool]:
        return try_load(os.fsdecode(path), size, max_pixels)

    def _map(path: Any, y: Any) -> tuple[Any, Any, Any]:
        x, ok = tf.numpy_function(_load, [path], [tf.float32, tf.bool], stateful=False)
        x.set_shape((size, size, 1))
        ok.set_shape(())
        return x, y, ok

    def _readable(x: Any, y: Any, ok: Any) -> Any:
        return ok

    def _drop_flag(x: Any, y: Any, ok: Any) -> tuple[Any, Any]:
        return x, tf.reshape(y, (1,))

    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(_readable).map(_drop_flag)


def _cached_inputs(cache: InputCache, training: bool, seed: int) -> Any:
    import tensorflow as tf

    rows = np.arange(len(cache.targets), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((rows, cache.targets))
    if training:
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)

    def _read(row: Any, y: Any) -> tuple[Any, Any]:
        x = tf.numpy_function(cache.row, [row], tf.float32, stateful=False)
        x.set_shape(cache.shape)
        return x, tf.reshape(y, (1,))

    return ds.map(_read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclass(frozen=True)
class InputCache:
    """``model_input`` of every readable sample in one float32 file on disk (a memmap,
    so only the rows being read are in memory), with their targets."""

    inputs: np.ndarray  # a read-only np.memmap, or empty
    targets: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.inputs.shape[1:])

    def row(self, i: np.int64) -> np.ndarray:
        return np.asarray(self.inputs[int(i)])

    @classmethod
    def build(
        cls,
        samples: Sequence[Sample],
        size: int,
        folder: Path,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> InputCache:
        folder.mkdir(parents=True, exist_ok=True)
        header = f"{PREPROCESSING_VERSION}\n{size}\n{max_pixels}\n"
        key = hashlib.sha256(
            name_bytes(header + "".join(f"{s.path}\t{s.label}\n" for s in samples))
        ).hexdigest()[:16]
        path, targets_path = folder / f"inputs-{key}.f32", folder / f"targets-{key}.npy"
        if not targets_path.exists():
            cls._write(samples, size, max_pixels, path, targets_path)
        targets = np.load(targets_path)
        if len(targets) == 0:  # nothing readable: numpy cannot map an empty file
            return cls(np.zeros((0, size, size, 1), np.float32), targets)
        inputs = np.memmap(path, np.float32, "r", shape=(len(targets), size, size, 1))
        return cls(inputs, targets)

    @staticmethod
    def _write(
        samples: Sequence[Sample], size: int, max_pixels: int, path: Path, targets_path: Path
    ) -> None:
        out = np.memmap(path, np.float32, "w+", shape=(len(samples), size, size, 1))
        kept: list[float] = []
        for i, sample in enumerate(samples):
            x, ok = try_load(sample.path, size, max_pixels)
            if ok:
                out[len(kept)] = x
                kept.append(float(sample.target))
            if (i + 1) % 1000 == 0:
                log.info("decoded %d/%d images into the input cache", i + 1, len(samples))
        out.flush()
        del out
        os.truncate(path, len(kept) * size * size * 4)
        np.save(targets_path, np.array(kept, np.float32))


class StatelessDraws:
    """Random draws that depend only on ``seed`` (an int64 scalar tensor): each draw folds
    its own counter into the seed. Same ``uniform``/``normal`` calls as tf.random.Generator."""

    def __init__(self, seed: Any) -> None:
        import tensorflow as tf

        self._key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
        self._drawn = 0

    def _next_key(self) -> Any:
        import tensorflow as tf

        self._drawn += 1
        return tf.random.experimental.stateless_fold_in(self._key, self._drawn)

    def uniform(self, shape: Any, minval: float = 0.0, maxval: float = 1.0) -> Any:
        import tensorflow as tf

        return tf.random.stateless_uniform(shape, self._next_key(), minval, maxval)

    def normal(self, shape: Any) -> Any:
        import tensorflow as tf

        return tf.random.stateless_normal(shape, self._next_key())


def build_augmenter(size: int, aug: Augmentation) -> Any:
    """A function ((N,S,S,1) in [0,1], int64 seed) -> (N,S,S,1) in [0,1] applying random
    geometry + intensity, the same for the same seed."""
    import tensorflow as tf

    kernel = tf.constant([[1, 2, 1], [2, 4, 2], [1, 2, 1]], tf.float32)[..., None, None] / 16.0
    text_masks = tf.constant(render_text_masks(size)) if aug.text_prob > 0 else None

    def augment(x: Any, seed: Any) -> Any:
        rng = StatelessDraws(seed)
        x = random_affine(x, rng, aug)
        if aug.text_prob > 0:
            x = burn_in_text(x, rng, aug.text_prob, text_masks)
        shape = tf.stack([tf.shape(x)[0], 1, 1, 1])
        gamma = tf.exp(rng.uniform(shape, -aug.gamma_log, aug.gamma_log))
        x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), gamma)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * rng.uniform(shape, 1 - aug.contrast, 1 + aug.contrast) + mean
        x = x + rng.uniform(shape, -aug.brightness, aug.brightness)
        blurred = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
        x = tf.where(rng.uniform(shape) < aug.blur_prob, blurred, x)
        if aug.unsharp_prob > 0:
            x = unsharp(x, rng, aug, size)
        sigma = rng.uniform(shape, 0.0, aug.noise_max)
        x = x + sigma * rng.normal(tf.shape(x))
        return tf.clip_by_value(x, 0.0, 1.0)

    return augment


TEXT_MASKS = 64
MARKER_WORDS = ("L", "R", "DCHA.", "IZDA.", "PORTABLE", "AP", "PA", "SUPINE", "ERECT", "12/03/2020")


def render_text_masks(size: int, seed: int = 0) -> np.ndarray:
    """(TEXT_MASKS, S, S, 1) float32 masks of one marker word each, 4-12 % of the side
    high, anywhere in the input; the same bank for every run."""
    from PIL import Image, ImageDraw

    from training.robustness import marker_font

    rng = np.random.default_rng(seed)
    masks = np.zeros((TEXT_MASKS, size, size, 1), np.float32)
    for mask in masks:
        canvas = Image.new("L", (size, size), 0)
        font = marker_font(max(6, round(size * rng.uniform(0.04, 0.12))))
        x, y = (int(v) for v in rng.integers(0, int(size * 0.8), 2))
        ImageDraw.Draw(canvas).text((x, y), str(rng.choice(MARKER_WORDS)), fill=255, font=font)
        mask[..., 0] = np.asarray(canvas, np.float32) / 255.0
    return masks


def burn_in_text(x: Any, rng: StatelessDraws, prob: float, masks: Any) -> Any:
    """White text (grey 0.85-1) from the mask bank over about ``prob`` of the images."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    pick = tf.cast(rng.uniform([n], 0.0, float(TEXT_MASKS)), tf.int32)
    shape = tf.stack([n, 1, 1, 1])
    alpha = tf.gather(masks, tf.minimum(pick, TEXT_MASKS - 1))
    alpha = tf.where(rng.uniform(shape) < prob, alpha, 0.0)
    return x * (1.0 - alpha) + rng.uniform(shape, 0.85, 1.0) * alpha


def random_affine(x: Any, rng: StatelessDraws, aug: Augmentation) -> Any:
    """Per image: rotation up to ``rotation_deg``, zoom 1 +- ``zoom`` and shifts up to
    ``translate`` of each side, as one bilinear resampling with reflected edges."""
    import tensorflow as tf

    n, h, w = (
        tf.shape(x)[0],
        tf.cast(tf.shape(x)[1], tf.float32),
        tf.cast(tf.shape(x)[2], tf.float32),
    )
    angle = rng.uniform([n], -math.radians(aug.rotation_deg), math.radians(aug.rotation_deg))
    zoom = rng.uniform([n], 1 - aug.zoom, 1 + aug.zoom)
    dx = rng.uniform([n], -aug.translate, aug.translate) * w
    dy = rng.uniform([n], -aug.translate, aug.translate) * h
    cos, sin = zoom * tf.cos(angle), zoom * tf.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    zero = tf.zeros_like(cos)
    # output pixel (u, v) samples input (cos*u - sin*v + a2, sin*u + cos*v + b2): the
    # rotation and zoom are about the centre, then the shift
    a2 = cx - cos * cx + sin * cy - dx
    b2 = cy - sin * cx - cos * cy - dy
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=tf.stack([cos, -sin, a2, sin, cos, b2, zero, zero], axis=1),
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def gaussian_blur(x: Any, sigma: Any, radius: int) -> Any:
    """Separable gaussian blur of a (N,S,S,1) batch with one ``sigma`` (a scalar tensor),
    edges reflected; ``radius`` is the kernel half-width in pixels (at least ~2 sigma)."""
    import tensorflow as tf

    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.nn.conv2d(padded, tf.reshape(kernel, (-1, 1, 1, 1)), strides=1, padding="VALID")
    return tf.nn.conv2d(rows, tf.reshape(kernel, (1, -1, 1, 1)), strides=1, padding="VALID")


def unsharp(x: Any, rng: Any, aug: Augmentation, size: int) -> Any:
    """Random unsharp masking / smoothing (see ``Augmentation``): one radius per batch,
    one amount per image, applied to about ``unsharp_prob`` of the images."""
    import tensorflow as tf

    scale = size / 160.0
    low, high = (math.log(s * scale) for s in aug.unsharp_sigma)
    sigma = tf.exp(rng.uniform((), low, high))
    radius = max(1, math.ceil(2.5 * aug.unsharp_sigma[1] * scale))
    shape = tf.stack([tf.shape(x)[0], 1, 1, 1])
    amount = rng.uniform(shape, *aug.unsharp_amount)
    amount = tf.where(rng.uniform(shape) < aug.unsharp_prob, amount, 0.0)
    return x + amount * (x - gaussian_blur(x, sigma, radius))
