"""``parquet``: one document per row, the text in column ``field`` (default ``text``):
``{"kind": "parquet", "pattern": "/data/fineweb/*.parquet"}`` (FineWeb, CulturaX and
most Hugging Face hub datasets ship so).

Files are read with pyarrow one row group at a time and only the ``field`` column, so a
multi-GB shard never sits in memory whole; files in sorted path order, rows in file order.
A null cell is an empty document (dropped by preparation).
"""

from __future__ import annotations

from collections.abc import Iterator

from cpt_jax.data.sources.base import (DomainError, SourceKind, as_patterns, glob_files,
                                       is_text_type)


class Parquet(SourceKind):
    name = "parquet"
    required = ("pattern",)
    optional = ("field",)

    def normalize(self, d):
        as_patterns(d)
        d.setdefault("field", "text")

    def files(self, d):
        return glob_files(d)

    def documents(self, d) -> Iterator[str]:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        for path in self.files(d):
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise DomainError(f"Domain {d['name']!r}: {path} is not a readable Parquet "
                                  f"file ({e}); point the pattern at .parquet files or use "
                                  f"the kind of its format.") from None
            names = pf.schema_arrow.names
            if d["field"] not in names:
                raise DomainError(f"Domain {d['name']!r}: {path} has no column "
                                  f"{d['field']!r} (columns: {names}); set the domain's "
                                  f"\"field\" to the column holding the text.")
            column_type = pf.schema_arrow.field(d["field"]).type
            if not is_text_type(column_type):
                raise DomainError(f"Domain {d['name']!r}: column {d['field']!r} of {path} is "
                                  f"{column_type}, not text; set \"field\" to a string column.")
            for group in range(pf.num_row_groups):
                column = pf.read_row_group(group, columns=[d["field"]]).column(0)
                for value in column.to_pylist():
                    yield "" if value is None else value
