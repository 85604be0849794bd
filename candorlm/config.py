"""Configuration for every stage: dataclasses, presets, and `--set section.field=value` overrides.

Each section is a dataclass whose type hints say what a field accepts (`Literal` choices,
`Annotated` ranges: candorlm/fields.py); `check()` validates it. Nothing here touches torch or
datatrove; every other module reads its settings from these classes.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from candorlm.errors import CandorError
from candorlm.fields import Section, hints, parse


@dataclass
class ModelConfig(Section):
    """A decoder-only transformer. The defaults are Qwen3's choices (RMSNorm, RoPE, GQA,
    SwiGLU, per-head QK-norm), so a default model exports to `transformers` unchanged."""

    section: ClassVar[str] = "model"
    vocab_size: Annotated[int, ">= 1"] = 8192
    d_model: Annotated[int, ">= 1"] = 256
    n_layers: Annotated[int, ">= 1"] = 4
    n_heads: Annotated[int, ">= 1"] = 4
    n_kv_heads: Annotated[int, ">= 1"] = 2  # GQA: n_heads must be a multiple; 1 is MQA, n_heads is MHA
    head_dim: Annotated[int, ">= 0 (0: derived from d_model)"] = 0  # 0: d_model // n_heads
    # 0: derived by `resolved()` (SwiGLU: ~8/3 d_model rounded to 64; else 4 d_model)
    d_ff: Annotated[int, ">= 0 (0: derived from d_model)"] = 0
    max_seq_len: Annotated[int, ">= 1"] = 512
    pos_encoding: Literal["rope", "alibi", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: Annotated[float, "> 0"] = 10000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: Annotated[float, "> 0"] = 1e-6
    qk_norm: bool = True
    mlp: Literal["swiglu", "relu2", "gelu"] = "swiglu"
    tie_embeddings: bool = True
    # Sparse attention: a pattern of S (sliding window) and L (full context) tiled over the
    # layers, e.g. "SSSL"; the last layer is always L. "" means every layer is full.
    window_pattern: str = ""
    window_size: Annotated[int, ">= 1"] = 128
    logit_softcap: Annotated[float, ">= 0 (0: off)"] = 0.0  # else logits = c * tanh(logits / c)
    init_std: Annotated[float, "> 0"] = 0.02
    # How attention is computed (not what), resolved for the device the model is built for
    # (model/attention.py). Weights do not depend on it.
    attention_backend: Literal["auto", "sdpa", "cpu", "flex"] = "auto"

    def rules(self):
        yield (self.n_heads % self.n_kv_heads == 0,
               f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        yield (set(self.window_pattern) <= {"S", "L"},
               f"model.window_pattern={self.window_pattern!r} may only contain S (sliding) and L (full), e.g. SSSL")
        yield (self.pos_encoding != "rope" or self.head_dim % 2 == 0,
               f"rope needs an even head_dim, got {self.head_dim}")

    def resolved(self) -> "ModelConfig":
        """A checked copy with the derived fields (head_dim, d_ff) filled in."""
        c = dataclasses.replace(self)
        c.check_fields()  # the rules need head_dim, derived below
        if c.head_dim == 0:
            if c.d_model % c.n_heads:
                raise CandorError(f"model.d_model={c.d_model} is not divisible by model.n_heads={c.n_heads}; "
                                  "set model.head_dim explicitly")
            c.head_dim = c.d_model // c.n_heads
        if c.d_ff == 0:
            # SwiGLU has three matrices, so 2/3 of 4*d keeps parameters equal to a 4*d GELU MLP
            # (Shazeer 2020); rounded up to a multiple of 64 for matmul efficiency.
            c.d_ff = (int(8 * c.d_model / 3) + 63) // 64 * 64 if c.mlp == "swiglu" else 4 * c.d_model
        return c.check()

    def layer_windows(self) -> list[int]:
        """Per-layer attention window in tokens; 0 means full causal context."""
        if not self.window_pattern:
            return [0] * self.n_layers
        p = self.window_pattern
        w = [self.window_size if p[i % len(p)] == "S" else 0 for i in range(self.n_layers)]
        w[-1] = 0  # the last layer always sees the whole context
        return w


@dataclass
class TrainConfig(Section):
    section: ClassVar[str] = "train"
    seq_len: Annotated[int, ">= 1"] = 256
    batch_size: Annotated[int, ">= 1"] = 16  # sequences per micro-batch (per rank)
    grad_accum: Annotated[int, ">= 1"] = 1
    max_steps: Annotated[int, ">= 0"] = 1000
    optimizer: Literal["muon", "adamw"] = "muon"
    lr: Annotated[float, ">= 0"] = 3e-3  # AdamW lr (embeddings, head, norms; every parameter with optimizer=adamw)
    matrix_lr: Annotated[float, ">= 0"] = 0.02  # Muon lr for 2-D hidden matrices (see train/optim.py)
    weight_decay: Annotated[float, ">= 0"] = 0.0
    beta1: Annotated[float, "[0, 1)"] = 0.9
    beta2: Annotated[float, "[0, 1)"] = 0.95
    warmup_steps: Annotated[int, ">= 0"] = 20
    decay_frac: Annotated[float, "[0, 1]"] = 0.3  # warmup-stable-decay: the last 30% of steps decay linearly
    min_lr_frac: Annotated[float, "[0, 1]"] = 0.0
    grad_clip: Annotated[float, ">= 0 (0: off)"] = 1.0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the hardware has it
    compile: bool = False
    eval_every: Annotated[int, ">= 0 (0: off)"] = 100
    eval_tokens: Annotated[int, ">= 1"] = 65536
    save_every: Annotated[int, ">= 0 (0: off)"] = 200
    log_every: Annotated[int, ">= 1"] = 10
    seed: int = 1337
    # else stop (with a final eval and save) after this long
    time_budget_s: Annotated[float, ">= 0 (0: off)"] = 0.0
    parallel: Literal["none", "ddp", "fsdp", "tp", "fsdp+tp"] = "none"  # see distributed/parallelize.py
    tp_size: Annotated[int, ">= 1"] = 1
    activation_checkpointing: bool = False


TOKENIZER_MIN_VOCAB = 262  # tokenizer.SPECIAL_TOKENS (6) + the 256 byte tokens


@dataclass
class TokenizerConfig(Section):
    section: ClassVar[str] = "tokenizer"
    vocab_size: Annotated[int, f">= {TOKENIZER_MIN_VOCAB} (6 special tokens + 256 bytes)"] = 8192
    min_frequency: Annotated[int, ">= 0"] = 2
    # else a prefix of the corpus this many bytes long
    max_train_bytes: Annotated[int, ">= 0 (0: all documents)"] = 0


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"
    source: str = "stdlib"
    val_fraction: Annotated[float, "[0, 1)"] = 0.02  # of documents (whole files), chosen by a hash of their id


# The demo's probe of the base model: a module's opening, as code files begin (a bare `class` at a
# file's start reads as prose to a model of the standard library, whose files open with docstrings
# and imports); `candor run --prompt` changes it.
DEMO_PROMPT = "import os\n\n\nclass "


@dataclass
class GenerationConfig(Section):
    """Sampling settings and their defaults, for every path that generates: `generation.generate_ids`,
    the Python API, `candor generate`, and the generation_config.json of a model directory. A
    setting given explicitly wins over the model directory's file, which wins over these."""

    section: ClassVar[str] = "generation"
    max_new_tokens: Annotated[int, ">= 0"] = 128
    temperature: Annotated[float, ">= 0 (0: greedy)"] = 0.8
    top_k: Annotated[int, ">= 0 (0: off)"] = 50
    # Holtzman et al. 2020 found 0.9-0.95 the range where nucleus samples read most like human text
    top_p: Annotated[float, "(0, 1] (1: off)"] = 0.95
    repetition_penalty: Annotated[float, "> 0 (1: off)"] = 1.0  # CTRL's (Keskar et al. 2019)
    seed: Annotated[int | None, "(none: a fresh seed each call)"] = None
    heal: bool = True  # token healing: the prompt's last token is regenerated (see api.py)

    def updated(self, **settings) -> "GenerationConfig":
        """A checked copy with each setting given (not None) replacing this config's."""
        unknown = sorted(set(settings) - set(hints(GenerationConfig)))
        if unknown:
            raise CandorError(f"unknown generation settings {unknown}: "
                              f"accepted are {', '.join(hints(GenerationConfig))}")
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None}).check()

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        """The settings of a generation_config.json; keys that are not ours (Hugging Face's
        do_sample, bos_token_id ...) are left for their readers."""
        return cls().updated(**{k: v for k, v in d.items() if k in hints(cls)})


