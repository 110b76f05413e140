"""The memory table: counts match real models and PEFT, the 2.7B config reproduces seed Table 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idc_lite.errors import ModelError
from idc_lite.tools.memory import (
    BLIP2IDC_TARGET_MODULES, DEFAULT_CONFIG, GIB, LORA_RANKS, PRECISIONS, SEED_TRAINING_GIB, SEED_WEIGHTS_GIB,
    as_quantized_weight_bytes, count_parameters, format_memory_table, load_config, lora_parameter_count,
    lora_targets, memory_table, meta_model, quantized_linear_bytes,
)

DATA = Path(__file__).parent / "data"


def tiny_config():
    """A BLIP-2 whose parts all differ in width (so in/out mix-ups show) and whose Q-Former layer 1
    has no cross-attention (so target names that match nothing are exercised)."""
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=48, cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=40, ffn_dim=80, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, word_embed_proj_dim=40, max_position_embeddings=64),
        num_query_tokens=4, image_token_index=99,
    )


def real_model(config):
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(config)


@pytest.fixture(scope="module")
def table_27b() -> dict:
    return memory_table(DEFAULT_CONFIG)


def test_target_list_is_blip2idcs():
    released = json.loads((DATA / "blip2idc-ier.adapter_config.json").read_text())["target_modules"]
    assert list(BLIP2IDC_TARGET_MODULES) == released


def test_counts_match_a_real_model():
    config = tiny_config()
    model = real_model(config)
    counts = count_parameters(meta_model(config))
    assert counts == count_parameters(model)
    assert counts.unique == sum(p.numel() for p in model.parameters())
    assert counts.all_tensors == sum(t.numel() for t in model.state_dict().values())
    assert counts.tied == 100 * 40  # OPT's lm_head shares the token embedding
    assert counts.vision == sum(p.numel() for p in model.vision_model.parameters())
    assert counts.qformer == sum(p.numel() for p in model.qformer.parameters()) + model.query_tokens.numel()


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    config = tiny_config()
    targets = lora_targets(meta_model(config))
    names = {t.name for t in targets}
    assert "qformer.encoder.layer.0.crossattention.attention.query" in names
    assert not any(".attention.attention.query" in n for n in names)  # self-attention query is not a target
    peft_model = get_peft_model(real_model(config), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules=list(BLIP2IDC_TARGET_MODULES)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(targets, 8) == trainable
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == names


def test_quantized_sizes_are_what_bitsandbytes_stores():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(96, 136)  # 136 * 96 is not a multiple of the block size
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    assert quantized_linear_bytes(136, 96, "int4") == stored
    codes, scales, _ = functional.int8_vectorwise_quant(weight.half())
    assert quantized_linear_bytes(136, 96, "int8") == codes.numel() + scales.numel() * scales.element_size()


def test_as_quantized_keeps_everything_but_linear_weights_in_fp16():
    model = meta_model(tiny_config())
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "language_model.lm_head"]
    quantized = sum(m.weight.numel() for m in linears)
    rest = sum(p.numel() for p in model.parameters()) - quantized
    expected = sum(quantized_linear_bytes(m.in_features, m.out_features, "int4") for m in linears) + 2 * rest
    assert as_quantized_weight_bytes(model, "int4") == expected


def test_tiny_table_has_no_seed_figures():
    table = memory_table(tiny_config())
    assert all(row["seed_gib"] is None for row in table["weights"] + table["training"])
    assert "| fp32 |" in format_memory_table(table)


def test_blip2_opt_27b_reproduces_seed_weights(table_27b):
    params = table_27b["params"]
    assert params["unique"] == 3_744_761_856
    assert params["all_tensors"] == params["unique"] + 50304 * 2560  # the tied lm_head, counted again
    rows = {row["precision"]: row for row in table_27b["weights"]}
    assert list(rows) == list(PRECISIONS)
    fp32 = rows["fp32"]["naive_bytes"]
    assert rows["fp16"]["naive_bytes"] == fp32 / 2
    assert rows["int8"]["naive_bytes"] == fp32 / 4
    assert rows["int4"]["naive_bytes"] == fp32 / 8
    assert fp32 / GIB == pytest.approx(SEED_WEIGHTS_GIB["fp32"], rel=0.03)  # the seed's "GB" are GiB
    for precision, seed in SEED_WEIGHTS_GIB.items():
        assert round(rows[precision]["naive_bytes"] / GIB, 2) == pytest.approx(seed, abs=0.01)
    quantized = [rows[p]["as_quantized_bytes"] for p in PRECISIONS]
    assert quantized == sorted(quantized, reverse=True)


def test_blip2_opt_27b_training_rows(table_27b):
    rows = table_27b["training"]
    assert [row["r"] for row in rows] == list(LORA_RANKS)
    # 39 ViT qkv, 24 Q-Former self-attention key/value, 6 cross-attention layers x (query, key, value), 96 OPT q/k/v
    assert {row["lora_modules"] for row in rows} == {39 + 24 + 18 + 96}
    assert rows[1]["lora_params"] == 2 * rows[0]["lora_params"] == rows[2]["lora_params"] / 2
    for row in rows:
        assert row["total_bytes"] == row["frozen_fp16_bytes"] + 16 * row["lora_params"]
        assert row["seed_gib"] == SEED_TRAINING_GIB[row["r"]]
        assert 0 < row["seed_minus_ours_gib"] < row["seed_gib"]  # activations etc. are not modelled


def test_load_config_from_file_or_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(DEFAULT_CONFIG.read_text())
    assert load_config(folder).to_dict() == load_config(DEFAULT_CONFIG).to_dict()
    with pytest.raises(ModelError, match="no such file"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "llama.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="not 'blip-2'"):
        load_config(tmp_path / "llama.json")


def test_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from idc_lite.cli.memory import memory

    app = typer.Typer()
    app.command()(memory)
    runner = CliRunner()

    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    assert "| fp32 | 14.430 |" in result.output and "| 8 | 177 |" in result.output

    tiny = tmp_path / "config.json"
    tiny.write_text(tiny_config().to_json_string())
    result = runner.invoke(app, [str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert table["model"] == tmp_path.name
    assert [row["precision"] for row in table["weights"]] == list(PRECISIONS)

    result = runner.invoke(app, [str(tmp_path / "missing")])
    assert isinstance(result.exception, ModelError)
