"""``idc-lite train DATA --model BASE --out DIR``: BLIP2IDC LoRA fine-tuning on a dataset of pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def train(
    data: Annotated[Path, typer.Argument(help="Training pairs (JSONL, or another format read_dataset knows).",
                                         show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="BLIP-2 base: directory or hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for checkpoints and the best adapter.")],
    val: Annotated[Optional[Path], typer.Option(
        "--val", help="Validation pairs (default: a seeded 5% of DATA, at least one pair).")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, help="LoRA rank r (lora_alpha = 2r).")] = 8,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Learning rate (default: seed Table 3, 5e-5 for r <= 16, 1e-4 for r = 32).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    max_steps: Annotated[int, typer.Option("--max-steps", min=1)] = 2000,
    val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate (and checkpoint) every N steps.")] = 100,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Stop after N validations without improvement.")] = 5,
    schedule: Annotated[str, typer.Option(
        "--schedule", help="Learning rate after warm-up: constant, or cosine (decays to 0 at --max-steps).")] = "constant",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    full: Annotated[bool, typer.Option("--full", help="Train every weight instead of LoRA (small models).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision of the base.")] = None,
) -> None:
    """Fine-tune MODEL on DATA with BLIP2IDC's LoRA recipe; the best adapter goes to OUT/best.

    Running the same command again resumes from OUT/checkpoint.
    """
    from ..errors import IdcError, require

    for module in ("torch", "transformers", "peft"):
        require(module, "idc-lite train", "train")
    import numpy as np
    from tqdm import tqdm

    from ..tools.datasets import read_dataset
    from ..loading import resolve_model_dir
    from ..settings import CompositionSettings, ProcessorSettings
    from ..tools.training import RecordSource, Trainer, TrainSettings, validation_batches

    try:
        settings = TrainSettings(mode="full" if full else "lora", rank=rank, lr=lr, batch_size=batch_size,
                                 max_steps=max_steps, val_every=val_every, patience=patience, schedule=schedule,
                                 seed=seed)
    except ValueError as exc:
        raise IdcError(None, str(exc)) from None
    model_dir = resolve_model_dir(model, revision)
    records = read_dataset(data)
    if val is not None:
        val_records = read_dataset(val)
    else:
        order = np.random.default_rng(seed).permutation(len(records))
        cut = max(1, len(records) // 20)
        if len(records) < 2:
            raise IdcError(data, "needs at least 2 pairs to hold one out for validation (or give --val)")
        val_records = [records[i] for i in order[:cut]]
        records = [records[i] for i in order[cut:]]
    processor = ProcessorSettings.from_model_dir(model_dir)
    composition = CompositionSettings()
    source = RecordSource(records, composition, processor, seed)
    val_batches = validation_batches(RecordSource(val_records, composition, processor, shuffle=False),
                                     len(val_records), batch_size)
    typer.echo(f"{len(records)} training pairs, {len(val_records)} validation pairs; lr {settings.learning_rate:g}",
               err=True)
    bar = tqdm(total=max_steps, unit="step", file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(step, total, record):
        bar.n = step
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"}, refresh=True)
        if "val_loss" in record and bar.disable:
            typer.echo(f"step {step}: loss {record['loss']:.4f}, validation loss {record['val_loss']:.4f}", err=True)

    trainer = Trainer(model_dir, out, settings, source, val_batches, progress=progress)
    bar.n = trainer.step
    summary = trainer.run()
    bar.close()
    typer.echo(json.dumps(summary), err=True)
    typer.echo(str(out / "best"))