# --- curation -----------------------------------------------------------------------------------
# Every threshold a curation filter uses lives here, so stats.json and the data card can report the
# exact values a corpus was made with; data/filters.py turns them into datatrove filters.

def _gopher_quality() -> dict:
    # Rae et al. 2021 (Gopher, arXiv:2112.11446, App. A.1.1), as datatrove ships them.
    return dict(min_doc_words=50, max_doc_words=100_000, min_avg_word_length=3, max_avg_word_length=10,
                max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
                max_non_alpha_words_ratio=0.8, min_stop_words=2)


def _gopher_repetition() -> dict:
    # Gopher Table A1: duplicate line/paragraph fractions and top/duplicate n-gram character fractions.
    return dict(dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
                top_n_grams=[[2, 0.2], [3, 0.18], [4, 0.16]],
                dup_n_grams=[[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]])


def _c4() -> dict:
    # Raffel et al. 2020 (C4), with FineWeb's one change (Penedo et al. 2024): lines without
    # terminal punctuation are kept, since dropping them removed too much good text.
    return dict(split_paragraph=True, remove_citations=True, filter_no_terminal_punct=False,
                min_num_sentences=5, min_words_per_line=3, max_word_length=1000, filter_lorem_ipsum=True,
                filter_javascript=True, filter_curly_bracket=True, filter_policy=True)


