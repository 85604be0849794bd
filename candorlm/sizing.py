"""The model sized to the compute a run will get (preset `auto`): depth, width, heads, vocabulary
and batch derived from the FLOPs its time budget buys on this machine.

C = train.time_budget_s x the measured matmul rate in the training precision x EXPECTED_MFU.
A compute-optimal rule calibrated on this project's machines (bench/sizing.py, docs/benchmarks.md
"Sizing") turns C into a shape: the vocabulary follows the depth (the tied head's share of the
FLOPs per token), the depth is the one whose tokens per parameter come nearest TOKENS_PER_PARAM,
the batch keeps the run at least MIN_STEPS steps long. Every value a `--set` gives is kept and the
rest derived around it; `--preset cpu-tiny` and the others are fixed shapes.

The decision is a record (`sizing.json` in the run, and in the run config stored with every
checkpoint): the measurement, the inputs, the chosen values and why. A rerun or `--resume` reads
the recorded measurement instead of measuring again, so it derives the same shape. This module
does not train, tokenize or read data; it measures once (candorlm/device.py) and decides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

from candorlm.config import ModelConfig, shape_for_depth
from candorlm.errors import CandorError

# The settings the rule derives; any of them given by `--set` (or fixed by an existing tokenizer)
# is kept as given and the others are chosen around it.
DERIVED = ("model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "tokenizer.vocab_size",
           "train.batch_size")

# --- the rule's constants (bench/sizing.py; docs/benchmarks.md "Sizing"; 2 Zen4 cores, AVX512-BF16) ---
# cpu-tiny's compiled step reaches 57-66% of the measured matmul rate (bf16 `make demo`, fp32 `time`).
EXPECTED_MFU = 0.6
# The best tokens per parameter (all of them counted) fitted at two budgets of fixed-step runs of
# five shapes: 2.59 at 229 cpu-tiny steps, 2.99 at 513; geometric mean 2.78.
TOKENS_PER_PARAM = 2.8
PARAMS_COUNTED = "total"  # total | non_embedding | compute
HEAD_SHARE = (0.2, 0.4)
VOCABS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEPTHS = range(1, 33)
BATCHES = (8, 16, 32)
MIN_STEPS = 0
RECORD = "sizing.json"


def kv_heads_for(n_heads: int) -> int:
    """Keys and values shared by at least two query heads (GQA), as cpu-tiny's 4/2: the largest
    divisor of n_heads that is at most half of it (1 head: 1)."""
    return max(k for k in range(1, n_heads + 1) if n_heads % k == 0 and (2 * k <= n_heads or n_heads == 1))


def shape_costs(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """FLOPs per training token and parameter counts of a model config, without building it:
    the same figures as Transformer.flops_per_token and num_params (tests/test_sizing.py)."""
    m = m.resolved()
    hd, d = m.head_dim, m.d_model
    attn_w = d * hd * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o and k, v projections
    mlp_w = (3 if m.mlp == "swiglu" else 2) * d * m.d_ff
    norms = 2 * d + (2 * hd if m.qk_norm else 0)  # per layer; LayerNorm adds no bias here
    layer = attn_w + mlp_w
    embed = m.vocab_size * d
    head = 0 if m.tie_embeddings else m.vocab_size * d
    pos = m.max_seq_len * d if m.pos_encoding == "learned" else 0
    total = m.n_layers * (layer + norms) + d + embed + head + pos
    if m.norm == "layernorm":
        total += m.n_layers * 2 * d + d  # LayerNorm's biases
    windows = m.layer_windows()
    attn = sum(12 * m.n_heads * hd * (min(w, seq_len) if w else seq_len) / (1 if w else 2) for w in windows)
    matmul = m.n_layers * layer + m.vocab_size * d  # the head (tied or not) is a matmul per token
    return {"flops_per_token": 6 * matmul + attn, "params": total,
            "params_non_embedding": total - embed - pos, "params_compute": matmul}


def counted_params(costs: dict[str, float], which: str = PARAMS_COUNTED) -> float:
    return costs[{"total": "params", "non_embedding": "params_non_embedding", "compute": "params_compute"}[which]]


def model_for(depth: int, vocab: int, base: ModelConfig, given: dict) -> ModelConfig:
    """base with the depth rule's shape at `depth` and `vocab`; values in `given` win."""
    shape = shape_for_depth(depth)
    heads = given.get("model.n_heads", shape["model.n_heads"])
    values = {**shape, "model.n_kv_heads": kv_heads_for(heads), "model.vocab_size": vocab}
    values.update({k: v for k, v in given.items() if k.startswith("model.")})
    return dataclasses.replace(base, **{k.split(".")[1]: v for k, v in values.items()})


