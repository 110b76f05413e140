"""Training: BLIP2IDC's LoRA fine-tuning (and full training, for small models built from scratch).

LoRA follows the BLIP2IDC recipe (DESIGN.md §1): targets = ViT ``qkv``, Q-Former cross-attention
``query`` and every ``key``/``value``, OPT ``q_proj``/``k_proj``/``v_proj``; ``lora_alpha = 2r``;
dropout 0.05; no bias; AdamW; learning rate by seed Table 3 (5e-5 for r <= 16, 1e-4 for r = 32);
batch 32. Validation loss is computed every ``val_every`` steps; the best checkpoint by validation
loss is kept and training stops early after ``patience`` validations without improvement.

The caption loss is BLIP-2's: the language model sees the query embeddings, BOS and the caption, and
is trained to predict the caption tokens and EOS. Query and BOS positions and padding are excluded
from the loss (label -100).

Everything needed to resume (trainable weights, optimizer state, step, RNG states, best loss) is
saved in ``OUT/checkpoint`` at every validation; running the same command again resumes from there.
Examples come from *sources*: a JSONL dataset of pairs (:class:`RecordSource`), or, for the demo
model, the synthetic world generated on the fly (see :mod:`idc_lite.demo`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..adapters import BLIP2IDC_TARGET_MODULES
from ..errors import IdcError
from ..results_io import readable_by_umask

logger = logging.getLogger("idc_lite")


def table3_lr(rank: int) -> float:
    """Seed Table 3: lr 5e-5 with rank 8 (CLEVR, Emu, Syned), 1e-4 with rank 32 (STD, IER)."""
    return 1e-4 if rank >= 32 else 5e-5


@dataclass(frozen=True)
class TrainSettings:
    mode: str = "lora"  # "lora": BLIP2IDC's LoRA; "full": every weight (for models trained from scratch)
    rank: int = 8
    lr: float | None = None  # None: seed Table 3 for LoRA, 1e-4 for full training
    batch_size: int = 32
    max_steps: int = 2000
    val_every: int = 100
    patience: int = 5
    warmup_steps: int = 50
    schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to 0 at max_steps
    weight_decay: float = 0.01
    max_caption_tokens: int = 40
    seed: int = 0
    #: Weights kept as they are, named by parameter or module prefix ("vision_model.encoder.layers.0.self_attn"):
    #: not trained in full mode, and given no LoRA in LoRA mode; or rows of one parameter
    #: ("vision_model.embeddings.patch_embedding.weight[0:64]"), restored after every step in full mode.
    #: For structure built into a model by hand (the demo's comparison heads), which training would
    #: otherwise wear away.
    frozen: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"mode must be lora or full, not {self.mode!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if self.rank < 1 or self.batch_size < 1 or self.max_steps < 1 or self.val_every < 1:
            raise ValueError("rank, batch_size, max_steps and val_every must be at least 1")
        object.__setattr__(self, "frozen", tuple(self.frozen))

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return table3_lr(self.rank) if self.mode == "lora" else 1e-4


def learning_rate_at(settings: TrainSettings, step: int) -> float:
    """The learning rate of (0-based) ``step``: linear warm-up, then constant or cosine decay to 0."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return settings.learning_rate
    done = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class Source(Protocol):
    """An endless, indexable stream of examples: ``examples(start, stop)`` -> (pixels (N, 3, H, W), captions).

    Example ``i`` is always the same, so a resumed run sees exactly the data it would have seen.
    """

    def examples(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]: ...


