from __future__ import annotations

import logging
import os
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.data import (
    LABELS,
    Sample,
    StatelessDraws,
    class_weights,
    counts,
    list_split,
    load_input,
    manifest_sha256,
    split_dir,
    try_load,
)
from worker.imaging.pipeline import load_gray, model_input


def test_list_split_reads_label_folders(cxr_dir: Path) -> None:
    train = list_split(cxr_dir, "train")
    c = counts(train)
    assert set(c) == {"normal", "covid"}  # pneumonia left out by default
    assert c["normal"] > c["covid"] > 100
    assert all(s.path.parent.name == s.label for s in train)
    assert train == sorted(train, key=lambda s: (str(s.path), s.label))
    with_pneumonia = list_split(cxr_dir, "train", include=("normal", "covid", "pneumonia"))
    assert counts(with_pneumonia).get("pneumonia", 0) > 0


def test_split_dir_accepts_a_folder_of_label_folders(cxr_dir: Path) -> None:
    assert split_dir(cxr_dir, "test") == cxr_dir / "test"
    assert split_dir(cxr_dir / "test", "test") == cxr_dir / "test"
    with pytest.raises(FileNotFoundError):
        split_dir(cxr_dir / "test" / "covid", "test")


def test_list_split_needs_the_split_folder_itself(cxr_dir: Path) -> None:
    """A folder of label folders is a test split for evaluate, never train and val at once."""
    flat = cxr_dir / "test"
    assert split_dir(flat, "val") == flat
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError, match=f"no {split}/ folder"):
            list_split(flat, split)


