"""``python -m benchmarks.feature_probe``: where in a model does the kind of change still show?

A probe of frozen features. The model is run, untouched, on stacked pairs of the synthetic world;
its states at several depths (the ViT after its layers 0 and 2, or its last in a shallower ViT; the
ViT's output; the Q-Former's query outputs; those projected into the decoder) are kept; for each
depth a small head (layer norm, 4 learnt queries attending over the states, a linear layer) learns
to name the pair's kind of change from the training split's pairs and is scored on the validation
split's. Chance is 1 in 9.

It tells a representation that has the comparison from one that lost it, without captions: the
demo recipe's frozen comparison heads were chosen by it (``docs/model-card.md``). Its scores
depend on the head's training (seeded) and the number of pairs; compare runs with the same
settings.

    python -m benchmarks.feature_probe runs/demo/stage1/best [--adapter runs/demo/stage2/best] \\
        --out benchmarks/results/demo-feature-probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

#: The depths probed: (name, where to read it).
DEPTHS = ("vit-layer0", "vit-layer2", "vit", "qformer", "projected")


def features(model, processor, split: str, n: int, seed: int, batch: int = 64) -> tuple[dict, np.ndarray]:
    """The model's states at every depth of :data:`DEPTHS` for the first ``n`` pairs of ``split``, and their kinds."""
    import torch

    from idc_lite.compose import compose_pair
    from idc_lite.settings import CompositionSettings
    from idc_lite.tools.synth import CATEGORIES, generate_pair

    composition = CompositionSettings()
    states: dict[str, list] = {depth: [] for depth in DEPTHS}
    kinds = []
    for start in range(0, n, batch):
        pairs = [generate_pair(i, seed=seed, split=split) for i in range(start, min(n, start + batch))]
        pixels = torch.from_numpy(np.stack([compose_pair(p.before, p.after, composition, processor) for p in pairs]))
        with torch.inference_mode():
            vision = model.vision_model(pixel_values=pixels, output_hidden_states=True)
            image = vision.last_hidden_state
            queries = model.qformer(query_embeds=model.query_tokens.expand(len(pairs), -1, -1),
                                    encoder_hidden_states=image,
                                    encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
            layers = vision.hidden_states  # embeddings, then each layer's output
            found = {"vit-layer0": layers[1], "vit-layer2": layers[min(3, len(layers) - 1)], "vit": image,
                     "qformer": queries, "projected": model.language_projection(queries)}
        for depth in DEPTHS:
            states[depth].append(found[depth].float())
        kinds += [CATEGORIES.index(p.category) for p in pairs]
    return {depth: torch.cat(parts) for depth, parts in states.items()}, np.asarray(kinds)


def probe(train, train_kinds, val, val_kinds, epochs: int = 30, seed: int = 0) -> dict:
    """Train a pooling head on ``train`` states, score it on ``val``: overall and per-kind accuracy."""
    import torch

    from idc_lite.tools.synth import CATEGORIES

    class Head(torch.nn.Module):
        def __init__(self, width: int, kinds: int):
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)
            self.queries = torch.nn.Parameter(torch.randn(1, 4, width) * 0.02)
            heads = next(h for h in (4, 3, 2, 1) if width % h == 0)
            self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            self.out = torch.nn.Linear(4 * width, kinds)

        def forward(self, states):
            states = self.norm(states)
            pooled, _ = self.attention(self.queries.expand(states.shape[0], -1, -1), states, states)
            return self.out(pooled.flatten(1))

    torch.manual_seed(seed)
    head = Head(train.shape[-1], len(CATEGORIES))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    labels = torch.from_numpy(train_kinds)
    for _ in range(epochs):
        order = torch.randperm(len(train))
        for start in range(0, len(train), 64):
            rows = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(head(train[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.inference_mode():
        predicted = head(val).argmax(-1).numpy()
    per_kind = {kind: round(float((predicted[val_kinds == k] == k).mean()), 3)
                for k, kind in enumerate(CATEGORIES) if (val_kinds == k).any()}
    return {"overall": round(float((predicted == val_kinds).mean()), 3), "per_kind": per_kind}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_probe", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="A BLIP-2 model folder (a demo stage's best, say).")
    parser.add_argument("--adapter", type=Path, help="A LoRA adapter folder to merge first (stage 2's best).")
    parser.add_argument("--train-pairs", type=int, default=2048)
    parser.add_argument("--val-pairs", type=int, default=540)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="The synthetic world's seed.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", type=Path, help="Write the scores here as JSON.")
    args = parser.parse_args(argv)

    import torch
    from transformers import Blip2ForConditionalGeneration

    from idc_lite.runtime import quiet_libraries
    from idc_lite.settings import ProcessorSettings

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Blip2ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.eval()
    processor = ProcessorSettings.from_model_dir(args.model)
    started = time.perf_counter()
    train, train_kinds = features(model, processor, "train", args.train_pairs, args.seed)
    val, val_kinds = features(model, processor, "val", args.val_pairs, args.seed)
    result = {"model": str(args.model), "adapter": None if args.adapter is None else str(args.adapter),
              "train_pairs": args.train_pairs, "val_pairs": args.val_pairs, "epochs": args.epochs, "depths": {}}
    for depth in DEPTHS:
        result["depths"][depth] = probe(train[depth], train_kinds, val[depth], val_kinds, args.epochs)
        scores = result["depths"][depth]
        print(f"{depth:>11}: {scores['overall']:.3f}  " + " ".join(f"{k} {v:.2f}" for k, v in scores["per_kind"].items()),
              flush=True)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
