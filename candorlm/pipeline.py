"""`candor run`: every stage in order into runs/<name>/, each skipped when its artifact is
complete and was made from the same inputs and settings (`force=True` redoes them).

Each stage records what it was made from in `<stage>/stage.json` (a fingerprint of its
inputs); a stage is current when that file matches and its outputs exist (candorlm/stage.py,
the rule curation's stats.json follows too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from candorlm.config import DEMO_PROMPT, RunConfig
from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_json
from candorlm.stage import fingerprint as _fp
from candorlm.stage import is_current, mark_current


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: RunConfig, runs_dir: str | Path = "runs", force: bool = False, prompt: str = DEMO_PROMPT,
        quiet: bool = False) -> dict:
    """Every stage for cfg (curation with cfg.curate) into runs_dir/cfg.name; returns the summary."""
    from candorlm.data import curate as curation
    from candorlm.data.documents import documents_fingerprint, iter_documents
    from candorlm.data.shards import build_shards
    from candorlm.data.sources import resolve_source
    from candorlm.tokenizer import Tokenizer, train_tokenizer
    from candorlm.train.loop import pretrain

    resolve_source(cfg.data.source)  # a missing source fails here, before anything is written
    if cfg.export.format_list():  # so does a model the asked export formats cannot express
        from candorlm.export.check import refuse_inexpressible

        for fmt in cfg.export.format_list():
            refuse_inexpressible(cfg.model, fmt)
    root = Path(runs_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    summary: dict = {"run_dir": str(root)}
    if cfg.sizing:  # preset auto: the shape was decided before the tokenizer's vocabulary is
        from candorlm.sizing import RECORD, explain

        say(explain(cfg.sizing))
        atomic_write_json(root / RECORD, cfg.sizing)
        summary["sizing"] = cfg.sizing.get("derived", {})

    # 1. curate
    t0 = time.perf_counter()
    data_dir = root / "data"
    if force or not curation.is_complete(data_dir, cfg.data.source, cfg.curate):
        say(f"[1/5] curating {cfg.data.source} -> {data_dir}")
        stats = curation.curate(cfg.data.source, str(data_dir), cfg.curate, force=force)
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
    if force or not is_current(tok_dir, tok_fp, ["tokenizer.json"]):
        say(f"[2/5] training a {cfg.tokenizer.vocab_size}-token byte-level BPE tokenizer -> {tok_dir}")
        texts = (d["text"] for d in iter_documents(docs_dir))
        if cfg.tokenizer.max_train_bytes:
            texts = _take_bytes(texts, cfg.tokenizer.max_train_bytes)
        tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        tok.save(tok_dir)
        mark_current(tok_dir, tok_fp, {"vocab_size": tok.vocab_size})
    else:
        say(f"[2/5] {tok_dir} is current; skipped")
    tok = Tokenizer.load(tok_dir)
    timings["tokenizer"] = time.perf_counter() - t0

    # 3. token shards
    t0 = time.perf_counter()
    tokens_dir = root / "tokens"
    shards_fp = _fp(docs_fp, tok.sha256, cfg.data.val_fraction)
    if force or not is_current(tokens_dir, shards_fp, ["train.bin", "val.bin", "meta.json"]):
        say(f"[3/5] tokenizing documents -> {tokens_dir}")
        build_shards(docs_dir, tok, tokens_dir, val_fraction=cfg.data.val_fraction)
        mark_current(tokens_dir, shards_fp)
    else:
        say(f"[3/5] {tokens_dir} is current; skipped")
    meta = json.loads((tokens_dir / "meta.json").read_text())
    summary["tokens"] = {"train": meta["train"]["tokens"], "val": meta["val"]["tokens"]}
    timings["tokens"] = time.perf_counter() - t0

    # 4. pretrain
    t0 = time.perf_counter()
    base_dir = root / "base"
    train_fp = _fp(shards_fp, dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.train))
    if force or not is_current(base_dir, train_fp, ["model.safetensors", "config.json"]):
        say(f"[4/5] pretraining ({cfg.preset}) -> {base_dir}")
        # a checkpoint of these settings (fingerprint.json, written before training starts) resumes
        resume = not force and (base_dir / "train_state" / "state.json").is_file() and is_current(
            base_dir, train_fp, record="fingerprint.json")
        if base_dir.exists() and not resume:  # another run's model (changed settings, or --force)
            shutil.rmtree(base_dir)
        mark_current(base_dir, train_fp, record="fingerprint.json")
        result = pretrain(tokens_dir, tok_dir, base_dir, cfg, resume=resume, quiet=quiet)
        if result.get("interrupted"):
            return {**summary, "interrupted": True}
        mark_current(base_dir, train_fp, {"result": result})
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

    # 6. fine-tune into a chat model
    t0 = time.perf_counter()
    summary["sft"] = sft_stage(cfg, root, docs_fp, train_fp, force, quiet)
    timings["sft"] = time.perf_counter() - t0
    if summary["sft"].get("interrupted"):
        return {**summary, "interrupted": True, "resume_from": str(root / "chat")}
    if cfg.export.format_list():
        t0 = time.perf_counter()
        summary["exports"] = export_stage(cfg, base_dir, root / "export", train_fp, force)
        timings["export"] = time.perf_counter() - t0
    if cfg.eval.task_list():
        t0 = time.perf_counter()
        results = eval_stage(cfg, root, force)
        summary["eval"] = {"model": results["model"], "results": str(root / "eval" / "results.json"),
                           "costs_s": results["costs_s"]}
        timings["eval"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary["cards"] = card_stage(cfg, root, force)
        timings["cards"] = time.perf_counter() - t0
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(root / "summary.json", summary)
    say(f"[5/5] val bits-per-byte {result['val_bpb']:.4f}")
    return summary


def sft_stage(cfg: RunConfig, root: Path, docs_fp: str, base_fp: str, force: bool = False,
              quiet: bool = False) -> dict:
    """The instruction set mined from root/data/documents into root/instructions/ (kept apart
    from pretraining's validation files; its section added to the data card), unless
    sft.data names other data; SFT of root/base into root/chat/; then held-out instruction
    loss and write-a-function answers, base vs chat, and the demo's two turns. Each part is
    skipped when current. Returns what the summary records ({"skipped": why} for a corpus
    without documented Python definitions and no sft.data)."""
    from candorlm.tune import measure
    from candorlm.tune.chat_data import chat_files
    from candorlm.tune.mine import write_instructions
    from candorlm.tune.sft import sft, split_chats

    base_dir, chat_dir, sec = root / "base", root / "chat", cfg.sft
    data = Path(sec.data) if sec.data else root / "instructions"
    if not sec.data:
        from candorlm.report.data_card import add_instruction_section
        from candorlm.tune import mine

        mine_fp = _fp(docs_fp, cfg.data.val_fraction, mine.SYSTEM_PROMPT, mine.KINDS, mine.MAX_CHARS)
        if force or not is_current(data, mine_fp, ["train.jsonl", "validation.jsonl", "stats.json"]):
            say(f"[sft] mining the instruction set from the documents -> {data}")
            try:
                write_instructions(root / "data" / "documents", data, tokens_dir=root / "tokens")
            except CandorError as e:
                if not str(e).startswith("no instruction examples"):
                    raise
                # a corpus without documented Python: no default chats, and no chat model
                say(f"[sft] skipped: {e}; --set sft.data=FILE fine-tunes on chats of your own")
                return {"skipped": str(e)}
            mark_current(data, mine_fp)
        else:
            say(f"[sft] {data} is current; skipped")
        stats = json.loads((data / "stats.json").read_text())
        add_instruction_section(root / "data" / "DATA_CARD.md", stats)
        say(f"[sft] instruction set: {stats['split']['train']} training, {stats['split']['validation']} validation "
            "examples (split by source file)")
    data_fp = _fp(*[hashlib.sha256(f.read_bytes()).hexdigest() for f in chat_files(data)])
    chat_fp = _fp(base_fp, data_fp, dataclasses.asdict(sec))
    if force or not is_current(chat_dir, chat_fp, ["model.safetensors", "config.json"]):
        say(f"[sft] fine-tuning {base_dir} on {data} -> {chat_dir}")
        resume = not force and (chat_dir / "train_state" / "state.json").is_file() and is_current(
            chat_dir, chat_fp, record="fingerprint.json")
        if chat_dir.exists() and not resume:
            shutil.rmtree(chat_dir)
        mark_current(chat_dir, chat_fp, record="fingerprint.json")
        result = sft(base_dir, data, chat_dir, cfg, resume=resume, quiet=quiet)
        if result.get("interrupted"):
            return result
        held = split_chats(data, sec.holdout_fraction, sec.seed)[1]
        say("[sft] measuring base vs chat on the held-out instructions")
        measured = measure.compare(base_dir, chat_dir, held, measure.write_prompts(held, sec.eval_prompts),
                                   sec.batch_size, eval_examples=sec.eval_examples)
        mark_current(chat_dir, chat_fp, {"result": result, "measured": measured})
    else:
        say(f"[sft] {chat_dir} is current; skipped")
    rec = json.loads((chat_dir / "stage.json").read_text())
    m = rec["measured"]
    say(f"[sft] held-out instruction loss: base {m['loss']['base']:.3f} -> chat {m['loss']['chat']:.3f} nats/token; "
        f"write-a-function answers that parse and define a function: base {m['write_function']['base_ok']}/"
        f"{m['write_function']['prompts']} -> chat {m['write_function']['chat_ok']}/{m['write_function']['prompts']}")
    return {"chat_dir": str(chat_dir), "data": str(data), "result": rec["result"],
            "measured": {k: m[k] for k in ("loss", "write_function")}, "exchange": measure.demo_exchange(chat_dir)}


def export_stage(cfg: RunConfig, base_dir: Path, out_dir: Path, model_fp: str, force: bool = False) -> dict[str, str]:
    """The exports `export.formats` asks for, into out_dir/hf and out_dir/model-<type>.gguf;
    each skipped when it was made from the same model and type. Returns format -> path."""
    from candorlm.export.gguf import export_gguf
    from candorlm.export.hf import export_hf

    out = {}
    for fmt in cfg.export.format_list():
        path = out_dir / ("hf" if fmt == "hf" else f"model-{cfg.export.gguf_type}.gguf")
        fp = _fp(model_fp, fmt, cfg.export.gguf_type if fmt == "gguf" else "f32")
        record = f"{path.name}.stage.json"
        if force or not is_current(out_dir, fp, [path.name], record=record):
            say(f"[export] {fmt} -> {path}")
            export_hf(base_dir, path) if fmt == "hf" else export_gguf(base_dir, path, cfg.export.gguf_type)
            mark_current(out_dir, fp, record=record)
        else:
            say(f"[export] {path} is current; skipped")
        out[fmt] = str(path)
    return out


EVAL_VERSION = 1  # bump when the suite's output changes, so `candor run` evaluates again


def evaluated_model(root: Path) -> Path:
    """The model the run's evaluation and card describe: the post-trained chat model when the
    run has one, else the base model."""
    chat = Path(root) / "chat"
    return chat if (chat / "model.safetensors").is_file() else Path(root) / "base"


def eval_stage(cfg: RunConfig, root: Path, force: bool = False) -> dict:
    """root/eval/results.json for `evaluated_model(root)` (evaluate/suite.py: held-out bits per
    byte on the run's validation split, code tasks from its held-out files, pycomplete, HumanEval,
    bias probes, robustness, as cfg.eval asks); skipped when made from the same model and settings.
    Returns the results."""
    from candorlm.evaluate.suite import evaluate_model
    from candorlm.stage import recorded

    model_dir, out = evaluated_model(root), Path(root) / "eval"
    e = cfg.eval
    settings = {"tasks": e.task_list(), "lm_tokens": e.lm_tokens, "code_items": e.code_items,
                "generate_items": e.generate_items, "humaneval_limit": e.humaneval_limit or None,
                "humaneval_samples": e.humaneval_samples, "max_new_tokens": e.max_new_tokens,
                "robustness_items": e.robustness_items}
    fp = _fp(recorded(model_dir), model_dir.name, settings, cfg.data.val_fraction, EVAL_VERSION)
    if force or not is_current(out, fp, ["results.json"]):
        say(f"[eval] evaluating {model_dir} -> {out}")
        evaluate_model(model_dir, out, data=Path(root) / "tokens", documents=Path(root) / "data" / "documents",
                       val_fraction=cfg.data.val_fraction, **settings)
        mark_current(out, fp)
    else:
        say(f"[eval] {out} is current; skipped")
    return json.loads((out / "results.json").read_text())


def card_stage(cfg: RunConfig, root: Path, force: bool = False) -> dict[str, str]:
    """root/MODEL_CARD.md and root/report.md (charts in root/eval/) from root/eval/results.json."""
    from candorlm.report.model_card import write_model_card
    from candorlm.report.run_report import write_report
    from candorlm.stage import recorded

    root = Path(root)
    fp = _fp(recorded(root / "eval"), cfg.name, EVAL_VERSION)
    paths = {"model_card": str(root / "MODEL_CARD.md"), "report": str(root / "report.md")}
    if force or not is_current(root, fp, ["MODEL_CARD.md", "report.md"], record="cards.stage.json"):
        res = json.loads((root / "eval" / "results.json").read_text())
        write_model_card(root / "MODEL_CARD.md", res, name=f"candorlm-{cfg.name}")
        write_report(root, res, {"pretrain": root / "base" / "log.jsonl", "chat": root / "chat" / "log.jsonl"},
                     name=cfg.name)
        mark_current(root, fp, record="cards.stage.json")
        say(f"[card] {root / 'MODEL_CARD.md'}, {root / 'report.md'}")
    return paths


def _take_bytes(texts, limit: int):
    n = 0
    for t in texts:
        if n >= limit:
            return
        n += len(t.encode("utf-8"))
        yield t
