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


def test_the_decode_profile_accounts_for_the_step_by_weight(artifact):
    """The per-node profile of a decode step: every linear map of the layers and the LM head get their
    own group, with the bytes they read; the groups' kernel time is a part of the profiled run (for a
    model this small, ONNX Runtime's own per-run work may be most of it)."""
    from benchmarks.decoder_profile import markdown, profile_decode, weight_role

    assert [weight_role(n) for n in ("model.decoder.layers.3.fc1.weight_t_Q4", "lm_head_Q8", "table",
                                     "model.decoder.layers.0.self_attn.k_proj.weight_t", "val_12")] == [
        "fc1", "lm_head", "lm_head", "k", None]
    result = profile_decode(artifact, "ort-int4", steps=3, bandwidth_bytes=1 << 22)
    groups = {row["group"]: row for row in result["groups"]}
    assert {"q", "k", "v", "out", "fc1", "fc2", "lm_head", "MatMul"} <= set(groups)  # MatMul: attention scores
    assert all(groups[g]["weight_bytes"] > 0 for g in ("q", "fc1", "lm_head")) and "weight_bytes" not in groups["MatMul"]
    assert groups["fc1"]["weight_bytes"] == groups["fc2"]["weight_bytes"]  # the same shape, transposed
    assert 0.0 < sum(row["share"] for row in result["groups"]) <= 1.0 + 1e-6
    assert result["profiled_ms_per_step"] > 0 and result["read_gbps"] > 0 and result["machine"]["cpu"]
    assert "| lm_head |" in markdown(result)


def test_the_decoder_ab_runs_each_build_in_a_process_of_its_own_and_alternates_which_goes_first(artifact):
    """Two builds timed one after the other measure the machine's drift; the A/B interleaves them."""
    from benchmarks.decoder_ab import compare, markdown, round_order

    assert [round_order(r) for r in range(3)] == [("a", "b"), ("b", "a"), ("a", "b")]
    lines = []
    result = compare(str(artifact), str(artifact), "ort-int4", [1, 2], rounds=1, tokens=2, repeats=1, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["round 1 A", "round 1 B"]
    for side in ("a", "b"):
        (run,) = result["runs"][side]
        assert set(run["ms_per_token"]) == {"1", "2"} and min(run["ms_per_token"].values()) > 0
        assert run["peak_rss_bytes"] > 1 << 20  # the child's own peak, measured by its runner
    assert set(result["ratio_b_over_a"]["ms_per_token"]) == {"1", "2"} and result["ratio_b_over_a"]["peak_rss"] > 0
    assert "| B / A |" in markdown(result)
