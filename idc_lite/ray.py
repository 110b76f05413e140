"""``batch`` on a Ray cluster, and :func:`describe_dataset` for pipelines of one's own (the ``ray`` extra).

Ray Data is what batch inference on clusters of GPUs and CPUs runs on: the pairs become a Dataset of
small rows (an id and where each image is), and ``map_batches`` hands them to an autoscaling pool of
actors, each of which loads the model once (:class:`DescribePairs`) and returns one record per pair
with the fields and values of local ``batch`` (:func:`idc_lite.results_io.batch_record`). Workers
read the images themselves, from a path every node sees or from object storage, so only paths and
records travel through Ray's object store. Ray Data restarts an actor that dies and retries its
blocks; a pair that fails is a record with its error, as locally.

Where records go, and why a run can be killed at any moment:

- JSONL or CSV, one local file: the driver appends each record as its block arrives, through
  :class:`idc_lite.results_io.ResultsFile`, exactly as local ``batch`` does.
- Parquet, a directory of parts (local, or object storage): the workers write one part per block
  (``write_parquet``). A Parquet file is readable only once its footer, written last, is there, so a
  part is whole or unreadable; the next run removes unreadable parts and reads the ids of the rest.

Either way the same command run again describes only the pairs without a record, and no pair is
written twice.

Inputs: two folders, local or any URI that pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``,
``file://``) or fsspec open, paired by the rules of local ``batch`` (:mod:`idc_lite.folders`); or a
manifest (CSV, JSONL or Parquet) with ``id``, ``before`` and ``after`` columns, whose relative
locations are relative to the manifest.
"""

from __future__ import annotations

import functools
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import IdcError, InputError, OptionError, first_line, require

require("ray", "the Ray engine", "ray")

import pyarrow as pa  # noqa: E402  (ray[data] brings pyarrow)
import ray  # noqa: E402  (absolute import: the Ray package, not this module)

from .results_io import BATCH_FIELDS, ResultsFile, batch_record, format_for  # noqa: E402

#: A batch record as an Arrow schema: what workers return and what Parquet parts hold.
SCHEMA = pa.schema([(name, pa.float64() if name == "seconds" else pa.string()) for name in BATCH_FIELDS])
#: Columns of a Dataset of pairs: ``before``/``after`` are what records say; the optional
#: ``*_source`` columns are where workers read the image, when that differs (an absolute path).
PAIR_COLUMNS = ("id", "before", "after")
SOURCE_COLUMNS = ("before_source", "after_source")
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
#: A new local cluster holds only paths and records in its object store.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a filesystem by scheme (``s3://...``) rather than a local path."""
    return bool(_URI.match(os.fspath(location)))


