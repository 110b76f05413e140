"""Ratios lite / reference from one run, the issues' targets with pass or fail, and quality retention.

Every ratio is computed from two medians stored in the same results file, and carries both, so it
can be checked. Each lite backend is compared with the reference on its device: fp32 on CPU, fp16 on
CUDA. A target is "pass", "fail", or "n/a" with the reason (a backend missing or failed, a figure
not measured); a miss is never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The reference each lite backend is compared with, by device.
BASELINES = {"cpu": "reference-fp32-cpu", "cuda": "reference-fp16-cuda"}
#: Figures compared per batch size (the median where the figure has a spread).
BATCH_METRICS = ("e2e_ms_per_pair", "encoder_ms_per_pair", "pairs_per_s", "decoder_ms_per_token",
                 "peak_rss_bytes", "gpu_peak_bytes")
#: Figures compared once per backend.
BACKEND_METRICS = ("load_s", "size_on_disk_bytes")


@dataclass(frozen=True)
class Target:
    """A ratio the issues ask for: ``metric`` of lite / its reference on ``device`` at most ``limit``."""

    source: str
    what: str
    metric: str
    device: str | None  # None: every device
    limit: float
    batch_sizes: tuple[int, ...] | None = None  # None: every measured batch size


TARGETS = (
    Target("issue 6", "CPU peak RSS, lite / reference fp32", "peak_rss_bytes", "cpu", 0.35),
    Target("issue 6", "GPU peak memory, lite / reference fp16", "gpu_peak_bytes", "cuda", 0.45),
    Target("issue 6", "end-to-end latency, lite / reference on the same device", "e2e_ms_per_pair", None, 1.0),
    Target("issue 7", "CPU end-to-end latency, lite / reference fp32", "e2e_ms_per_pair", "cpu", 0.4),
    Target("issue 7", "CPU decode ms per token / memory-bandwidth floor", "decode_over_floor", "cpu", 1.5, (1,)),
)


def batch_value(backend: dict, batch_size: int, metric: str) -> float | None:
    """The figure ``metric`` of ``backend`` at ``batch_size`` (a median for timed figures), or None."""
    if metric == "decoder_ms_per_token":
        return (backend.get("decoder_ms_per_token") or {}).get(str(batch_size))
    row = next((r for r in backend.get("batches", []) if r["batch_size"] == batch_size and "skipped" not in r), None)
    if row is None or row.get(metric) is None:
        return None
    value = row[metric]
    return value["median"] if isinstance(value, dict) else value


def floor_violations(backends: dict[str, dict], bandwidth_gbps: float | None) -> list[dict]:
    """CPU backends whose batch-1 decode beat their bandwidth floor: then the floor is no floor, and the
    run's decode-to-floor figures mean nothing (a sanity check of the measurement, not of the backends)."""
    rows = []
    for name, backend in backends.items():
        if backend.get("backend", {}).get("device") != "cpu":
            continue
        floor, measured = floor_ms(backend, bandwidth_gbps), batch_value(backend, 1, "decoder_ms_per_token")
        if floor and measured is not None and measured < floor:
            rows.append({"backend": name, "measured_ms": measured, "floor_ms": floor, "ratio": measured / floor})
    return rows


def floor_ms(backend: dict, bandwidth_gbps: float | None) -> float | None:
    """The decoder's memory-bandwidth floor per decode step: its weight bytes / the measured read bandwidth."""
    from .decoder_speed import bandwidth_floor_ms

    if not bandwidth_gbps or not backend.get("decoder_bytes"):
        return None
    return bandwidth_floor_ms(backend["decoder_bytes"], bandwidth_gbps)


def ratios(backends: dict[str, dict]) -> list[dict]:
    """lite / reference for every figure both have, per batch size (or once per backend)."""
    rows = []
    for name, lite in backends.items():
        baseline = BASELINES.get(lite["backend"]["device"].split(":")[0])
        reference = backends.get(baseline)
        if lite["backend"]["kind"] != "lite" or reference is None:
            continue
        for metric in BACKEND_METRICS:
            rows.append(_ratio(name, baseline, None, metric, lite.get(metric), reference.get(metric)))
        sizes = sorted({r["batch_size"] for b in (lite, reference) for r in b.get("batches", [])})
        for batch_size in sizes:
            for metric in BATCH_METRICS:
                rows.append(_ratio(name, baseline, batch_size, metric, batch_value(lite, batch_size, metric),
                                   batch_value(reference, batch_size, metric)))
    return [row for row in rows if row is not None]