def head_share(m: ModelConfig, seq_len: int) -> float:
    """The tied head's share of the training FLOPs per token."""
    return 6 * m.vocab_size * m.d_model / shape_costs(m, seq_len)["flops_per_token"]


def rungs(base: ModelConfig, seq_len: int, given: dict) -> list[tuple[int, int, ModelConfig]]:
    """The shapes the rule chooses among, (depth, vocabulary, model), smallest first: at each depth
    the vocabularies whose head takes HEAD_SHARE of the FLOPs per token (the one nearest the range
    where none falls in it). Along the list depth, vocabulary and parameters never decrease, so a
    larger budget never picks a smaller model. Values in `given` narrow it."""
    depths = [given["model.n_layers"]] if "model.n_layers" in given else list(DEPTHS)
    vocabs = [given["tokenizer.vocab_size"]] if "tokenizer.vocab_size" in given else list(VOCABS)
    lo, hi = HEAD_SHARE
    out = []
    for depth in depths:
        ms = [(v, model_for(depth, v, base, given)) for v in vocabs]
        inside = [(v, m) for v, m in ms if lo <= head_share(m, seq_len) <= hi]
        if not inside:  # the vocabulary nearest the range, on a log scale
            inside = [min(ms, key=lambda vm: abs(math.log(head_share(vm[1], seq_len) / math.sqrt(lo * hi))))]
        out += [(depth, v, m) for v, m in inside]
    chain = []  # by size; a rung with a smaller depth or vocabulary than the one before is left out
    for r in sorted(out, key=lambda r: shape_costs(r[2], seq_len)["params"]):
        if not chain or (r[0] >= chain[-1][0] and r[1] >= chain[-1][1]):
            chain.append(r)
    return chain


def derive(flops: float, base: ModelConfig, seq_len: int, given: dict | None = None) -> dict:
    """The rule: {setting: value} for every key in DERIVED, plus "why" (lines), for a budget of
    `flops` training FLOPs. `given` holds the values fixed by the user (kept as they are)."""
    given = dict(given or {})
    best = None
    for depth, vocab, m in rungs(base, seq_len, given):
        costs = shape_costs(m, seq_len)
        tokens = flops / costs["flops_per_token"]
        ratio = tokens / counted_params(costs)
        key = abs(math.log(ratio / TOKENS_PER_PARAM))
        if best is None or key < best[0]:
            best = (key, depth, vocab, m, costs, tokens, ratio)
    _, depth, vocab, m, costs, tokens, ratio = best
    if "train.batch_size" in given:
        batch = given["train.batch_size"]
    else:  # the largest batch that leaves the run MIN_STEPS steps
        fits = [b for b in BATCHES if tokens / (b * seq_len) >= MIN_STEPS]
        batch = max(fits) if fits else min(BATCHES)
    steps = tokens / (batch * seq_len)
    why = [f"depth {depth}: {tokens / 1e6:.1f}M tokens for {counted_params(costs) / 1e6:.2f}M parameters "
           f"({PARAMS_COUNTED}), {ratio:.1f} tokens per parameter (the rule: the shape nearest "
           f"{TOKENS_PER_PARAM:g})",
           f"vocabulary {vocab}: the tied head takes {head_share(m, seq_len):.0%} of the "
           f"{costs['flops_per_token'] / 1e6:.1f} MFLOP/token (the rule: {HEAD_SHARE[0]:.0%}-{HEAD_SHARE[1]:.0%})",
           f"batch {batch} x {seq_len}: ~{steps:.0f} steps (the rule: the largest of {BATCHES} "
           f"leaving at least {MIN_STEPS} steps)"]
    return {"model.n_layers": m.n_layers, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
            "model.n_kv_heads": m.n_kv_heads, "tokenizer.vocab_size": vocab, "train.batch_size": batch,
            "why": why, "expected_tokens": tokens, "expected_steps": steps}


def training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_facts():
    """(autocast_dtype, matmul_flops, native_bf16, cpu_name): imported here alone, when first
    needed (torch)."""
    from candorlm.device import autocast_dtype, cpu_name, matmul_flops, native_bf16

    return autocast_dtype, matmul_flops, native_bf16, cpu_name


def precision(device: str, dtype_choice: str) -> str:
    """bf16 or fp32: what train.dtype resolves to on this device (no measuring)."""
    autocast_dtype = _device_facts()[0]
    return "fp32" if autocast_dtype(device, dtype_choice) is None else "bf16"