def filesystem(uri: str):
    """``(pyarrow filesystem, path in it)`` for a URI: pyarrow's own filesystems, else fsspec's."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        try:
            import fsspec
        except ImportError:
            raise InputError(uri, f"pyarrow cannot open this URI ({first_line(exc)}) and fsspec is not installed") from None
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_exc:
            raise InputError(uri, f"no filesystem for this URI ({first_line(fsspec_exc)})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class Pairs:
    """What the driver found: pairs to describe, keys recorded with an error at once, unpaired images."""

    rows: list[dict] = field(default_factory=list)  # PAIR_COLUMNS + SOURCE_COLUMNS
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, error): ambiguous names, bad manifest rows
    only_before: list[str] = field(default_factory=list)
    only_after: list[str] = field(default_factory=list)
    where: str = "the folders"

    @property
    def keys(self) -> list[str]:
        return [row["id"] for row in self.rows] + [key for key, _ in self.errors]


def find_pairs(before: str | os.PathLike, after: str | os.PathLike | None = None) -> Pairs:
    """The pairs of two folders (local or URIs), or of a manifest when ``after`` is None."""
    if after is None:
        return read_manifest(before)
    before, after = os.fspath(before), os.fspath(after)
    if not is_uri(before) and not is_uri(after):
        from .folders import pair_folders

        found = pair_folders(before, after)
        rows = [_row(key, str(b), str(a)) for key, b, a in found.pairs]
        ambiguous = [(key, _ambiguous(files)) for key, files in found.ambiguous]
        return Pairs(rows, ambiguous, list(map(str, found.only_before)), list(map(str, found.only_after)))
    from .folders import pair_indexes

    found = pair_indexes(_index_uri(before), _index_uri(after))
    rows = [_row(key, b, a) for key, b, a in found.pairs]
    ambiguous = [(key, _ambiguous(files)) for key, files in found.ambiguous]
    return Pairs(rows, ambiguous, found.only_before, found.only_after)


def _ambiguous(files) -> str:
    return f"ambiguous: several images share this name ({', '.join(str(f) for f in files)})"


def _row(key: str, before: str, after: str) -> dict:
    """A pair row: records name the images as given; workers read them at an absolute path or URI."""
    return {"id": key, "before": before, "after": after, "before_source": _source(before), "after_source": _source(after)}


def _source(location: str) -> str:
    return location if is_uri(location) else os.path.abspath(location)


def _index_uri(uri: str) -> dict[str, list[str]]:
    """The images below a folder URI by key (:func:`idc_lite.folders.index_names`), as URIs."""
    import pyarrow.fs as pafs

    from .folders import index_names

    fs, root = filesystem(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(uri, "no such folder")
        if info.type == pafs.FileType.File:
            raise InputError(uri, "is a file, expected a folder of images")
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise InputError(uri, f"cannot list this folder ({first_line(exc)})") from None
    prefix, base = root.rstrip("/") + "/", uri.rstrip("/")
    index = index_names(e.path[len(prefix):] for e in entries if e.type == pafs.FileType.File and e.path.startswith(prefix))
    return {key: [f"{base}/{name}" for name in names] for key, names in index.items()}


def read_manifest(location: str | os.PathLike) -> Pairs:
    """The pairs of a manifest: CSV, JSONL or Parquet with ``id``, ``before`` and ``after`` columns.

    Relative image locations are relative to the manifest's folder. A row without an image, and an id
    that several rows share, are recorded with their error, as an ambiguous name is for folders.
    """
    location = os.fspath(location)
    kind = MANIFEST_SUFFIXES.get(Path(location.split("?")[0]).suffix.lower())
    if kind is None:
        raise InputError(location, "not a manifest: name it .csv, .jsonl or .parquet (or give two folders)")
    table = _read_table(location, kind)
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(location, f"the manifest has no {', '.join(missing)} column (it needs id, before and after)")
    columns = {c: [None if v is None else str(v) for v in table.column(c).to_pylist()] for c in PAIR_COLUMNS}
    base = location.rsplit("/", 1)[0] if is_uri(location) else os.path.dirname(location)
    resolve = lambda value: value if is_uri(value) or os.path.isabs(value) or not base else (  # noqa: E731
        f"{base}/{value}" if is_uri(base) else os.path.join(base, value))
    unnamed = sum(1 for key in columns["id"] if not key)
    if unnamed:
        raise InputError(location, f"{unnamed} rows have no id; give every row an id")
    counts: dict[str, int] = {}
    for key in columns["id"]:
        counts[key] = counts.get(key, 0) + 1
    pairs, reported = Pairs(where="the manifest"), set()
    for key, before, after in zip(*columns.values()):
        if counts[key] > 1:
            if key not in reported:
                pairs.errors.append((key, f"duplicate id: {counts[key]} rows of the manifest have it"))
                reported.add(key)
        elif not before or not after:
            pairs.errors.append((key, f"no {'before' if not before else 'after'} image in the manifest"))
        else:
            pairs.rows.append(_row(key, resolve(before), resolve(after)))
    return pairs


def _read_table(location: str, kind: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    def read(source) -> pa.Table:
        if kind == "parquet":
            return pq.read_table(source)
        if kind == "csv":  # ids like 0001 stay strings
            return pacsv.read_csv(source, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in PAIR_COLUMNS}, strings_can_be_null=True))
        return pajson.read_json(source)

    try:
        if not is_uri(location):
            return read(location)
        fs, path = filesystem(location)
        with fs.open_input_file(path) as source:
            return read(source)
    except FileNotFoundError:
        raise InputError(location, "no such manifest") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(location, f"cannot read this manifest ({first_line(exc)})") from None


# ----------------------------------------------------------------------------------------- workers


class DescribePairs:
    """The callable class ``map_batches`` runs on each actor: one model load, then batches of pairs.

    ``captioner`` is a picklable zero-argument factory of :class:`idc_lite.Captioner`, called once
    per actor. A batch is a ``pyarrow.Table`` of pair rows; the result, one record per row.
    """

    def __init__(self, captioner: Callable, batch_size: int):
        from .compose import ImageLimits

        # A model that does not load is the user's error: raised with the first batch, it ends the run
        # with one line, where an actor dying in its constructor would be started again and again.
        self.captioner, self.error = None, None
        try:
            self.captioner = captioner()
        except IdcError as exc:
            self.error = exc
        self.batch_size = batch_size
        self.max_bytes = ImageLimits().max_bytes
        self._filesystems: dict[str, tuple] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .captioner import DiffResult
        from .compose import describe_input

        if self.error is not None:
            raise self.error
        rows = batch.to_pylist()
        records: list[dict | None] = [None] * len(rows)
        todo, inputs = [], []
        for i, row in enumerate(rows):
            try:
                pair = tuple(self._input(row, side) for side in ("before", "after"))
            except InputError as exc:  # an object that cannot be read: the pair's record says why
                backend = self.captioner.backend
                unread = DiffResult(caption=None, before=row["before"], after=row["after"], model=backend.model_id,
                                    backend=backend.name, adapter=backend.adapter, error=str(exc))
                records[i] = batch_record(row["id"], row["before"], row["after"], unread)
                continue
            todo.append(i)
            inputs.append(pair)
        results = self.captioner.describe_batch(inputs, self.batch_size, on_error="return")
        for i, pair, result in zip(todo, inputs, results):
            row = rows[i]
            record = batch_record(row["id"], row["before"], row["after"], result)
            if record["error"]:  # name the image as the record does, not where this worker read it
                for given, side in zip(pair, ("before", "after")):
                    prefix = describe_input(given) + ": "
                    if record["error"].startswith(prefix):
                        record["error"] = f"{row[side]}: {record['error'][len(prefix):]}"
                        break
            records[i] = record
        return pa.Table.from_pylist(records, schema=SCHEMA)

    def _input(self, row: dict, side: str):
        """What the captioner is given: a local path as is, the bytes of an object in storage."""
        location = row.get(f"{side}_source") or row[side]
        if not is_uri(location):
            return location
        try:
            fs, path = self._filesystem(location)
            with fs.open_input_file(path) as fh:
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise InputError(row[side], "no such file") from None
        except OSError as exc:
            raise InputError(row[side], f"cannot read file ({first_line(exc)})") from None
        if len(data) > self.max_bytes:
            raise InputError(row[side], f"more than the {self.max_bytes} bytes an image may be")
        return data

    def _filesystem(self, uri: str):
        """One filesystem per scheme and bucket (opening one may ask the store for its region)."""
        scheme, rest = uri.split("://", 1)
        key = (scheme, rest.split("/", 1)[0])
        if key not in self._filesystems:
            fs, path = filesystem(uri)
            # how much of the URI after "scheme://" the filesystem's own paths leave out (hdfs: the host)
            self._filesystems[key] = (fs, len(rest) - len(path) if rest.endswith(path) else None)
        fs, cut = self._filesystems[key]
        return (fs, rest[cut:]) if cut is not None else filesystem(uri)


def parse_workers(spec: str | int | tuple[int, int]) -> int | tuple[int, int]:
    """``N`` workers, or a ``MIN-MAX`` range that Ray Data's autoscaler moves within."""
    if isinstance(spec, (int, tuple)):
        low, high = (spec, spec) if isinstance(spec, int) else spec
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
        if not match:
            raise OptionError(None, f"--workers takes N or MIN-MAX (e.g. 4 or 1-8), not {spec!r}")
        low = int(match.group(1))
        high = int(match.group(2) or low)
    if low < 1 or high < low:
        raise OptionError(None, f"workers must be at least 1, and MIN <= MAX: not {spec!r}")
    return low if low == high else (low, high)