def _ratio(lite: str, reference: str, batch_size: int | None, metric: str, lite_value, reference_value) -> dict | None:
    if lite_value is None or reference_value is None:
        return None
    return {"lite": lite, "reference": reference, "batch_size": batch_size, "metric": metric,
            "lite_value": lite_value, "reference_value": reference_value,
            "ratio": lite_value / reference_value if reference_value else None}


def targets(backends: dict[str, dict], ratio_rows: list[dict], bandwidth_gbps: float | None) -> list[dict]:
    """Each target for each lite backend it applies to and each batch size: pass, fail or n/a (and why)."""
    rows = []
    for target in TARGETS:
        lites = [n for n, b in backends.items() if b["backend"]["kind"] == "lite"
                 and (target.device is None or b["backend"]["device"].split(":")[0] == target.device)]
        if not lites:
            rows.append(_target_row(target, None, None, None, f"no lite backend on {target.device} in this run"))
        for name in lites:
            lite = backends[name]
            if lite.get("error") and not lite.get("batches"):
                rows.append(_target_row(target, name, None, None, f"{name} failed: {lite['error']}"))
                continue
            sizes = target.batch_sizes or sorted(r["batch_size"] for r in lite.get("batches", []))
            for batch_size in sizes:
                rows.append(_evaluate(target, name, backends, batch_size, ratio_rows, bandwidth_gbps))
    return rows


def _evaluate(target: Target, name: str, backends: dict[str, dict], batch_size: int, ratio_rows: list[dict],
              bandwidth_gbps: float | None) -> dict:
    lite = backends[name]
    if target.metric == "decode_over_floor":
        measured, floor = batch_value(lite, batch_size, "decoder_ms_per_token"), floor_ms(lite, bandwidth_gbps)
        if measured is None or floor is None:
            why = "decoder ms per token not measured" if measured is None else "no bandwidth or decoder size measured"
            return _target_row(target, name, batch_size, None, why)
        return _target_row(target, name, batch_size, measured / floor, None, measured=measured, floor_ms=floor)
    key = (name, batch_size, target.metric)
    row = next((r for r in ratio_rows if (r["lite"], r["batch_size"], r["metric"]) == key), None)
    if row is None or row["ratio"] is None:
        baseline = BASELINES.get(lite["backend"]["device"].split(":")[0])
        why = (f"no {baseline} in this run" if baseline not in backends
               else f"{target.metric} not measured for both {name} and {baseline}")
        return _target_row(target, name, batch_size, None, why)
    return _target_row(target, name, batch_size, row["ratio"], None, reference=row["reference"])


def _target_row(target: Target, lite: str | None, batch_size: int | None, value: float | None, why: str | None,
                **extra) -> dict:
    status = "n/a" if value is None else ("pass" if value <= target.limit else "fail")
    return {"source": target.source, "target": target.what, "metric": target.metric, "lite": lite,
            "batch_size": batch_size, "value": value, "limit": target.limit, "status": status, "why": why, **extra}


def quality(backends: dict[str, dict], references: dict[str, list[str]]) -> dict:
    """CIDEr of every backend's captions, and of each lite backend: identical captions and CIDEr vs its reference."""
    from idc_lite.tools.metrics import score

    def cider(captions: dict[str, str | None]) -> float | None:
        scored = {key: caption for key, caption in captions.items() if caption is not None}
        return score(scored, {key: references[key] for key in scored}, meteor=False)["CIDEr"] if scored else None

    per_backend = {name: {"n": len(b["quality"]["captions"]), "cider": cider(b["quality"]["captions"]),
                          "errors": len(b["quality"]["errors"])}
                   for name, b in backends.items() if b.get("quality")}
    retention = []
    for name, lite in backends.items():
        baseline = BASELINES.get(lite["backend"]["device"].split(":")[0])
        if lite["backend"]["kind"] != "lite" or name not in per_backend or baseline not in per_backend:
            continue
        ours, theirs = lite["quality"]["captions"], backends[baseline]["quality"]["captions"]
        common = [key for key in ours if key in theirs]
        identical = sum(ours[key] == theirs[key] for key in common)
        lite_cider, reference_cider = per_backend[name]["cider"], per_backend[baseline]["cider"]
        retention.append({
            "lite": name, "reference": baseline, "n": len(common), "identical": identical,
            "identical_share": identical / len(common) if common else None,
            "lite_cider": lite_cider, "reference_cider": reference_cider,
            "cider_retention": lite_cider / reference_cider if lite_cider is not None and reference_cider else None,
        })
    return {"per_backend": per_backend, "retention": retention}
