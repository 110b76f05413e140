"""Result files that survive interruption: JSONL or CSV, one record per pair, flushed as written.

A run killed at any moment leaves complete records plus at most one partial last line; opening the
file again drops that partial line, reports which keys are done, and appends. So a run can be
repeated with the same output until everything is done, and no key is ever written twice.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import InputError

FORMATS = ("jsonl", "csv")


def format_for(path: Path, fmt: str | None) -> str:
    """The format to write: as asked, or from the file suffix (``.csv`` -> csv, anything else -> jsonl)."""
    if fmt is None:
        return "csv" if path.suffix.lower() == ".csv" else "jsonl"
    if fmt not in FORMATS:
        raise InputError(path, f"unknown format {fmt!r} (use jsonl or csv)")
    return fmt


class ResultsFile:
    """Append records keyed by ``key_field`` to ``path``; ``done`` holds the keys already there."""

    def __init__(self, path: str | os.PathLike, fields: list[str], fmt: str | None = None, key_field: str = "id"):
        self.path = Path(path)
        self.fields = fields
        self.key_field = key_field
        self.format = format_for(self.path, fmt)
        if self.path.is_dir():
            raise InputError(self.path, "is a folder, expected a results file")
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._recover()
        self._fh = None

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def _recover(self) -> None:
        """Read the complete records, and cut a partial last line left by an interrupted run."""
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1] if not data.endswith(b"\n") else data
        if len(complete) != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(complete))
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(self.path, "not a UTF-8 results file; give another output path") from None
        if self.format == "jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.records[str(record[self.key_field])] = record
                except (ValueError, KeyError, TypeError):
                    raise InputError(self.path, f"line {number} is not a results record; give another output path") from None
        elif text:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or self.key_field not in reader.fieldnames:
                raise InputError(self.path, f"not a results CSV (no {self.key_field!r} column); give another output path")
            for row in reader:
                self.records[row[self.key_field]] = row

    def rewrite_without(self, keys: set[str]) -> None:
        """Drop the records of ``keys`` (e.g. failures to retry), atomically."""
        kept = [r for k, r in self.records.items() if k not in keys]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if self.format == "csv":
                fh.write(self._csv_line(self.fields))
            for record in kept:
                fh.write(self._line(record))
        os.replace(tmp, self.path)
        self.records = {k: r for k, r in self.records.items() if k not in keys}

    def write(self, record: dict) -> None:
        """Append one record and flush it to the OS."""
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
            if new and self.format == "csv":
                self._fh.write(self._csv_line(self.fields))
        self._fh.write(self._line(record))
        self._fh.flush()
        self.records[str(record[self.key_field])] = record

    def _line(self, record: dict) -> str:
        if self.format == "jsonl":
            return json.dumps(record, ensure_ascii=False) + "\n"
        # One physical line per record (whitespace runs collapsed), so a cut line is always the last one.
        return self._csv_line(["" if v is None else " ".join(str(v).split()) for v in map(record.get, self.fields)])

    @staticmethod
    def _csv_line(cells) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(cells)
        return out.getvalue()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
