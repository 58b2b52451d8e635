from __future__ import annotations

import numpy as np
import pytest

from training.audit import border_only, centre_only, grad_cam, lungs_hidden


def test_audit_masks_fill_parts_of_the_network_input_with_its_mean() -> None:
    x = np.random.default_rng(0).random((160, 160, 1)).astype(np.float32)
    mean = pytest.approx(x.mean())
    b = border_only(x)
    assert np.all(b[20:140, 20:140] == mean)
    np.testing.assert_array_equal(b[:20], x[:20])
    c = centre_only(x)
    np.testing.assert_array_equal(c[20:140, 20:140], x[20:140, 20:140])
    assert np.all(c[:20] == mean) and np.all(c[:, 140:] == mean)
    h = lungs_hidden(x)
    assert np.all(h[80, 5:64] == mean) and np.all(h[80, 96:155] == mean)
    np.testing.assert_array_equal(h[:, 64:96], x[:, 64:96])  # mediastinum visible
    np.testing.assert_array_equal(h[:9], x[:9])


@pytest.mark.parametrize(("arch", "size"), [("vgg16", 64), ("inceptionv3", 75)])
def test_grad_cam_explains_a_model_built_on_a_nested_application(arch: str, size: int) -> None:
    """The application base nested in vgg16 / inceptionv3 is not an ensemble member; an
    ensemble of such models is still explained member by member."""
    from training.ensemble import combine
    from training.models import build_model

    inputs = np.random.default_rng(0).random((2, size, size, 1)).astype(np.float32)
    signs = np.array([1.0, -1.0])
    ensemble = combine([build_model(arch, size) for _ in range(2)], size)
    for model in (build_model(arch, size), ensemble):
        cams = grad_cam(model, inputs, signs)
        assert cams.shape == (2, size, size)
        assert np.all(np.isfinite(cams)) and cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6


def test_grad_cam_points_at_the_evidence_for_the_class_asked() -> None:
    """A network whose covid logit is the mean brightness: the covid map is the bright
    patch, normalised to a peak of 1, and the normal map is empty (nothing in the image
    argues for normal)."""
    import keras

    from training.models import HEAD

    size = 32
    inputs = keras.Input((size, size, 1))
    conv = keras.layers.Conv2D(1, 1, activation="relu", kernel_initializer="ones")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(conv)
    logit = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones", name=HEAD)
    model = keras.Model(inputs, logit(pooled))
    image = np.zeros((1, size, size, 1), np.float32)
    image[0, 4:12, 20:28] = 1.0

    covid, normal = grad_cam(model, np.concatenate([image, image]), np.array([1.0, -1.0]))

    assert covid.max() == pytest.approx(1.0)
    assert np.all(covid[4:12, 20:28] == pytest.approx(1.0))
    assert covid.sum() == pytest.approx(64.0, rel=0.05)  # the patch, not beyond it
    assert not normal.any()
