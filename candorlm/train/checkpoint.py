"""Training checkpoints: a model directory plus `train_state/` (optimizer, step, schedule
length, RNG states), committed together so a killed write leaves the previous one whole.

Optimizer state is written with torch.save and read back with `weights_only=True`: tensors
and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_json, commit_staged, recover, staging_dir
from candorlm.model.io import write_model_files


def save_checkpoint(out_dir: str | Path, model, tokenizer_dir, optimizers, state: dict, run_config: dict,
                    state_dict=None, optim_states=None, staged: bool = False) -> None:
    """state: JSON-able (step, max_steps, ...). state_dict/optim_states: precomputed full
    (consolidated) states for distributed runs; by default taken from model/optimizers.
    staged: out_dir/.staging already holds files of this checkpoint (the DCP shards of a
    sharded run, train_state/dcp/) and is committed together with the rest."""
    out_dir = Path(out_dir)
    st = out_dir / ".staging" if staged else staging_dir(out_dir)
    write_model_files(st, model, tokenizer_dir, state_dict=state_dict)
    ts = st / "train_state"
    ts.mkdir(exist_ok=staged)
    torch.save({
        "optimizers": optim_states if optim_states is not None else [o.state_dict() for o in optimizers],
        "torch_rng": torch.get_rng_state(),
    }, ts / "optimizer.pt")
    atomic_write_json(ts / "state.json", {**state, "python_rng": repr(random.getstate())})
    atomic_write_json(ts / "run_config.json", run_config)
    commit_staged(out_dir)


def has_checkpoint(out_dir: str | Path) -> bool:
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        recover(out_dir)
    return (out_dir / "train_state" / "state.json").is_file() and (out_dir / "model.safetensors").is_file()


def load_train_state(out_dir: str | Path) -> tuple[dict, dict]:
    """Returns (state.json contents, torch payload with optimizer states and RNG)."""
    out_dir = Path(out_dir)
    if not has_checkpoint(out_dir):
        raise CandorError(f"--resume: {out_dir} holds no checkpoint (no train_state/state.json); "
                          "run without --resume to start fresh")
    state = json.loads((out_dir / "train_state" / "state.json").read_text())
    payload = torch.load(out_dir / "train_state" / "optimizer.pt", map_location="cpu", weights_only=True)
    opt = payload["optimizers"]
    if isinstance(opt, dict) and opt.get("format") == "dcp":  # a sharded run's states: DCP shards
        payload["optimizers"] = {**opt, "path": str(out_dir / "train_state" / opt["path"])}
    return state, payload


def load_run_config(out_dir: str | Path) -> dict:
    """The run configuration the checkpoint was trained with ({} for a checkpoint without one)."""
    p = Path(out_dir) / "train_state" / "run_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# Settings a resumed run cannot change: the weights' shapes and meaning, and the optimizer
# whose state is restored. Everything else may change, at the price of exactness (the
# parallel layout too: checkpoints reshard, see dist_checkpoint.py), and so may a longer
# context where positions have no weights (training on at a longer train.seq_len) and how
# attention is computed (model.attention_backend, absent from older checkpoints).
RESUME_FIXED = ("model.", "train.optimizer")


def _may_change(key: str, old, new, now: dict) -> bool:
    if key == "model.attention_backend":
        return True
    return key == "model.max_seq_len" and new >= old and now["model"]["pos_encoding"] != "learned"


def resume_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """{"section.field": (checkpoint's value, new value)} for the model and train settings
    that differ; raises for those in RESUME_FIXED."""
    diffs = {f"{sec}.{k}": (saved[sec].get(k), v) for sec in ("model", "train") if sec in saved
             for k, v in now[sec].items() if saved[sec].get(k) != v}
    fixed = [k for k in diffs if k.startswith(RESUME_FIXED) and not _may_change(k, *diffs[k], now)]
    if fixed:
        listed = ", ".join(f"{k}={diffs[k][1]!r} (checkpoint: {diffs[k][0]!r})" for k in fixed[:4])
        raise CandorError(f"--resume: {listed}: a resumed run keeps its checkpoint's model and optimizer; "
                          "drop those --set, or train into a new --out")
    return diffs


def restore_rng(state: dict, payload: dict) -> None:
    torch.set_rng_state(payload["torch_rng"])
    import ast

    random.setstate(ast.literal_eval(state["python_rng"]))