def pairs_dataset(rows: list[dict], batch_size: int = 8, workers: int | tuple[int, int] = 1) -> "ray.data.Dataset":
    """A Dataset of pair rows, in blocks of whole batches: at least 8 blocks per worker, at most 64 batches a block.

    Blocks are the unit an actor takes, a Parquet part holds and a retry repeats: small enough to
    spread over the pool, large enough to keep the parts few.
    """
    most = workers if isinstance(workers, int) else workers[1]
    batches = max(1, min(64, math.ceil(len(rows) / max(1, 8 * most * batch_size))))
    size = batches * batch_size
    columns = (*PAIR_COLUMNS, *SOURCE_COLUMNS)
    blocks = [pa.table({c: pa.array([r.get(c) for r in rows[i:i + size]], pa.string()) for c in columns})
              for i in range(0, len(rows), size)]
    return ray.data.from_arrow(blocks or [pa.table({c: pa.array([], pa.string()) for c in columns})])


def describe_dataset(
    pairs: "ray.data.Dataset | str | os.PathLike", model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None, *, batch_size: int = 8, workers: int | tuple[int, int] | str = 1,
    gpus_per_worker: float = 0, captioner: Callable | None = None, **captioner_options,
) -> "ray.data.Dataset":
    """The records of a Dataset of pairs, described on an actor pool: a Dataset, lazy like any other.

    ``pairs`` has ``id``, ``before`` and ``after`` columns (local paths every worker sees, or URIs),
    or is a manifest's location. Each of ``workers`` actors (``N`` or ``(MIN, MAX)``) builds one
    :class:`idc_lite.Captioner` from ``model``, ``adapter`` and ``captioner_options`` (or calls the
    picklable factory ``captioner``) and reserves ``gpus_per_worker`` GPUs. The records have
    :data:`idc_lite.results_io.BATCH_FIELDS`; write them with ``write_parquet`` or iterate over them.
    """
    if batch_size < 1:
        raise OptionError(None, f"batch_size must be at least 1, not {batch_size}")
    workers = parse_workers(workers)
    if isinstance(pairs, (str, os.PathLike)):
        found = read_manifest(pairs)
        if found.errors:
            key, error = found.errors[0]
            raise InputError(pairs, f"{len(found.errors)} rows cannot be described (first: {key}: {error})")
        pairs = pairs_dataset(found.rows, batch_size, workers)
    if captioner is None:
        from .captioner import Captioner

        local = lambda p: os.path.abspath(p) if p is not None and os.path.exists(p) else p  # noqa: E731
        captioner = functools.partial(Captioner, local(model), local(adapter), **captioner_options)
    pool = (ray.data.ActorPoolStrategy(size=workers) if isinstance(workers, int)
            else ray.data.ActorPoolStrategy(min_size=workers[0], max_size=workers[1]))
    return pairs.map_batches(
        DescribePairs, fn_constructor_kwargs={"captioner": captioner, "batch_size": batch_size},
        batch_size=batch_size, batch_format="pyarrow", compute=pool, num_cpus=1, num_gpus=gpus_per_worker or None,
    )


