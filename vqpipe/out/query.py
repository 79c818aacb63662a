"""SQL engines and pyarrow over exactly the committed rows of a Snapshot's sources, also while a compaction is
unfinished (then `data/` itself fails every reader on purpose): `vqpipe compact --sql` prints `duckdb_sql`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..manifest import Source


def duckdb_sql(srcs: list[Source]) -> str:
    """A DuckDB query over `srcs` (Snapshot.sources): the whole files at once, plus the counted row ranges of any
    compacted file that also holds rows that no longer count (filtered on file_row_number)."""
    whole = [s.url for s in srcs if s.ranges is None and s.rows]
    parts = []
    if whole:
        parts.append(f"SELECT * FROM read_parquet([{', '.join(_sql_str(u) for u in whole)}])")
    for s in srcs:
        if s.ranges:
            where = " OR ".join(f"(file_row_number >= {a} AND file_row_number < {b})" for a, b in s.ranges)
            parts.append(
                f"SELECT * EXCLUDE (file_row_number) FROM read_parquet({_sql_str(s.url)}, file_row_number = true) "
                f"WHERE {where}"
            )
    if not parts:
        raise ValueError("no committed rows to query")
    return "\nUNION ALL BY NAME\n".join(parts)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def arrow_dataset(srcs: list[Source]) -> Any:
    """A pyarrow dataset over `srcs` (Snapshot.sources): the whole files as files; the counted ranges of a compacted
    file that also holds rows that no longer count are read into memory (rare: until the next compaction)."""
    import pyarrow.dataset as pads

    files = [s.url for s in srcs if s.ranges is None and s.rows]
    if not any(s.ranges for s in srcs):
        return pads.dataset(files, format="parquet")
    tables: list[pa.Table] = []
    for s in srcs:
        if s.ranges:
            t = pq.read_table(s.url)
            tables.extend(t.slice(a, b - a) for a, b in s.ranges)
    children = [pads.dataset(tables)]
    if files:
        children.insert(0, pads.dataset(files, format="parquet"))
    return pads.dataset(children)