def _fineweb() -> dict:
    # Penedo et al. 2024 (FineWeb, arXiv:2406.17557 §3.3): the three custom heuristics.
    return dict(line_punct_thr=0.12, line_punct_exclude_zero=False, short_line_thr=0.67, short_line_length=30,
                char_duplicates_ratio=0.01, new_line_ratio=0.3)


def _text_sanity() -> dict:
    # Broken text, not poor text (data/filters.py: TextSanityFilter). Fewer than 2 visible characters
    # carry nothing ("42" is a whole fortune; "-" is a separator); one character in 100 lost to
    # U+FFFD or unassigned/private code points means the bytes were decoded wrongly upstream; no
    # English word or URL comes near 1000 characters without a space, base64 and hex dumps do.
    return dict(min_chars=2, max_undecodable_frac=0.01, mojibake=True, max_run_chars=1000)


PROSE_FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
# What each curation preset switches on; a filter set explicitly (`--set curate.c4_quality=true`)
# overrides its preset. web: FineWeb's web-crawl filters. curated: text someone already chose
# (books, licenses, notes), where those filters remove good text: only what catches broken text.
# code: source code, as the stdlib default has always been curated (prose filters never saw it).
CURATE_PRESETS: dict[str, dict[str, bool]] = {
    "web": {**dict.fromkeys(PROSE_FILTERS, True), "code_quality": True, "text_sanity": False},
    "curated": {**dict.fromkeys(PROSE_FILTERS, False), "code_quality": False, "text_sanity": True},
    "code": {**dict.fromkeys(PROSE_FILTERS, False), "code_quality": True, "text_sanity": False},
}
SPLITS = ("auto", "none", "blank", "percent", "regex:PATTERN")
Switch = Annotated[bool | None, "(none: the preset decides)"]  # a filter on, off, or as CURATE_PRESETS says


