"""One error type for the whole platform.

Every API answers failures with the same body, ``{"error": {"code", "message", "details"}}``
(see ``docs/errors.md``). Codes are stable, dotted and lower-case (``kms.key_revoked``); clients
branch on the code, never on the message. The HTTP status travels with the error so that the
server maps it without a lookup table and the client can rebuild the error from a response.
"""

from __future__ import annotations

from typing import Any


class QaiError(Exception):
    """A failure with a stable code, a human message, structured details and an HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 400,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details: dict[str, Any] = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (a process pool, a Dask worker): keep the code, the
        # status and a subclass's own attributes rather than pickle's default (the args only).
        return (_restore, (type(self), self.code, self.message, self.status, self.details), self.__dict__)

    def to_body(self) -> dict[str, Any]:
        """The JSON error body shared by every API."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    @classmethod
    def from_body(cls, body: Any, status: int) -> QaiError:
        """Rebuild an error from a response body; a body of another shape becomes ``http.error``."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            details = err.get("details")
            return cls(
                err["code"],
                str(err.get("message", "")),
                status=status,
                details=details if isinstance(details, dict) else {},
            )
        return cls("http.error", f"HTTP {status}", status=status, details={"body": str(body)[:500]})


class VerificationError(QaiError):
    """A signature, proof or checkpoint failed to verify. ``code`` names the exact reason."""

    def __init__(self, code: str, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(code, message, status=422, details=details)


def _restore(cls: type[QaiError], code: str, message: str, status: int, details: dict[str, Any]) -> QaiError:
    err = cls.__new__(cls)
    QaiError.__init__(err, code, message, status=status, details=details)
    return err
