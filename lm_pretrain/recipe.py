"""Recipes: the typed schema, YAML loading with `extends`, `--set` overrides, readable errors.

Every recipe field is validated here and nowhere else. A recipe is frozen once loaded.
"""

from __future__ import annotations

import difflib
import re
import string
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lm_pretrain.errors import LmpError
from lm_pretrain.eval.tasks import DATA_TASKS
from lm_pretrain.recipe_yaml import _read_yaml, apply_overrides, quote
from lm_pretrain.train.schedule import SCHEDULE_KINDS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetadataConfig(Section):
    """Metadata conditioning then cooldown (MeCo): documents start with their metadata, except
    in the last cooldown_fraction of training tokens."""

    field: str = Field("source", description="source (the corpus source) or the name of a jsonl field")
    kind: Literal["text", "url"] = Field("text", description="url: the value is reduced to its domain")
    template: str | None = Field(
        None, description='default "URL: {value}\\n\\n" for urls, else "{value}\\n\\n"'
    )
    cooldown_fraction: float = Field(0.1, ge=0, le=1)

    @field_validator("template")
    @classmethod
    def _one_value_field(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ValueError(f"{exc}; write a literal brace as {{{{ or }}}}") from None
        if fields != {"value"}:
            raise ValueError(
                "the template must contain {value} (where the metadata goes) and no other {field}; "
                'e.g. "source: {value}\\n\\n"; write a literal brace as {{ or }}'
            )
        return template

    @property
    def resolved_template(self) -> str:
        if self.template is not None:
            return self.template
        return "URL: {value}\n\n" if self.kind == "url" else "{value}\n\n"


class MixtureStage(Section):
    until: float = Field(gt=0, le=1, description="the stage ends at this fraction of training")
    weights: dict[str, float] = Field(description="per source, over data.mixture.weights")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        return _non_negative_weights(weights)


def _non_negative_weights(weights: dict[str, float]) -> dict[str, float]:
    bad = [f"{name}: {w}" for name, w in weights.items() if not w >= 0 or w == float("inf")]
    if bad:
        raise ValueError(f"mixture weights must be finite and 0 or more ({', '.join(bad)})")
    return weights


class MixtureConfig(Section):
    """Training windows drawn from each source in proportion to its weight (per window, so per
    token), in stages by fraction of training. A source the weights do not name takes `default`
    (1 unless given); a stage's weights replace those it names for that stage. With
    relative_to_size the weights multiply each source's own share of the training tokens, so 1
    everywhere samples as without a mixture and {simple_wiki: 4} upsamples one source 4 times."""

    weights: dict[str, float] = Field(default_factory=dict)
    stages: list[MixtureStage] | None = None
    relative_to_size: bool = Field(False, description="weights multiply each source's share of the tokens")

    @model_validator(mode="before")
    @classmethod
    def _plain_weights(cls, raw: Any) -> Any:
        # `mixture: {childes: 2, default: 1}` is shorthand for `mixture: {weights: {...}}`
        if isinstance(raw, dict) and raw and not {"weights", "stages", "relative_to_size"} & set(raw):
            return {"weights": raw}
        return raw

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        return _non_negative_weights(weights)

    @model_validator(mode="after")
    def _stages_rise(self) -> MixtureConfig:
        ends = [stage.until for stage in self.stages or []]
        if ends and (ends != sorted(set(ends)) or ends[-1] != 1):
            raise ValueError(f"data.mixture.stages: `until` must rise to 1.0 (got {ends})")
        return self


class DataConfig(Section):
    path: str = Field(
        "builtin:demo", description="a BabyLM folder, a folder of text files, a .jsonl file, or builtin:demo"
    )
    format: Literal["auto", "text", "jsonl", "babylm"] = "auto"
    text_field: str = Field("text", description="jsonl: the field holding a document's text")
    source_field: str | None = Field(None, description="jsonl: the field naming a document's source")
    lines_per_document: int = Field(
        200, ge=1, description="text and babylm files: documents longer than this are cut into blocks"
    )
    word_budget: int | None = Field(
        None, ge=1, description="at most this many words (whitespace-split); 10M strict-small, 100M strict"
    )
    over_budget: Literal["error", "subsample"] = Field(
        "error", description="a corpus over the budget: stop, or keep a proportional share of each source"
    )
    metadata: MetadataConfig | None = None
    packing: Literal["concat", "document"] = Field(
        "concat", description="document: no attention across packed documents, positions restart"
    )
    validation_fraction: float = Field(0.01, ge=0.0, lt=0.5)
    mixture: MixtureConfig | None = Field(None, description="weights per source, optionally staged")
    cache_dir: str | None = Field(None, description="token shard cache; default $LMP_CACHE or ~/.cache/lmp")


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    path: str | None = Field(
        None, description="an existing tokenizer.json (or a folder holding one) to reuse"
    )
    min_frequency: int = Field(2, ge=1)
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    mask_token: str = "<mask>"


class ModelConfig(Section):
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default num_heads")
    intermediate_size: int | None = Field(None, ge=1, description="SwiGLU width; default about 8/3 hidden")
    max_seq_len: int = Field(256, ge=8)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {kv}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head size (hidden_size / num_heads) must be even for rotary embeddings")
        return self


class MuonConfig(Section):
    """Muon for the 2-D hidden matrices (optim.kind: muon). Defaults after Liu et al. 2025 ("Muon is
    scalable for LLM training"): the update scaled to AdamW's RMS, so optim.lr and a weight decay
    of 0.1 carry over; adjust_lr original is Keller Jordan's sqrt(max(1, rows/cols)) scaling, for
    which modded-nanogpt uses an LR near 0.02-0.05."""

    lr: float | None = Field(None, gt=0, description="default: optim.lr")
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(0.1, ge=0)
    adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    ns_steps: int = Field(5, ge=1, description="Newton-Schulz iterations of the orthogonalisation")


# Adam's decay rates: each in [0, 1)
Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(Section):
    kind: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for hidden matrices, AdamW (lr, betas) for the rest"
    )
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    muon: MuonConfig = MuonConfig()


