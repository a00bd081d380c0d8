"""Exit codes of `slmfleet load` and `slmfleet pin`, and the errors that carry them.

Every failure of the loader is one of these exceptions; the command line turns `exit_code` into
the process status and `message` into stderr and the container's termination message, so a
Degraded status can say precisely what went wrong.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # anything else: the destination is not writable, the disk is full, a bug
EXIT_USAGE = 2  # bad arguments: a malformed digest or URI, an unusable --dest
EXIT_DIGEST_MISMATCH = 10  # the manifest's digest is not the pin (nothing was downloaded)
EXIT_FILE_MISMATCH = 11  # a file's bytes do not match the manifest (or the file is missing from the source)
EXIT_REFUSED_FORMAT = 12  # the manifest lists a pickle file and --allow-pickle was not given
EXIT_UNREACHABLE = 13  # the storage did not answer (connection, timeouts, 5xx, throttling) after the retries
EXIT_SOURCE_ERROR = 14  # the storage answered and refused: credentials, permissions, no such bucket or directory

EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK:>2}  verified: every file in place matches the pinned manifest
  {EXIT_ERROR:>2}  other error (destination not writable, disk full, ...)
  {EXIT_USAGE:>2}  bad arguments (digest, URI, destination)
  {EXIT_DIGEST_MISMATCH:>2}  the source's manifest does not have the pinned digest (nothing downloaded)
  {EXIT_FILE_MISMATCH:>2}  a file does not match the manifest (name, expected and actual hash are reported)
  {EXIT_REFUSED_FORMAT:>2}  the manifest lists a pickle file (.bin .pt .pth .pkl .pickle .ckpt); see --allow-pickle
  {EXIT_UNREACHABLE:>2}  the storage did not answer after the retries (connection refused, timeouts, 5xx, throttling)
  {EXIT_SOURCE_ERROR:>2}  the storage refused (credentials, permissions, no such bucket or directory)"""


class WeightsError(Exception):
    """A failure with the exit code that reports it."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(WeightsError):
    exit_code = EXIT_USAGE


class DigestMismatch(WeightsError):
    exit_code = EXIT_DIGEST_MISMATCH


class FileMismatch(WeightsError):
    exit_code = EXIT_FILE_MISMATCH

    def __init__(self, path: str, expected: str, actual: str, where: str = "") -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"file mismatch: {path}{f' ({where})' if where else ''}: expected {expected}, got {actual}"
        )


class RefusedFormat(WeightsError):
    exit_code = EXIT_REFUSED_FORMAT


class Unreachable(WeightsError):
    exit_code = EXIT_UNREACHABLE


class SourceError(WeightsError):
    exit_code = EXIT_SOURCE_ERROR
