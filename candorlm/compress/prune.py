"""`candor prune`: zero a share of the blocks' linear weights, by magnitude or by Wanda, unstructured
or N:M semi-structured (2:4: two of every four consecutive inputs kept), with an optional
recovery fine-tune (compress/recover.py), into a new model directory.

Magnitude (the baseline of Sun et al. 2023): the smallest |W| of each layer, compared over
the whole layer. Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"):
score |W_ij| * ||X_j||_2, X_j the j-th input feature over the calibration tokens, compared
within each output row; as in the paper's code, block by block, each block's inputs coming
from the blocks before it already pruned. N:M: the comparison group is each run of M inputs
of a row, for either score. Each group loses exactly round(sparsity * size) weights.

The pruned directory is a plain model directory (dense float32 with zeros: nothing here makes
it faster or smaller; no sparse kernel is used); config.json records the method and the
sparsity achieved per matrix. Embedding, head and norms are not pruned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from candorlm.compress.calibration import CALIBRATION_SEQ_LEN, calibration_batch
from candorlm.compress.quantize import read_config_json
from candorlm.config import TrainConfig
from candorlm.errors import CandorError
from candorlm.export.check import check_out_path
from candorlm.fileio import atomic_dir, atomic_write_json
from candorlm.model.io import load_model, write_model_files
from candorlm.model.quantized import hidden_linears

METHODS = ("magnitude", "wanda")
DEFAULT_SPARSITY = 0.5
DEFAULT_CALIBRATION_TOKENS = 16384  # 128 sequences of 128; the paper uses 128 x 2048 and finds few suffice


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" (keep N of every M consecutive inputs) -> (N, M); None for unstructured."""
    if pattern is None:
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise CandorError(f"--pattern {pattern!r} must be N:M with 0 < N < M (keep N of every M inputs), e.g. 2:4")
    return int(m.group(1)), int(m.group(2))


def check_prune_args(method: str, sparsity: float | None, pattern: str | None) -> tuple[float, tuple[int, int] | None]:
    if method not in METHODS:
        raise CandorError(f"--method {method!r} is not a pruning method: use one of {', '.join(METHODS)}")
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise CandorError(f"--sparsity {sparsity} contradicts --pattern {pattern} (which zeroes {implied:g}); "
                              "leave --sparsity out")
        return implied, nm
    sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
    if not 0 <= sparsity < 1:
        raise CandorError(f"--sparsity {sparsity} must be in [0, 1) (the share of weights zeroed)")
    return float(sparsity), None


def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """True where a weight stays: the lowest scores of each comparison group are dropped."""
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise CandorError(f"--pattern {n}:{m} needs the input size to be a multiple of {m}; a layer has {in_f}")
        groups = score.reshape(out_f, in_f // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(out_f, in_f)
    flat = score.reshape(out_f, in_f) if per_row else score.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(out_f, in_f)


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, nm) -> dict[str, torch.Tensor]:
    return {name: keep_mask(lin.weight.abs(), sparsity, nm, per_row=False) for name, lin in hidden_linears(model)}


