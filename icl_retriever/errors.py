"""Exception types: every failure we detect is raised as an ICLRetrieverError subclass."""

from __future__ import annotations

from typing import Any


class ICLRetrieverError(Exception):
    """Base class of every error this library raises on purpose."""


class PoolError(ICLRetrieverError, ValueError):
    """A pool file or record is malformed. The message names the file and line when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        elif line is not None:
            where = f"record {line}: "
        super().__init__(f"{where}{message}")


class IndexFormatError(ICLRetrieverError):
    """An index directory is missing, incomplete, corrupted or incompatible."""


class IndexExistsError(IndexFormatError, FileExistsError):
    """The target index directory exists and overwriting was not requested."""


class IndexWriteError(ICLRetrieverError, OSError):
    """Writing a new version of an index failed (full disk, permissions, ...); the index is unchanged."""


class IndexBusyError(ICLRetrieverError, TimeoutError):
    """Another process holds the index's lock (it is building or writing that directory); nothing was changed."""


class EncoderMismatchError(IndexFormatError):
    """The encoder that would embed queries is not the one the index was built with."""


class ModelLoadError(ICLRetrieverError):
    """A model could not be located, verified or loaded (or is not trusted without being named)."""


def first_validation_error(exc: Any, fallback: str) -> tuple[str, Any, str]:
    """``(field, cause, message)`` of a pydantic ``ValidationError``'s first error, for one-line messages.

    ``cause`` is the exception a validator raised (``None`` for pydantic's own checks); ``field`` is the
    dotted location, or ``fallback`` for a model-level error.
    """
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or fallback
    return field, (err.get("ctx") or {}).get("error"), err["msg"]
