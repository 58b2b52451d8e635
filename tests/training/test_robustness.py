from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from training.robustness import (
    SHIFTS,
    burnt_in_text,
    jpeg_compressed,
    landscape_film,
    noisy_frame,
    portrait_film,
    sharpened,
    smoothed,
    tighter_field,
    wider_field,
)


@pytest.fixture()
def gray() -> np.ndarray:
    """A smooth gradient with fine detail (a 2-pixel checker) that lossy copies blur."""
    rows, cols = np.mgrid[0:120, 0:100]
    checker = ((rows // 2 + cols // 2) % 2) * 0.1
    return (0.2 + 0.5 * (rows + cols) / 218 + checker).astype(np.float32)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_changes_the_image_repeatably_and_stays_in_range(
    name: str, gray: np.ndarray
) -> None:
    transform, what = SHIFTS[name]
    out = transform(gray)
    assert what and out.ndim == 2
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, transform(gray))
    assert out.shape != gray.shape or not np.allclose(out, gray, atol=1e-3)


def test_framing_shifts_keep_or_cut_the_expected_part(gray: np.ndarray) -> None:
    wide = wider_field(gray)
    assert wide.shape == gray.shape
    assert np.all(wide[:12] == 0) and np.all(wide[:, :10] == 0)
    assert wide[60, 50] == pytest.approx(gray[60, 50], abs=0.02)
    assert tighter_field(gray).shape == (102, 84)
    np.testing.assert_array_equal(portrait_film(gray), gray[:, 10:90])
    np.testing.assert_array_equal(landscape_film(gray), gray[12:108])
    marked = burnt_in_text(gray)
    changed = np.argwhere(np.abs(marked - gray) > 0.02)
    assert changed.size and changed.min(axis=0).tolist() >= [24, 20], "inside the 20 % band"
    framed = noisy_frame(gray)
    assert framed.shape == (120, 160)
    np.testing.assert_array_equal(framed[:, 30:130], gray)
    assert 0.01 < float(framed[:, :30].std()) < 0.04


def test_jpeg_copy_is_close_but_lossy(gray: np.ndarray) -> None:
    out = jpeg_compressed(gray)
    assert out.shape == gray.shape and out.dtype == np.float32
    lost = np.abs(out - gray).mean()
    assert 0.005 < lost < 0.05  # 0.05 = the whole checker detail gone
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.9


def test_processing_shifts_enhance_or_soften_detail(
    gray: np.ndarray, edge_energy: Callable[[np.ndarray], float]
) -> None:
    assert edge_energy(sharpened(gray, 0.008)) > 1.2 * edge_energy(gray)
    assert edge_energy(smoothed(gray, 0.008)) < 0.5 * edge_energy(gray)
    coarse = sharpened(gray, 0.03)
    assert coarse.shape == gray.shape and coarse.dtype == np.float32
    assert smoothed(gray, 0.004).mean() == pytest.approx(gray.mean(), abs=0.01)
