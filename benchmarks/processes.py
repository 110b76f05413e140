"""Child processes: every model of a benchmark is loaded in one, never in the runner itself.

A fresh process per backend (and per build stage) makes its peak memory its own, keeps two large
models from ever sharing one address space, and returns all their memory to the system when it
exits.

Peak memory is the child's ``VmHWM`` (/proc/self/status): the high-water mark of the process
image's own address space. ``getrusage``'s ``ru_maxrss`` will not do on Linux: it survives
``exec``, so a child started by vfork/fork reports at least its parent's resident size at that
moment. Each child runs under this module (``python -m benchmarks.processes PEAK_FILE MODULE ARGS``),
which writes its peak to ``PEAK_FILE`` when it exits.
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process image's peak resident set size so far (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class ChildRun:
    """How a child process ended; ``peak_rss_bytes`` is None when it died before it could say."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int | None
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """What went wrong, for a message: the signal or exit code, and the log's last line."""
        if self.returncode < 0:
            how = f"killed by signal {-self.returncode}" + (" (out of memory?)" if self.returncode == -9 else "")
        else:
            how = f"exit code {self.returncode}"
        lines = [line for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        return f"{how}; last log line: {lines[-1].strip() if lines else '(empty)'}; full log: {self.log}"


def run_child(module: str, args: list, log: Path, echo: str | None = None) -> ChildRun:
    """Run ``python -m module *args`` with its output in ``log``; wait and return how it went.

    With ``echo``, each line of the child's output is also printed on stderr behind that prefix, as
    it comes: a long build shows its stages instead of minutes of silence.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log.with_name(log.name + ".peak.json")
    peak_file.unlink(missing_ok=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", __name__, str(peak_file), module, *map(str, args)]
    with open(log, "w", encoding="utf-8") as sink:
        if echo is None:
            returncode = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
        else:
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", bufsize=1) as child:
                for line in child.stdout:
                    sink.write(line)
                    sink.flush()
                    print(f"{echo}{line.rstrip()}", file=sys.stderr, flush=True)
                returncode = child.wait()
    wall_s = time.perf_counter() - started
    peak = json.loads(peak_file.read_text(encoding="utf-8"))["peak_rss_bytes"] if peak_file.is_file() else None
    peak_file.unlink(missing_ok=True)
    return ChildRun(returncode, wall_s, peak, log)


def _write_peak(path: str) -> None:
    Path(path).write_text(json.dumps({"peak_rss_bytes": peak_rss_bytes()}), encoding="utf-8")


if __name__ == "__main__":
    peak_path, module, *rest = sys.argv[1:]
    atexit.register(_write_peak, peak_path)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