class RecordSource:
    """The pairs of a dataset, epoch after epoch.

    For training (``shuffle=True``) each epoch has its own seeded order and each use of a pair draws
    one of its references; for validation (``shuffle=False``) pairs come in file order with their
    first reference, so the validation loss of every run is comparable.
    """

    def __init__(self, records, composition, processor, seed: int = 0, shuffle: bool = True):
        if not records:
            raise IdcError(None, "the dataset is empty")
        self.records, self.composition, self.processor = list(records), composition, processor
        self.seed, self.shuffle = seed, shuffle

    def examples(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        from ..compose import compose_pair

        n = len(self.records)
        pixels, captions = [], []
        for position in range(start, stop):
            epoch, index = divmod(position, n)
            if self.shuffle:
                index = int(np.random.default_rng([self.seed, epoch]).permutation(n)[index])
            record = self.records[index]
            pick = np.random.default_rng([self.seed, epoch, index]).integers(len(record.references)) if self.shuffle else 0
            pixels.append(compose_pair(record.before, record.after, self.composition, self.processor))
            captions.append(record.references[int(pick)])
        return np.stack(pixels), captions


def validation_batches(source: Source, n: int, batch_size: int) -> list[tuple[np.ndarray, list[str]]]:
    """The first ``n`` examples of ``source`` in batches, computed once."""
    return [source.examples(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


class CaptionBatcher:
    """Captions -> input ids, attention mask and labels for ``Blip2ForConditionalGeneration``."""

    def __init__(self, tokenizer, tokens, max_caption_tokens: int):
        self.tokenizer, self.tokens, self.max_tokens = tokenizer, tokens, max_caption_tokens

    def __call__(self, captions: list[str]):
        import torch

        t = self.tokens
        rows = []
        for caption in captions:
            ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.max_tokens]
            rows.append(ids + [t.eos_token_ids[0]])
        width = max(map(len, rows))
        prefix = [t.image_token_id] * t.num_query_tokens + [t.bos_token_id]
        input_ids = torch.full((len(rows), len(prefix) + width), t.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            end = len(prefix) + len(row)
            input_ids[i, :end] = torch.tensor(prefix + row)
            labels[i, len(prefix):end] = torch.tensor(row)
            mask[i, :end] = 1
        return input_ids, mask, labels


def _resumable(settings: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (it may run longer or be more patient)."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in ("max_steps", "patience")}))


def _split_frozen(frozen: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, list[slice]]]:
    """``frozen`` as (prefixes, {parameter: [row slices]})."""
    import re

    prefixes, rows = [], {}
    for item in frozen:
        match = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", item)
        if match:
            rows.setdefault(match[1], []).append(slice(int(match[2]), int(match[3])))
        else:
            prefixes.append(item)
    return tuple(prefixes), rows


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the parameter or module ``name`` is one of ``prefixes`` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def lora_config(rank: int, num_qformer_layers: int, exclude: list[str] | None = None):
    """BLIP2IDC's LoRA config for a model whose Q-Former has ``num_qformer_layers`` layers.

    ``exclude``: full module names that get no LoRA (see :attr:`TrainSettings.frozen`).
    """
    from peft import LoraConfig

    targets = [t for t in BLIP2IDC_TARGET_MODULES if "crossattention" not in t]
    targets += [f"qformer.encoder.layer.{i}.crossattention.attention.query" for i in range(max(12, num_qformer_layers))]
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, bias="none", target_modules=targets,
                      exclude_modules=exclude or None)


class Trainer:
    """Train ``model_dir`` on ``train`` (a :class:`Source`), validating on ``val`` batches; write to ``out``."""

    def __init__(self, model_dir: Path, out: Path, settings: TrainSettings, train: Source, val,
                 progress: Callable[[int, int, dict], None] | None = None):
        import torch
        from transformers import Blip2ForConditionalGeneration

        from ..tokenizer import load_tokenizer
        from ..decoding import token_settings
        from ..loading import check_blip2_dir
        from ..runtime import quiet_libraries

        quiet_libraries()
        self.model_dir, self.out, self.settings, self.train, self.val = Path(model_dir), Path(out), settings, train, val
        self.progress = progress
        config = check_blip2_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.batcher = CaptionBatcher(self.tokenizer, token_settings(config), settings.max_caption_tokens)
        torch.manual_seed(settings.seed)
        net = Blip2ForConditionalGeneration.from_pretrained(self.model_dir, dtype=torch.float32)
        prefixes, rows = _split_frozen(settings.frozen)
        params = dict(net.named_parameters())
        for item in settings.frozen:  # a prefix names parameters or modules; rows, one parameter
            found = any(_under(n, (item,)) for n in params) if item in prefixes else item.split("[")[0] in params
            if not found:
                raise IdcError(self.model_dir, f"has no weights named {item} to keep frozen")
        self._pinned = []  # (parameter, rows, their values): restored after every step
        if settings.mode == "lora":
            from peft import get_peft_model

            exclude = [n for n, _ in net.named_modules() if n and _under(n, prefixes)]
            net = get_peft_model(net, lora_config(settings.rank, net.config.qformer_config.num_hidden_layers, exclude))
        else:
            for name, param in net.named_parameters():
                param.requires_grad_(not _under(name, prefixes))
            self._pinned = [(params[name], part, params[name].detach()[part].clone())
                            for name, parts in rows.items() for part in parts if params[name].requires_grad]
        self.net = net
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.step, self.best, self.stale, self.history = 0, math.inf, 0, []
        self._resume_if_possible()

    # -- state ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def _trainable_state(self) -> dict:
        return {n: p.detach().contiguous() for n, p in self.net.named_parameters() if p.requires_grad}

    def _save_checkpoint(self) -> None:
        import torch
        from safetensors.torch import save_file

        self.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="checkpoint.tmp-", dir=self.out))  # unpredictable, made by us
        save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({
            "step": self.step, "best": self.best, "stale": self.stale, "history": self.history,
            "settings": asdict(self.settings), "model": str(self.model_dir),
        }, indent=1))
        readable_by_umask(tmp)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        os.replace(tmp, self.checkpoint_dir)

    def _resume_if_possible(self) -> None:
        import torch
        from safetensors.torch import load_file

        state_path = self.checkpoint_dir / "state.json"
        if not state_path.is_file():
            return
        state = json.loads(state_path.read_text())
        if _resumable(state["settings"]) != _resumable(asdict(self.settings)) or state["model"] != str(self.model_dir):
            raise IdcError(self.out, "holds a checkpoint of another training run (different model or settings); "
                           "use another output folder, or delete its checkpoint to start over")
        weights = load_file(str(self.checkpoint_dir / "trainable.safetensors"))
        if self.net.load_state_dict(weights, strict=False).unexpected_keys:
            raise IdcError(self.checkpoint_dir, "checkpoint weights do not fit the model")
        extra = torch.load(self.checkpoint_dir / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
        self.step, self.best, self.stale, self.history = state["step"], state["best"], state["stale"], state["history"]
        logger.info("resumed from step %d (best validation loss %.4f)", self.step, self.best)

    # -- loop ----------------------------------------------------------------------------------
    def _loss(self, pixels, captions):
        import torch

        input_ids, mask, labels = self.batcher(captions)
        return self.net(pixel_values=torch.from_numpy(pixels), input_ids=input_ids, attention_mask=mask,
                        labels=labels).loss

    def validate(self) -> float:
        import torch

        self.net.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for pixels, captions in self.val:
                total += float(self._loss(pixels, captions)) * len(captions)
                count += len(captions)
        self.net.train()
        return total / count

    def _lr(self) -> float:
        return learning_rate_at(self.settings, self.step)

    def run(self) -> dict:
        """Train until ``max_steps`` or early stopping; returns the run's summary."""
        import torch

        s = self.settings
        self.net.train()
        started, last_loss = time.perf_counter(), math.nan
        while self.step < s.max_steps and self.stale < s.patience:
            pixels, captions = self.train.examples(self.step * s.batch_size, (self.step + 1) * s.batch_size)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            loss = self._loss(pixels, captions)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            with torch.no_grad():
                for param, part, values in self._pinned:
                    param[part] = values
            self.step += 1
            last_loss = loss.item()
            record = {"step": self.step, "loss": last_loss}
            if self.step % s.val_every == 0 or self.step == s.max_steps:
                record["val_loss"] = self.validate()
                if record["val_loss"] < self.best:
                    self.best, self.stale = record["val_loss"], 0
                    self._save_best()
                else:
                    self.stale += 1
                self.history.append(record)
                self._save_checkpoint()
            if self.progress:
                self.progress(self.step, s.max_steps, record)
        stopped = "early stopping" if self.stale >= s.patience else "max steps"
        return {"steps": self.step, "best_val_loss": self.best, "stopped": stopped, "best": str(self.out / "best"),
                "seconds": time.perf_counter() - started, "last_loss": last_loss}

    def _save_best(self) -> None:
        """The best model so far: a PEFT adapter (LoRA) or a full model directory, written atomically."""
        from .modelgen import save_model

        self.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="best.tmp-", dir=self.out))  # unpredictable, made by us
        if self.settings.mode == "lora":
            self.net.save_pretrained(tmp)
            config = json.loads((tmp / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(self.model_dir)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        else:
            from ..settings import ProcessorSettings

            save_model(self.net, self.tokenizer, tmp, ProcessorSettings.from_model_dir(self.model_dir).height)
        readable_by_umask(tmp)
        shutil.rmtree(self.out / "best", ignore_errors=True)
        os.replace(tmp, self.out / "best")
