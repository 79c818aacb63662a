"""The few exception types a vqpipe user sees. Each carries a message that names what was wrong and where."""

from __future__ import annotations


class VqpipeError(Exception):
    """Base class: anything vqpipe raises on purpose."""


class ConfigError(VqpipeError):
    """A setting is unknown, has a bad value, or conflicts with an existing run."""


class CheckpointError(VqpipeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class StorageError(VqpipeError):
    """An input or output location cannot be listed, read or written."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A file or object that is not there: a StorageError (named, redacted) that `except FileNotFoundError`
    also catches, as it catches a missing local file."""


class _ReasonError(VqpipeError):
    """An error with a stable reason code and a human detail; picklable so it crosses Ray process boundaries."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.reason, self.detail)


class ShardError(_ReasonError):
    """A whole shard cannot be processed (not a tar, truncated, unreadable, too many bad samples).

    `reason` is a stable code that ends up in the failure record.
    """


class SampleError(_ReasonError):
    """One sample cannot be turned into pixels; the job records it as an error row and goes on.

    `reason` is a stable code: decode_error, truncated, not_an_image, missing_image, too_large, ...
    """


class IncompleteRunError(VqpipeError):
    """The job ended with shards that are not done."""


class LeaseError(VqpipeError):
    """Another run holds the output (its lease is live), or this run lost its lease to another."""


# The shard failure reason of an attempt that the store failed (a timeout, a dropped connection, throttling, a
# missing or forbidden object: the detail says which). Retried like any reason not listed below.
STORAGE_ERROR = "storage_error"


class CapacityError(VqpipeError):
    """No encoder replica could be placed within run.placement_timeout_s: the cluster lacks the resources one
    needs (for now: an autoscaler may add them). Not the user's mistake, so not exit 2: a scheduler retries."""


# Exit codes of `vqpipe tokenize` (README, "Exit codes"); `job.Summary.exit_code` decides which one a run gets.
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
EXIT_BUSY = 3  # another run holds OUT's lease (or this run lost it): try again later
EXIT_NO_CAPACITY = 75  # sysexits.h's EX_TEMPFAIL ("try again later"): no replica could be placed in time


# Shard failure reasons that no retry can change: the bytes are not a tar, or the tar is malformed. The driver
# fails such a shard at its first attempt (dispatch_policy.DispatchPolicy.failed). `truncated_tar` is left out on purpose: an input still being
# copied, or a read that ended early, can succeed when tried again.
PERMANENT_SHARD_REASONS: frozenset[str] = frozenset({"not_a_tar", "bad_tar"})
# Shard failure reasons that the input's bytes alone decide: the same bytes fail the same way. A shard that failed
# with one of these, and whose input has not changed since (size, mtime or ETag), is not retried by the next run
# (unless --retry-failed). `truncated_tar` is in: a copy still in progress changes size or mtime when it grows.
INPUT_SHARD_REASONS: frozenset[str] = PERMANENT_SHARD_REASONS | {"truncated_tar"}
