"""``idc-lite info MODEL``: what an artifact (or model directory) holds and how it would run here."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


def info(
    model: Annotated[Optional[str], typer.Argument(
        help="Artifact or model directory (default: the embedded model).", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="Device to plan for: auto, cpu or cuda[:N].")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an artifact's manifest, its files and sizes, and the providers and decoder it would use."""
    from ..model_info import describe_model

    report = describe_model(model, device)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for line in format_report(report):
        typer.echo(line)


def format_report(report: dict) -> list[str]:
    lines = [f"{report['name']}  ({report['kind']}, {report['path']})"]
    for key, value in report.get("summary", {}).items():
        lines.append(f"  {key}: {value}")
    if report.get("files"):
        lines.append(f"  files ({_size(sum(f['size'] for f in report['files'].values()))}):")
        lines += [f"    {name:40} {_size(f['size']):>10}" for name, f in report["files"].items()]
    plan = report["plan"]
    lines.append(f"  would run on {plan['device']}: " + ", ".join(f"{k} {v}" for k, v in plan.items() if k != "device"))
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
