"""Acquisition shifts: the same films as another hospital might produce them.

Hospitals differ less in their patients than in how they take and store the film: how
tightly the beam is collimated, the detector's aspect ratio (Kaggle squashed every film to
a square; a 14 x 17 inch portrait film squashed to a square is wider than a landscape
one), the resolution and compression of the archive copy, noise, patient positioning and
the detector's own image processing (edge and local-contrast enhancement, smoothing).
``evaluate --robustness`` re-scores the split under each shift below (applied to the grey
image BEFORE ``model_input``, so the pipeline's own crop and equalisation still run) and
reports AUC, sensitivity and specificity at the card threshold: a model that holds on
other hospitals' films should lose little under any of them.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.filters import gaussian, unsharp_mask
from skimage.transform import resize, rotate

GrayTransform = Callable[[np.ndarray], np.ndarray]


def wider_field(gray: np.ndarray, scale: float = 0.8) -> np.ndarray:
    """Wider collimation: the film shrunk to ``scale`` of its size inside a black frame."""
    rows, cols = gray.shape
    h, w = round(rows * scale), round(cols * scale)
    out = np.zeros_like(gray)
    top, left = (rows - h) // 2, (cols - w) // 2
    out[top : top + h, left : left + w] = resize(gray, (h, w), anti_aliasing=True)
    return out


def noisy_frame(gray: np.ndarray, aspect: float = 4 / 3, sigma: float = 6 / 255) -> np.ndarray:
    """Padded to ``aspect`` (width / height) with a dark surround carrying noise of
    ``sigma``: a scanned or photographed film, or a screenshot of one."""
    rows, cols = gray.shape
    pad = max(round((rows * aspect - cols) / 2), cols // 8)
    noise = np.random.default_rng(0).normal(0.02, sigma, (rows, cols + 2 * pad))
    out = np.clip(noise, 0.0, 1.0).astype(np.float32)
    out[:, pad : pad + cols] = gray
    return out


def burnt_in_text(gray: np.ndarray, text: str = "DCHA.") -> np.ndarray:
    """White text a twentieth of the film high, a fifth of the way in from the top left:
    inside the field the border crop keeps, where a marker such as the covid hospital's
    "DCHA." (cropped away when it sits at the edge, as in this data) sometimes lands."""
    rows, cols = gray.shape
    picture = Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8))
    font = marker_font(max(8, rows // 20))
    ImageDraw.Draw(picture).text((cols // 5, rows // 5), text, fill=255, font=font)
    return np.asarray(picture, dtype=np.float32) / 255.0


def marker_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` pixels; its small bitmap font where Pillow was built
    without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except ImportError:
        return ImageFont.load_default()


def tighter_field(gray: np.ndarray, keep: float = 0.85) -> np.ndarray:
    """Tighter collimation: only the central ``keep`` of each side."""
    rows, cols = gray.shape
    dr, dc = round(rows * (1 - keep) / 2), round(cols * (1 - keep) / 2)
    return gray[dr : rows - dr, dc : cols - dc]


def portrait_film(gray: np.ndarray, cut: float = 0.10) -> np.ndarray:
    """A taller film: ``cut`` of the width removed on each side, so the squashed square
    shows the chest wider than in training."""
    d = round(gray.shape[1] * cut)
    return gray[:, d : gray.shape[1] - d]


def landscape_film(gray: np.ndarray, cut: float = 0.10) -> np.ndarray:
    """A wider film: ``cut`` of the height removed at top and bottom."""
    d = round(gray.shape[0] * cut)
    return gray[d : gray.shape[0] - d, :]


def low_resolution(gray: np.ndarray, side: int = 100) -> np.ndarray:
    """An archive copy at ``side`` pixels, scaled back up."""
    small = resize(gray, (side, side), anti_aliasing=True)
    return resize(small, gray.shape, order=1)


def jpeg_compressed(gray: np.ndarray, quality: int = 25) -> np.ndarray:
    """An 8-bit lossy JPEG copy at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality
    )
    return np.asarray(Image.open(buffer), dtype=np.float32) / 255.0


def noisy(gray: np.ndarray, sigma: float = 0.04) -> np.ndarray:
    """Quantum noise of a lower dose: gaussian, the same pattern for every call."""
    noise = np.random.default_rng(0).normal(0.0, sigma, gray.shape)
    return np.clip(gray + noise, 0.0, 1.0).astype(np.float32)


def rotated(gray: np.ndarray, degrees: float = 10.0) -> np.ndarray:
    """Patient positioned ``degrees`` off vertical (counter-clockwise)."""
    return rotate(gray, degrees, mode="edge").astype(np.float32)


def sharpened(gray: np.ndarray, radius: float) -> np.ndarray:
    """Unsharp masking (amount 1) with a gaussian of ``radius`` times the longer side:
    small radii enhance edges, large ones local contrast (multi-scale detector processing)."""
    sigma = radius * max(gray.shape)
    return np.clip(unsharp_mask(gray, radius=sigma, amount=1.0), 0.0, 1.0).astype(np.float32)


def smoothed(gray: np.ndarray, radius: float) -> np.ndarray:
    """A softer detector or processing: gaussian blur, sigma ``radius`` times the longer side."""
    return gaussian(gray, sigma=radius * max(gray.shape)).astype(np.float32)


SHIFTS: dict[str, tuple[GrayTransform, str]] = {
    "wider_field": (wider_field, "film shrunk to 80% inside a black frame"),
    "noisy_frame": (noisy_frame, "padded to 4:3 with a dark surround, noise of 6 grey levels"),
    "tighter_field": (tighter_field, "central 85% of each side only"),
    "text_inside": (burnt_in_text, 'white "DCHA." burnt in inside the cropped field'),
    "portrait_film": (portrait_film, "10% of the width cut on each side"),
    "landscape_film": (landscape_film, "10% of the height cut at top and bottom"),
    "low_resolution": (low_resolution, "down to 100 px and back up"),
    "jpeg_q25": (jpeg_compressed, "8-bit JPEG, quality 25"),
    "noise_0.04": (noisy, "gaussian noise, sigma 0.04 of full scale"),
    "rotated_10": (rotated, "rotated 10 degrees counter-clockwise"),
    "rotated_-10": (lambda g: rotated(g, -10.0), "rotated 10 degrees clockwise"),
    "edges_enhanced": (lambda g: sharpened(g, 0.008), "unsharp mask, sigma 0.8% of the side"),
    "contrast_enhanced": (lambda g: sharpened(g, 0.03), "unsharp mask, sigma 3% of the side"),
    "smoothed_0.4": (lambda g: smoothed(g, 0.004), "gaussian blur, sigma 0.4% of the side"),
    "smoothed_0.8": (lambda g: smoothed(g, 0.008), "gaussian blur, sigma 0.8% of the side"),
}
