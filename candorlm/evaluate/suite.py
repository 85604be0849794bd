"""`candor eval`'s suite: every evaluation of one model directory into OUT/results.json (plus
OUT/samples.jsonl with each generated completion and its outcome), and the training facts
the model card needs, so every number the card shows comes from that one file.

Task names (`tasks`): lm (bits per byte and perplexity on held-out data), pycomplete, code (the
held-out stdlib tasks of evaluate/code_tasks.py; needs the curated documents), humaneval, bias
(evaluate/probes.py), robustness (evaluate/robustness.py over the multiple-choice tasks run),
or a path to a task YAML (evaluate/tasks.py). A task that cannot run here (no held-out data, no
documents) is listed under "skipped" with the reason, never silently left out. `costs_s`
records the seconds each took.

It does not render cards (report/model_card.py does, from results.json).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from candorlm.errors import CandorError
from candorlm.fileio import atomic_write_json, atomic_write_text

DEFAULT_TASKS = ("lm", "code", "pycomplete", "humaneval", "bias", "robustness")
KNOWN = ("lm", "code", "pycomplete", "humaneval", "bias", "robustness")
# Energy is estimated, not measured: the assumed draw of one busy core under AVX-512 load (a Zen4
# desktop part runs ~10-20 W a core at full load; 15 W is the middle), times the cores, times the time.
WATTS_PER_CORE = 15.0


def parse_tasks(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    items = list(DEFAULT_TASKS) if spec is None else ([s.strip() for s in spec.split(",")] if isinstance(spec, str)
                                                      else list(spec))
    for t in items:
        if t not in KNOWN and not t.endswith((".yaml", ".yml")):
            raise CandorError(f"--tasks: {t!r} is not one of {', '.join(KNOWN)} or a task .yaml file")
    return [t for t in items if t]


def hardware() -> dict:
    import torch

    from candorlm.device import cpu_has_bf16, cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_bf16(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def training_facts(model_dir: Path) -> dict:
    """Steps, tokens, time, throughput from the `done` records of the model's log.jsonl and of
    the base model it was tuned from (a sibling base/), and an energy estimate."""
    facts, seconds = {}, 0.0
    for stage, d in (("pretrain", model_dir.parent / "base"), ("finetune", model_dir)):
        if stage == "finetune" and d.resolve() == (model_dir.parent / "base").resolve():
            continue
        log = d / "log.jsonl"
        if not log.is_file():
            continue
        done = [json.loads(line) for line in log.read_text().splitlines() if '"done"' in line]
        if done:
            r = done[-1]
            keep = ("step", "tokens_seen", "train_time_s", "tok_s", "mfu", "params", "val_bpb")
            facts[stage] = {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep if k in r}
            seconds += float(r.get("train_time_s", 0.0))
    hw = hardware()
    watts = WATTS_PER_CORE * hw["threads"]
    facts["energy"] = {"train_time_s": round(seconds, 1), "assumed_watts": watts,
                       "watt_hours": round(watts * seconds / 3600, 3),
                       "assumption": f"{WATTS_PER_CORE:g} W per busy CPU thread x {hw['threads']} threads x training "
                                     "time; not measured (no power meter is read)"}
    return facts


def training_data(documents: str | Path | None, card_dir: Path) -> dict | None:
    """The data card's headline facts from the curated corpus's stats.json (beside documents/);
    data_card is the card's path relative to card_dir (where MODEL_CARD.md goes)."""
    if documents is None or not (Path(documents).parent / "stats.json").is_file():
        return None
    stats = json.loads((Path(documents).parent / "stats.json").read_text())
    audit = stats.get("audit") or {}
    card = os.path.relpath(Path(documents).parent / "DATA_CARD.md", card_dir)
    out = {"data_card": card, "read": stats.get("read"), "kept": stats.get("kept"),
           "cda": stats.get("cda")}
    for key in ("corpus", "after_cda"):
        a = audit.get(key)
        if a and a.get("skew"):
            out[key] = {"skewed": a["skewed"], "occupation_score": a["skew"]["occupation_score"],
                        "gender_ratio_bits": a["skew"]["gender_ratio_bits"],
                        "threshold_bits": a["skew"]["threshold_bits"]}
    return out