# ----------------------------------------------------------------------------------------- cluster


def connect(address: str | None = None, *, num_cpus: int | None = None,
            object_store_memory: int | None = LOCAL_OBJECT_STORE_BYTES) -> bool:
    """Join a Ray cluster; True when this call connected (the caller then shuts the connection down).

    ``address``: ``None`` (``RAY_ADDRESS`` when set, else a new local cluster), ``local`` (a new
    local cluster), ``auto`` (the cluster ``ray start`` runs on this machine), ``HOST:PORT`` or
    ``ray://HOST:PORT`` (Ray Client). Already connected in this process: nothing is done.
    """
    import logging

    if ray.is_initialized():
        return False
    address = check_address(address)
    options: dict = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "local":
        options.update(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False)
    try:
        ray.init(address=address, **options)
    except ConnectionError as exc:
        raise OptionError(address, f"cannot reach this Ray cluster ({first_line(exc)})") from None
    return True


def check_address(address: str | None) -> str:
    """The cluster to join (``RAY_ADDRESS``, else ``local``, for None), or :class:`OptionError` for what is not an address."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address not in ("local", "auto") and not re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", address):
        raise OptionError(None, f"--ray takes auto, local, HOST:PORT or ray://HOST:PORT, not {address!r} "
                          "(to start a local cluster, put --ray last or write --ray=local)")
    return address


def cluster_resources() -> str:
    """The cluster's CPUs and GPUs, in words."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    return f"{int(total.get('CPU', 0))} CPUs" + (f", {gpus} GPUs" if gpus else "")


