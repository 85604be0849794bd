"""`candor data`: curate a source into documents/, removed/, stats.json and DATA_CARD.md, as a
chain of datatrove pipelines. This file wires the phases and executors; the blocks live in
sources, normalize, filters, dedup, adapters and ledger.

Phases (each a datatrove executor; tasks are fixed by the input, workers only run them):
  process  read -> normalize -> size gate -> quality filters -> decontaminate -> PII ->
           candidates (+ MinHash signatures)                                    [tasks]
  buckets  MinHash LSH buckets -> candidate pairs                               [bands tasks]
  decide   exact groups + near clusters -> what to remove (keep the first)       [1 task]
  final    candidates -> dedup filter -> bias audit -> CDA -> documents          [tasks]
  finalize move documents, merge removed/, stats.json, DATA_CARD.md             [1 task]
Completion markers in work/logs/<phase>/completions let an interrupted run resume. Which filters
run follows the curation preset (`curate.preset`, chosen here for the source when `auto`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import orjson

from candorlm import stage
from candorlm.config import CURATE_PRESETS, CurateConfig
from candorlm.data.finalize import VERSION, Finalize, finalize
from candorlm.data.normalize import CODE_SUFFIXES
from candorlm.data.sources import MB, Source, assign, auto_tasks, plan, resolve_source
from candorlm.errors import CandorError
from candorlm.fields import choices

EXECUTORS = choices(CurateConfig, "executor")
OUTPUTS = ("stats.json", "documents")  # what a finished curation leaves; stats.json is its record


# ---------------------------------------------------------------------------------------------
# The preset, fingerprints and completion


def choose_preset(cfg: CurateConfig, src: Source, units: list[dict]) -> tuple[str, str]:
    """(preset, why) for this source: cfg.preset unless it is auto. The auto rule: the stdlib is
    code; a directory is code when most of its bytes are in source files (by extension), else
    curated; a .txt file is curated; JSONL, Parquet and saved datasets are taken for web crawls."""
    if cfg.preset != "auto":
        return cfg.preset, "set by curate.preset"
    if src.kind == "stdlib":
        return "code", "auto: the standard library is source code"
    if src.kind == "dir":
        total = sum(u["size"] for u in units) or 1
        code = sum(u["size"] for u in units if os.path.splitext(u["rel"])[1].lower() in CODE_SUFFIXES)
        if 2 * code > total:
            return "code", f"auto: {100 * code / total:.0f}% of the directory's bytes are source files"
        return "curated", f"auto: {100 - 100 * code / total:.0f}% of the directory's bytes are not source files"
    if src.kind == "txt":
        return "curated", "auto: a text file"
    return "web", f"auto: a {src.kind} dataset is taken for a web crawl"


def describe_preset(cfg: CurateConfig, why: str) -> str:
    """One line for a resolved cfg: its preset, why, and the filters it runs (any set explicitly too)."""
    on = [k for k in CURATE_PRESETS["web"] if getattr(cfg, k)]
    return (f"preset {cfg.preset} ({why}; --set curate.preset=web|curated|code to change): "
            f"filters {', '.join(on) or 'none'}; split {cfg.split}")


def _fingerprint(src: Source, units: list[dict], cfg: CurateConfig, tasks: int) -> str:
    ident = [[u.get("rel"), u.get("kind"), u.get("size"), u.get("mtime"), u.get("start"), u.get("groups"),
              u.get("stop"), u.get("error")] for u in units]
    extra = []
    for p in cfg.decontaminate_files:
        st = os.stat(p) if os.path.exists(p) else None
        extra.append([os.path.abspath(p), st and st.st_size, st and st.st_mtime_ns])
    return stage.fingerprint({"version": VERSION, "source": [src.kind, src.path], "units": ident, "tasks": tasks,
                              "config": cfg.content_dict(), "eval_files": extra})


def _plan(source: str, cfg: CurateConfig):
    """(source, units, tasks, fingerprint, the config resolved for its preset, why that preset)."""
    src = resolve_source(source)
    cfg = cfg.check()
    units = plan(src, int(cfg.task_mb * MB))
    preset, why = choose_preset(cfg, src, units)
    cfg = dataclasses.replace(cfg, decontaminate_files=[os.path.abspath(p) for p in cfg.decontaminate_files])
    cfg = cfg.resolved(preset)
    tasks = cfg.tasks or auto_tasks(units, cfg.task_mb)
    return src, units, tasks, _fingerprint(src, units, cfg, tasks), cfg, why


def is_complete(out_dir: str, source: str, cfg: CurateConfig | None = None) -> bool:
    """True when out_dir holds a finished curation of this source (as it is now) with this config.
    A missing source is a CandorError here too, before anything is printed or written."""
    resolve_source(source)
    return stage.is_current(out_dir, _plan(source, cfg or CurateConfig())[3], OUTPUTS, record="stats.json")


# ---------------------------------------------------------------------------------------------
# Pipelines


def _phase_pipelines(cfg: CurateConfig, src: Source, work: str, tasks: int) -> dict[str, list]:
    from candorlm.data import adapters, dedup, filters
    from candorlm.data.ledger import LedgerWriter, TaskEnd, TaskStart
    from candorlm.data.normalize import Normalize
    from candorlm.data.reader import SourceReader

    process = [
        TaskStart(work, "process"),
        SourceReader(os.path.join(work, "manifest.json"), src.name,
                     LedgerWriter(work, "process", "read_error", "failed"), work, int(cfg.max_doc_mb * MB),
                     cfg.txt_doc_chars, cfg.split),
        Normalize(cfg.fix_mojibake),
        filters.SizeGate(exclusion_writer=LedgerWriter(work, "process", "size")),
        *[step for _, step in filters.quality_steps(cfg, work)],
    ]
    if cfg.decontaminate:
        process.append(adapters.Decontaminate(cfg.decontaminate_files, cfg.decontaminate_n,
                                              exclusion_writer=LedgerWriter(work, "process", "decontamination")))
    if cfg.pii != "off":
        process.append(adapters.PIIScrub(cfg.pii, work, exclusion_writer=LedgerWriter(work, "process", "pii")))
    process.append(dedup.CandidateWriter(work))
    if cfg.near_dedup:
        process.append(dedup.signature_step(cfg, work))
    process.append(TaskEnd(work, "process"))

    final = [TaskStart(work, "final"), dedup.CandidateReader(work),
             dedup.DedupFilter(work, exclusion_writer=LedgerWriter(work, "final", "dedup"))]
    if cfg.bias_audit:
        final.append(adapters.BiasAudit(work, "bias"))
    if cfg.cda == "gender":
        final.append(adapters.GenderCDA())
        if cfg.bias_audit:
            final.append(adapters.BiasAudit(work, "bias_after_cda"))
    final += [adapters.DocumentsWriter(work), TaskEnd(work, "final")]
    phases = {"process": process}
    if cfg.near_dedup:
        phases["buckets"] = [TaskStart(work, "buckets"), dedup.buckets_step(cfg, work), TaskEnd(work, "buckets")]
    phases["decide"] = [dedup.DedupDecide(work, tasks, cfg.exact_dedup, cfg.near_dedup)]
    phases["final"] = final
    return phases


def _phase_tasks(phase: str, cfg: CurateConfig, tasks: int) -> int:
    return {"buckets": cfg.minhash_bands, "decide": 1}.get(phase, tasks)


class _Quiet:
    """Keeps datatrove's console logging out of the user's terminal (it still goes to each task's
    log file under work/logs/); used inside local worker processes and around the whole run."""

    sink = None

    @classmethod
    @contextlib.contextmanager
    def stderr(cls):
        from datatrove.utils.logging import setup_default_logger

        if cls.sink is None:
            cls.sink = open(os.devnull, "w")
        saved, sys.stderr = sys.stderr, cls.sink
        setup_default_logger()
        try:
            yield
        finally:
            sys.stderr = saved
            setup_default_logger()


# Modules the forkserver imports once, so each worker process starts with them loaded (~0.8 s
# each otherwise). "__main__" (multiprocessing's default) is left out: see _main_module_hidden.
_PRELOAD = ["candorlm.data.curate", "candorlm.data.adapters", "candorlm.data.pii", "candorlm.data.decontam",
            "candorlm.data.bias", "candorlm.data.cda", "datatrove.pipeline.filters", "datatrove.pipeline.dedup.minhash"]


@contextlib.contextmanager
def _main_module_hidden():
    """While worker processes start, hide the __main__ module's file and spec so the workers
    do not re-run the user's script (what multiprocessing does under spawn/forkserver, and why
    an unguarded script hangs). The pipeline steps live in importable modules, and dill pickles
    anything defined in __main__ by value, so the workers never need __main__."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    for k in saved:
        if k == "__spec__":
            main.__spec__ = None
        else:
            del main.__file__
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _local_executor_class(quiet: bool):
    import multiprocess
    from datatrove.executor import LocalPipelineExecutor

    # effective only before the first forkserver start in this process
    multiprocess.get_context("forkserver").set_forkserver_preload(_PRELOAD)

    class CandorLocalExecutor(LocalPipelineExecutor):
        def _launch_run_for_rank(self, rank: int, ranks_q, completed=None, completed_lock=None):
            if not quiet:
                return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)
            with _Quiet.stderr():
                return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)

    return CandorLocalExecutor


