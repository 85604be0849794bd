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
Completion markers in work/logs/<phase>/completions let an interrupted run resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time

import orjson

from candorlm.data.curate_config import CurateConfig
from candorlm.data.finalize import VERSION, Finalize, finalize
from candorlm.data.ledger import write_json
from candorlm.data.sources import MB, Source, assign, auto_tasks, plan, resolve_source
from candorlm.errors import CandorError

EXECUTORS = ("local", "slurm", "ray")


# ---------------------------------------------------------------------------------------------
# Fingerprints and completion


def _fingerprint(src: Source, units: list[dict], cfg: CurateConfig, tasks: int) -> str:
    ident = [[u.get("rel"), u.get("kind"), u.get("size"), u.get("mtime"), u.get("start"), u.get("groups"),
              u.get("stop"), u.get("error")] for u in units]
    extra = []
    for p in cfg.decontaminate_files:
        st = os.stat(p) if os.path.exists(p) else None
        extra.append([os.path.abspath(p), st and st.st_size, st and st.st_mtime_ns])
    blob = json.dumps({"version": VERSION, "source": [src.kind, src.path], "units": ident, "tasks": tasks,
                       "config": cfg.content_dict(), "eval_files": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _plan(source: str, cfg: CurateConfig):
    src = resolve_source(source)
    units = plan(src, int(cfg.task_mb * MB))
    tasks = cfg.tasks or auto_tasks(units, cfg.task_mb)
    return src, units, tasks, _fingerprint(src, units, cfg, tasks)


def _stats_fingerprint(out_dir: str) -> str | None:
    try:
        with open(os.path.join(str(out_dir), "stats.json")) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str, source: str, cfg: CurateConfig | None = None) -> bool:
    """True when out_dir holds a finished curation of this source (as it is now) with this config.
    A missing source is a CandorError here too, before anything is printed or written."""
    resolve_source(source)
    done = _stats_fingerprint(out_dir)
    return done is not None and done == _plan(source, (cfg or CurateConfig()).validate())[3]


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
                     cfg.txt_doc_chars),
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
                raise CandorError("--executor slurm needs --slurm-partition (the partition to submit to)")
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
    fp_path = os.path.join(work, "fingerprint.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, "stats.json"))
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            if json.load(f).get("fingerprint") == fingerprint:
                return True
    for d in ("work", "documents", "removed"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "manifest.json"), "wb") as f:
        f.write(orjson.dumps(manifest))
    write_json(fp_path, {"fingerprint": fingerprint})
    return False


def _say(msg: str) -> None:
    print(f"[data] {msg}", file=sys.__stderr__, flush=True)