@dataclass
class CurateConfig(Section):
    section: ClassVar[str] = "curate"
    # auto: code for the stdlib and directories mostly of source files, curated for other
    # directories and .txt files, web for .jsonl/.parquet/saved datasets (data/curate.py: choose_preset)
    preset: Literal["auto", "web", "curated", "code"] = "auto"

    # --- reading and sharding ---
    # How a .txt source (and, in a directory, each file that is not source code) becomes documents:
    # auto: a single .txt is cut at blank lines into documents of >= txt_doc_chars, a directory's files
    # are one document each; none: one document per file; blank: one per paragraph; percent: one per
    # entry of a fortune file (entries end at a line holding only %); regex:PATTERN: a line matching
    # PATTERN (the whole line) ends a document.
    split: Annotated[str, "(auto, none, blank, percent or regex:PATTERN)"] = "auto"
    # Output depends on `tasks` (how input is split), never on how many workers run them.
    # 0: one task per `task_mb` of input (the stdlib, ~31 MB, gives 8 tasks), at most 1024.
    tasks: Annotated[int, ">= 0 (0: one per task_mb of input)"] = 0
    task_mb: Annotated[float, "> 0"] = 4.0
    # Larger documents are removed as size:too_large before any work is spent on them (a single
    # 200 MB line would take Gopher ~400 s). The largest stdlib file is 0.76 MB.
    max_doc_mb: Annotated[float, "> 0"] = 8.0
    # split=auto cuts a .txt source into documents of at least this many characters (one document
    # per paragraph would fall under Gopher's 50-word minimum; one per file would give the
    # tokenizer's validation split nothing to choose from).
    txt_doc_chars: Annotated[int, ">= 1"] = 4096
    workers: Annotated[int, ">= 0 (0: all cores)"] = 0
    executor: Literal["local", "slurm", "ray"] = "local"

    # --- normalization ---
    fix_mojibake: bool = True  # ftfy; skipped for pure-ASCII text, which cannot contain mojibake

    # --- quality filters (prose filters see only prose, code filters only code) ---
    gopher_quality: Switch = None
    gopher_repetition: Switch = None
    c4_quality: Switch = None
    fineweb_quality: Switch = None
    code_quality: Switch = None
    text_sanity: Switch = None  # every document, prose and code
    # C4 also deletes lines (short, "javascript", cookie-policy) and joins the rest without blank
    # lines: right for web pages, wrong for Markdown/reST structure. By default only its document
    # decisions apply; True applies its line edits as published.
    c4_rewrite_lines: bool = False
    gopher_quality_args: dict = field(default_factory=_gopher_quality)
    gopher_repetition_args: dict = field(default_factory=_gopher_repetition)
    c4_quality_args: dict = field(default_factory=_c4)
    fineweb_quality_args: dict = field(default_factory=_fineweb)
    text_sanity_args: dict = field(default_factory=_text_sanity)
    # In the spirit of StarCoder (Li et al. 2023, §3; The Stack, Kocetkov et al. 2022):
    code_max_line_length: Annotated[int, ">= 1"] = 1000
    code_max_mean_line_length: Annotated[float, "> 0"] = 100.0
    code_min_alnum_frac: Annotated[float, "[0, 1]"] = 0.25
    code_autogen_markers: list = field(default_factory=lambda: ["auto-generated", "autogenerated",
                                                                "automatically generated", "do not edit"])
    code_autogen_lines: Annotated[int, ">= 0"] = 5  # markers are looked for in this many first lines
    # Paths exempt from the auto-generated check. The stdlib's pydoc_data/topics.py is Sphinx's
    # "Autogenerated" help text: 0.76 MB of English documentation, kept on purpose.
    code_autogen_exempt: list = field(default_factory=lambda: ["pydoc_data/topics.py"])
    code_blob_max_chars: Annotated[int, ">= 1"] = 1024  # one base64/hex/escape run longer than this removes the file
    code_blob_max_frac: Annotated[float, "[0, 1]"] = 0.5  # as does blob text over this fraction of the file

    # --- PII, decontamination ---
    pii: Literal["mask", "drop", "off"] = "mask"
    decontaminate: bool = True
    decontaminate_files: list = field(default_factory=list)  # extra eval sets: .jsonl (text) or .txt (a line each)
    decontaminate_n: Annotated[int, ">= 1"] = 13  # n-gram length (GPT-3's decontamination used 13-grams)

    # --- dedup ---
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash_ngrams: Annotated[int, ">= 1"] = 5  # word 5-grams, as in datatrove and FineWeb
    # bands x rows: the cheapest setting bench/dedup_quality.py finds meeting both targets with a
    # two-standard-error margin (5,356 pairs): 18 x 11 (198 hashes) found 99.4% of pairs with
    # Jaccard >= 0.85 (98.3% in [0.85, 0.90)) and 0.29% of pairs with J <= 0.5. datatrove's
    # default 14 x 8 let 1.7% of J <= 0.5 pairs through. Threshold (1/b)^(1/r) = 0.769.
    minhash_bands: Annotated[int, ">= 1"] = 18
    minhash_rows: Annotated[int, ">= 1"] = 11
    minhash_seed: int = 1

    # --- audit and augmentation ---
    bias_audit: bool = True
    cda: Literal["none", "gender"] = "none"  # counterfactual augmentation, see candorlm/data/cda.py

    # --- cluster executors (ignored by the local executor) ---
    slurm_partition: str = ""
    slurm_time: str = "04:00:00"
    slurm_cpus_per_task: Annotated[int, ">= 1"] = 1
    slurm_mem_per_cpu_gb: Annotated[int, ">= 1"] = 2
    slurm_qos: str = ""
    ray_cpus_per_task: Annotated[int, ">= 1"] = 1

    def rules(self):
        import re

        ok = self.split in SPLITS[:-1] or (self.split.startswith("regex:") and len(self.split) > 6)
        yield ok, f"curate.split={self.split!r} is not one of {', '.join(SPLITS)}"
        if ok and self.split.startswith("regex:"):
            try:
                re.compile(self.split[6:])
            except re.error as e:
                yield False, f"curate.split={self.split!r}: the pattern is not a regular expression ({e})"

    def resolved(self, preset: str) -> "CurateConfig":
        """A checked copy for `preset` (web, curated or code): the filters left unset take the
        preset's switches."""
        c = dataclasses.replace(self, preset=preset)
        for name, on in CURATE_PRESETS[preset].items():
            if getattr(c, name) is None:
                setattr(c, name, on)
        return c.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_dict(self) -> dict:
        """The settings that change what the curated corpus contains (for the fingerprint)."""
        return {k: v for k, v in self.to_dict().items()
                if not k.startswith(("slurm_", "ray_")) and k not in ("workers", "executor")}

    def minhash_threshold(self) -> float:
        """Jaccard similarity at which a pair becomes a candidate with probability ~1/2: (1/b)^(1/r)."""
        return (1.0 / self.minhash_bands) ** (1.0 / self.minhash_rows)


