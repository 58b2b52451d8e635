"""The picture polarity check: its committed weights are what the fitting code gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.polarity import fit
from worker.imaging.polarity import WEIGHTS


def test_the_committed_polarity_weights_are_refitted_from_the_training_split(
    cxr_dir: Path,
) -> None:
    committed = json.loads(WEIGHTS.read_text())
    fitted = fit(cxr_dir)
    np.testing.assert_allclose(fitted["coefficients"], committed["coefficients"], atol=1e-6)
    assert fitted["measured"] == committed["measured"]
    for split in ("val", "test"):
        measured = committed["measured"][split]
        assert measured["upright_flagged"] <= 1 and measured["inverted_caught"] >= 0.99
