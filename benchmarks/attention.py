"""``python -m benchmarks.attention``: does the ViT compare corresponding parts of the two halves?

BLIP2IDC reads some of its ViT heads as comparing corresponding parts of the *before* and *after*
images (paper section 2.2, seed Figure 1). This measures that behaviour on the synthetic world's test
split, where the changed region of every pair is known from its scenes: for each patch of the changed
region, in either half, the share of the chosen layer's attention (the last by default) that falls on
the same region of the *other* half. Compared with the share uniform attention would give (the
region's patches over all tokens), per category and per head; the share on the other half as a
whole is given beside it.

The changed region is the union of the boxes of what differs between the two scenes (an added,
removed or recoloured object; a moved object at both places; new text); a change of the whole
picture (``background``, ``style``, ``global``) makes it the whole half, and so does ``none``, which
has no changed region (its row is the halves' comparison as a whole). A patch belongs to the region
when the region's box overlaps it. These are attention weights, where heads looked: a high share
says that a head reads the other half at the same place, not that it found the change.

    python -m benchmarks.attention --n 1080 --out benchmarks/results/demo-attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

WHOLE_PICTURE = ("background", "style", "global", "none")


def changed_boxes(pair) -> list[tuple[float, float, float, float]] | None:
    """Boxes (scene pixels) of what differs between a synthetic pair's scenes; None for the whole picture."""
    if pair.category in WHOLE_PICTURE:
        return None
    before, after = pair.before_scene, pair.after_scene
    boxes = [o.box for o in set(before.objects) ^ set(after.objects)]
    if before.text != after.text:
        boxes += [t.box for t in (before.text, after.text) if t is not None]
    return boxes


def region_mask(boxes, scene_size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) booleans: the patches of one half (``rows`` patch rows over the scene) a box overlaps."""
    if boxes is None:
        return np.ones((rows, cols), dtype=bool)
    width, height = scene_size
    ys, xs = np.arange(rows + 1) * height / rows, np.arange(cols + 1) * width / cols
    mask = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= ((ys[:-1, None] < y1) & (ys[1:, None] > y0)) & ((xs[None, :-1] < x1) & (xs[None, 1:] > x0))
    return mask


def corresponding_share(matrix: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per head: the mean share of attention from the region's patches (both halves) onto the same
    region of the other half, and onto the other half as a whole.

    ``matrix`` (heads, tokens, tokens) with the class token first and the halves' patches after it,
    top half first; ``mask`` (rows of one half, cols).
    """
    half = mask.size
    region = np.flatnonzero(mask.ravel())
    top, bottom = 1 + region, 1 + half + region
    to_region = np.concatenate([matrix[:, top][:, :, bottom].sum(-1), matrix[:, bottom][:, :, top].sum(-1)], axis=1)
    to_half = np.concatenate([matrix[:, top, 1 + half:].sum(-1), matrix[:, bottom, 1:1 + half].sum(-1)], axis=1)
    return to_region.mean(1), to_half.mean(1)


def measure(model=None, n: int = 1080, seed: int = 0, layer: int = -1) -> dict:
    from idc_lite import Captioner
    from idc_lite.tools.synth import CATEGORIES, generate_pair

    captioner = Captioner(model)
    per_category: dict[str, dict[str, list]] = {c: {"region": [], "half": [], "chance": [], "patches": []}
                                                for c in CATEGORIES}
    started = time.perf_counter()
    geometry = captioner.backend.attention_geometry()
    rows, cols = geometry.grid
    if rows % 2:
        raise SystemExit(f"error: {rows} patch rows do not split into two halves")
    for index in range(n):
        pair = generate_pair(index, seed, "test")
        maps = captioner.attention(pair.before, pair.after, layer=layer)
        mask = region_mask(changed_boxes(pair), (pair.before_scene.width, pair.before_scene.height), rows // 2, cols)
        region, half = corresponding_share(maps.matrix, mask)
        entry = per_category[pair.category]
        entry["region"].append(region)
        entry["half"].append(half)
        entry["chance"].append(mask.sum() / geometry.tokens)
        entry["patches"].append(int(mask.sum()))
    rows_out = {}
    for category, entry in per_category.items():
        if not entry["region"]:
            continue
        region = np.mean(entry["region"], axis=0)  # per head
        chance = float(np.mean(entry["chance"]))
        best = int(np.argmax(region))
        rows_out[category] = {
            "pairs": len(entry["region"]), "region_patches": float(np.mean(entry["patches"])),
            "share": float(region.mean()), "chance": chance, "ratio": float(region.mean() / chance),
            "best_head": best, "best_head_share": float(region[best]),
            "per_head": [float(v) for v in region], "other_half": float(np.mean(entry["half"])),
        }
    return {
        "model": captioner.model_id, "backend": captioner.backend.name, "split": "test", "seed": seed, "pairs": n,
        "layer": layer % geometry.layers, "layers": geometry.layers, "heads": geometry.heads,
        "grid": list(geometry.grid), "other_half_chance": (rows // 2) * cols / geometry.tokens,
        "seconds": round(time.perf_counter() - started, 1), "categories": rows_out,
    }


def markdown(result: dict) -> str:
    lines = [f"Layer {result['layer']} of 0-{result['layers'] - 1}, {result['pairs']} test pairs (seed "
             f"{result['seed']}), {result['model']} on the {result['backend']} backend.", "",
             "| category | region patches | share on the same region of the other half | uniform | ratio | "
             "best head (share) | share on the other half |", "|---|--:|--:|--:|--:|--:|--:|"]
    for category, row in result["categories"].items():
        lines.append(f"| {category} | {row['region_patches']:.1f} | {row['share']:.3f} | {row['chance']:.3f} | "
                     f"{row['ratio']:.2f} | {row['best_head']} ({row['best_head_share']:.3f}) | "
                     f"{row['other_half']:.3f} |")
    lines.append(f"\nUniform attention would put {result['other_half_chance']:.3f} on the other half.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default=None, help="Model or artifact (default: the embedded model).")
    parser.add_argument("--n", type=int, default=1080, help="Test pairs (120 per category for 1080).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=-1, help="ViT layer, from 0; -1 is the last.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON here.")
    args = parser.parse_args(argv)
    from idc_lite.errors import IdcError

    try:
        result = measure(args.model, args.n, args.seed, args.layer)
    except IdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