EXPORT_FORMATS = ("hf", "gguf")


@dataclass
class ExportConfig(Section):
    """`candor run`'s optional last stage: exports of the base model (candorlm/export/)."""

    section: ClassVar[str] = "export"
    formats: Annotated[str, "(comma-separated, of hf and gguf; empty: none)"] = ""
    gguf_type: Literal["f32", "f16", "q8_0"] = "f32"

    def format_list(self) -> list[str]:
        return [f.strip() for f in self.formats.split(",") if f.strip()]

    def rules(self):
        for f in self.format_list():
            yield f in EXPORT_FORMATS, (f"export.formats={self.formats!r}: {f!r} is not one of "
                                        f"{', '.join(EXPORT_FORMATS)}")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig(Section):
    """Supervised fine-tuning on chats (candorlm/tune/sft.py). The optimizer, schedule, time
    budget, checkpoints and logging are pretraining's (train/), driven by these fields."""

    section: ClassVar[str] = "sft"
    # "" in `candor run`: the instruction set mined from the corpus (tune/mine.py). A .jsonl file or
    # a directory of them; a directory with train.jsonl and validation.jsonl keeps that split.
    data: str = ""
    epochs: Annotated[int, ">= 1"] = 2
    max_steps: Annotated[int, ">= 0 (0: the epochs decide)"] = 0
    batch_size: Annotated[int, ">= 1"] = 16  # conversations per micro-batch
    grad_accum: Annotated[int, ">= 1"] = 1
    # 0: the base model's max_seq_len. Longer conversations are skipped and counted, never cut.
    seq_len: Annotated[int, ">= 0 (0: the model's context)"] = 0
    # Rows hold one conversation each (the model has no document mask, so packed rows would attend
    # across conversations: tune/chat_data.py). grouped: rows of similar length share a batch (1.3%
    # padding on the mined set); none: random batches (42%). Both give every conversation the loss
    # it has alone.
    packing: Literal["grouped", "none"] = "grouped"
    optimizer: Literal["adamw", "muon"] = "adamw"
    # 150 steps from a cpu-tiny base on the mined set: held-out loss 3.33 at 1e-4, 3.27 at 3e-4,
    # 3.36 at 1e-3, 3.63 at 3e-3 (docs/benchmarks.md, "SFT in the demo")
    lr: Annotated[float, ">= 0"] = 3e-4
    matrix_lr: Annotated[float, ">= 0"] = 0.005  # muon only
    weight_decay: Annotated[float, ">= 0"] = 0.0
    warmup_steps: Annotated[int, ">= 0"] = 10
    decay_frac: Annotated[float, "[0, 1]"] = 0.5
    grad_clip: Annotated[float, ">= 0 (0: off)"] = 1.0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    time_budget_s: Annotated[float, ">= 0 (0: off)"] = 0.0  # else the steps fit in this long (at most the epochs')
    holdout_fraction: Annotated[float, "[0, 1)"] = 0.05  # of a file's conversations; a mined set keeps its own split
    eval_every: Annotated[int, ">= 0 (0: only at the end)"] = 100
    eval_examples: Annotated[int, ">= 1"] = 256  # held-out conversations scored per evaluation
    # held-out "Write a Python function" prompts that `candor run` has base and chat answer greedily
    eval_prompts: Annotated[int, ">= 0"] = 20
    save_every: Annotated[int, ">= 0 (0: off)"] = 200
    log_every: Annotated[int, ">= 1"] = 10
    seed: int = 0
    lora_rank: Annotated[int, ">= 0 (0: full fine-tuning)"] = 0
    lora_alpha: Annotated[float, "> 0"] = 16.0
    lora_dropout: Annotated[float, "[0, 1)"] = 0.0
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DPOConfig(Section):
    """Direct preference optimization on prompt/chosen/rejected pairs (candorlm/tune/dpo.py);
    the loop, checkpoints and logging are pretraining's."""

    section: ClassVar[str] = "dpo"
    beta: Annotated[float, "> 0"] = 0.1  # the DPO paper's and trl's default
    loss_type: Literal["sigmoid", "robust", "ipo"] = "sigmoid"
    label_smoothing: Annotated[float, "[0, 0.5]"] = 0.0
    epochs: Annotated[int, ">= 1"] = 1
    max_steps: Annotated[int, ">= 0 (0: the epochs decide)"] = 0
    batch_size: Annotated[int, ">= 1"] = 8  # pairs per micro-batch
    grad_accum: Annotated[int, ">= 1"] = 1
    seq_len: Annotated[int, ">= 0 (0: the model's context)"] = 0
    lr: Annotated[float, ">= 0"] = 1e-4
    weight_decay: Annotated[float, ">= 0"] = 0.0
    warmup_steps: Annotated[int, ">= 0"] = 5
    decay_frac: Annotated[float, "[0, 1]"] = 0.5
    grad_clip: Annotated[float, ">= 0 (0: off)"] = 1.0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    time_budget_s: Annotated[float, ">= 0 (0: off)"] = 0.0
    holdout_fraction: Annotated[float, "[0, 1)"] = 0.1
    eval_every: Annotated[int, ">= 0 (0: only at the end)"] = 50
    save_every: Annotated[int, ">= 0 (0: off)"] = 200
    log_every: Annotated[int, ">= 1"] = 10
    seed: int = 0
    lora_rank: Annotated[int, ">= 0 (0: the whole model)"] = 0
    lora_alpha: Annotated[float, "> 0"] = 16.0
    lora_dropout: Annotated[float, "[0, 1)"] = 0.0
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))


