"""CSV rows ending in "\n" that survive any file name."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TextIO


def write_csv_row(stream: TextIO, fields: Sequence[object]) -> None:
    """One CSV row ending in "\\n", with any field holding "\\r" or "\\n" quoted.

    Python 3.11's csv writer quotes only the characters of its line terminator, so with
    "\\n" a file name holding a carriage return would split its row: the row is written
    with "\\r\\n" and the terminator shortened afterwards."""
    line = io.StringIO()
    csv.writer(line, lineterminator="\r\n").writerow(fields)
    stream.write(line.getvalue().removesuffix("\r\n") + "\n")
