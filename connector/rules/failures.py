"""Why a record could not be processed, in words an operator can act on."""

from __future__ import annotations

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    StatementError,
)

from connector.rules.safe_json import clean_text

MAX_REASON_LENGTH = 500


def failure_reason(exc: BaseException) -> str:
    """The reason recorded on a quarantined record.

    For a database error, the database's own message: SQLAlchemy's text would add the statement
    and its parameters, which hold the record's data (personal data among it).
    """
    if isinstance(exc, DBAPIError | StatementError) and exc.orig is not None:
        text = f"the database refused it: {exc.orig}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return clean_text(text)[:MAX_REASON_LENGTH]


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unavailable for now (locked, restarting,
    unreachable) rather than that it refused this record: a reason to try the batch again
    later, never to quarantine its records."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | OSError)