EVAL_TASKS = ("lm", "code", "pycomplete", "humaneval", "bias", "robustness")


@dataclass
class EvalConfig(Section):
    """`candor run`'s evaluation stage (candorlm/evaluate/suite.py), sized for the demo's budget:
    fewer items than `candor eval` takes by default. The model card is written from its results."""

    section: ClassVar[str] = "eval"
    tasks: Annotated[str, "(comma-separated, of lm, code, pycomplete, humaneval, bias, robustness; none: skip "
                          "the evaluation and the cards)"] = ",".join(EVAL_TASKS)
    lm_tokens: Annotated[int, ">= 1"] = 16384
    code_items: Annotated[int, ">= 1"] = 60
    generate_items: Annotated[int, ">= 1"] = 12  # generations per generative code task (and pycomplete)
    humaneval_limit: Annotated[int, ">= 0 (0: all 164)"] = 20
    humaneval_samples: Annotated[int, ">= 1 (1: greedy pass@1; >= 10 adds pass@10)"] = 1
    max_new_tokens: Annotated[int, ">= 1"] = 64
    robustness_items: Annotated[int, ">= 1"] = 24

    def task_list(self) -> list[str]:
        return [] if self.tasks.strip() == "none" else [t.strip() for t in self.tasks.split(",") if t.strip()]

    def rules(self):
        for t in self.task_list():
            yield t in EVAL_TASKS, f"eval.tasks={self.tasks!r}: {t!r} is not one of {', '.join(EVAL_TASKS)} (or none)"


