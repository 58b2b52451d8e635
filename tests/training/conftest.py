"""Fixtures of the training tests: the shared data set and the shipped model.

The shared data lives next to the repository (``<repo>/../shared/data``) or where
``CXR_SHARED_DATA`` points; tests that need it skip with a clear message when absent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_root() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set CXR_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def cxr_dir(shared_data: Path) -> Path:
    path = shared_data / "cxr"
    if not (path / "train").is_dir():
        pytest.skip(f"no chest X-ray set at {path}")
    return path


@pytest.fixture(scope="session")
def dicom_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM samples under {shared_data / 'dicom' / 'cxr'}")
    return files


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    path = REPO_ROOT / "models" / "cxr-compact"
    assert (path / "model_card.json").is_file(), f"the shipped model is missing at {path}"
    return path


@pytest.fixture()
def model_copy(shipped_model: Path, tmp_path: Path) -> Path:
    """A copy of the shipped model folder (without its evaluation) a test may change."""
    folder = tmp_path / "model"
    shutil.copytree(shipped_model, folder, ignore=shutil.ignore_patterns("evaluation"))
    return folder


@pytest.fixture(scope="session")
def sample_png(cxr_dir: Path) -> Path:
    return sorted((cxr_dir / "test" / "covid").glob("*.png"))[0]


@pytest.fixture(scope="session")
def csv_awkward_names() -> tuple[str, ...]:
    """File names a CSV row must quote to survive being read back."""
    return (
        "carriage\rreturn.png",
        "new\nline.png",
        "both\r\nends.png",
        "comma,name.png",
        'quote"name.png',
        "tab\tname.png",
    )


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    fake_dcm = tmp_path / "truncated.dcm"
    fake_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return {"empty": empty, "text": text, "truncated_dicom": fake_dcm}


@pytest.fixture()
def test_sample(cxr_dir: Path, tmp_path: Path) -> Callable[[int], Path]:
    """A folder of symlinks to a seeded sample of the shared test split: n per label."""

    def make(per_label: int) -> Path:
        folder = tmp_path / "test-sample"
        rng = np.random.default_rng(0)
        for label in ("normal", "covid"):
            files = sorted((cxr_dir / "test" / label).glob("*.png"))
            (folder / label).mkdir(parents=True)
            for i in rng.choice(len(files), per_label, replace=False):
                (folder / label / files[i].name).symlink_to(files[i])
        return folder

    return make


@pytest.fixture(scope="session")
def edge_energy() -> Callable[[np.ndarray], float]:
    """Mean absolute difference between neighbouring pixels of a (..., H, W[, 1]) array."""

    def measure(x: np.ndarray) -> float:
        x = np.asarray(x)
        if x.ndim > 2 and x.shape[-1] == 1:
            x = x[..., 0]
        return float(np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean())

    return measure
