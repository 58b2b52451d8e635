"""Screening one study: a soft time limit reaches the caller instead of becoming a row."""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput
from worker.screening import reraise_time_limit


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