def evaluate_model(model_dir: str | Path, out_dir: str | Path, tasks=None, data: str | Path | None = None,
                   documents: str | Path | None = None, val_fraction: float = 0.02, seed: int = 0,
                   lm_tokens: int = 32768, code_items: int = 100, generate_items: int = 31,
                   humaneval_limit: int | None = None,
                   humaneval_samples: int = 1, max_new_tokens: int = 96, robustness_items: int = 50,
                   device: str = "cpu", quiet: bool = False) -> dict:
    """Run `tasks` on the model, write out_dir/results.json and samples.jsonl; returns the results."""
    from candorlm.evaluate.scoring import Scorer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    names = parse_tasks(tasks)
    scorer = Scorer.from_dir(model_dir, device=device)
    shape = ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
    cfg = json.loads((model_dir / "config.json").read_text())["model"]
    res: dict = {"model": str(model_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "precision": scorer.precision, "seed": seed, "hardware": hardware(),
                 "model_config": {k: cfg[k] for k in shape if k in cfg},
                 "params": sum(p.numel() for p in scorer.model.parameters()),
                 "training": training_facts(model_dir), "training_data": training_data(documents, out_dir.parent),
                 "tasks": {}, "skipped": {}, "costs_s": {}}
    samples: list[dict] = []
    mc_tasks = []

    def say(msg):
        if not quiet:
            print(f"[eval] {msg}", flush=True)

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        res["costs_s"][name] = round(time.perf_counter() - t0, 1)
        say(f"{name}: {res['costs_s'][name]} s")
        return out

    from candorlm.evaluate import tasks as T

    def run_one(task):
        r = T.run_task(scorer, task, seed)
        res["tasks"][task.name] = r
        if task.kind == "multiple_choice":
            mc_tasks.append(task)

    for name in names:
        if name == "lm":
            from candorlm.evaluate.lm import heldout_documents, lm_metrics

            if data is None:
                res["skipped"]["lm"] = "no held-out data given (a token directory, file or directory)"
                continue
            docs = heldout_documents(data, scorer.tokenizer)
            res["lm"] = timed("lm", lambda d=docs: {"data": str(data), **lm_metrics(scorer, d, lm_tokens, seed=seed)})
        elif name == "pycomplete":
            task = T.pycomplete()
            task.max_new_tokens, task.items = max_new_tokens, task.items[:generate_items]
            timed("pycomplete", lambda t=task: run_one(t))
        elif name == "code":
            from candorlm.evaluate.code_tasks import build_code_tasks, heldout_functions

            if documents is None or not Path(documents).is_dir():
                res["skipped"]["code"] = "no curated documents/ directory to take held-out files from"
                continue
            fs = heldout_functions(documents, val_fraction, seed=0)
            built = build_code_tasks(fs, max_items=code_items, seed=seed, max_new_tokens=max_new_tokens,
                                     generate_items=generate_items)
            if not built:
                res["skipped"]["code"] = "the held-out files have no function with a docstring and a short body"
            for t in built:
                timed(t.name, lambda t=t: run_one(t))
            for missing in {"code_body_choice", "code_parses", "code_doctest"} - {t.name for t in built}:
                res["skipped"][missing] = "too few held-out functions of this kind"
        elif name == "humaneval":
            from candorlm.evaluate.humaneval import evaluate_humaneval

            r = timed("humaneval", lambda: evaluate_humaneval(
                scorer, n_samples=humaneval_samples, ks=(1, 10) if humaneval_samples >= 10 else (1,),
                limit=humaneval_limit, max_new_tokens=max_new_tokens, seed=seed))
            samples += [{"task": "humaneval", **d} for d in r.pop("details")]
            res["humaneval"] = r
        elif name == "bias":
            from candorlm.evaluate.probes import run_probes

            res["bias"] = timed("bias", lambda: run_probes(scorer, seed))
        elif name == "robustness":
            continue  # after the tasks it perturbs
        else:
            timed(Path(name).stem, lambda p=name: run_one(T.load_task(p)))
    if "robustness" in names:
        from candorlm.evaluate.robustness import robustness

        if not mc_tasks:
            res["skipped"]["robustness"] = "no multiple-choice task was run to perturb"
        else:
            small = [T.Task(**{**t.__dict__, "items": t.items[:robustness_items]}) for t in mc_tasks]
            res["robustness"] = timed("robustness", lambda: robustness(scorer, small, seed=seed))
            res["robustness_items"] = min(robustness_items, max(len(t.items) for t in mc_tasks))
    res["costs_s"]["total"] = round(sum(res["costs_s"].values()), 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_json(out_dir / "results.json", res)
    return res
