"""Every byte vqpipe reads or writes goes through here (fsspec): local paths and any fsspec URL.

Three promises the rest of the job relies on:
- Listing is paginated: expanding `part-{000000..099999}.tar` lists each parent directory once, never one
  request per shard, and the listing's metadata doubles as each shard's version (size, mtime or ETag).
- Reads stream (block read-ahead, nothing downloaded whole) and survive a dropped connection mid-shard.
- Writes commit atomically: a name appears only when its `atomic_write` block exits normally.
- Every call ends by a deadline (`vqpipe_deadline_s` in storage_options, default DEFAULT_DEADLINE_S), client
  retries included, and its error says what happened in a line (timed out, connection lost, throttled, ...).

No message built here carries a credential: every StorageError and log line goes through `redact`.
This package is the only part of vqpipe that imports fsspec (`redaction` does not: it is pure text).

One module per concern: `redaction`, `failures` (what went wrong, in a word), `deadlines`, `s3session` (the
deadline on each S3 request), `urls`, `retries`, `listing`, `reads`, `writes`, `conditional`.
Everything public is re-exported here, so callers write `from vqpipe import storage; storage.open_input(...)`.
Tunables live in their module: patch `storage.retries.RETRY_BACKOFF_S`, `storage.reads.READ_BLOCK_SIZE`,
`storage.writes.WRITE_BLOCK_SIZE` (the names re-exported here are copies of the values).
"""

from ..errors import StorageError
from .conditional import WriteConflict, _warned_unconditional, read_versioned, remove_if, write_if
from .deadlines import DEFAULT_DEADLINE_S
from .deadlines import OPTION as DEADLINE_OPTION
from .failures import Failure, classify
from .listing import (
    TAR_SUFFIXES,
    exists,
    expand_inputs,
    expand_inputs_with_info,
    file_exists,
    input_version,
    iter_files_info,
    list_files,
    list_files_info,
    remove,
)
from .reads import (
    READ_BLOCK_SIZE,
    RetryingReader,
    open_input,
    open_input_with_version,
    read_bytes,
    read_json,
    sha256_of,
)
from .redaction import public_storage_options, redact
from .retries import RETRY_ATTEMPTS, RETRY_BACKOFF_S
from .urls import is_local, join, protocol
from .writes import (
    TMP_PREFIX,
    WRITE_BLOCK_SIZE,
    atomic_write,
    cleanup_temporaries,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "DEADLINE_OPTION",
    "DEFAULT_DEADLINE_S",
    "Failure",
    "classify",
    "READ_BLOCK_SIZE",
    "RETRY_ATTEMPTS",
    "RETRY_BACKOFF_S",
    "TAR_SUFFIXES",
    "TMP_PREFIX",
    "WRITE_BLOCK_SIZE",
    "RetryingReader",
    "StorageError",
    "WriteConflict",
    "_warned_unconditional",
    "atomic_write",
    "cleanup_temporaries",
    "exists",
    "file_exists",
    "expand_inputs",
    "expand_inputs_with_info",
    "input_version",
    "is_local",
    "join",
    "list_files",
    "iter_files_info",
    "list_files_info",
    "open_input",
    "open_input_with_version",
    "protocol",
    "public_storage_options",
    "read_bytes",
    "read_json",
    "sha256_of",
    "read_versioned",
    "redact",
    "remove",
    "remove_if",
    "write_bytes_atomic",
    "write_if",
    "write_json_atomic",
]
