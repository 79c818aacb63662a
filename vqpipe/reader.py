"""One shard stream -> samples, with webdataset's tar iterators.

Only raw bytes come out: members are never unpickled or decoded here. A sample without an image member, with a
bad label or with a key seen before in the shard comes out with an `error` instead of image bytes, so the
caller can record it. Damage to the tar itself raises `ShardError` (the whole shard fails).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from webdataset.tariterators import group_by_keys, tar_file_iterator

from .errors import SampleError, ShardError
from .preprocess import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

META_EXTENSIONS = ("json", "txt")


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    image_ext: str | None = None
    label: int | None = None
    meta: str | None = None
    error: SampleError | None = None


def iter_samples(stream: IO[bytes], shard_name: str) -> Iterator[RawSample]:
    """Yield every sample of a WebDataset tar stream in order, as RawSample."""
    seen: set[str] = set()
    try:
        members = tar_file_iterator(stream)
        files = ({**m, "__url__": shard_name} for m in members)
        for group in group_by_keys(files):
            key = group["__key__"]
            sample = _to_sample(key, group)
            if key in seen:
                sample = RawSample(
                    key, error=SampleError("duplicate_key", f"key {key!r} appears again in the shard")
                )
            seen.add(key)
            yield sample
    except tarfile.ReadError as e:
        reason = "not_a_tar" if not seen else "truncated_tar"
        raise ShardError(reason, f"{shard_name}: {_clean(e)}") from None
    except (EOFError, tarfile.TarError) as e:
        raise ShardError("truncated_tar", f"{shard_name}: {_clean(e)}") from None
    except ValueError as e:  # webdataset: the same member name twice within one sample
        raise ShardError("bad_tar", f"{shard_name}: {_clean(e)}") from None


def _to_sample(key: str, group: dict) -> RawSample:
    sample = RawSample(key)
    for ext in IMAGE_EXTENSIONS:
        if ext in group:
            sample.image, sample.image_ext = group[ext], ext
            break
    else:
        present = sorted(k for k in group if not k.startswith("__"))
        sample.error = SampleError(
            "missing_image", f"no image member (has: {', '.join(present) or 'nothing'})"
        )
        return sample
    try:
        if "cls" in group:
            sample.label = int(group["cls"].decode("ascii").strip())
        for ext in META_EXTENSIONS:
            if ext in group:
                sample.meta = group[ext].decode("utf-8")
                break
    except (UnicodeDecodeError, ValueError) as e:
        sample.error = SampleError("bad_metadata", f"unreadable .cls/.json/.txt member: {_clean(e)}")
    return sample


def _clean(e: BaseException) -> str:
    """The exception's message without webdataset's ' @ <stream repr>' suffix."""
    return str(e.args[0] if e.args else e).split(" @ ")[0]
