"""Screening one study: a soft time limit reaches the caller instead of becoming a row."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from config.settings import Settings
from worker.imaging.dicom import instance_header, read_dataset
from worker.imaging.enum import RejectCode, Status
from worker.imaging.errors import RejectedInput
from worker.model import Classifier
from worker.screening import reraise_time_limit, screen_study

MAX_PIXELS = Settings().max_pixels


@pytest.mark.parametrize("link", ["__cause__", "__context__"])
def test_a_soft_time_limit_inside_a_rejection_is_raised_again(link: str) -> None:
    decoder_error = RuntimeError("decoder")  # raised from, or while handling, the limit
    setattr(decoder_error, link, SoftTimeLimitExceeded())
    rejection = RejectedInput(RejectCode.UNREADABLE, "pixel data cannot be decoded")
    rejection.__cause__ = decoder_error
    with pytest.raises(SoftTimeLimitExceeded):
        reraise_time_limit(rejection)


def test_other_errors_are_left_to_the_caller_even_in_a_cycle() -> None:
    error, other = ValueError("corrupt"), KeyError("x")
    error.__context__, other.__context__ = other, error
    reraise_time_limit(error)


@pytest.mark.parametrize(
    "name", ["derived_cxr_siim_truncated_jpeg.dcm", "derived_cxr_nih_truncated_native.dcm"]
)
def test_a_file_cut_short_is_rejected_as_an_instance_of_its_study(
    name: str, zoo_dir: Path, model_dir: Path
) -> None:
    """The full read fails, the header alone does not (discovery grouped the file by
    it): the row must join its study, not stand with a null study and instance."""
    path = str(zoo_dir / name)
    header = instance_header(read_dataset(path, pixels=False))
    outcome = screen_study(
        header.study_instance_uid, [path], Classifier(model_dir), max_pixels=MAX_PIXELS
    )
    (result,) = outcome.instances
    assert result.status is Status.REJECTED and result.header == header
