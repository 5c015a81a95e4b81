"""The project's exceptions: one base class, raised by the library, shown by the shells.

The CLI turns a `FlexolmoError` into a one-line message and exit code 1; the API turns it
into an HTTP error. Every message says what was wrong and what to do about it.
"""


class FlexolmoError(Exception):
    """Base for every error a user can act on."""

    http_status = 400


class InputError(FlexolmoError):
    """The user's input (a file, an option, a name) is not acceptable."""


class NotFoundError(FlexolmoError):
    """A named thing (source, document, model, index) does not exist."""

    http_status = 404


class ConflictError(FlexolmoError):
    """The request clashes with the workspace's state (a duplicate name, a stale index)."""

    http_status = 409


class IntegrityError(FlexolmoError):
    """Stored data failed a check (a checksum, a hash of shared weights, a truncated file)."""

    http_status = 500


class OutdatedError(ConflictError):
    """An artifact was written by another version of flexolmo and cannot be read; rebuild it."""
