"""`candor <command>`: parses arguments and calls one function per command; no logic of its own.

User errors (CandorError) print one line, `candor: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from candorlm.errors import CandorError


def _add_config_args(p: argparse.ArgumentParser, default: str = "cpu-tiny") -> None:
    from candorlm.config import PRESETS

    p.add_argument("--preset", default=default,
                   help=f"one of {', '.join(PRESETS)} (default {default}; auto: cpu-tiny's run with the model sized "
                        "to this machine's compute and the time budget; cpu-tiny: the demo's fixed shape)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", default=[],
                   help="override any setting, e.g. --set train.max_steps=100 (repeatable)")


def _config(args, name: str = "demo", measurement: dict | None = None, known: dict | None = None):
    from candorlm.config import build_config, parse_set_args

    return build_config(args.preset, parse_set_args(args.set), name=name, measurement=measurement, known=known)


def add_section_flags(p: argparse.ArgumentParser, cls, title: str, description: str = "") -> None:
    """One flag per field of the config dataclass `cls` (dict fields excepted: `--set` takes
    those as JSON), named after the field (`--max-new-tokens`), its accepted values from the
    field's hint: booleans get --x/--no-x, lists repeat, choices are listed. Unset flags are
    None, so they leave the setting to whatever else decides it."""
    from candorlm.fields import hints

    g, defaults = p.add_argument_group(title, description), cls()
    for name, f in hints(cls).items():
        if f.kind is dict:
            continue
        key, flag = f"{cls.section}.{name}", "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = f"{key}: {f.accepts()} (default: {json.dumps(default)})".replace("%", "%%")
        if f.kind is bool:
            g.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.kind is list:
            g.add_argument(flag, dest=key, action="append", default=None, metavar="VALUE",
                           help=help_text + "; repeatable")
        else:
            g.add_argument(flag, dest=key, default=None, choices=f.choices or None,
                           metavar=None if f.choices else name.upper(), help=help_text)


def section_flags(args, cls) -> dict:
    """{field: value} for the flags of `cls` given on the command line."""
    from candorlm.fields import hints

    return {name: v for name in hints(cls) if (v := getattr(args, f"{cls.section}.{name}", None)) is not None}


def cmd_data(args) -> None:
    from candorlm.config import CurateConfig, build_config, parse_set_args
    from candorlm.data import curate

    sets = parse_set_args(args.set)
    other = [k for k, _ in sets if not k.startswith("curate.")]
    if other:
        raise CandorError(f"candor data takes curation settings (--set curate.FIELD=VALUE), not {', '.join(other)}")
    flags = [(f"curate.{k}", v) for k, v in section_flags(args, CurateConfig).items()]
    cfg = build_config(overrides=sets + flags).curate
    stats = curate.curate(args.source, args.out, cfg, verbose=args.verbose)
    if stats.get("submitted"):
        print(f"submitted to {cfg.executor}; when the jobs finish, rerun the same command to collect the outputs")
        return
    print(json.dumps({k: stats.get(k) for k in ("read", "kept", "removed", "failed")}))
    print(f"curated documents in {os.path.join(args.out, 'documents')}; "
          f"data card: {os.path.join(args.out, 'DATA_CARD.md')}")


def cmd_tokenizer(args) -> None:
    from candorlm.data.documents import iter_documents
    from candorlm.tokenizer import train_tokenizer

    tok = train_tokenizer((d["text"] for d in iter_documents(args.data)), args.vocab_size, args.min_frequency)
    tok.save(args.out)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out}/tokenizer.json")


def cmd_tokenize(args) -> None:
    from candorlm.data.shards import build_shards
    from candorlm.tokenizer import Tokenizer

    meta = build_shards(args.data, Tokenizer.load(args.tokenizer), args.out, val_fraction=args.val_fraction)
    print(json.dumps({"train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"]}))


def cmd_pretrain(args) -> None:
    from candorlm import sizing
    from candorlm.train.loop import pretrain, threads_default

    threads_default()
    # preset auto: the vocabulary is the tokenizer's; a resumed run derives its shape from the
    # measurement its checkpoint recorded, not from a new one
    tok_file = os.path.join(args.tokenizer, "tokenizer.json")
    known = {"tokenizer.vocab_size": _vocab_size(tok_file)} if os.path.isfile(tok_file) else None
    saved = os.path.join(args.out, "train_state", "run_config.json")
    recorded = sizing.recorded_measurement(saved) if args.resume else None
    cfg = _config(args, measurement=recorded, known=known)
    if cfg.sizing and int(os.environ.get("RANK", "0")) == 0:
        print(sizing.explain(cfg.sizing), file=sys.stderr)
    result = pretrain(args.data, args.tokenizer, args.out, cfg, resume=args.resume)
    if result.get("interrupted"):
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, not one per rank
        print(json.dumps({k: result[k] for k in ("step", "val_bpb", "tok_s", "mfu")}))


def _vocab_size(tokenizer_file: str) -> int:
    from candorlm.tokenizer import Tokenizer

    return Tokenizer.load(os.path.dirname(tokenizer_file)).vocab_size


def _tune_config(args, section: str):
    """The run config of `candor sft` / `candor dpo`: --set for that section only, and the
    --lora-* flags as its lora_* fields."""
    from candorlm.config import build_config, parse_set_args

    sets = parse_set_args(args.set)
    other = [k for k, _ in sets if not k.startswith(f"{section}.")]
    if other:
        raise CandorError(f"candor {section} takes {section} settings (--set {section}.FIELD=VALUE), not "
                          f"{', '.join(other)}: the model's come from --model")
    flags = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
             "lora_targets": [t for item in args.lora_targets for t in item.split(",") if t]
             if args.lora_targets else None}
    return build_config(overrides=sets + [(f"{section}.{k}", v) for k, v in flags.items() if v is not None])


def _add_tune_args(p: argparse.ArgumentParser, section: str) -> None:
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.add_argument("--set", action="append", metavar=f"{section}.FIELD=VALUE", default=[],
                   help=f"any {section} setting, e.g. --set {section}.lr=1e-4 (repeatable)")
    p.add_argument("--lora-rank", type=int, default=None, help=f"{section}.lora_rank: train LoRA adapters of this "
                   "rank instead of every weight (0: every weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help=f"{section}.lora_alpha (default 16)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                   help="the linear layers adapted (default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")


def _tune_summary(result: dict, keys: tuple[str, ...]) -> None:
    if result.get("interrupted"):
        sys.exit(130)
    print(json.dumps({k: result[k] for k in ("step", *keys, "trainable_params", "params", "adapter") if k in result}))


def cmd_sft(args) -> None:
    from candorlm.train.loop import threads_default
    from candorlm.tune.sft import sft

    threads_default()
    result = sft(args.model, args.data, args.out, _tune_config(args, "sft"), resume=args.resume)
    _tune_summary(result, ("val_loss",))


def cmd_dpo(args) -> None:
    from candorlm.train.loop import threads_default
    from candorlm.tune.dpo import dpo

    threads_default()
    result = dpo(args.model, args.pairs, args.out, _tune_config(args, "dpo"), resume=args.resume)
    _tune_summary(result, ("val_margin", "val_accuracy", "val_loss"))


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(text: str) -> str:
    """\\n, \\t, \\r, \\\\ and escaped quotes in a prompt typed on the command line (as llama.cpp
    does): a shell passes "import os\\n" as a backslash and an n. Other backslashes stay."""
    return re.sub(r"\\([ntr\\\"'])", lambda m: _ESCAPES[m.group(1)], text)


def cmd_generate(args) -> None:
    from candorlm.api import load
    from candorlm.config import GenerationConfig
    from candorlm.fields import parse

    settings = {k: parse(GenerationConfig, k, v, f"--{k.replace('_', '-')}") if isinstance(v, str) else v
                for k, v in section_flags(args, GenerationConfig).items()}
    m = load(args.model)
    if args.prompt is None:
        prompt = sys.stdin.read()
    else:
        prompt = args.prompt if args.no_escape else unescape(args.prompt)
    for piece in m.stream(prompt, **settings):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    from candorlm.tune.chat import run_chat

    if (args.model is None) == (args.url is None):
        raise CandorError("candor chat needs --model DIR (a model directory) or --url URL (a running candor serve)")
    run_chat(args.model, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
             url=args.url, api_key=args.api_key or os.environ.get("CANDOR_API_KEY"))


def cmd_serve(args) -> None:
    from candorlm.serve.server import ServeOptions, serve

    engine = {"max_slots": args.max_slots, "prefix_cache": not args.no_prefix_cache, "speculative": args.speculative,
              "dtype": args.dtype, "compile": args.compile}
    if args.max_model_len:
        engine["max_seq_len"] = args.max_model_len
    if args.max_concurrency < 1 or args.max_body_bytes < 1:
        raise CandorError(f"--max-concurrency {args.max_concurrency} and --max-body-bytes {args.max_body_bytes} "
                          "must be >= 1")
    key = args.api_key or os.environ.get("CANDOR_API_KEY") or None
    opts = ServeOptions(served_name=args.served_model_name, api_key=key, max_concurrency=args.max_concurrency,
                        max_body_bytes=args.max_body_bytes, run_dir=args.run_dir, engine=engine)
    serve(args.model, host=args.host, port=args.port, options=opts, log_level=args.log_level)


def cmd_feedback(args) -> None:
    from candorlm.serve.feedback import open_store

    n = open_store(args.run_dir, create=False).export(args.format, args.out, args.model_version)
    print(f"{n} {args.format} records written to {args.out}")


def cmd_eval(args) -> None:
    from candorlm.device import configure_cpu_allocator

    if args.seq_len < 0 or args.tokens < 1:
        raise CandorError(f"--seq-len {args.seq_len} must be >= 0 (0: the model's context) "
                          f"and --tokens {args.tokens} >= 1")
    configure_cpu_allocator()
    if args.tasks is None and args.out is None:
        if args.data is None:
            raise CandorError("candor eval needs --data TOKENS (validation bits per byte) or --tasks/--out (the suite)")
        from candorlm.data.shards import open_split
        from candorlm.device import autocast_dtype
        from candorlm.evaluate.bpb import evaluate_bpb, token_bytes_for
        from candorlm.model.io import load_model

        model = load_model(args.model)
        seq_len = min(args.seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        r = evaluate_bpb(model, open_split(args.data, "val"), token_bytes_for(args.model, args.data), seq_len,
                         args.tokens, 8, autocast_dtype("cpu", "auto"))
        print(json.dumps(r))
        return
    from candorlm.evaluate.suite import evaluate_model

    out = args.out or os.path.join(args.model, "eval")
    res = evaluate_model(args.model, out, tasks=args.tasks, data=args.data, documents=args.documents,
                         val_fraction=args.val_fraction, humaneval_limit=args.humaneval_limit or None,
                         humaneval_samples=args.samples, lm_tokens=args.tokens, seed=args.seed)
    print(f"results in {os.path.join(out, 'results.json')} ({res['costs_s']['total']} s); "
          f"model card: candor card --model {args.model}")


def cmd_card(args) -> None:
    from pathlib import Path

    from candorlm.report.model_card import write_model_card
    from candorlm.report.run_report import write_report

    results = args.results or os.path.join(args.model, "eval", "results.json")
    if not os.path.isfile(results):
        raise CandorError(f"--results {results} does not exist; run `candor eval --model {args.model}` first")
    res = json.loads(open(results, encoding="utf-8").read())
    out = args.out or os.path.join(args.model, "MODEL_CARD.md")
    write_model_card(out, res, name=args.name or os.path.basename(os.path.normpath(args.model)))
    charts = os.path.relpath(os.path.dirname(os.path.abspath(results)), os.path.dirname(os.path.abspath(out)))
    logs = {"pretrain": Path(args.model) / "log.jsonl"}
    write_report(os.path.dirname(os.path.abspath(out)), res, logs, name=args.name or args.model, charts=charts)
    print(f"model card: {out}; report: {os.path.join(os.path.dirname(out) or '.', 'report.md')}")


def cmd_export(args) -> None:
    if args.format == "hf":
        from candorlm.export.hf import export_hf

        out = export_hf(args.model, args.out, args.type or "f32")
    else:
        from candorlm.export.gguf import export_gguf

        out = export_gguf(args.model, args.out, args.type or "f32")
    print(f"exported {args.model} as {args.format} to {out}")


def cmd_import(args) -> None:
    from candorlm.export.hf import import_hf

    out = import_hf(args.src, args.out)
    print(f"imported {args.src} as a candorlm model directory: {out}")


def cmd_quantize(args) -> None:
    from candorlm.compress.quantize import quantize_model

    out = quantize_model(args.model, args.out, args.method, args.group_size, args.embedding)
    print(f"quantized {args.model} ({args.method}"
          + (f", group size {args.group_size or 32}" if args.method == "int4" else "") + f") to {out}")


def cmd_prune(args) -> None:
    from candorlm.compress.prune import format_sparsity, prune_model

    r = prune_model(args.model, args.out, args.method, args.sparsity, args.pattern, args.tokens,
                    args.calibration_tokens, args.eval_tokens, args.recover_steps, args.recover_lr,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"pruned {args.model} ({args.method}, {r['pattern'] or 'unstructured'}) to {args.out}; sparsity achieved:")
    print(format_sparsity(r))


def cmd_run(args) -> None:
    from candorlm import pipeline, sizing
    from candorlm.train.loop import threads_default

    threads_default()
    # preset auto: a rerun (or a resume) sizes from the measurement the run recorded; --force measures again
    record = os.path.join(args.runs_dir, args.name, sizing.RECORD)
    cfg = _config(args, name=args.name, measurement=None if args.force else sizing.recorded_measurement(record))
    cfg.data.source = args.source
    s = pipeline.run(cfg, runs_dir=args.runs_dir, force=args.force, prompt=args.prompt)
    if s.get("interrupted"):
        print(f"interrupted; rerun the same command to resume from {s.get('resume_from', s['run_dir'] + '/base')}")
        sys.exit(130)
    base = os.path.join(s["run_dir"], "base")
    p = s["pretrain"]
    print()
    print(f"val bits-per-byte: {p['val_bpb']:.4f}   ({p['step']} steps, {p['tokens_seen']:,} tokens, "
          f"{p['tok_s']:,.0f} tok/s, MFU {100 * p['mfu']:.0f}%)")
    print(f"greedy completion of {s['completion']['prompt']!r}:")
    print("-" * 60)
    print(s["completion"]["prompt"] + s["completion"]["text"])
    print("-" * 60)
    if "measured" in s.get("sft", {}):
        _print_sft(s["sft"])
    print(f"artifacts in {s['run_dir']}/: data/ (DATA_CARD.md), tokenizer/, tokens/, base/ (model directory)"
          + (", instructions/, chat/ (model directory)" if "measured" in s.get("sft", {}) else ""))
    if s.get("cards"):
        print(f"evaluation: {s['eval']['results']} ({s['eval']['costs_s'].get('total')} s); "
              f"model card: {s['cards']['model_card']}; report: {s['cards']['report']}")
    for fmt, path in s.get("exports", {}).items():
        print(f"export ({fmt}): {path}")
    print("next:")
    print(f"  candor generate --model {base} \"import os\\n\" --temperature 0.8")
    print(f"  candor eval --model {base} --data {s['run_dir']}/tokens")
    if "measured" in s.get("sft", {}):
        print(f"  candor chat --model {s['sft']['chat_dir']}")
    print(f"  python -c \"import candorlm; print(candorlm.load('{base}').generate('def', max_new_tokens=64))\"")


def _print_sft(s: dict) -> None:
    loss, write = s["measured"]["loss"], s["measured"]["write_function"]
    print(f"chat model ({s['chat_dir']}): held-out instruction loss {loss['chat']:.3f} (base {loss['base']:.3f}); "
          f"write-a-function answers that parse and define a function: {write['chat_ok']}/{write['prompts']} "
          f"(base {write['base_ok']}/{write['prompts']})")
    print("two turns with the chat model (greedy):")
    print("-" * 60)
    for turn in s["exchange"]:
        print(">>> " + turn["user"].replace("\n", "\n... "))
        print(turn["assistant"])
    print("-" * 60)


def build_parser() -> argparse.ArgumentParser:
    from candorlm.config import DEMO_PROMPT, CurateConfig, GenerationConfig

    ap = argparse.ArgumentParser(prog="candor", description="candorlm: curate, tokenize, pretrain, generate.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="curate raw text into a clean, deduplicated, documented corpus")
    p.add_argument("--source", default="stdlib",
                   help="stdlib, a directory, .txt, .jsonl(.gz), .parquet, or a saved dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true", help="show the executor's logs (always in OUT/work/logs)")
    p.add_argument("--set", action="append", metavar="curate.FIELD=VALUE", default=[],
                   help="any curation setting, e.g. --set curate.pii=drop (repeatable)")
    add_section_flags(p, CurateConfig, "curation", "each flag sets curate.FIELD, as --set curate.FIELD=VALUE does")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on curated documents")
    p.add_argument("--data", required=True, help="a curated documents/ directory")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize curated documents into train.bin/val.bin shards")
    p.add_argument("--data", required=True, help="a curated documents/ directory")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("pretrain", help="pretrain a transformer on token shards")
    p.add_argument("--data", required=True, help="a token directory (train.bin, val.bin, meta.json)")
    p.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="fine-tune a model directory on chats (JSONL messages or prompt/completion)")
    p.add_argument("--model", required=True, help="the model directory to start from")
    p.add_argument("--data", default=None, help="a .jsonl file or a directory of them (default: sft.data)")
    _add_tune_args(p, "sft")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("dpo", help="preference-tune a model directory on prompt/chosen/rejected pairs (DPO)")
    p.add_argument("--model", required=True, help="the model directory to start from; also the frozen reference")
    p.add_argument("--pairs", required=True, help="a .jsonl file of prompt/chosen/rejected records")
    _add_tune_args(p, "dpo")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("--model", required=True)
    p.add_argument("prompt", nargs="?", help="the prompt; \\n, \\t, \\\\ are escapes (default: standard input, as is)")
    p.add_argument("--no-escape", action="store_true", help="take the prompt argument's backslashes literally")
    # flags left unset: the model directory's generation_config.json, then GenerationConfig's defaults
    add_section_flags(p, GenerationConfig, "sampling", "unset: the model's generation_config.json decides")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a model in the terminal (/help lists the commands)")
    p.add_argument("--model", default=None, help="a model directory")
    p.add_argument("--url", default=None, help="instead of --model: a running `candor serve`, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="the server's API key, with --url (also CANDOR_API_KEY)")
    p.add_argument("--system", default=None, help="the system prompt (/system TEXT changes it)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: generation_config.json)")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="0: off")
    p.add_argument("--top-p", type=float, default=None, help="1: off")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes tokens already in the context less likely (1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    _serve_parsers(sub)

    p = sub.add_parser("eval", help="evaluate a model: bits per byte, tasks, HumanEval, bias probes, robustness")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="held-out data: a token directory (its val split), a .jsonl, a text "
                   "file or a directory; alone (without --tasks/--out): print validation bits per byte only")
    p.add_argument("--tasks", default=None, help="comma-separated: lm, code, pycomplete, humaneval, bias, robustness, "
                   "or task .yaml files (default: all of those)")
    p.add_argument("--out", default=None, help="where results.json goes (default MODEL/eval)")
    p.add_argument("--documents", default=None, help="the curated documents/ the model was trained on "
                   "(code tasks come from its held-out files)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="the data.val_fraction the model was trained with")
    p.add_argument("--humaneval-limit", type=int, default=0, help="first N HumanEval problems (default 0: all 164)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval samples per problem (1: greedy; >= 10: pass@10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=262144, help="held-out tokens to score (default 262144)")
    p.add_argument("--seq-len", type=int, default=0, help="window length of the bits-per-byte-only mode "
                   "(default 0: the model's context)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="MODEL_CARD.md (Hugging Face format) and report.md from a model's results.json")
    p.add_argument("--model", required=True)
    p.add_argument("--results", default=None, help="default MODEL/eval/results.json")
    p.add_argument("--out", default=None, 
                   help="the card's path (default MODEL/MODEL_CARD.md); report.md goes beside it")
    p.add_argument("--name", default=None, help="the model's name in the card (default: the directory's name)")
    p.set_defaults(func=cmd_card)

    sub.add_parser("lm-eval", help="lm-evaluation-harness with model type candor: "
                   "candor lm-eval --model candor --model_args model=DIR --tasks T (the harness's flags)")

    p = sub.add_parser("export", help="write a model directory for transformers (Qwen3) or llama.cpp (GGUF)")
    p.add_argument("--model", required=True)
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument("--type", default=None, help="weights: hf f32 (default), f16, bf16; gguf f32 (default), f16, q8_0")
    p.add_argument("--out", required=True, help="a directory (hf) or a .gguf file (gguf)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a transformers Qwen3 checkpoint directory to a candorlm model directory")
    p.add_argument("--from", dest="src", required=True, help="config.json + safetensors + tokenizer.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("quantize", help="a model directory with int8 or int4 weights")
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, help="int8 (per output row) or int4 (per group of inputs)")
    p.add_argument("--group-size", type=int, default=None, help="int4: 32 (default), 64 or 128 inputs per scale")
    p.add_argument("--embedding", default="int8", help="the embedding and head: int8 (default) or fp32")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("prune", help="zero a share of the hidden weights (magnitude or Wanda)")
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, help="magnitude or wanda")
    p.add_argument("--sparsity", type=float, default=None, help="share of weights zeroed, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured, e.g. 2:4 (keep 2 of every 4 inputs)")
    p.add_argument("--tokens", default=None,
                   help="the run's token shards: wanda's calibration (val.bin), recovery (train.bin)")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="the reporting budget whose windows calibration avoids (default: the run's train.eval_tokens)")
    p.add_argument("--recover-steps", type=int, default=0, help="a fine-tune of this many steps with the mask held")
    p.add_argument("--recover-lr", type=float, default=None, help="recovery AdamW lr (default 3e-4)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("run", help="every stage, from raw text to a model, into runs/<name>/")
    p.add_argument("--name", default="demo")
    p.add_argument("--source", default="stdlib")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt of the greedy completion (default {DEMO_PROMPT!r})")
    # the whole run sizes its model to the machine; `candor pretrain` (also the building block
    # under torchrun, where every rank would measure on its own) keeps cpu-tiny's fixed shape
    _add_config_args(p, default="auto")  # curation settings too: --set curate.FIELD=VALUE
    p.set_defaults(func=cmd_run)
    return ap


def _serve_parsers(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible API server and a web chat for a model")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (also CANDOR_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="requests held at once, running or queued; more get 429 (default 64)")
    p.add_argument("--max-slots", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-model-len", type=int, default=0, help="context per sequence (default 0: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt in full")
    p.add_argument("--speculative", type=int, default=0, help="prompt-lookup draft tokens for greedy requests (0: off)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights and KV cache (default: the model's; bfloat16 where the CPU runs it natively)")
    p.add_argument("--compile", action="store_true", help="compile the one-token decode (~30-40 s at start)")
    p.add_argument("--run-dir", default="runs/serve", help="where feedback.db is kept (default runs/serve)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("feedback", help="the web chat's feedback as training data")
    fsub = p.add_subparsers(dest="action", required=True)
    e = fsub.add_parser("export", help="JSONL for `candor sft` (answers rated up) or `candor dpo` (preferences)")
    e.add_argument("--format", required=True, choices=("sft", "dpo"))
    e.add_argument("--run-dir", default="runs/serve", help="the server's --run-dir (default runs/serve)")
    e.add_argument("--out", required=True, help="the JSONL file to write")
    e.add_argument("--model-version", default=None, help="only feedback on this model version")
    e.set_defaults(func=cmd_feedback)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # the harness's own command line, with the `candor` model type registered
        from candorlm.evaluate.harness import main as harness_main

        harness_main(argv[1:])
        return
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except CandorError as e:
        print(f"candor: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("candor: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