@dataclass
class RunConfig:
    name: str = "demo"
    preset: str = "cpu-tiny"
    # preset auto: how the shape was derived (candorlm/sizing.py), kept with every checkpoint
    sizing: dict = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The shape rule (nanochat's, Karpathy 2025): one dial, the depth; the width is 64 per layer and
# heads are 64 wide, so a model of depth L is L layers of 64 L with L heads. How many of those
# heads share keys and values (GQA) stays each preset's choice.
DEPTH_WIDTH, HEAD_WIDTH = 64, 64


def shape_for_depth(depth: int) -> dict[str, int]:
    """The model shape the depth rule gives: overrides for n_layers, d_model and n_heads."""
    if depth < 1:
        raise CandorError(f"depth={depth} must be >= 1")
    d_model = DEPTH_WIDTH * depth
    return {"model.n_layers": depth, "model.d_model": d_model, "model.n_heads": d_model // HEAD_WIDTH}


def describe_shape(m: ModelConfig) -> str:
    """One line: the model's shape and whether it follows the depth rule."""
    rule = shape_for_depth(m.n_layers)
    shape = f"{m.n_layers} layers x {m.d_model}, {m.n_heads} heads of {m.head_dim or m.d_model // m.n_heads}"
    if (m.d_model, m.n_heads) == (rule["model.d_model"], rule["model.n_heads"]):
        return f"shape: {shape} (the depth rule: d_model = {DEPTH_WIDTH} x depth, {HEAD_WIDTH}-dim heads)"
    return (f"shape: {shape} (not the depth rule, which gives d_model {rule['model.d_model']} and "
            f"{rule['model.n_heads']} heads at depth {m.n_layers})")


# Presets: each is a set of overrides on the defaults above; batch and schedule follow from the
# compute budget.
AUTO = "auto"
_DEMO_RUN = {"model.max_seq_len": 256, "train.seq_len": 256, "train.max_steps": 100000,
             "train.time_budget_s": 480.0, "train.eval_every": 250, "train.save_every": 500, "train.compile": True,
             "sft.time_budget_s": 120.0}
PRESETS: dict[str, dict[str, object]] = {
    # cpu-tiny's run (sequence, budgets, schedule, compile), with the depth, width, heads,
    # vocabulary and batch derived from the FLOPs the budget buys on this machine
    # (candorlm/sizing.py; build_config fills them in). Not the default: measured better than
    # cpu-tiny on the fp32 path, not yet measured on the bf16 path (docs/benchmarks.md "Sizing").
    AUTO: dict(_DEMO_RUN),
    # Sized so `make demo` (set-up + curate + tokenizer + pretrain + eval + mining + SFT +
    # base-vs-chat measurement) fits 15 min on 2 cores: the time budgets fix the step counts
    # after 6 timed steps (docs/benchmarks.md has the measured wall time of a fresh clone's
    # `make demo`, set-up included). Pretraining had 600 s before SFT joined the demo; 480 s
    # leave room for SFT's 120 s and ~60 s of mining, loading and measuring.
    # torch.compile: 0.44-0.47 s vs 0.60-0.62 s per step after ~30 s of compiling
    # (bench/train_throughput.py), so it pays for itself in under 2 min.
    "cpu-tiny": {
        **shape_for_depth(4), "model.n_kv_heads": 2, "tokenizer.vocab_size": 8192, "train.batch_size": 32,
        **_DEMO_RUN,
    },
    "cpu-small": {
        **shape_for_depth(6), "model.n_kv_heads": 2,
        "model.max_seq_len": 512, "tokenizer.vocab_size": 16384,
        "train.seq_len": 512, "train.batch_size": 16, "train.max_steps": 5000,
        "train.eval_every": 250, "train.save_every": 500,
    },
    # GPT-2 small class (124M with a 50k vocab) for one GPU node.
    "gpt2-small": {
        **shape_for_depth(12), "model.n_kv_heads": 4,
        "model.max_seq_len": 1024, "tokenizer.vocab_size": 50304, "model.tie_embeddings": True,
        "train.seq_len": 1024, "train.batch_size": 32, "train.grad_accum": 16, "train.max_steps": 10000,
        "train.warmup_steps": 200, "train.eval_every": 500, "train.save_every": 1000, "train.parallel": "ddp",
    },
    # ~1B parameters for FSDP2 on several GPUs. Not the depth rule (which gives 1024 wide at 16
    # layers): twice as wide, with 128-dim heads, Llama 3.2 1B's width and depth; fewer, wider
    # layers shard into larger FSDP units.
    "1b": {
        "model.d_model": 2048, "model.n_layers": 16, "model.n_heads": 16, "model.n_kv_heads": 8,
        "model.max_seq_len": 2048, "tokenizer.vocab_size": 65536, "model.tie_embeddings": False,
        "train.seq_len": 2048, "train.batch_size": 8, "train.grad_accum": 8, "train.max_steps": 20000,
        "train.warmup_steps": 500, "train.eval_every": 1000, "train.save_every": 1000,
        "train.parallel": "fsdp", "train.activation_checkpointing": True, "train.matrix_lr": 0.01,
        "train.lr": 1e-3,
    },
}


SECTIONS = ("model", "train", "tokenizer", "data", "curate", "export", "sft", "dpo", "eval")


def apply_override(cfg: RunConfig, key: str, value) -> None:
    """Set `section.field` on cfg; strings are converted to the field's type (fields.parse)."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise CandorError(f"unknown setting {key!r}: use section.field with section one of {', '.join(SECTIONS)}")
    section = getattr(cfg, parts[0])
    names = hints(type(section))
    if parts[1] not in names:
        raise CandorError(f"unknown setting {key!r}: {parts[0]} has {', '.join(sorted(names))}")
    if isinstance(value, str):
        value = parse(type(section), parts[1], value, key, current=getattr(section, parts[1]))
    setattr(section, parts[1], value)


def parse_set_args(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise CandorError(f"--set {item!r}: expected section.field=value, e.g. --set train.max_steps=100")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def build_config(preset: str = "cpu-tiny", overrides: list[tuple[str, object]] | None = None, name: str = "demo",
                 measurement: dict | None = None, known: dict | None = None) -> RunConfig:
    """The run's settings: the preset's, then the overrides (which win). Preset auto derives its
    shape (candorlm/sizing.py) from `measurement` (a recorded one; None: measure now), keeping
    the derived settings that the overrides or `known` (e.g. an existing tokenizer's
    tokenizer.vocab_size) fix."""
    if preset not in PRESETS:
        raise CandorError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = RunConfig(name=name, preset=preset)
    for k, v in PRESETS[preset].items():
        apply_override(cfg, k, v)
    for k, v in overrides or []:
        apply_override(cfg, k, v)
    if preset == AUTO:
        from candorlm import sizing

        set_keys = {k for k, _ in overrides or []}
        given = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in sizing.DERIVED if k in set_keys}
        given.update({k: v for k, v in (known or {}).items() if k not in given})
        cfg.train.check()
        cfg.sizing = sizing.decide(cfg, given, measurement)
        for k, v in {**cfg.sizing["derived"], **given}.items():
            apply_override(cfg, k, v)
    # The model's vocabulary is the tokenizer's unless set on its own (pretrain sets it from
    # the trained tokenizer, which may be smaller than asked on a small corpus).
    if not any(k == "model.vocab_size" for k, _ in overrides or []):
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
    if cfg.model.max_seq_len < cfg.train.seq_len:
        cfg.model.max_seq_len = cfg.train.seq_len
    cfg.tokenizer.check()
    cfg.model = cfg.model.resolved()
    for sec in ("train", "data", "curate", "export", "sft", "dpo", "eval"):
        getattr(cfg, sec).check()
    return cfg


def model_config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise CandorError(f"config.json has unknown model fields {sorted(unknown)}")
    return ModelConfig(**d).resolved()


def describe(cfg: RunConfig, sections: tuple[str, ...] = ("model", "train", "tokenizer", "data")) -> str:
    """The settings a run will use, one `section.field = value` per line, for printing at start;
    the curation settings are printed by curation itself."""
    lines = [f"preset {cfg.preset}; {describe_shape(cfg.model)}"]
    for sec in sections:
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items():
            lines.append(f"  {sec}.{k} = {json.dumps(v)}")
    return "\n".join(lines)