def quiet(progress: bool) -> None:
    """For the command line: Ray Data's progress bars on a terminal only, its log lines only with ``-v``,
    and a worker's own exception raised as it is, so that a user error (a model that does not load)
    ends the run as one line, as locally (:func:`idc_cause`)."""
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    context.raise_original_map_exception = True
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)


def idc_cause(exc: BaseException) -> IdcError | None:
    """The :class:`IdcError` a worker raised, from the Ray exceptions wrapped around it, if any."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, IdcError) and not isinstance(current, ray.exceptions.RayError):
            return current  # the worker's own, not Ray's copy of it (whose message is the traceback)
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None


# ----------------------------------------------------------------------------------------- outputs


class RecordsFile:
    """JSONL or CSV records in one local file, appended by the driver as blocks arrive."""

    def __init__(self, path: str, fmt: str | None):
        if is_uri(path):
            raise InputError(path, "a JSONL or CSV output is one file appended as records arrive, which object "
                             "storage cannot do: give a local path, or --format parquet for a directory of parts")
        self.file = ResultsFile(path, BATCH_FIELDS, fmt)

    @property
    def done(self) -> set[str]:
        return self.file.done

    def errors(self) -> dict[str, str | None]:
        return {key: record.get("error") for key, record in self.file.records.items()}

    def drop(self, keys: set[str]) -> None:
        self.file.rewrite_without(keys)

    def write_records(self, records: Iterable[dict]) -> None:
        for record in records:
            self.file.write(record)

    def write(self, records: "ray.data.Dataset") -> None:
        for batch in records.iter_batches(batch_size=None, batch_format="pyarrow"):
            for record in batch.to_pylist():
                self.file.write(record)

    def close(self) -> None:
        self.file.close()


class RecordParts:
    """Parquet records in a directory of parts, local or in object storage; each part whole or unreadable.

    Opening reads the ``id`` and ``error`` of every part. A part that does not read is what a run
    killed while writing it left: it is removed, once every readable part is known to be a results
    part (a folder of other Parquet files is refused untouched).
    """

    def __init__(self, location: str):
        import pyarrow.fs as pafs

        self.location = location
        self.fs, self.root = filesystem(location) if is_uri(location) else (pafs.LocalFileSystem(), os.path.abspath(location))
        self.removed: list[str] = []
        self.parts: dict[str, dict[str, str | None]] = {}  # path -> {id: error}
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise InputError(location, "is a file: a Parquet output is a directory of parts")
        if info.type == pafs.FileType.NotFound:
            return
        import pyarrow.parquet as pq

        unreadable = []
        for entry in self.fs.get_file_info(pafs.FileSelector(self.root)):
            name = entry.base_name
            if entry.type != pafs.FileType.File or name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue
            try:
                table = pq.read_table(entry.path, filesystem=self.fs, columns=["id", "error"])
            except (pa.ArrowInvalid, OSError, KeyError):
                try:  # a part of ours cut short, or not ours at all
                    pq.read_schema(entry.path, filesystem=self.fs)
                except (pa.ArrowInvalid, OSError):
                    unreadable.append(entry.path)
                    continue
                raise InputError(location, f"{name} is not a results part (no id and error columns); give another "
                                 "output path (it is left as it is)") from None
            self.parts[entry.path] = dict(zip(map(str, table.column("id").to_pylist()), table.column("error").to_pylist()))
        for path in unreadable:
            self.fs.delete_file(path)
            self.removed.append(path)

    @property
    def done(self) -> set[str]:
        return {key for part in self.parts.values() for key in part}

    def errors(self) -> dict[str, str | None]:
        return {key: error for part in self.parts.values() for key, error in part.items()}

    def drop(self, keys: set[str]) -> None:
        """Rewrite each part holding one of ``keys`` without it: a new part under the same name, moved in."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for path, part in list(self.parts.items()):
            if not keys & part.keys():
                continue
            table = pq.read_table(path, filesystem=self.fs)
            kept = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(keys), pa.string()))))
            if kept.num_rows:
                self._put(kept, path)
                self.parts[path] = {k: e for k, e in part.items() if k not in keys}
            else:
                self.fs.delete_file(path)
                del self.parts[path]

    def write_records(self, records: Iterable[dict]) -> None:
        records = list(records)
        if records:
            table = pa.Table.from_pylist(records, schema=SCHEMA)
            path = f"{self.root}/driver-{uuid.uuid4().hex}.parquet"
            self._put(table, path)
            self.parts[path] = {r["id"]: r.get("error") for r in records}

    def write(self, records: "ray.data.Dataset") -> None:
        # Writing a part of records takes little CPU; reserving none lets it run beside actors that hold every core.
        records.write_parquet(self.root, filesystem=self.fs, ray_remote_args={"num_cpus": 0})

    def rescan(self) -> dict[str, str | None]:
        return RecordParts(self.location).errors()

    def _put(self, table: pa.Table, path: str) -> None:
        import pyarrow.parquet as pq

        self.fs.create_dir(self.root, recursive=True)
        folder, name = path.rsplit("/", 1)
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=self.fs)
        self.fs.move(temporary, path)

    def close(self) -> None:
        pass


