"""LoRA (Hu et al. 2021) on a candorlm Transformer through `peft`: wrap the model's linear
layers with low-rank adapters, train only those, save the adapters alone in peft's format,
and merge them into a plain model directory. No training loop here.

Adapters go on the attention and MLP projections, by module name. Not on the output head:
the default model ties it to the token embedding (model.tie_embeddings), and an adapter on
one of the two would untie them when merged, giving a model whose files no longer say what
it computes. With the head and embedding frozen, a merged model keeps the tie, and
model/io.py writes it as it writes a pretrained one.

The adapters hold r(d_in + d_out) parameters per adapted matrix, ~2r/d of a d x d one. At
rank 8 that is 2.9% of cpu-tiny's parameters (d 256, vocab 8192), 2.0% of cpu-small's, and
3.0% of the micro test model's (d 64, vocab 8192; 12.9% with a 512-token vocabulary, where
the embedding no longer dominates).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn

from candorlm import config
from candorlm.errors import CandorError
from candorlm.fileio import atomic_dir

LORA_TARGETS = tuple(config.LORA_TARGETS)  # the sft.lora_targets and dpo.lora_targets default
# rank 8 with alpha 2r: the LoRA paper found r as low as 4-8 enough on GPT-3's attention
# matrices; alpha/r = 2 is the ratio trl's and peft's examples use. dropout 0: the adapters
# of a small model on a few thousand examples overfit less than they underfit.
RANK, ALPHA, DROPOUT = 8, 16.0, 0.0


def _check(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    for t in targets:
        if t in ("lm_head", "embed") and tied:
            raise CandorError(f"lora target {t!r}: the output head is tied to the embedding in this model; "
                              f"adapt the projections instead ({', '.join(LORA_TARGETS)})")
    present = [t for t in targets if t in linear]
    if not present:
        raise CandorError(f"lora targets {list(targets)} match none of the model's linear layers "
                          f"({', '.join(sorted(linear))})")
    return present


def apply_lora(model: nn.Module, rank: int = RANK, alpha: float = ALPHA, dropout: float = DROPOUT,
               targets: tuple[str, ...] = LORA_TARGETS):
    """The model wrapped in a peft `PeftModel` with adapters on `targets` (those the model has:
    a ReLU² or GELU MLP has no gate_proj); every other parameter is frozen. This changes
    `model` in place (peft swaps its modules), so copy it first to keep the plain one. The
    wrapped model takes the same arguments (model(x, y) gives the loss); inside
    `peft_model.disable_adapter()` it is the base model again (DPO's reference)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise CandorError(f"lora rank={rank} (>= 1), alpha={alpha} (> 0), dropout={dropout} (in [0, 1)): out of range")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=_check(model, tuple(targets)),
                     bias="none")
    return get_peft_model(model, cfg)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; the tied head counts once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(peft_model, directory: str | Path, base_model: str | Path | None = None) -> None:
    """The adapters alone, in peft's format (adapter_config.json, adapter_model.safetensors),
    written whole or not at all; `PeftModel.from_pretrained` or `load_adapter` reads them.
    base_model: the model directory they adapt, recorded as base_model_name_or_path."""
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = str(base_model) if base_model is not None else cfg.base_model_name_or_path
    with atomic_dir(directory) as tmp:
        # save_embedding_layers=False: the embedding is never adapted here, and "auto" would look
        # base_model up on the Hugging Face Hub when it is not a local directory.
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False):
    """`model` (a candorlm Transformer, changed in place) with the adapters saved in `directory`."""
    from peft import PeftModel

    d = Path(directory)
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise CandorError(f"{d} holds no LoRA adapter (expected adapter_config.json and adapter_model.safetensors)")
    return PeftModel.from_pretrained(model, str(d), is_trainable=trainable)


def merged_model(peft_model) -> nn.Module:
    """A plain candorlm Transformer with W + (alpha / r) B A folded into each adapted weight.
    The wrapped model is left as it was (merging works on a copy, so it briefly takes twice
    the memory), so training can go on after a save."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if merged.cfg.tie_embeddings and merged.lm_head.weight is not merged.embed.weight:
        raise CandorError("merging the adapters untied the output head from the embedding")
    return merged.eval()


def save_merged(peft_model, out_dir: str | Path, tokenizer_dir: str | Path | None,
                generation: dict | None = None) -> Path:
    """Write the merged model as a model directory (config.json, model.safetensors, tokenizer
    files, generation_config.json), whole or not at all; every command reads it as it reads
    a pretrained one."""
    from candorlm.model.io import write_model_files

    merged = merged_model(peft_model)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, merged, tokenizer_dir, generation=generation)
    return Path(out_dir)
