"""The decode floor: read bandwidth measured as decoders read, and the check that no backend beats it."""

from __future__ import annotations

from benchmarks import compare, report
from benchmarks.decoder_speed import bandwidth_floor_ms, decode_threads, read_bandwidth_gbps


def _backend(device: str, decoder_bytes: int, ms: float) -> dict:
    return {"backend": {"device": device}, "decoder_bytes": decoder_bytes, "decoder_ms_per_token": {"1": ms}}


def test_a_backend_faster_than_its_floor_fails_the_sanity_check():
    gbps = 20.0  # 2 GB of weights: a floor of 100 ms
    backends = {"reference-fp32-cpu": _backend("cpu", 2 * 10**9, 93.0), "lite-ort-int4-cpu": _backend("cpu", 10**9, 60.0),
                "lite-ort-int4-cuda": _backend("cuda", 10**9, 5.0)}
    assert bandwidth_floor_ms(2 * 10**9, gbps) == 100.0
    violations = compare.floor_violations(backends, gbps)
    assert [(v["backend"], round(v["ratio"], 2)) for v in violations] == [("reference-fp32-cpu", 0.93)]
    table = "\n".join(report.decoder_table({"memory_bandwidth_gbps": gbps, "backends": backends,
                                            "floor_violations": violations}))
    assert "| reference-fp32-cpu |" in table and "| lite-ort-int4-cpu |" in table and "cuda" not in table
    assert "Sanity check failed" in table and "0.93x its floor" in table
    fine = compare.floor_violations({"lite-ort-int4-cpu": backends["lite-ort-int4-cpu"]}, gbps)
    assert fine == [] and "no backend decoded faster" in "\n".join(report.decoder_table(
        {"memory_bandwidth_gbps": gbps, "backends": backends, "floor_violations": fine}))


def test_read_bandwidth_streams_with_the_decoders_threads():
    assert decode_threads() >= 1
    assert read_bandwidth_gbps(size_bytes=1 << 24, threads=2, repeats=1) > 0
