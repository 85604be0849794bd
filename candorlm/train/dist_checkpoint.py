"""The distributed half of training checkpoints: sharded model and optimizer states saved and
loaded with `torch.distributed.checkpoint` (DCP), resharded from N ranks to M.

train/checkpoint.py writes the model directory and the plain single-process format; this
module adds `train_state/dcp/` for FSDP and TP runs, inside the same staged commit.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch

from candorlm.distributed.runtime import DistInfo, barrier, is_sharded
from candorlm.errors import CandorError
from candorlm.fileio import staging_dir
from candorlm.model.io import weights_state_dict
from candorlm.train.optim import remember_base_lrs

DCP_DIR = "dcp"  # train_state/dcp/: DCP shards of {"model", "optim"}, keyed by parameter name

# --- checkpoints ----------------------------------------------------------------------------
# Single process and DDP keep the plain format (train/checkpoint.py): every rank holds whole
# optimizer states, rank 0 writes them, any number of ranks reads them. FSDP and TP shard the
# states, so every rank writes its shards with DCP into train_state/dcp/ inside the same staged
# commit; DCP records each shard's place in the full tensor and reshards on load, so N ranks
# resume on M (one process loads whole tensors without a process group).

def consolidated_states(model, dist: DistInfo):
    """(full fp32 weights for model.safetensors, optimizer-states entry for optimizer.pt):
    (None, None) where the plain format applies; for sharded runs, weights gathered to rank 0
    (a collective: every rank calls it) and a pointer to the DCP shards."""
    if not is_sharded(model):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank != 0:
        return None, None
    return weights_state_dict(model, full), {"format": "dcp", "path": DCP_DIR}


def stage_sharded_states(out_dir, model, optimizers, dist: DistInfo) -> bool:
    """Sharded runs: rank 0 opens out_dir/.staging, then every rank writes its shards of the
    model and optimizer states into .staging/train_state/dcp; the caller's rank 0 then adds
    the model directory files and commits. Returns whether it staged (False: plain format)."""
    if not is_sharded(model):
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(out_dir) / ".staging" / "train_state" / DCP_DIR
    if dist.rank == 0:
        staging_dir(out_dir)
        path.mkdir(parents=True)
    barrier(dist)
    msd, osd = get_state_dict(model, optimizers)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    return True


def load_optimizer_states(optimizers, states, model) -> None:
    """states: the `optimizers` entry of optimizer.pt. A DCP pointer loads weights and
    optimizer states from the shards, resharded for this run (or whole, in one process);
    positional full states load as they are, or are sharded for FSDP/TP (1 -> N ranks)."""
    if isinstance(states, dict) and states.get("format") == "dcp":
        _load_dcp(states["path"], model, optimizers)
    elif is_sharded(model):
        _load_full_optimizer_states(states, model, optimizers)
    else:
        for opt, st in zip(optimizers, states, strict=False):
            opt.load_state_dict(st)


def optimizer_state_norm(optimizers) -> float:
    """The root sum of squares of every optimizer state tensor (moments, momentum buffers; not
    step counters) over the whole model, whatever its sharding: the fingerprint the training
    log records at each save and after a resume loads, so the log shows what was carried on.
    A collective under FSDP/TP: every rank calls it."""
    sq = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                for _, v in sorted(opt.state.get(p, {}).items()):
                    if torch.is_tensor(v) and v.dim() > 0 and v.is_floating_point():
                        n = torch.linalg.vector_norm(v, dtype=torch.float64)
                        if hasattr(n, "full_tensor"):  # a DTensor: its shards' norms combined
                            n = n.full_tensor()
                        sq += float(n) ** 2
    return sq ** 0.5


def _load_dcp(path, model, optimizers) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not Path(path).is_dir():
        raise CandorError(f"--resume: {path} is missing; the checkpoint's DCP shards are needed to resume it")
    # Loading fills only the keys a fresh optimizer has; the schedule's base lr must be among
    # them, or it would be lost on resume.
    remember_base_lrs(optimizers)
    msd, osd = get_state_dict(model, optimizers)  # templates: the shapes and shards this run wants
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # "assuming ... load in a single process": it is, by design
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_safe_reader(str(path)), planner=_safe_load_planner())
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _load_full_optimizer_states(states: list[dict], model, optimizers) -> None:
    """Positional single-process states -> name-keyed full states -> this run's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    remember_base_lrs(optimizers)  # see _load_dcp
    # Activation checkpointing's wrapper is in the parameter names (not in state dicts).
    names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters()}
    osd = {"state": {}, "param_groups": []}
    for opt, st in zip(optimizers, states, strict=False):
        for group, saved in zip(opt.param_groups, st["param_groups"], strict=False):
            fqns = [names[id(p)] for p in group["params"]]
            for fqn, idx in zip(fqns, saved["params"], strict=False):
                if idx in st["state"]:
                    osd["state"][fqn] = st["state"][idx]
            osd["param_groups"].append({**saved, "params": fqns})
    set_optimizer_state_dict(model, optimizers, osd, options=StateDictOptions(full_state_dict=True))


# DCP writes its index (.metadata) with pickle and reads it, and non-tensor values, with
# unrestricted pickle. Our rule is that loading never runs code from a file, so the readers
# below admit only the classes DCP's index is made of and plain values (torch.load weights_only).
_META = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {(_META, n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                      "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                      "StorageMeta")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")} | {
    ("torch", str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which a checkpoint index never needs")


def _safe_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with the restricted unpickler
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)  # DefaultLoadPlanner: weights_only=False
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()
