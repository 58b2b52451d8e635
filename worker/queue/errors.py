"""What the queue raises: a malformed message, an ingest a person must correct, an
ingest root not mounted (yet)."""

from __future__ import annotations

from worker.errors import UserError


class MalformedTask(ValueError):
    """A task message that cannot be a study: logged, acknowledged, never retried."""


class IngestError(UserError, ValueError):
    """A problem with ingest's input a person can act on."""


class IngestRootUnavailable(OSError):
    """The configured ingest root is not mounted here (yet): a transient failure."""