def build_executors(phases: dict[str, list], cfg: CurateConfig, work: str, tasks: int, workers: int,
                    executor: str, quiet: bool = True, finalize_step=None) -> dict:
    """One datatrove executor per phase. Slurm and Ray executors are chained with `depends`, so
    running the last one runs (or submits) them all in order."""
    executors, prev = {}, None
    items = list(phases.items()) + ([("finalize", [finalize_step])] if finalize_step is not None else [])
    for name, pipeline in items:
        n = _phase_tasks(name, cfg, tasks) if name != "finalize" else 1
        logdir = os.path.join(work, "logs", name)
        if executor == "local":
            from datatrove.executor import LocalPipelineExecutor  # noqa: F401 - documented peer

            ex = _local_executor_class(quiet)(pipeline, tasks=n, workers=max(1, min(workers, n)), logging_dir=logdir)
        elif executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            if not cfg.slurm_partition:
                raise CandorError("curate.executor=slurm needs curate.slurm_partition (the partition to submit to)")
            ex = SlurmPipelineExecutor(pipeline, tasks=n, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                       cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
                                       qos=cfg.slurm_qos or "normal", job_name=f"candor-{name}", logging_dir=logdir,
                                       workers=workers if workers > 0 else -1, depends=prev,
                                       venv_path=venv if os.path.exists(venv := os.path.join(sys.prefix, "bin",
                                                                                             "activate")) else None)
        elif executor == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            ex = RayPipelineExecutor(pipeline, tasks=n, workers=workers if workers > 0 else -1,
                                     logging_dir=logdir, depends=prev, cpus_per_task=cfg.ray_cpus_per_task)
        else:
            raise CandorError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
        executors[name] = prev = ex
    return executors


