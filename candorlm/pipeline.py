"""`candor run`: every stage in order into runs/<name>/, each skipped when its artifact is
complete and was made from the same inputs and settings (`force=True` redoes them).

Each stage records what it was made from in `<stage>/stage.json` (a fingerprint of its
inputs); a stage is current when that file matches and its outputs exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from candorlm.config import RunConfig
from candorlm.fileio import atomic_write_json


def _fp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _current(stage_dir: Path, fingerprint: str, required: list[str]) -> bool:
    p = stage_dir / "stage.json"
    if not p.is_file() or any(not (stage_dir / r).exists() for r in required):
        return False
    try:
        return json.loads(p.read_text()).get("fingerprint") == fingerprint
    except ValueError:
        return False


def _mark(stage_dir: Path, fingerprint: str, info: dict) -> None:
    atomic_write_json(stage_dir / "stage.json", {"fingerprint": fingerprint, **info})


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: RunConfig, runs_dir: str | Path = "runs", force: bool = False, curate_cfg=None, workers: int = 0,
        prompt: str = "class", quiet: bool = False) -> dict:
    from candorlm.data import curate as curation
    from candorlm.data.documents import documents_fingerprint, iter_documents
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer, train_tokenizer
    from candorlm.train.loop import pretrain

    from candorlm.data.sources import resolve_source

    resolve_source(cfg.data.source)  # a missing source fails here, before anything is written
    if cfg.export.format_list():  # so does a model the asked export formats cannot express
        from candorlm.export.check import refuse_inexpressible

        for fmt in cfg.export.format_list():
            refuse_inexpressible(cfg.model, fmt)
    root = Path(runs_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    summary: dict = {"run_dir": str(root)}

    # 1. curate
    t0 = time.perf_counter()
    data_dir = root / "data"
    if curate_cfg is None:
        from candorlm.data.curate_config import CurateConfig

        curate_cfg = CurateConfig()
    if force or not curation.is_complete(data_dir, cfg.data.source, curate_cfg):
        say(f"[1/5] curating {cfg.data.source} -> {data_dir}")
        stats = curation.curate(cfg.data.source, str(data_dir), curate_cfg, workers=workers or cfg.data.workers)
    else:
        say(f"[1/5] {data_dir} is current; skipped")
        stats = json.loads((data_dir / "stats.json").read_text())
    summary["documents"] = {k: stats.get(k) for k in ("read", "kept", "failed", "removed")}
    timings["data"] = time.perf_counter() - t0
    docs_dir = data_dir / "documents"
    docs_fp = documents_fingerprint(docs_dir)

    # 2. tokenizer
    t0 = time.perf_counter()
    tok_dir = root / "tokenizer"
    tok_fp = _fp(docs_fp, dataclasses.asdict(cfg.tokenizer))
    if force or not _current(tok_dir, tok_fp, ["tokenizer.json"]):
        say(f"[2/5] training a {cfg.tokenizer.vocab_size}-token byte-level BPE tokenizer -> {tok_dir}")
        texts = (d["text"] for d in iter_documents(docs_dir))
        if cfg.tokenizer.max_train_bytes:
            texts = _take_bytes(texts, cfg.tokenizer.max_train_bytes)
        tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        tok.save(tok_dir)
        _mark(tok_dir, tok_fp, {"vocab_size": tok.vocab_size})
    else:
        say(f"[2/5] {tok_dir} is current; skipped")
    tok = Tokenizer.load(tok_dir)
    timings["tokenizer"] = time.perf_counter() - t0

    # 3. token shards
    t0 = time.perf_counter()
    tokens_dir = root / "tokens"
    shards_fp = _fp(docs_fp, tok.sha256, cfg.data.val_fraction)
    if force or not _current(tokens_dir, shards_fp, ["train.bin", "val.bin", "meta.json"]):
        say(f"[3/5] tokenizing documents -> {tokens_dir}")
        build_shards(docs_dir, tok, tokens_dir, val_fraction=cfg.data.val_fraction)
        _mark(tokens_dir, shards_fp, {})
    else:
        say(f"[3/5] {tokens_dir} is current; skipped")
    meta = json.loads((tokens_dir / "meta.json").read_text())
    summary["tokens"] = {"train": meta["train"]["tokens"], "val": meta["val"]["tokens"]}
    timings["tokens"] = time.perf_counter() - t0

    # 4. pretrain
    t0 = time.perf_counter()
    base_dir = root / "base"
    train_fp = _fp(shards_fp, dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train))
    if force or not _current(base_dir, train_fp, ["model.safetensors", "config.json"]):
        say(f"[4/5] pretraining ({cfg.preset}) -> {base_dir}")
        resume = not force and (base_dir / "train_state" / "state.json").is_file() and _same_run(base_dir, train_fp)
        if base_dir.exists() and not resume:  # another run's model (changed settings, or --force)
            import shutil

            shutil.rmtree(base_dir)
        atomic_write_json(base_dir / "fingerprint.json", {"fingerprint": train_fp})
        result = pretrain(tokens_dir, tok_dir, base_dir, cfg, resume=resume, quiet=quiet)
        if result.get("interrupted"):
            return {**summary, "interrupted": True}
        _mark(base_dir, train_fp, {"result": result})
    else:
        say(f"[4/5] {base_dir} is current; skipped")
    result = json.loads((base_dir / "stage.json").read_text())["result"]
    summary["pretrain"] = result
    timings["pretrain"] = time.perf_counter() - t0

    # 5. evaluate and sample
    t0 = time.perf_counter()
    from candorlm.api import load

    m = load(base_dir)
    completion = m.generate(prompt, max_new_tokens=48, temperature=0.0)
    summary["completion"] = {"prompt": prompt, "text": completion}
    timings["sample"] = time.perf_counter() - t0
    if cfg.export.format_list():
        t0 = time.perf_counter()
        summary["exports"] = export_stage(cfg, base_dir, root / "export", train_fp, force)
        timings["export"] = time.perf_counter() - t0
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(root / "summary.json", summary)
    say(f"[5/5] val bits-per-byte {result['val_bpb']:.4f}")
    return summary


def export_stage(cfg: RunConfig, base_dir: Path, out_dir: Path, model_fp: str, force: bool = False) -> dict[str, str]:
    """The exports `export.formats` asks for, into out_dir/hf and out_dir/model-<type>.gguf;
    each skipped when it was made from the same model and type. Returns format -> path."""
    from candorlm.export.gguf import export_gguf
    from candorlm.export.hf import export_hf

    out = {}
    for fmt in cfg.export.format_list():
        path = out_dir / ("hf" if fmt == "hf" else f"model-{cfg.export.gguf_type}.gguf")
        fp = _fp(model_fp, fmt, cfg.export.gguf_type if fmt == "gguf" else "f32")
        stamp = out_dir / f"{path.name}.stage.json"
        if force or not (path.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp):
            say(f"[export] {fmt} -> {path}")
            export_hf(base_dir, path) if fmt == "hf" else export_gguf(base_dir, path, cfg.export.gguf_type)
            atomic_write_json(stamp, {"fingerprint": fp})
        else:
            say(f"[export] {path} is current; skipped")
        out[fmt] = str(path)
    return out


def _same_run(base_dir: Path, fingerprint: str) -> bool:
    p = base_dir / "fingerprint.json"
    return p.is_file() and json.loads(p.read_text()).get("fingerprint") == fingerprint


def _take_bytes(texts, limit: int):
    n = 0
    for t in texts:
        if n >= limit:
            return
        n += len(t.encode("utf-8"))
        yield t
