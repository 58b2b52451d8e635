"""Patient identifiers never leave the worker in clear unless asked for."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from config.settings import Settings

PatientIdMode = Literal["hash", "none", "clear"]
DEFAULT_KEY_WARNING = (
    "CXR_HASH_KEY is the published default: anyone with this code can recompute patient "
    "references from patient IDs. Set a secret, and keep it (a new key changes the "
    "patient_ref of studies screened from then on; earlier rows keep theirs)."
)
EMPTY_KEY_WARNING = (
    "CXR_HASH_KEY is empty (an unset variable?): anyone with this code can recompute "
    "patient references from patient IDs. Set a secret, and keep it."
)
MIN_KEY_LENGTH = 16
SHORT_KEY_WARNING = (
    "CXR_HASH_KEY has {n} characters: a short key can be guessed, and with it every "
    f"patient_ref recomputed; use {MIN_KEY_LENGTH} or more random characters "
    "(python -c 'import secrets; print(secrets.token_hex(32))')."
)
CLEAR_WARNING = "CXR_PATIENT_ID_MODE=clear: patient IDs are stored in clear in studies.patient_ref."


def privacy_warning(settings: Settings) -> str | None:
    """What the operator must hear, at start, about how patient IDs will be stored."""
    if settings.patient_id_mode == "clear":
        return CLEAR_WARNING
    if settings.hash_key_is_default:
        return EMPTY_KEY_WARNING if settings.hash_key == "" else DEFAULT_KEY_WARNING
    if settings.patient_id_mode == "hash" and len(settings.hash_key) < MIN_KEY_LENGTH:
        return SHORT_KEY_WARNING.format(n=len(settings.hash_key))
    return None


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