class ScheduleConfig(Section):
    """Lengths (warmup, decay, cooldown) are fractions of training when below 1, else counts of `unit`."""

    kind: Literal[tuple(SCHEDULE_KINDS)] = "wsd"  # type: ignore[valid-type]
    unit: Literal["steps", "tokens"] = "steps"
    warmup: float = Field(0.05, ge=0)
    decay: float = Field(0.2, ge=0, description="wsd and infinite: the final decay (anneal)")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="LR at the end of a decay, over the peak")
    cooldown: float = Field(0.1, ge=0, description="infinite: cosine cooldown after warmup")
    constant_lr_ratio: float = Field(0.25, gt=0, le=1, description="infinite: the long constant stage")

    @model_validator(mode="after")
    def _stages_fit(self) -> ScheduleConfig:
        # fractions can be checked here; counts only once the number of training steps is known
        lengths = {"warmup": self.warmup, "cooldown": self.cooldown, "decay": self.decay}
        stages = {k: lengths[k] for k in ("warmup", *SCHEDULE_KINDS[self.kind].stages)}
        if all(v < 1 for v in stages.values()) and sum(stages.values()) > 1:
            named = " + ".join(f"{k} {v:g}" for k, v in stages.items())
            raise ValueError(f"{named} add up to more than all of training; shorten them")
        return self