def curate(source: str, out_dir: str, cfg: CurateConfig | None = None, workers: int = 0, executor: str = "local",
           *, force: bool = False, verbose: bool = False, quiet: bool = False) -> dict:
    """Curate `source` into `out_dir` and return the stats (also in out_dir/stats.json). Output
    depends on the source and the config (which fixes the number of tasks), not on `workers`
    (0: all cores). A finished, current out_dir is returned as is unless `force`."""
    cfg = (cfg or CurateConfig()).validate()
    if executor not in EXECUTORS:
        raise CandorError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if workers < 0:
        raise CandorError(f"workers={workers} must be >= 0 (0: all cores)")
    say = (lambda m: None) if quiet else _say
    t_start = time.perf_counter()
    src, units, tasks, fp = _plan(source, cfg)
    out = os.path.abspath(out_dir)
    _check_writable(out)
    sets = {}
    if cfg.decontaminate:
        from candorlm.data.adapters import eval_sets

        sets = eval_sets(cfg.decontaminate_files)  # a missing or malformed file fails here, not in a worker
    if not force and _stats_fingerprint(out) == fp:
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

    phases = _phase_pipelines(cfg, src, work, tasks)
    fin_args = dict(out=out, work=work, cfg_dict=cfg.to_dict(), source={"spec": source, "kind": src.kind,
                    "path": src.path, "inputs": len(units), "mb": round(total_mb, 3)},
                    fingerprint=fp, tasks=tasks, workers=workers, executor=executor,
                    eval_sets={k: len(v) for k, v in sets.items()})
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
    write_json(os.path.join(out, "stats.json"), stats)
    acc = stats["accounting"]["docs"]
    copies = f", added {stats['augmented']} CDA copies" if stats["augmented"] else ""
    say(f"read {acc['read']} documents: kept {acc['kept']}, removed {acc['removed']}, failed {acc['failed']}"
        f"{copies} in {stats['timings_s']['total']:.1f} s"
        + ("" if stats["accounting_ok"] else "  (ACCOUNTING MISMATCH: see stats.json)"))
    return stats


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli_arguments(p) -> None:
    """The curation options (not --source/--out, which the command defines)."""
    g = p.add_argument_group("curation")
    g.add_argument("--workers", type=int, default=0, help="parallel worker processes (default 0: all cores)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="datatrove executor: local processes (default), slurm jobs, or a ray cluster")
    g.add_argument("--tasks", type=int, default=0, help="split the input into this many tasks (default: one per 4 MB)")
    g.add_argument("--pii", choices=("mask", "drop", "off"), default="mask",
                   help="mask PII with typed placeholders (default), drop documents with any, or off")
    g.add_argument("--cda", choices=("none", "gender"), default="none",
                   help="gender: add a gender-swapped copy of each prose document (counterfactual augmentation)")
    g.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    g.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal only")
    g.add_argument("--minhash-bands", type=int, default=CurateConfig.minhash_bands)
    g.add_argument("--minhash-rows", type=int, default=CurateConfig.minhash_rows)
    g.add_argument("--decontaminate", action="append", default=[], metavar="FILE",
                   help="also remove documents sharing a 13-gram with this eval file (.jsonl text / .txt); repeatable")
    g.add_argument("--no-decontaminate", action="store_true", help="skip decontamination (also the built-in eval sets)")
    for name in ("gopher-quality", "gopher-repetition", "c4-quality", "fineweb-quality", "code-quality"):
        g.add_argument(f"--no-{name}", action="store_true", help=f"skip the {name.replace('-', ' ')} filter")
    g.add_argument("--no-bias-audit", action="store_true", help="skip the demographic term audit")
    g.add_argument("--max-doc-mb", type=float, default=CurateConfig.max_doc_mb,
                   help="remove larger documents unread (default 8)")
    g.add_argument("--slurm-partition", default="", help="with --executor slurm: the partition")
    g.add_argument("--slurm-time", default=CurateConfig.slurm_time, help="with --executor slurm: time per task")


def config_from_args(args) -> CurateConfig:
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - the run/data commands share this
    cfg = CurateConfig(
        tasks=g("tasks", 0) or 0, pii=g("pii", "mask"), cda=g("cda", "none"),
        exact_dedup=not g("no_dedup", False), near_dedup=not (g("no_dedup", False) or g("no_near_dedup", False)),
        minhash_bands=g("minhash_bands", CurateConfig.minhash_bands),
        minhash_rows=g("minhash_rows", CurateConfig.minhash_rows),
        decontaminate=not g("no_decontaminate", False),
        decontaminate_files=[os.path.abspath(p) for p in g("decontaminate", []) or []],
        gopher_quality=not g("no_gopher_quality", False), gopher_repetition=not g("no_gopher_repetition", False),
        c4_quality=not g("no_c4_quality", False), fineweb_quality=not g("no_fineweb_quality", False),
        code_quality=not g("no_code_quality", False), bias_audit=not g("no_bias_audit", False),
        max_doc_mb=g("max_doc_mb", CurateConfig.max_doc_mb),
        slurm_partition=g("slurm_partition", "") or "", slurm_time=g("slurm_time", CurateConfig.slurm_time),
    )
    return cfg.validate()


__all__ = ["curate", "is_complete", "add_cli_arguments", "config_from_args", "CurateConfig", "finalize",
           "build_executors"]
