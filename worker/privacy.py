"""Patient identifiers never leave the worker in clear unless asked for."""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

PatientIdMode = Literal["hash", "none", "clear"]
DEFAULT_KEY_WARNING = (
    "CXR_HASH_KEY is the published default: anyone with this code can recompute patient "
    "references from patient IDs. Set a secret, and keep it (a new key changes every "
    "patient_ref)."
)


def file_error(exc: OSError) -> str:
    """``FileNotFoundError: No such file or directory``: a file error without the file
    names it carries, since export folders are often named after the patient."""
    return f"{type(exc).__name__}: {exc.strerror or 'cannot be read'}"


def patient_ref(patient_id: str | None, mode: PatientIdMode, key: str) -> str | None:
    """A keyed hash (HMAC-SHA256, 32 hex digits), nothing, or the ID itself."""
    if not patient_id or mode == "none":
        return None
    if mode == "clear":
        return patient_id
    return hmac.new(key.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]
