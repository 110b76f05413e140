"""Result files that survive interruption: JSONL or CSV, one record per pair, flushed as written.

A run killed at any moment leaves complete records plus at most one partial last line; opening the
file again drops that partial line, reports which keys are done, and appends. So a run can be
repeated with the same output until everything is done, and no key is ever written twice.

An existing file is read and checked to be a results file of this kind before anything in it is
changed, so a wrong ``-o`` is refused intact. CSV cells that a spreadsheet would run as a formula
(starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) get a leading ``'``, the
spreadsheet convention for "this is text", and lose it again when the file is read back; a cell
that starts with ``'`` gets one more, so reading back is exact. Files are replaced through a
temporary file of an unpredictable name in the same folder, created exclusively (never through a
symlink someone left there), then renamed over the target (:func:`atomic_write_text`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import InputError

FORMATS = ("jsonl", "csv")
#: The fields of a ``batch`` record, in order: CSV columns, Parquet schema; local and Ray runs share them.
BATCH_FIELDS = ["id", "before", "after", "caption", "error", "model", "adapter", "backend", "seconds"]
#: First characters that make a spreadsheet read a cell as a formula (or a command), and the quote
#: that marks a cell as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEXT_MARK = "'"


def escape_cell(value: str) -> str:
    """A CSV cell that no spreadsheet runs as a formula: a leading ``'`` before a formula start (or a ``'``)."""
    return TEXT_MARK + value if value.startswith((*FORMULA_STARTS, TEXT_MARK)) else value


def unescape_cell(value: str) -> str:
    """The value :func:`escape_cell` was given."""
    return value[1:] if value.startswith(TEXT_MARK) else value


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def readable_by_umask(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the mode a plain write would (0666 / 0777 less the umask).

    Some writers (safetensors' ``save_file``, the int4 quantizer's external data, ``mkdtemp``) create
    0600 files or 0700 folders, which would leave an artifact or a training run in a shared folder
    unreadable by its other users.
    """
    mask = current_umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` whole or not at all, through an exclusive temporary file beside it.

    The temporary file has an unpredictable name and is created with ``O_EXCL`` (``tempfile.mkstemp``),
    so a symlink planted in the folder is never written through; an existing file's permission bits
    are kept, and a new file gets the ones a plain write would (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def batch_record(key: str, before, after, result) -> dict:
    """The ``batch`` record of one pair described by :meth:`idc_lite.Captioner.describe_batch`."""
    return {
        "id": key, "before": str(before), "after": str(after), "caption": result.caption,
        "error": result.error, "model": result.model, "adapter": result.adapter,
        "backend": result.backend, "seconds": round(result.timings.total_s, 4),
    }


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
            if not stat.S_ISREG(self.path.stat().st_mode):
                raise InputError(self.path, "is not a regular file (a device or FIFO); give a results file path")
            self._recover()
        self._fh = None

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def _recover(self) -> None:
        """Read the complete records, check them, and only then cut a partial last line of an interrupted run."""
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        partial = data[len(complete):]
        not_ours = "give another output path (it is left as it is)"
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(self.path, f"not a UTF-8 results file; {not_ours}") from None
        if self.format == "jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.records[str(record[self.key_field])] = record
                except (ValueError, KeyError, TypeError):
                    raise InputError(self.path, f"line {number} is not a results record; {not_ours}") from None
            if partial and not partial.startswith(b'{"'):
                raise InputError(self.path, f"its last line is not a results record; {not_ours}")
        elif text:
            reader = csv.reader(io.StringIO(text))
            header = next(reader, None)
            if header != self.fields:
                raise InputError(self.path, f"not a results CSV with the columns {','.join(self.fields)}; {not_ours}")
            for number, row in enumerate(reader, 2):
                if len(row) != len(self.fields):
                    raise InputError(self.path, f"line {number} is not a results row; {not_ours}")
                record = dict(zip(self.fields, map(unescape_cell, row)))
                self.records[record[self.key_field]] = record
        elif partial and not self._csv_line(self.fields).encode().startswith(partial):
            raise InputError(self.path, f"not a results CSV; {not_ours}")
        if partial:
            with open(self.path, "r+b") as fh:
                fh.truncate(len(complete))

    def rewrite_without(self, keys: set[str]) -> None:
        """Drop the records of ``keys`` (e.g. failures to retry), atomically."""
        kept = [r for k, r in self.records.items() if k not in keys]
        header = self._csv_line(self.fields) if self.format == "csv" else ""
        atomic_write_text(self.path, header + "".join(self._line(record) for record in kept))
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
        return self._csv_line(["" if v is None else escape_cell(" ".join(str(v).split()))
                               for v in map(record.get, self.fields)])

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