def open_records(output: str, fmt: str | None) -> RecordsFile | RecordParts:
    """Where a run's records go: Parquet parts for ``--format parquet`` (or a ``.parquet`` name), else one file."""
    if fmt == "parquet" or (fmt is None and output.rstrip("/").lower().endswith(".parquet")):
        return RecordParts(output)
    format_for(Path(output), fmt)  # refuses an unknown format by name
    return RecordsFile(output, fmt)


# ----------------------------------------------------------------------------------------- the batch command


def run_batch(
    before: str, after: str | None, output: str, *, captioner: Callable, model_name: str, fmt: str | None = None,
    batch_size: int = 8, workers: str | int | tuple[int, int] = 1, gpus_per_worker: float = 0,
    retry_failed: bool = False, address: str | None = None, echo: Callable[[str], None] = print,
    progress: bool = False,
) -> int:
    """``idc-lite batch --ray``: pair, skip what ``output`` holds, describe the rest on the cluster; the exit code.

    0 when every pair has a record without error, 1 when some pair's record has one, 130 when
    interrupted (what was written stays). ``echo`` says what happens, in the words of local ``batch``.
    """
    workers = parse_workers(workers)
    check_address(address)
    if gpus_per_worker < 0:
        raise OptionError(None, f"--gpus-per-worker must be 0 or more, not {gpus_per_worker}")
    found = find_pairs(before, after)
    for side, files in (("before", found.only_before), ("after", found.only_after)):
        if files:
            shown = ", ".join(map(str, files[:5])) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
            echo(f"warning: {len(files)} {side} images without a partner: {shown}")
    records = open_records(output, fmt)
    for path in getattr(records, "removed", []):
        echo(f"removed {path}: a part cut short when a run was stopped; its pairs are described again")
    if retry_failed:
        records.drop({key for key, error in records.errors().items() if error})
    done = records.done
    todo = [row for row in found.rows if row["id"] not in done]
    echo(f"{len(found.rows)} pairs in {found.where}, {len(found.rows) - len(todo)} already in {output}, "
         f"{len(todo)} to describe")
    records.write_records({"id": key, "error": error} for key, error in found.errors if key not in done)
    if todo:
        started = connect(address)
        try:
            quiet(progress)
            echo(f"model: {model_name}; Ray cluster of {cluster_resources()}; "
                 f"workers: {workers if isinstance(workers, int) else '%d-%d' % workers}")
            dataset = describe_dataset(pairs_dataset(todo, batch_size, workers), batch_size=batch_size,
                                       workers=workers, gpus_per_worker=gpus_per_worker, captioner=captioner)
            records.write(dataset)
        except KeyboardInterrupt:
            records.close()
            echo(f"interrupted: {len(records.done)} results kept in {output}; run again to resume")
            return 130
        except Exception as exc:
            cause = idc_cause(exc)
            if cause is None:
                raise
            raise cause from None
        finally:
            records.close()
            if started:
                ray.shutdown()
    errors = records.rescan() if isinstance(records, RecordParts) else records.errors()
    keys = found.keys
    failed = sum(1 for key in keys if errors.get(key))
    echo(f"{len(todo)} pairs described now; {len(keys) - failed} ok and {failed} failed in {output}")
    if failed:
        echo("failed pairs are recorded with their error; fix them and run again with --retry-failed")
    return 1 if failed else 0