def test_a_split_is_found_whatever_the_case_and_other_folders_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--split Val` missed a Val/ folder that `val` found; a class folder under a name
    of its own (covid_confirmed/) went unused and unsaid by train."""
    for folder in ("Val/covid", "Val/NORMAL", "Val/covid_confirmed"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.png").write_bytes(b"x")
    assert split_dir(tmp_path, "Val") == split_dir(tmp_path, "VAL") == tmp_path / "Val"
    with caplog.at_level(logging.WARNING):
        samples = list_split(tmp_path, "Val")
    assert sorted(s.label for s in samples) == ["covid", "normal"]
    assert "left out: covid_confirmed/ under" in caplog.text


def test_linked_sub_folders_are_walked_once_each(tmp_path: Path) -> None:
    """Files in a linked folder are listed; a link loop and a second link to the same
    folder add nothing."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("b.png", "a.png"):
        (store / name).write_bytes(b"x")
    covid = tmp_path / "data" / "train" / "covid"
    covid.mkdir(parents=True)
    (covid / "x.png").write_bytes(b"x")
    (covid / "ward7").symlink_to(store)
    (covid / "ward9").symlink_to(store)
    (covid / "loop").symlink_to(covid)
    samples = list_split(tmp_path / "data", "train")
    assert [s.path.relative_to(covid).as_posix() for s in samples] == [
        "ward7/a.png",
        "ward7/b.png",
        "x.png",
    ]


def test_manifest_hash_is_order_and_location_independent(tmp_path: Path) -> None:
    a = [
        Sample(tmp_path / "covid" / "a.png", "covid"),
        Sample(tmp_path / "normal" / "b.png", "normal"),
    ]
    h = manifest_sha256(a, tmp_path)
    assert h == manifest_sha256(list(reversed(a)), tmp_path)
    moved = [Sample(Path("/elsewhere") / s.path.relative_to(tmp_path), s.label) for s in a]
    assert manifest_sha256(moved, Path("/elsewhere")) == h
    assert manifest_sha256(a[:1], tmp_path) != h


def test_manifest_hash_does_not_follow_links_out_of_the_data_folder(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    hashes = []
    for copy in ("one", "two"):
        (tmp_path / copy / "covid").mkdir(parents=True)
        (store / f"{copy}.png").write_bytes(b"x")
        (tmp_path / copy / "covid" / "a.png").symlink_to(store / f"{copy}.png")
        hashes.append(
            manifest_sha256([Sample(tmp_path / copy / "covid" / "a.png", "covid")], tmp_path / copy)
        )
    assert hashes[0] == hashes[1]


def test_manifest_hash_covers_the_bytes_of_names_that_are_not_utf8(tmp_path: Path) -> None:
    """Such a name hashes as its bytes; UTF-8 names hash as before."""
    odd = Sample(tmp_path / "covid" / os.fsdecode(b"film\xe9.png"), "covid")
    assert manifest_sha256([odd], tmp_path) == sha256(b"covid/film\xe9.png\tcovid\n").hexdigest()
    plain = Sample(tmp_path / "covid" / "film\xe9.png", "covid")
    expected = sha256("covid/film\xe9.png\tcovid\n".encode()).hexdigest()
    assert manifest_sha256([plain], tmp_path) == expected


def test_class_weights_balance_the_classes() -> None:
    samples = [Sample(Path(f"n{i}"), "normal") for i in range(30)] + [
        Sample(Path(f"c{i}"), "covid") for i in range(10)
    ]
    w = class_weights(counts(samples))
    assert w[1] == pytest.approx(2.0) and w[0] == pytest.approx(40 / 60)
    assert 30 * w[0] == pytest.approx(10 * w[1])


def test_load_input_is_the_worker_pipeline(sample_png: Path) -> None:
    x = load_input(sample_png, 64)
    np.testing.assert_array_equal(x, model_input(load_gray(sample_png), 64))
    assert x.shape == (64, 64, 1) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_try_load_flags_bad_files(bad_files: dict[str, Path]) -> None:
    for path in bad_files.values():
        x, ok = try_load(path, 32)
        assert not ok and x.shape == (32, 32, 1)


def test_tf_dataset_streams_and_augments_only_in_training(
    cxr_dir: Path, bad_files: dict[str, Path]
) -> None:
    from training.data import make_dataset

    samples = list_split(cxr_dir, "val")[:6] + list_split(cxr_dir, "val")[-6:]
    samples.append(Sample(bad_files["empty"], "covid"))  # dropped, not a crash
    plain = list(make_dataset(samples, 48, 5, training=False).as_numpy_iterator())
    xs = np.concatenate([x for x, _ in plain])
    ys = np.concatenate([y for _, y in plain]).reshape(-1)
    assert xs.shape == (12, 48, 48, 1)
    np.testing.assert_array_equal(ys, [LABELS[s.label] for s in samples[:12]])
    np.testing.assert_allclose(xs[0], load_input(samples[0].path, 48))  # no augmentation

    train = make_dataset(samples[:12], 48, 4, training=True, seed=1, with_weights={0: 0.5, 1: 2.0})
    x, y, w = next(iter(train.as_numpy_iterator()))
    assert x.shape == (4, 48, 48, 1) and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(w.reshape(-1), np.where(y.reshape(-1) > 0.5, 2.0, 0.5))
    clean = np.stack([load_input(s.path, 48) for s in samples[:12]])
    assert not any(np.allclose(xi, ci, atol=1e-3) for xi in x for ci in clean)


def test_the_input_cache_gives_the_decoded_pixels_and_is_built_once(
    cxr_dir: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    from training.data import InputCache, make_dataset

    samples = list_split(cxr_dir, "val")[:5] + list_split(cxr_dir, "val")[-5:]
    samples.insert(3, Sample(bad_files["truncated_dicom"], "covid"))  # dropped, not a crash
    cache_dir = tmp_path / "cache"
    cached = list(make_dataset(samples, 40, 4, training=False, cache_dir=cache_dir))
    decoded = list(make_dataset(samples, 40, 4, training=False))
    for (xc, yc), (xd, yd) in zip(cached, decoded, strict=True):
        np.testing.assert_array_equal(xc.numpy(), xd.numpy())
        np.testing.assert_array_equal(yc.numpy(), yd.numpy())
    assert sum(len(x) for x, _ in cached) == 10

    files = sorted(cache_dir.iterdir())
    assert len(files) == 2 and files[0].stat().st_size == 10 * 40 * 40 * 4
    stamp = files[0].stat().st_mtime_ns
    again = InputCache.build(samples, 40, cache_dir)
    assert files[0].stat().st_mtime_ns == stamp and again.shape == (40, 40, 1)

    train = make_dataset(samples, 40, 10, training=True, seed=3, cache_dir=cache_dir)
    labels = np.sort(np.concatenate([y.numpy().reshape(-1) for _, y in decoded]))
    for _ in range(2):  # every epoch sees every cached image once
        np.testing.assert_array_equal(np.sort(next(iter(train))[1].numpy().reshape(-1)), labels)


def test_readable_counts_leave_out_files_that_cannot_be_read(
    cxr_dir: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    from training.data import readable_counts

    samples = list_split(cxr_dir, "val")[:3] + list_split(cxr_dir, "val")[-2:]
    samples.append(Sample(bad_files["truncated_dicom"], "covid"))
    samples.append(Sample(bad_files["empty"], "normal"))
    listed = counts(samples)
    found = readable_counts(samples, 32, tmp_path)
    assert sum(listed.values()) == 7 and sum(found.values()) == 5
    assert found == counts(samples[:5])


def test_a_broken_link_in_a_label_folder_is_listed_to_be_counted_unreadable(
    sample_png: Path, tmp_path: Path
) -> None:
    from training.data import readable_counts

    folder = tmp_path / "train" / "covid"
    folder.mkdir(parents=True)
    (folder / "ok.png").symlink_to(sample_png)
    (folder / "moved.png").symlink_to(tmp_path / "gone.png")
    samples = list_split(tmp_path, "train")
    assert [s.path.name for s in samples] == ["moved.png", "ok.png"]
    assert readable_counts(samples, 32, tmp_path / "cache") == {"covid": 1}


def test_dicom_files_named_by_uid_or_vendor_suffix_are_listed(
    sample_png: Path, tmp_path: Path
) -> None:
    from tests.dicom_factory import base_dataset, png_pixels, write

    folder = tmp_path / "train" / "covid"
    names = ["1.2.276.0.7230010.3.1.4.850819", "film.IMA", "plain.dcm", "notes.txt"]
    for name in names[:3]:
        write(base_dataset(png_pixels(sample_png)), folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert sorted(s.path.name for s in list_split(tmp_path, "train")) == sorted(names[:3])


def test_a_dicom_without_preamble_named_by_its_uid_is_listed_and_read(
    sample_png: Path, tmp_path: Path
) -> None:
    """No "DICM" at byte 128 and a UID's last part as suffix: it was never listed, so
    neither trained on nor counted unreadable. A UID-named file that is no DICOM is
    listed and counted unreadable; a text file stays out."""
    from tests.dicom_factory import base_dataset, png_pixels
    from training.data import readable_counts

    folder = tmp_path / "train" / "covid"
    folder.mkdir(parents=True)
    ds = base_dataset(png_pixels(sample_png))
    del ds.file_meta
    film = folder / "CR.1.2.840.1002"
    ds.save_as(film, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert film.read_bytes()[128:132] != b"DICM"
    (folder / "1.2.840.1003").write_bytes(b"cut short by the export")
    (folder / "notes.txt").write_text("not an image")
    samples = list_split(tmp_path, "train")
    assert [s.path.name for s in samples] == ["1.2.840.1003", "CR.1.2.840.1002"]
    assert readable_counts(samples, 32, tmp_path / "cache") == {"covid": 1}


def test_a_missing_file_is_named_as_missing_wherever_it_is_loaded(
    sample_png: Path, tmp_path: Path
) -> None:
    from training.data import load_or_reason

    (tmp_path / "moved.png").symlink_to(tmp_path / "gone.png")
    for path, what in [("moved.png", "broken symbolic link"), ("never.dcm", "no such file")]:
        x, reason = load_or_reason(tmp_path / path, 32)
        assert x is None and reason == f"unreadable: FileNotFoundError: {what}"


def test_a_file_name_that_is_not_utf8_is_read_with_and_without_the_input_cache(
    sample_png: Path, tmp_path: Path
) -> None:
    from training.data import make_dataset, readable_counts

    folder = tmp_path / "train" / "covid"
    folder.mkdir(parents=True)
    (folder / os.fsdecode(b"film\xe9.png")).symlink_to(sample_png)
    samples = list_split(tmp_path, "train")
    assert readable_counts(samples, 32, tmp_path / "cache") == {"covid": 1}
    for cache_dir in (tmp_path / "cache", None):
        ((x, y),) = make_dataset(samples, 32, 4, training=False, cache_dir=cache_dir)
        np.testing.assert_array_equal(x.numpy()[0], load_input(sample_png, 32))
        assert y.numpy().reshape(-1).tolist() == [1.0]


def test_the_input_cache_is_keyed_on_the_preprocessing_version(
    cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data
    from training.data import InputCache

    samples = list_split(cxr_dir, "val")[:2]
    InputCache.build(samples, 32, tmp_path)
    monkeypatch.setattr(training.data, "PREPROCESSING_VERSION", "next")
    InputCache.build(samples, 32, tmp_path)
    assert len(list(tmp_path.glob("inputs-*"))) == 2  # old pixels are not reused


def test_augmentation_depends_only_on_the_batch_seed() -> None:
    import tensorflow as tf

    from training.data import Augmentation, build_augmenter

    augment = build_augmenter(32, Augmentation(unsharp_prob=0.5))
    x = tf.constant(np.random.default_rng(0).random((4, 32, 32, 1)), tf.float32)
    first, again = (augment(x, tf.constant(7, tf.int64)).numpy() for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = augment(x, tf.constant(8, tf.int64)).numpy()
    assert not np.allclose(first, other, atol=1e-3)
    assert not np.allclose(first[0], first[1], atol=1e-3)  # one draw per image


def test_text_augmentation_burns_white_marker_text_into_the_chosen_images() -> None:
    import tensorflow as tf

    from training.data import TEXT_MASKS, Augmentation, burn_in_text, render_text_masks

    masks = render_text_masks(64)
    assert masks.shape == (TEXT_MASKS, 64, 64, 1)
    np.testing.assert_array_equal(masks, render_text_masks(64))
    inked = (masks > 0.5).mean(axis=(1, 2, 3))
    assert inked.min() > 0 and inked.max() < 0.2, "one word each, never the whole input"
    x = tf.fill((8, 64, 64, 1), 0.3)
    marked = burn_in_text(x, StatelessDraws(tf.constant(3, tf.int64)), 1.0, masks).numpy()
    assert all(0.6 < image.max() <= 1.0 for image in marked), "anti-aliased text, near white"
    assert np.all(marked >= 0.3 - 1e-6)
    kept = burn_in_text(x, StatelessDraws(tf.constant(3, tf.int64)), 0.0, masks).numpy()
    np.testing.assert_array_equal(kept, x.numpy())
    assert Augmentation().text_prob == 0.0, "opt-in, as the shipped model was trained"


def test_an_epochs_augmentation_depends_only_on_the_seed_and_the_epoch(cxr_dir: Path) -> None:
    """Not on thread order in the parallel map, nor on how much of the last epoch was read."""
    from training.data import make_dataset

    samples = list_split(cxr_dir, "val")[:12] + list_split(cxr_dir, "val")[-12:]

    def read(stream: Any) -> np.ndarray:
        return np.concatenate([x.numpy() for x, _ in stream])

    stream = make_dataset(samples, 48, 2, training=True, seed=5)
    first, second = read(stream), read(stream)
    assert not np.allclose(first, second, atol=1e-3)
    rerun = make_dataset(samples, 48, 2, training=True, seed=5)
    next(iter(rerun))  # one batch of the first epoch
    np.testing.assert_array_equal(read(rerun), second)
    assert not np.allclose(read(make_dataset(samples, 48, 2, training=True, seed=6)), first)


def test_gaussian_blur_keeps_flat_images_and_softens_detail(
    edge_energy: Callable[[np.ndarray], float],
) -> None:
    import tensorflow as tf

    from training.data import gaussian_blur

    flat = tf.fill((2, 24, 24, 1), 0.4)
    np.testing.assert_allclose(gaussian_blur(flat, tf.constant(2.0), 5).numpy(), 0.4, atol=1e-6)
    rows, cols = np.mgrid[0:24, 0:24]
    checker = (((rows + cols) % 2) * 1.0).astype(np.float32)[None, ..., None]
    blurred = gaussian_blur(tf.constant(checker), tf.constant(1.5), 4).numpy()
    assert blurred.shape == checker.shape
    assert edge_energy(blurred) < 0.1 * edge_energy(checker)
    assert blurred.mean() == pytest.approx(checker.mean(), abs=0.02)


@pytest.mark.parametrize(("amount", "sharper"), [((1.0, 1.0), True), ((-0.6, -0.6), False)])
def test_unsharp_augmentation_sharpens_or_smooths_as_drawn(
    cxr_dir: Path,
    amount: tuple[float, float],
    sharper: bool,
    edge_energy: Callable[[np.ndarray], float],
) -> None:
    import tensorflow as tf

    from training.data import Augmentation, unsharp

    x = tf.constant(np.stack([load_input(s.path, 64) for s in list_split(cxr_dir, "val")[:4]]))
    aug = Augmentation(unsharp_prob=1.0, unsharp_amount=amount)
    out = unsharp(x, tf.random.Generator.from_seed(0), aug, 64).numpy()
    assert out.shape == x.shape
    before, after = edge_energy(x.numpy()), edge_energy(out)
    assert (after > 1.2 * before) if sharper else (after < before)
    off = unsharp(x, tf.random.Generator.from_seed(0), Augmentation(unsharp_prob=1e-9), 64)
    np.testing.assert_allclose(off.numpy(), x.numpy(), atol=1e-6)