def measure(device: str, dtype_choice: str) -> dict:
    """The machine's matmul rate in the precision the run will train in (candorlm/device.py), one
    device's: under torchrun every rank trains the same shape, sized for one device's budget."""
    import torch

    autocast_dtype, matmul_flops, native_bf16, cpu_name = _device_facts()
    amp = autocast_dtype(device, dtype_choice)
    t0 = time.perf_counter()
    rate = matmul_flops(device, amp)
    return {"device": device, "precision": "bf16" if amp is not None else "fp32", "matmul_flops": rate,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "native_bf16": native_bf16(device.split(":")[0]),
            "measured_s": round(time.perf_counter() - t0, 2), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def budget_flops(budget_s: float, rate: float) -> float:
    return budget_s * rate * EXPECTED_MFU


def decide(cfg, given: dict, measurement: dict | None, device: str | None = None) -> dict:
    """The sizing record for cfg (its preset's and the user's settings applied, the derived ones
    still the preset's placeholders): the measurement (taken now unless given), the inputs and
    the derived values. Values in `given` are kept."""
    missing = [k for k in DERIVED if k not in given]
    if not missing:
        return {"rule": "none: every derived setting was given", "given": given, "derived": {}}
    budget = cfg.train.time_budget_s
    if budget <= 0:
        raise CandorError("preset auto sizes the model for train.time_budget_s, which is 0 (off): give a budget, "
                          f"or set {', '.join(missing)}, or choose a fixed preset (--preset cpu-tiny)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and measurement is None:  # every rank would measure, and might size its model apart
        raise CandorError(f"preset auto measures the machine, and under torchrun (WORLD_SIZE={world}) each rank would "
                          f"measure its own: choose a fixed preset (--preset cpu-tiny, gpt2-small ...) or set "
                          f"{', '.join(missing)}")
    device = device or training_device()
    if measurement is None or measurement.get("precision") != precision(device, cfg.train.dtype) \
            or measurement.get("device") != device:  # recorded for another precision: a new measurement
        measurement = measure(device, cfg.train.dtype)
    flops = budget_flops(budget, measurement["matmul_flops"])
    d = derive(flops, cfg.model, cfg.train.seq_len, given)
    derived = {k: d[k] for k in DERIVED if k not in given}
    return {"rule": _rule_text(), "measurement": measurement, "budget_s": budget, "expected_mfu": EXPECTED_MFU,
            "budget_flops": flops, "given": given, "derived": derived, "why": d["why"],
            "expected_tokens": d["expected_tokens"], "expected_steps": d["expected_steps"]}


def _rule_text() -> str:
    return (f"C = budget_s x matmul_flops x {EXPECTED_MFU}; shapes: the depth rule, vocabularies whose tied head "
            f"takes {HEAD_SHARE[0]:.0%}-{HEAD_SHARE[1]:.0%} of the FLOPs/token; the shape whose tokens per parameter "
            f"({PARAMS_COUNTED}) come nearest {TOKENS_PER_PARAM:g}; batch: the largest of {BATCHES} with >= "
            f"{MIN_STEPS} steps")


def explain(record: dict) -> str:
    """The derivation in a few lines, for printing at start."""
    if not record.get("derived"):
        return "sizing (preset auto): every derived setting was given; nothing derived"
    m = record["measurement"]
    lines = [f"sizing (preset auto): {record['budget_s']:g} s x {m['matmul_flops'] / 1e9:.0f} GFLOP/s "
             f"({m['precision']} matmul on {m['device']}, measured {m.get('when', '')}) x expected MFU "
             f"{record['expected_mfu']:g} = {record['budget_flops']:.3g} FLOPs"]
    lines += [f"  {w}" for w in record["why"]]
    lines.append("  derived: " + ", ".join(f"{k}={v}" for k, v in record["derived"].items())
                 + (f"; given: {', '.join(f'{k}={v}' for k, v in record['given'].items())}" if record["given"] else ""))
    return "\n".join(lines)


def recorded_measurement(path: str | Path) -> dict | None:
    """The measurement a sizing record (sizing.json, or a run config holding one) keeps, or None."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except ValueError as e:
        raise CandorError(f"{p} is not JSON ({e}); delete it to measure again") from e
    rec = d.get("sizing", d) if isinstance(d, dict) else None
    m = rec.get("measurement") if isinstance(rec, dict) else None
    if m is not None and not (isinstance(m, dict) and isinstance(m.get("matmul_flops"), (int, float))):
        raise CandorError(f"{p}: the recorded measurement has no matmul_flops; delete it to measure again")
    return m