class AverageConfig(Section):
    """A weight average kept during training and evaluated beside the raw weights (val_loss_avg),
    so a constant-LR (WSD stable) stage can be judged mid-way; final-avg/ holds it at the end."""

    kind: Literal["ema", "last_k"] = "ema"
    decay: float = Field(0.999, gt=0, lt=1, description="ema: per update")
    k: int = Field(4, ge=1, description="last_k: snapshots averaged (LAWA)")
    every: int = Field(1, ge=1, description="steps between updates")


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, across all processes")
    micro_batch_size: int | None = Field(None, ge=1, description="per process and forward pass")
    seq_len: int | None = Field(None, ge=8, description="training sequence length; default model.max_seq_len")
    seq_len_schedule: list[tuple[float, int]] | None = Field(
        None,
        description="[[fraction of training, length], ...]: train at each length until that fraction, "
        "tokens per step kept (more, shorter sequences); e.g. [[0.6, 128], [0.8, 256], [1.0, 512]]",
    )
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: replicate the model (ddp) or shard it (fsdp)"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute block activations in backward: far less memory, about 1/3 more compute"
    )
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_tokens: int = Field(65536, ge=1, description="validation tokens scored at each evaluation")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default all cores")
    data_worker: bool = Field(True, description="prepare batches in a background process; false: in the loop")
    average: AverageConfig | None = None
    skip_nonfinite: int = Field(
        0, ge=0, description="steps with a non-finite loss or gradient to skip before stopping"
    )

    max_words_seen: int | None = Field(
        None, ge=1, description="train until this many corpus words were seen; default 10x data.word_budget"
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        given = [n for n in ("max_steps", "max_tokens", "max_words_seen") if getattr(self, n) is not None]
        if len(given) > 1:
            others = " ".join(f"--set train.{n}=null" for n in given[:-1])
            raise ValueError(
                f"set only one of train.max_steps, max_tokens, max_words_seen (got {', '.join(given)}); "
                f"the recipe may set one already: to use {given[-1]}, add {others}"
            )
        if self.distributed == "fsdp" and self.average is not None:
            raise ValueError("train.average does not work with train.distributed fsdp yet; drop one of them")
        return self


class HybridConfig(Section):
    """Masked next-token prediction (MNTP), alone or mixed with causal LM (GPT-BERT, BabyLM 2024).

    A masked sequence has some tokens corrupted and attends in both directions; the output at
    position k predicts the original token k + 1 wherever k + 1 was chosen. Spans of 1 to max_span
    tokens are chosen together; a chosen span becomes the mask token, a random token (random_fraction)
    or stays as it is (keep_fraction). The rate of chosen tokens moves linearly from mask_rate_start
    to mask_rate_end over training.

    masking hard (adaptive masking, after Edman & Fraser's AMLM, BabyLM 2025) prefers the tokens the
    model currently predicts worst: each candidate's chance of being chosen is proportional to
    (1 - hard_mix) + hard_mix x (its token's recent masked loss / the row's mean), so with hard_mix
    below 1 every token keeps a floor chance. A token's recent loss is a moving average over the
    masked targets of earlier steps, halving its memory every hard_half_life steps.
    """

    masked_fraction: float = Field(
        15 / 16, ge=0, le=1, description="objective hybrid: share of sequences masked, the rest causal"
    )
    mask_rate_start: float = Field(0.3, gt=0, lt=1)
    mask_rate_end: float = Field(0.15, gt=0, lt=1)
    random_fraction: float = Field(0.1, ge=0, le=1)
    keep_fraction: float = Field(0.1, ge=0, le=1)
    max_span: int = Field(3, ge=1, description="chosen spans are 1..max_span tokens long")
    masking: Literal["random", "hard"] = Field(
        "random", description="hard: prefer the tokens with the highest recent loss (see hard_mix)"
    )
    hard_mix: float = Field(0.5, gt=0, le=1, description="masking hard: weight of hardness against uniform")
    hard_half_life: int = Field(
        100, ge=1, description="masking hard: steps over which a loss's weight halves"
    )

    @model_validator(mode="after")
    def _split(self) -> HybridConfig:
        if self.random_fraction + self.keep_fraction > 1:
            raise ValueError(
                f"random_fraction {self.random_fraction} + keep_fraction {self.keep_fraction} exceeds 1"
            )
        return self


class DistillConfig(Section):
    """Distillation: the loss mixes the next-token cross-entropy with the cross-entropy to the
    teachers' averaged distribution (an ensemble when several). Teachers are lmp runs, checkpoints
    or Llama-architecture transformers folders sharing the student's tokenizer."""

    teachers: list[str] = Field(min_length=1, description="run folders, checkpoints or model folders")
    weight: float = Field(
        0.5, ge=0, le=1, description="share of the distillation loss; the rest is next-token"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions")
    teacher_words: int | None = Field(
        None,
        ge=0,
        description="under data.word_budget: the words teachers not trained by lmp on this corpus saw",
    )


class EvalConfig(Section):
    """Zero-shot scores of the model being trained, logged to metrics.jsonl as eval/<task> (and
    eval/<task>_mntp for masked next-token and hybrid objectives), scored as `lmp eval` does."""

    every: int | None = Field(None, ge=1, description="steps between evaluations; default train.eval_every")
    tasks: list[Literal[("probe", *DATA_TASKS)]] = ["probe"]  # type: ignore[valid-type]
    data_dir: str | None = Field(
        None, description="the BabyLM evaluation_data folder (or a BLiMP folder): needed by all but probe"
    )
    fast: bool = Field(True, description="the official fast_eval subsets of evaluation_data")
    items_per_uid: int | None = Field(None, ge=1, description="score only the first N items of each UID")
    probe_items: int = Field(50, ge=1, description="probe minimal pairs per phenomenon")

    @model_validator(mode="after")
    def _data_for_tasks(self) -> EvalConfig:
        needs = [t for t in self.tasks if t != "probe"]
        if needs and self.data_dir is None:
            raise ValueError(f"eval.tasks {', '.join(needs)} need eval.data_dir (the evaluation_data folder)")
        if not self.tasks:
            raise ValueError("eval.tasks is empty; list at least one task or drop the eval section")
        return self


class CheckpointConfig(Section):
    every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_last: int = Field(3, ge=1)


class TrackingConfig(Section):
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "lmp"
    tensorboard: bool = False


class Recipe(Section):
    name: str
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig(max_steps=400)
    objective: Literal["causal", "masked_next_token", "hybrid"] = "causal"
    hybrid: HybridConfig = HybridConfig()
    distill: DistillConfig | None = None
    eval: EvalConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        # it names runs/<name>: no path separators, and no leading dot ("..")
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
            raise ValueError(
                f"{name!r} must be a folder name: letters, digits, '.', '_' and '-', not starting with '.'"
            )
        return name

    @model_validator(mode="after")
    def _fits(self) -> Recipe:
        t = self.train
        if t.max_steps is None and t.max_tokens is None and t.max_words_seen is None:
            if self.data.word_budget is None:
                raise ValueError(
                    "set one of train.max_steps, train.max_tokens or train.max_words_seen "
                    "(or data.word_budget, whose 10 passes are the default length)"
                )
        if self.train.seq_len is not None and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len {self.train.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}"
            )
        if self.optim.kind == "muon" and self.train.distributed == "fsdp":
            # each process would orthogonalise its shard of a matrix, not the matrix
            raise ValueError(
                "optim.kind muon orthogonalises whole matrices, and train.distributed fsdp shards them "
                "across processes; use train.distributed=ddp with muon (or optim.kind=adamw with fsdp)"
            )
        stages = self.train.seq_len_schedule
        if stages is not None:
            fractions = [f for f, _ in stages]
            if not stages or fractions != sorted(set(fractions)) or fractions[-1] != 1 or fractions[0] <= 0:
                raise ValueError(
                    f"train.seq_len_schedule {stages}: stage ends must rise from above 0 to 1.0, e.g. "
                    "[[0.6, 128], [0.8, 256], [1.0, 512]]"
                )
            odd = [length for _, length in stages if length < 8 or self.seq_len % length]
            if odd:
                raise ValueError(
                    f"train.seq_len_schedule length {odd[0]} must divide train.seq_len {self.seq_len} (the "
                    "length that sets the tokens per step), so that each step keeps its tokens"
                )
        if self.data.mixture is not None and self.train.seq_len_schedule is not None:
            raise ValueError(
                "data.mixture and train.seq_len_schedule do not work together yet; drop one of them"
            )
        if self.distill is not None and self.objective != "causal":
            raise ValueError(
                f"distill works with objective causal only (the teachers are causal LMs), not {self.objective}"
            )
        if self.hybrid.masking == "hard" and self.objective == "causal":
            raise ValueError(
                "hybrid.masking hard chooses which tokens to mask, and objective causal masks none; "
                "set objective: hybrid (or masked_next_token), or drop hybrid.masking"
            )
        micro = self.train.micro_batch_size
        if micro is not None and self.train.batch_size % micro:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} must be a multiple of "
                f"train.micro_batch_size {micro}"
            )
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    @property
    def max_words_seen(self) -> int | None:
        """The words-seen bound: train.max_words_seen, else 10 passes of the budget (BabyLM 2025 rule)."""
        t = self.train
        if t.max_words_seen is not None:
            return t.max_words_seen
        if t.max_steps is None and t.max_tokens is None and self.data.word_budget is not None:
            return 10 * self.data.word_budget
        return None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading


def _fields_at(loc: tuple) -> list[str]:
    """The field names allowed at a location of the schema, for 'did you mean' hints."""
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        model = _section_type(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _section_type(annotation: Any) -> Any:
    """The Section class inside an annotation such as `EvalConfig | None`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation


_MAX_ERRORS = 20  # a long list of bad values would otherwise print one line each


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    errors = err.errors()
    for e in errors[:_MAX_ERRORS]:
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        path = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" - did you mean '{close[0]}'?" if close else ""
            lines.append(f"  {path}: unknown field{hint} (allowed here: {', '.join(allowed)})")
        elif e["type"] == "missing" and isinstance(e["loc"][-1], int):  # a tuple given too few items
            lines.append(
                f"  {path}: too few values (got {quote(e.get('input'))}); see lmp recipe show for the default"
            )
        elif e["type"] == "value_error":
            lines.append(f"  {path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path}: {e['msg']} (got {quote(e.get('input'))})")
    if len(errors) > _MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - _MAX_ERRORS:,} more")
    return "\n".join(lines)


def validate_recipe(raw: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise LmpError(_format_errors(err, source)) from None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {prefix: None} if not node and prefix else {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_changes(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every leaf field where `new` differs from `old`."""
    before, after = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = sorted(set(before) | set(after))
    return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, str(path))