@torch.no_grad()
def wanda_masks(model: nn.Module, calib: torch.Tensor, sparsity: float, nm) -> dict[str, torch.Tensor]:
    """Wanda's masks, applied to the model as they are made. One forward over the whole
    calibration batch (the loss, so the head stays chunked): each linear's input sums of
    squares are gathered while its block runs dense; when the block ends, its linears are
    pruned and it runs again, so the next block sees a pruned block's output."""
    linears = dict(hidden_linears(model))
    sumsq = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    masks: dict[str, torch.Tensor] = {}
    rerun = [False]

    def gather(name):
        def hook(mod, args):
            if not rerun[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sumsq[name] += x.square().sum(0)
        return hook

    def prune_block(i):
        def hook(block, args, kwargs, output):
            if rerun[0]:
                return None
            for name, lin in linears.items():
                if name.startswith(f"layers.{i}."):
                    score = lin.weight.abs() * sumsq[name].sqrt().to(lin.weight.dtype)[None, :]
                    masks[name] = keep_mask(score, sparsity, nm, per_row=True)
                    lin.weight.mul_(masks[name])
            rerun[0] = True
            try:
                return block(*args, **kwargs)
            finally:
                rerun[0] = False
        return hook

    handles = [lin.register_forward_pre_hook(gather(name)) for name, lin in linears.items()]
    handles += [b.register_forward_hook(prune_block(i), with_kwargs=True) for i, b in enumerate(model.layers)]
    try:
        model(calib[:, :-1], calib[:, 1:])
    finally:
        for h in handles:
            h.remove()
    return masks


def achieved_sparsity(model: nn.Module) -> dict[str, float]:
    """The share of exact zeros in each pruned matrix, as it is now."""
    return {name: float((lin.weight == 0).sum()) / lin.weight.numel() for name, lin in hidden_linears(model)}


def report_windows(model_dir: str | Path, max_seq_len: int, eval_tokens: int | None) -> tuple[int, int]:
    """(seq_len, max_tokens) of the windows whose figures calibration must not see: the run's
    own evaluation (train_state/run_config.json) unless eval_tokens is given."""
    p = Path(model_dir) / "train_state" / "run_config.json"
    run = json.loads(p.read_text()).get("train", {}) if p.is_file() else {}
    seq_len = min(int(run.get("seq_len", max_seq_len)), max_seq_len)
    tokens = eval_tokens if eval_tokens is not None else int(run.get("eval_tokens", TrainConfig.eval_tokens))
    if tokens < 1:
        raise CandorError(f"--eval-tokens {tokens} must be >= 1")
    return seq_len, tokens


def prune_model(model_dir: str | Path, out_dir: str | Path, method: str, sparsity: float | None = None,
                pattern: str | None = None, tokens_dir: str | Path | None = None,
                calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS, eval_tokens: int | None = None,
                recover_steps: int = 0, recover_lr: float | None = None, seed: int = 0,
                log=lambda *a: None) -> dict:
    """Prune model_dir into out_dir (atomically); returns the "pruning" record of its config.json.

    tokens_dir: the run's token shards, needed by Wanda (calibration from val.bin) and by the
    recovery (train.bin). eval_tokens: the reporting budget calibration avoids (default: the
    run's train.eval_tokens)."""
    from candorlm.compress import recover as rec

    sparsity, nm = check_prune_args(method, sparsity, pattern)
    if recover_steps < 0:
        raise CandorError(f"--recover-steps {recover_steps} must be >= 0")
    if tokens_dir is None and (method == "wanda" or recover_steps):
        raise CandorError("--tokens DIR (the run's token shards) is needed for "
                          + ("wanda's calibration" if method == "wanda" else "--recover-steps"))
    src = read_config_json(model_dir)
    if "quantization" in src:
        raise CandorError(f"{model_dir} is quantized; prune the float model, then quantize the pruned one")
    out = check_out_path(out_dir, model_dir, "dir")
    model = load_model(model_dir)
    record = {"method": method, "sparsity": sparsity, "pattern": pattern and f"{nm[0]}:{nm[1]}",
              "comparison": "per output row" if method == "wanda" else "per layer"}
    if nm is not None:
        record["comparison"] = f"each {nm[1]} consecutive inputs of a row"
    if tokens_dir is not None:
        val = rec.check_tokens(tokens_dir, model_dir, "val")
    if method == "wanda":
        seq_len, budget = report_windows(model_dir, model.cfg.max_seq_len, eval_tokens)
        cal_len = min(CALIBRATION_SEQ_LEN, seq_len // 2, model.cfg.max_seq_len)
        if calibration_tokens < 1:
            raise CandorError(f"--calibration-tokens {calibration_tokens} must be >= 1")
        n_seqs = -(-calibration_tokens // cal_len)
        calib = torch.from_numpy(calibration_batch(val, n_seqs, cal_len + 1, seq_len, budget))
        log(f"wanda: {calib.shape[0]} calibration sequences of {cal_len} tokens from {tokens_dir}/val.bin, "
            f"outside the {budget:,}-token reporting windows (seq_len {seq_len})")
        masks = wanda_masks(model, calib, sparsity, nm)
        record["calibration"] = {"split": "val", "sequences": calib.shape[0], "seq_len": cal_len,
                                 "avoids": {"seq_len": seq_len, "eval_tokens": budget}}
    else:
        masks = magnitude_masks(model, sparsity, nm)
        with torch.no_grad():
            for name, lin in hidden_linears(model):
                lin.weight.mul_(masks[name])
    if recover_steps:
        losses = rec.recover(model, masks, tokens_dir, recover_steps, lr=recover_lr, seed=seed, log=log)
        record["recovery"] = {"steps": recover_steps, "lr": recover_lr or rec.DEFAULT_LR, "first_loss": losses[0],
                              "last_loss": losses[-1]}
    per_layer = achieved_sparsity(model)
    total = sum(lin.weight.numel() for _, lin in hidden_linears(model))
    record["achieved"] = per_layer
    record["achieved_overall"] = sum(per_layer[n] * lin.weight.numel() for n, lin in hidden_linears(model)) / total
    gpath = Path(model_dir) / "generation_config.json"
    gen = json.loads(gpath.read_text()) if gpath.is_file() else None
    with atomic_dir(out) as d:
        write_model_files(d, model, model_dir, generation=gen)
        atomic_write_json(d / "config.json", {**src, "model": json.loads((d / "config.json").read_text())["model"],
                                              "pruning": record})
    return record


def format_sparsity(record: dict) -> str:
    """The achieved sparsity per matrix as printable lines."""
    lines = [f"  {name:32s} {s:.4f}" for name, s in record["achieved"].items()]
    return "\n".join(lines + [f"  {'overall':32s} {record['achieved_overall']:.4f}"])

