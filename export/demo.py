"""The demo recipe: a small BLIP-2 trained on the synthetic world, the way BLIP2IDC was built.

    python -m export demo --out runs/demo [--seed 0]

1. **base**: a small ``Blip2ForConditionalGeneration`` with random weights and a byte-level BPE
   tokenizer (up to 2k tokens) trained on the world's captions; its ViT starts with two heads that
   compare each patch with the same place in the other image (:func:`init_comparison_heads`), kept
   as built through both training stages (:data:`FROZEN`);
2. **stage 1**: every weight trained from scratch (the stand-in for BLIP-2's pre-training) on a mix
   (see :class:`SceneSource`): single scenes captioned by their contents ("a large red circle and a
   small blue star on a beige background"); stacked pairs captioned by what differs between their
   halves ("differences: bottom only a small green star on the left"), the auxiliary task that makes
   the vision side compare the two halves; and language replay, text of the world's change captions
   on a blank image, so that the decoder knows the captions' language before it sees a pair, as OPT
   does;
3. **stage 2, BLIP2IDC**: LoRA with BLIP2IDC's targets on the stage-1 base, on vertically stacked
   (before, after) pairs of the world and their change captions, ``add`` and ``none`` pairs drawn
   twice as often as the others (:data:`TRAIN_CATEGORIES`);
4. **export**: merge, ONNX encoder, int4 decoders, manifest -> the artifact shipped as idc-lite's
   default model.

Every stage writes into ``OUT/<stage>`` and is skipped when already complete; an interrupted stage
resumes from its checkpoint. Examples are generated on the fly from (split, seed, index), so a seed
reproduces the run; validation uses the world's ``val`` split, evaluation its ``test`` and
``shifted`` splits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from idc_lite.settings import CompositionSettings, ProcessorSettings

logger = logging.getLogger("export")

IMAGE_SIZE = 160
#: Sizes chosen to train on 2 CPU cores in about an hour (``docs/model-card.md``).
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
              image_size=IMAGE_SIZE, patch_size=16)
QFORMER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3,
               encoder_hidden_size=192, cross_attention_frequency=1)
TEXT = dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=256,
            max_position_embeddings=128)
#: 32 queries (BLIP-2 has 32): room to carry what differs, not only what is there.
NUM_QUERY_TOKENS = 32
VOCAB_SIZE = 2000


#: Stage 2's categories, in turn: ``add`` and ``none``, the two the first demo model never said,
#: come twice as often as the others (the validation and test splits stay balanced).
TRAIN_CATEGORIES = ("add", "remove", "color", "none", "local", "background", "add", "text", "style", "global",
                    "none")


class SceneSource:
    """Stage 1 examples of ``split``, on the fly: a mix of scenes, compared pairs and language replay.

    With ``replay`` > 0, that share of the examples is language replay: a blank grey image and a
    caption of the world's text (a change reference of the training split). It keeps what the
    decoder learnt in its language pre-training while every weight trains on pictures, as a large
    language model keeps its language; no change caption is ever shown with a picture.

    With ``compared`` > 0, that share is a pair stacked as idc-lite stacks one
    (:func:`~idc_lite.compose.compose_pair`), captioned by what differs between its halves
    (:func:`~idc_lite.tools.synth.list_differences`, "differences: top only a small red star on the
    left; bottom only a small blue star on the left"): the auxiliary task that teaches the vision side
    to compare the top half with the bottom half, which LoRA alone did not (``docs/model-card.md``).
    Its categories come in :data:`TRAIN_CATEGORIES`'s turn.

    The rest are single scenes captioned by their contents.
    """

    def __init__(self, split: str, seed: int, processor: ProcessorSettings, replay: float = 0.0,
                 compared: float = 0.0):
        if replay + compared > 1:
            raise ValueError("replay + compared must be at most 1")
        self.split, self.seed, self.processor = split, seed, processor
        self.replay, self.compared = replay, compared
        self.composition = CompositionSettings()

    def examples(self, start: int, stop: int):
        from PIL import Image

        from idc_lite.compose import compose_pair, preprocess
        from idc_lite.tools.synth import SPLIT_IDS, describe_scene, generate_pair, random_scene, ranges_of, render_scene

        pixels, captions = [], []
        for index in range(start, stop):
            rng = np.random.default_rng([SPLIT_IDS[self.split], self.seed, index, 1])
            draw = rng.random()
            if draw < self.replay:
                references = generate_pair(index, seed=self.seed, split="train").references
                pixels.append(preprocess(Image.new("RGB", (64, 64), (128, 128, 128)), self.processor))
                captions.append(references[int(rng.integers(len(references)))])
            elif draw < self.replay + self.compared:
                pair = generate_pair(index, seed=self.seed, split=self.split,
                                     category=TRAIN_CATEGORIES[index % len(TRAIN_CATEGORIES)])
                pixels.append(compose_pair(pair.before, pair.after, self.composition, self.processor))
                captions.append(pair.differences)
            else:
                scene = random_scene(rng, ranges=ranges_of(self.split))
                pixels.append(preprocess(render_scene(scene), self.processor))
                captions.append(describe_scene(scene))
        return np.stack(pixels), captions


class PairSource:
    """Stage 2 examples: stacked pairs of ``split`` with one of their references, on the fly.

    With ``categories``, pair ``i`` is of category ``categories[i % len(categories)]`` (training's
    :data:`TRAIN_CATEGORIES`); without, the split's own balanced turn.
    """

    def __init__(self, split: str, seed: int, processor: ProcessorSettings,
                 composition: CompositionSettings = CompositionSettings(), categories: tuple[str, ...] | None = None):
        self.split, self.seed, self.processor, self.composition = split, seed, processor, composition
        self.categories = categories

    def examples(self, start: int, stop: int):
        from idc_lite.compose import compose_pair
        from idc_lite.tools.synth import generate_pair

        pixels, captions = [], []
        for index in range(start, stop):
            category = self.categories[index % len(self.categories)] if self.categories else None
            pair = generate_pair(index, seed=self.seed, split=self.split, category=category)
            pixels.append(compose_pair(pair.before, pair.after, self.composition, self.processor))
            pick = np.random.default_rng([self.seed, index, 2]).integers(len(pair.references))
            captions.append(pair.references[int(pick)])
        return np.stack(pixels), captions


def caption_corpus(seed: int, n: int = 4000) -> list[str]:
    """Captions of the world's training split: change references, differences and scene descriptions."""
    from idc_lite.tools.synth import SPLIT_IDS, describe_scene, generate_pair, random_scene

    texts = []
    for index in range(n):
        pair = generate_pair(index, seed=seed, split="train")
        texts.extend(pair.references)
        texts.append(pair.differences)
        texts.append(describe_scene(random_scene(np.random.default_rng([SPLIT_IDS["train"], seed, index, 1]))))
    return texts


def build_base(out: Path, seed: int) -> Path:
    """A demo-sized BLIP-2 with random weights and the world's tokenizer (stage 1's start).

    Its weights start as a from-scratch model needs (:func:`init_from_scratch`), not as
    transformers leaves them for a BLIP-2 that is always loaded pre-trained.
    """
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from idc_lite.tools.modelgen import BOS_ID, EOS_ID, IMAGE_TOKEN, PAD_ID, save_model, train_tokenizer

    tokenizer = train_tokenizer(caption_corpus(seed), vocab_size=VOCAB_SIZE)
    config = Blip2Config(
        vision_config=VISION, qformer_config=QFORMER,
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, **TEXT),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    init_from_scratch(model, seed)
    return save_model(model, tokenizer, out, IMAGE_SIZE)


#: Standard deviation of a from-scratch weight (ViT's and BLIP-2's Q-Former's).
INIT_STD = 0.02
#: The comparison heads' layout in the ViT's residual stream (:func:`init_comparison_heads`):
#: position code, half sign (+s, -s in the top half, -s, +s in the bottom one: both halves keep the
#: same mean and variance, so layer norm scales their content alike), content and difference.
POSITION_DIMS, HALF_DIMS, CONTENT_DIMS, DIFFERENCE_DIMS = slice(0, 40), (40, 41), slice(64, 128), slice(128, 192)
#: Norm of a patch's position code and size of its half sign, in the raw embedding.
POSITION_NORM, HALF_SIGN = 8.0, 4.0
#: Gain of the comparison heads' query and key weights: at the initial embedding scale, each head
#: gives its chosen patch nearly all of its attention.
COMPARISON_GAIN = 1.5


def init_from_scratch(model, seed: int) -> None:
    """Give a new demo model the starting weights that training from scratch needs.

    transformers initialises a BLIP-2 to be overwritten by pre-trained weights: the ViT's weights
    at standard deviation 1e-10 (its config's default) and the query tokens at zero, identical, so
    that only dropout tells them apart. Here the ViT and the queries start as LAVIS starts a
    Q-Former and timm a ViT (normal, std :data:`INIT_STD`), and the ViT gets comparison heads
    (:func:`init_comparison_heads`).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if name.endswith("weight") and param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        embeddings = model.vision_model.embeddings
        for param in (embeddings.class_embedding, embeddings.position_embedding):
            param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator) * INIT_STD)
    init_comparison_heads(model.vision_model, seed)


def init_comparison_heads(vision_model, seed: int) -> None:
    """Start the ViT's first layer comparing each patch with the same patch of the other half.

    A pair is stacked before above after, so patch (r, c) of the top half and patch (r + rows/2, c)
    show the same place. BLIP2IDC reads its fine-tuned heads doing this comparison (paper section
    2.2); a demo-sized ViT trained from scratch on 2 CPU cores did not learn it (``docs/model-card.md``,
    the probes). So it starts with it, and the recipe keeps it as built (:data:`FROZEN`):

    - the position embedding of patch (r, c) is a random code of (r mod rows/2, c), the same in both
      halves, plus a sign saying which half (:data:`HALF_DIMS`); patches write their content into
      other dimensions;
    - head 0 of layer 0 matches codes and prefers the other half's sign (it attends to the same
      place in the other image); head 1 matches codes and its own sign (it attends to itself);
    - both read the content and write it into a difference subspace, head 0 negated: after layer 0
      that subspace holds (this patch - the same patch of the other image), zero where nothing
      changed.
    """
    import torch

    config = vision_model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    grid = config.image_size // config.patch_size
    rows = grid // 2
    code_dims = POSITION_DIMS.stop - POSITION_DIMS.start
    content = CONTENT_DIMS.stop - CONTENT_DIMS.start
    if hidden < DIFFERENCE_DIMS.stop or heads < 2 or head_dim < max(code_dims + 1, content) or grid % 2:
        raise ValueError(f"comparison heads need hidden size >= {DIFFERENCE_DIMS.stop}, 2 heads of >= {content} "
                         "dimensions and an even number of patch rows")
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(rows * grid, code_dims, generator=generator)
    codes = codes / codes.norm(dim=1, keepdim=True) * POSITION_NORM
    with torch.no_grad():
        embeddings = vision_model.embeddings
        position = torch.zeros_like(embeddings.position_embedding)
        for r in range(grid):
            for c in range(grid):
                token = 1 + r * grid + c
                position[0, token, POSITION_DIMS] = codes[(r % rows) * grid + c]
                sign = HALF_SIGN if r < rows else -HALF_SIGN
                position[0, token, HALF_DIMS[0]], position[0, token, HALF_DIMS[1]] = sign, -sign
        embeddings.position_embedding.copy_(position)
        patch = embeddings.patch_embedding
        outside = torch.ones(hidden, dtype=torch.bool)
        outside[CONTENT_DIMS] = False
        patch.weight[outside] = 0
        patch.bias.zero_()
        attention = vision_model.encoder.layers[0].self_attn
        qkv, projection = attention.qkv.weight, attention.projection.weight
        for head, (half_sign, out_sign) in enumerate(((-1.0, -1.0), (1.0, 1.0))):
            q, k, v = head * head_dim, hidden + head * head_dim, 2 * hidden + head * head_dim
            for start in (q, k, v):
                qkv[start:start + head_dim] = 0
            for j in range(code_dims):
                qkv[q + j, POSITION_DIMS.start + j] = COMPARISON_GAIN
                qkv[k + j, POSITION_DIMS.start + j] = COMPARISON_GAIN
            qkv[q + code_dims, HALF_DIMS[0]] = COMPARISON_GAIN
            qkv[k + code_dims, HALF_DIMS[0]] = half_sign * COMPARISON_GAIN
            projection[:, head * head_dim:(head + 1) * head_dim] = 0
            for j in range(content):
                qkv[v + j, CONTENT_DIMS.start + j] = 1.0
                projection[DIFFERENCE_DIMS.start + j, head * head_dim + j] = out_sign
        if attention.qkv.bias is not None:
            attention.qkv.bias.zero_()
        attention.projection.bias.zero_()


#: Why stage 1 replays language: with a decoder trained on scene captions only, LoRA on q/k/v could
#: not teach it the change captions' language; a decoder that knows the language only has to be
#: connected to what changed, as OPT is. Pre-training the decoder on the captions and then freezing
#: it (as BLIP-2 does), or fine-tuning it with the vision side, both stalled; replay from scratch
#: learns both at once. The losses behind this: ``docs/model-card.md``.
#: Share of stage 1's examples that are language replay (see :class:`SceneSource`).
REPLAY = 0.2
#: Why stage 1 compares: the first demo model (stage 1 on single scenes, then stacked scenes
#: captioned by each half's contents, then LoRA) saw what was in a picture but did not compare its
#: halves: it never said "added" nor "nothing changed" (``docs/model-card.md``). Half of stage 1's
#: examples are pairs captioned by their differences, so that every weight learns to compare. With
#: transformers' initialisation this alone did not work in a 2-core budget; with comparison heads
#: in the ViT's first layer (:func:`init_comparison_heads`) it does (the model card's figures).
#: Single scenes (the rest) are kept few: their halves are not two pictures of one place, so what
#: the comparison heads write for them is noise that training learns to silence.
COMPARED = 0.7
#: The comparison heads and what they rely on, kept as built in both stages: the position and class
#: embeddings, the whole first layer, and the patch embedding's rows outside :data:`CONTENT_DIMS`
#: (zero: patches write their content there alone, so the difference subspace stays exactly zero
#: where nothing changed). Trained freely, the model lost the comparison: a probe of the ViT's output
#: told unchanged pairs from changed ones in 63% of them at the start and in 3% after training, and
#: with the first layer's attention alone frozen, in 3% after 500 steps (``docs/model-card.md``).
FROZEN = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
          "vision_model.encoder.layers.0",
          *(f"vision_model.embeddings.patch_embedding.{p}[{a}:{b}]" for p in ("weight", "bias")
            for a, b in ((0, CONTENT_DIMS.start), (CONTENT_DIMS.stop, VISION["hidden_size"]))))
#: Stage settings. Stage 1 trains from scratch, so it uses a from-scratch learning rate.
#: Stage 2's learning rate is not seed Table 3's 1e-4 (for rank 32): that rate is for a 3.7 B model
#: with a pre-trained vision side, trained for epochs on a GPU; a short probe of learning rates
#: (``docs/model-card.md``) chose 1e-3.
STAGE1 = dict(mode="full", lr=5e-4, batch_size=32, max_steps=4000, val_every=500, patience=4, warmup_steps=200,
              schedule="cosine", max_caption_tokens=72, frozen=FROZEN)
STAGE2 = dict(mode="lora", rank=32, lr=1e-3, batch_size=32, max_steps=1500, val_every=250, patience=4, warmup_steps=50,
              schedule="cosine", frozen=FROZEN)
VAL_EXAMPLES = 256


def train_stage(model_dir: Path, out: Path, source, val_source, seed: int, **settings) -> dict:
    """Run (or resume) one training stage; skipped when ``out/done.json`` says it finished."""
    import json

    from tqdm import tqdm

    from idc_lite.tools.training import Trainer, TrainSettings, validation_batches

    done = out / "done.json"
    if done.is_file():
        logger.info("%s: already trained", out.name)
        return json.loads(done.read_text())
    trainer_settings = TrainSettings(seed=seed, **settings)
    val = validation_batches(val_source, VAL_EXAMPLES, trainer_settings.batch_size)
    bar = tqdm(total=trainer_settings.max_steps, desc=out.name, file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(step, total, record):
        bar.n = step
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "step"}, refresh=True)
        if "val_loss" in record:
            logger.info("%s step %d: loss %.4f, validation loss %.4f", out.name, step, record["loss"], record["val_loss"])

    trainer = Trainer(model_dir, out, trainer_settings, source, val, progress=progress)
    bar.n = trainer.step
    summary = trainer.run()
    bar.close()
    summary["history"] = trainer.history
    done.write_text(json.dumps(summary, indent=1))
    return summary


def build_demo(out: Path, seed: int = 0, artifact: Path | None = None) -> Path:
    """Run every stage of the recipe into ``out``; returns the artifact directory."""
    from idc_lite.settings import ProcessorSettings

    from .build import build_artifact, require_export_extra

    require_export_extra()

    base = out / "base"
    if not (base / "config.json").is_file():
        logger.info("building the demo base model and its tokenizer")
        build_base(base, seed)
    processor = ProcessorSettings.from_model_dir(base)
    train_stage(base, out / "stage1", SceneSource("train", seed, processor, REPLAY, COMPARED),
                SceneSource("val", seed, processor, REPLAY, COMPARED), seed, **STAGE1)
    base_model = out / "stage1" / "best"
    train_stage(base_model, out / "stage2", PairSource("train", seed, processor, categories=TRAIN_CATEGORIES),
                PairSource("val", seed, processor), seed, **STAGE2)
    artifact = artifact or out / "artifact"
    # The artifact carries its reference (fp16 base and adapter, 16 MB) so that lite-versus-reference
    # parity runs offline anywhere, and names its provenance by recipe and seed, not by this machine's paths.
    return build_artifact(base_model, artifact, out / "stage2" / "best", name="idc-lite-demo", force=True,
                          ship_reference=True, provenance={"recipe": "demo", "seed": seed})
