from __future__ import annotations

import numpy as np
import pytest

from training.models import ARCHITECTURES, build_model, feature_map


@pytest.mark.parametrize(
    ("arch", "size"),
    [("compact", 64), ("residual", 64), ("alexnet", 96), ("vgg16", 32), ("inceptionv3", 75)],
)
def test_architectures_map_grey_batches_to_probabilities(arch: str, size: int) -> None:
    model = build_model(arch, size)
    out = np.asarray(model(np.random.default_rng(0).random((2, size, size, 1), np.float32)))
    assert out.shape == (2, 1)
    assert np.all((out >= 0) & (out <= 1))
    features = feature_map(model)  # what Grad-CAM explains: a learned map, not the image
    assert len(features.shape) == 4 and features.shape[1] < size and features.shape[-1] > 3


def test_compact_is_small() -> None:
    assert build_model("compact", 192).count_params() < 1_000_000


def test_residual_blocks_add_a_shortcut_and_halve_resolution_per_stage() -> None:
    model = build_model("residual", 160)
    adds = [layer for layer in model.layers if layer.name.endswith("_add")]
    assert len(adds) == 6  # blocks (1, 2, 2, 1)
    assert model.get_layer("s1b1_out").output.shape[1:] == (40, 40, 32)
    assert model.get_layer("s4b1_out").output.shape[1:] == (5, 5, 192)


def test_unknown_architecture_and_missing_weights_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet", 64)
    with pytest.raises(FileNotFoundError):
        build_model("compact", 64, weights=tmp_path / "none.weights.h5")
    assert set(ARCHITECTURES) == {"compact", "residual", "alexnet", "vgg16", "inceptionv3"}


def test_whole_model_weights_file_round_trip(tmp_path) -> None:
    a = build_model("compact", 32)
    path = tmp_path / "w.weights.h5"
    a.save_weights(path)
    b = build_model("compact", 32, weights=path)
    x = np.random.default_rng(1).random((1, 32, 32, 1), np.float32)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=1e-6)


def test_weights_of_another_architecture_are_one_clear_error(tmp_path) -> None:
    """A traceback (ValueError) after the whole data set had been decoded."""
    from worker.errors import UserError

    path = tmp_path / "compact.weights.h5"
    build_model("compact", 32).save_weights(path)
    with pytest.raises(UserError, match="does not match cxr_residual"):
        build_model("residual", 32, weights=path)