# ---------------------------------------------------------------------------------------------
# The entry point


OURS = ("work", "documents", "removed", "stats.json", "DATA_CARD.md")


def _check_writable(out: str) -> None:
    """out must be new, empty, or an earlier `candor data` output: resuming or redoing a run
    deletes work/, documents/ and removed/ there, which must never be someone else's files."""
    if os.path.isdir(out):
        foreign = [n for n in os.listdir(out) if not (n in OURS or n.startswith(("data_card_", ".")))]
        if foreign:
            raise CandorError(f"output directory '{out}' is not empty and not a `candor data` output "
                              f"(it has {', '.join(sorted(foreign)[:3])}); choose a new or empty directory")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".candor-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise CandorError(f"cannot write to output directory '{out}': {e.strerror or e}") from None


def _prepare_work(out: str, work: str, fingerprint: str, manifest: dict) -> bool:
    """Reuse work/ when it belongs to this fingerprint (resume); else start clean. Returns True
    when resuming."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, "stats.json"))
    if stage.is_current(work, fingerprint, ["manifest.json"], record="fingerprint.json"):
        return True
    for d in ("work", "documents", "removed"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "manifest.json"), "wb") as f:
        f.write(orjson.dumps(manifest))
    stage.mark_current(work, fingerprint, record="fingerprint.json")
    return False


def _say(msg: str) -> None:
    print(f"[data] {msg}", file=sys.__stderr__, flush=True)


def curate(source: str, out_dir: str, cfg: CurateConfig | None = None, workers: int | None = None,
           executor: str | None = None, *, force: bool = False, verbose: bool = False, quiet: bool = False) -> dict:
    """Curate `source` into `out_dir` and return the stats (also in out_dir/stats.json). Output
    depends on the source and the config (which fixes the number of tasks), not on the workers
    (0: all cores). workers/executor, when given, replace cfg's. A finished, current out_dir is
    returned as is unless `force`."""
    cfg = dataclasses.replace(cfg or CurateConfig(), **{k: v for k, v in (("workers", workers),
                              ("executor", executor)) if v is not None})
    say = (lambda m: None) if quiet else _say
    t_start = time.perf_counter()
    src, units, tasks, fp, cfg, why = _plan(source, cfg)
    workers, executor = cfg.workers, cfg.executor
    out = os.path.abspath(out_dir)
    _check_writable(out)
    sets = {}
    if cfg.decontaminate:
        from candorlm.data.adapters import eval_sets

        sets = eval_sets(cfg.decontaminate_files)  # a missing or malformed file fails here, not in a worker
    if not force and stage.is_current(out, fp, OUTPUTS, record="stats.json"):
        with open(os.path.join(out, "stats.json")) as f:
            return json.load(f)
    work = os.path.join(out, "work")
    if force:
        shutil.rmtree(work, ignore_errors=True)
    groups = assign(units, tasks)
    resumed = _prepare_work(out, work, fp, {"source": [src.kind, src.path], "tasks": groups})
    workers = workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1)
    total_mb = sum(u["size"] for u in units) / 1e6
    say(f"{'resuming' if resumed else 'curating'} {source}: {len(units)} inputs, {total_mb:.1f} MB, "
        f"{tasks} tasks on {workers} {executor} workers -> {out}")
    say(describe_preset(cfg, why))

    phases = _phase_pipelines(cfg, src, work, tasks)
    # the config as stats.json reports it; workers are left out: they never change the output
    reported = {k: v for k, v in cfg.to_dict().items() if k != "workers"}
    fin_args = dict(out=out, work=work, cfg_dict=reported, source={"spec": source, "kind": src.kind,
                    "path": src.path, "inputs": len(units), "mb": round(total_mb, 3)},
                    fingerprint=fp, tasks=tasks, workers=workers, executor=executor,
                    eval_sets={k: len(v) for k, v in sets.items()}, preset={"name": cfg.preset, "why": why})
    if executor == "slurm":
        exs = build_executors(phases, cfg, work, tasks, workers, executor, finalize_step=Finalize(**fin_args))
        exs["finalize"].run()
        say(f"submitted {len(exs)} Slurm jobs; stats.json appears in {out} when they finish")
        return {"submitted": True, "out": out, "phases": list(exs), "fingerprint": fp}
    if executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=verbose)

    quiet_logs = not verbose and executor == "local"
    exs = build_executors(phases, cfg, work, tasks, workers, executor, quiet=quiet_logs)
    timings = {"plan": round(time.perf_counter() - t_start, 3)}
    with _Quiet.stderr() if quiet_logs else contextlib.nullcontext(), _main_module_hidden():
        for name, ex in exs.items():
            t0 = time.perf_counter()
            if name == "decide" and executor == "local":
                from candorlm.data.dedup import decide

                decide(work, tasks, cfg.exact_dedup, cfg.near_dedup)  # one task: no process to start
            else:
                ex.run()
            timings[name] = round(time.perf_counter() - t0, 3)
    stats = finalize(**fin_args, timings=timings)
    stats["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    stage.mark_current(out, fp, stats, record="stats.json")
    acc = stats["accounting"]["docs"]
    copies = f", added {stats['augmented']} CDA copies" if stats["augmented"] else ""
    say(f"read {acc['read']} documents: kept {acc['kept']}, removed {acc['removed']}, failed {acc['failed']}"
        f"{copies} in {stats['timings_s']['total']:.1f} s"
        + ("" if stats["accounting_ok"] else "  (ACCOUNTING MISMATCH: see stats.json)"))
    return stats


__all__ = ["curate", "is_complete", "choose_preset", "describe_preset", "finalize", "build_executors"]
