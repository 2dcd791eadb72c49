"""What a cycle will cost before the cluster is booked: tokens, GPU hours and wall time per stage.

A roofline model over the recipe's sizes (questions, tree, evaluation chains, training steps)
and a device table (malt_ops/hardware.yaml: datasheet peaks, the shares of them reached, model
shapes, benchmark sizes). Decoding reads the weights and every sequence's KV cache once per
step, and is bounded by bandwidth or compute, whichever is slower; prefill and training are
compute-bound. The device table's ``cpu-2core`` entry is calibrated on measured runs here, the
GPU entries are datasheet peaks at stated shares: the printed assumptions say which.

Why our own: vLLM and TRL ship benchmarks that measure a running engine, not a planner that
prices a whole MALT cycle (a tree, three roles, DPO, evaluation chains) from a recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from malt_ops.config import ROLES, TRAINED, Recipe, describe_validation_error
from malt_ops.errors import MaltError

HARDWARE_FILE = Path(__file__).with_name("hardware.yaml")
BYTES_PER_PARAM = 2
"""bf16 weights (fp32 on CPUs without native bf16 doubles it; the cpu entry's shares absorb it)."""
VLLM_DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's own default for max_num_seqs on GPUs, where inference.vllm leaves it null."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Efficiency(_Strict):
    decode_compute: float = Field(default=0.5, gt=0, le=1)
    decode_bandwidth: float = Field(default=0.6, gt=0, le=1)
    prefill_compute: float = Field(default=0.5, gt=0, le=1)
    train_compute: float = Field(default=0.35, gt=0, le=1)
    load_gb_s: float = Field(default=1.0, gt=0)
    sequence_overhead_s: float = Field(default=0.0, ge=0)
    output_share: float = Field(default=0.6, gt=0, le=1)
    positive_share: float = Field(default=0.5, gt=0, le=1)
    pair_share: float = Field(default=0.5, gt=0, le=1)
    memory_headroom: float = Field(default=0.9, gt=0, le=1)


class Device(_Strict):
    bf16_tflops: float = Field(gt=0)
    memory_gib: float = Field(gt=0)
    bandwidth_gb_s: float = Field(gt=0)
    source: str
    efficiency: dict[str, float] = Field(default_factory=dict)
    """Shares measured on this device; they win over the table's ``efficiency``."""


class ModelShape(_Strict):
    params_b: float = Field(gt=0)
    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * BYTES_PER_PARAM

    @property
    def kv_bytes_per_token(self) -> float:
        return self.layers * self.kv_heads * self.head_dim * 2 * BYTES_PER_PARAM


class BenchmarkSize(_Strict):
    train: int = Field(gt=0)
    test: int = Field(gt=0)
    prompt_tokens: int = Field(gt=0)


class Hardware(_Strict):
    devices: dict[str, Device]
    efficiency: Efficiency = Field(default_factory=Efficiency)
    models: dict[str, ModelShape]
    benchmarks: dict[str, BenchmarkSize]

    def device(self, name: str) -> Device:
        if name not in self.devices:
            raise MaltError(
                f"--gpu-type {name}: unknown; use one of {', '.join(self.devices)} or add it to "
                f"the hardware table (--hardware)"
            )
        return self.devices[name]

    def shares(self, device: str) -> Efficiency:
        merged = self.efficiency.model_dump() | self.devices[device].efficiency
        try:
            return Efficiency(**merged)
        except ValidationError as exc:
            raise MaltError(describe_validation_error(exc, f"devices.{device}.efficiency")) from exc

    def model_of(self, recipe: Recipe) -> ModelShape | None:
        """The recipe's model shape: model.name, or the last part of model.path."""
        cfg = recipe.model
        key = cfg.name if cfg.source == "packaged" else Path(cfg.path or "").name
        return self.models.get(key.lower().removesuffix(".gguf"))


def load_hardware(path: str | Path | None = None) -> Hardware:
    source = Path(path) if path else HARDWARE_FILE
    try:
        raw = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MaltError(f"hardware table {source}: {exc}") from exc
    try:
        return Hardware(**(raw or {}))
    except ValidationError as exc:
        raise MaltError(describe_validation_error(exc, str(source))) from exc
    except TypeError as exc:
        raise MaltError(f"hardware table {source}: expected a mapping at the top") from exc


@dataclass
class StageCost:
    generated_tokens: float = 0.0
    prefill_tokens: float = 0.0
    train_tokens: float = 0.0
    gpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    gpus: int = 0


@dataclass
class Estimate:
    recipe: str
    device: str
    gpus: int
    model: str
    stages: dict[str, StageCost]
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> StageCost:
        total = StageCost()
        for cost in self.stages.values():
            for name in ("generated_tokens", "prefill_tokens", "train_tokens"):
                setattr(total, name, getattr(total, name) + getattr(cost, name))
            total.gpu_seconds += cost.gpu_seconds
            total.wall_seconds += cost.wall_seconds
        total.gpus = self.gpus
        return total


@dataclass
class _Engine:
    """One model replica: its GPUs, and the rates the roofline gives it."""

    shape: ModelShape
    device: Device
    shares: Efficiency
    gpus: int
    batch: int

    @property
    def flops(self) -> float:
        return self.device.bf16_tflops * 1e12 * self.gpus

    @property
    def bandwidth(self) -> float:
        return self.device.bandwidth_gb_s * 1e9 * self.gpus * self.shares.decode_bandwidth

    def generation_seconds(
        self, sequences: float, generated: float, prefill: float, context: float
    ) -> float:
        flops_per_token = 2 * self.shape.params_b * 1e9
        read = self.shape.weight_bytes + self.batch * context * self.shape.kv_bytes_per_token
        step = max(
            read / self.bandwidth,
            self.batch * flops_per_token / (self.flops * self.shares.decode_compute),
        )
        decode = generated / self.batch * step
        encode = prefill * flops_per_token / (self.flops * self.shares.prefill_compute)
        return decode + encode + sequences * self.shares.sequence_overhead_s

    def load_seconds(self) -> float:
        return self.shape.weight_bytes / (self.shares.load_gb_s * 1e9)


def _tree_sizes(recipe: Recipe) -> dict[str, int]:
    s = recipe.sampling
    return {"generator": s.n, "verifier": s.n * s.m, "refiner": s.n * s.m * s.l}


def _chain_tokens(tokens: Any, shares: Efficiency, prompt: int) -> dict[str, dict[str, float]]:
    """Per role: mean generated tokens, and the prompt it reads (earlier turns included)."""
    out: dict[str, dict[str, float]] = {}
    context = float(prompt)
    for role in ROLES:
        generated = getattr(tokens, role) * shares.output_share
        out[role] = {"generated": generated, "prompt": context}
        context += generated + prompt / 2  # the next role's prompt: its instructions and this turn
    return out


def _generation(
    recipe: Recipe,
    questions: int,
    per_question: dict[str, int],
    tokens: Any,
    shares: Efficiency,
    prompt: int,
) -> tuple[float, float, float, float]:
    """Sequences, generated tokens, prefill tokens (shared prefixes once) and mean context."""
    chain = _chain_tokens(tokens, shares, prompt)
    sequences = generated = prefill = context_sum = 0.0
    parents, encoded = 1, 0.0
    for role in ROLES:
        count, turn = per_question[role], chain[role]
        sequences += count
        generated += count * turn["generated"]
        # prefix caching: what a parent's children share is encoded once, with the parent
        prefill += parents * (turn["prompt"] - encoded)
        context_sum += count * (turn["prompt"] + turn["generated"] / 2)
        parents, encoded = count, turn["prompt"]
    return (
        questions * sequences,
        questions * generated,
        questions * prefill,
        context_sum / max(sequences, 1),
    )


def _train_role(
    recipe: Recipe, role: str, questions: int, shares: Efficiency, shape: ModelShape, prompt: int
) -> tuple[float, float]:
    """Training tokens and FLOPs of one role's SFT (and DPO where the recipe asks)."""
    cfg = getattr(recipe.training, role)
    target = "generator" if role == "star" else role
    nodes = questions * _tree_sizes(recipe)[target]
    chain = _chain_tokens(recipe.sampling.max_new_tokens, shares, prompt)[target]
    length = min(cfg.max_length, chain["prompt"] + chain["generated"])
    processes = recipe.training.processes
    per_step = cfg.batch_size * cfg.grad_accum * processes
    examples = nodes * shares.positive_share * cfg.epochs
    if cfg.max_steps > 0:
        examples = min(examples, cfg.max_steps * per_step)
    # LoRA: the forward pass (2P per token) and the backward pass through frozen weights (2P,
    # no weight gradients); gradient checkpointing recomputes the forward once more
    per_token = (6 if cfg.gradient_checkpointing else 4) * shape.params_b * 1e9
    tokens = examples * length
    flops = tokens * per_token
    if getattr(cfg, "dpo", False):
        branching = recipe.sampling.m if role == "verifier" else recipe.sampling.l
        parents = nodes / branching
        pairs = parents * min(recipe.labeling.max_pairs_per_parent, branching) * shares.pair_share
        pairs *= cfg.dpo_epochs
        if cfg.dpo_max_steps > 0:
            pairs = min(pairs, cfg.dpo_max_steps * per_step)
        # chosen and rejected through the policy, and once through the reference (forward only)
        dpo_tokens = 2 * pairs * length
        tokens += dpo_tokens
        flops += dpo_tokens * (per_token + 2 * shape.params_b * 1e9)
    return tokens, flops


def estimate(
    recipe: Recipe,
    gpus: int | None = None,
    device: str | None = None,
    hardware: Hardware | None = None,
    recipe_name: str = "",
) -> Estimate:
    """Per-stage tokens, GPU seconds and wall seconds of one cycle of ``recipe``."""
    table = hardware or load_hardware()
    device = device or recipe.kubernetes.gpu.gpu_type or "h100-80gb"
    spec = table.device(device)
    shares = table.shares(device)
    shape = table.model_of(recipe)
    if shape is None:
        raise MaltError(
            f"model {recipe.model.name if recipe.model.source == 'packaged' else recipe.model.path}: "
            f"no shape in the hardware table; add it under models: (--hardware FILE)"
        )
    bench = table.benchmarks[recipe.data.benchmark]
    engine_gpus = 1
    if recipe.inference.backend == "vllm":
        engine_gpus = (
            recipe.inference.vllm.tensor_parallel_size
            * recipe.inference.vllm.pipeline_parallel_size
        )
    gpus = gpus or max(engine_gpus, recipe.kubernetes.gpu.count)
    if gpus < engine_gpus:
        raise MaltError(
            f"--gpus {gpus}: the vLLM engine spans {engine_gpus} GPUs "
            f"(inference.vllm tensor x pipeline parallel); give at least that many"
        )
    batch = recipe.inference.batch_size
    if recipe.inference.backend == "vllm":
        batch = recipe.inference.vllm.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS
    engine = _Engine(shape, spec, shares, engine_gpus, batch)
    replicas = gpus // engine_gpus
    questions = recipe.data.train_size or bench.train
    stages: dict[str, StageCost] = {}

    def generation_stage(
        sequences: float, generated: float, prefill: float, context: float, parallel: int
    ) -> StageCost:
        seconds = engine.generation_seconds(sequences, generated, prefill, context)
        load = engine.load_seconds()
        parallel = max(1, min(parallel, replicas))
        return StageCost(
            generated_tokens=generated,
            prefill_tokens=prefill,
            gpu_seconds=(seconds + load * parallel) * engine_gpus,
            wall_seconds=seconds / parallel + load,
            gpus=parallel * engine_gpus,
        )

    sequences, generated, prefill, context = _generation(
        recipe,
        questions,
        _tree_sizes(recipe),
        recipe.sampling.max_new_tokens,
        shares,
        bench.prompt_tokens,
    )
    stages["sample"] = generation_stage(
        sequences, generated, prefill, context, recipe.sampling.num_shards
    )

    train = StageCost()
    role_seconds = []
    processes = recipe.training.processes
    for role in TRAINED:
        tokens, flops = _train_role(recipe, role, questions, shares, shape, bench.prompt_tokens)
        seconds = flops / (spec.bf16_tflops * 1e12 * processes * shares.train_compute)
        seconds += engine.load_seconds()
        role_seconds.append(seconds)
        train.train_tokens += tokens
        train.gpu_seconds += seconds * processes
    # the roles train as parallel pods, as many at once as the GPUs allow
    at_once = max(1, min(len(TRAINED), gpus // processes))
    train.wall_seconds = (
        sum(role_seconds) / at_once if at_once < len(TRAINED) else max(role_seconds)
    )
    train.gpus = at_once * processes
    stages["train"] = train

    ev = recipe.evaluation
    chains = len(ev.seeds) * min(ev.subset_size, recipe.data.test_size or bench.test) * ev.votes
    systems = 3  # the base model, the trained MALT set and the STaR generator
    one_chain = {role: 1 for role in ROLES}
    sequences, generated, prefill, context = _generation(
        recipe, systems * chains, one_chain, ev.max_new_tokens, shares, bench.prompt_tokens
    )
    stages["evaluate"] = generation_stage(sequences, generated, prefill, context, 1)

    assumptions = [
        f"device {device}: {spec.bf16_tflops:g} TFLOP/s bf16, {spec.bandwidth_gb_s:g} GB/s, "
        f"{spec.memory_gib:g} GiB ({spec.source})",
        f"shares of peak: decode {shares.decode_compute:g} compute / {shares.decode_bandwidth:g} "
        f"bandwidth, prefill {shares.prefill_compute:g}, training {shares.train_compute:g}"
        + (" (measured on this device)" if spec.efficiency else " (assumed)"),
        f"model {shape.params_b:g} B parameters, {shape.kv_bytes_per_token / 1024:.0f} KiB KV "
        f"cache per token; decode batch {batch}, {engine_gpus} GPU(s) per engine, "
        f"{replicas} engine(s) at most",
        f"{questions} training questions, {bench.prompt_tokens} prompt tokens per question, "
        f"answers {shares.output_share:.0%} of max_new_tokens, "
        f"{shares.positive_share:.0%} of nodes labelled correct, weights loaded at "
        f"{shares.load_gb_s:g} GB/s",
        "prepare, label and register run on CPU pods (minutes; not counted); promote reads "
        "evaluate's cached results (a champion the cache lacks costs a third of evaluate more)",
    ]
    name = recipe_name or recipe.name
    return Estimate(name, device, gpus, shape and f"{shape.params_b:g}B", stages, assumptions)


def _tokens(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} B"
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}" if value else "-"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{math.ceil(seconds / 60):.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_estimate(result: Estimate) -> str:
    header = (
        f"malt-ops estimate: {result.recipe} on {result.gpus} x {result.device} "
        f"({result.model} model)\n\n"
        "| stage | GPUs | tokens generated | tokens prefilled | tokens trained | GPU hours | wall |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for stage, cost in [*result.stages.items(), ("total", result.total)]:
        rows.append(
            f"| {stage} | {cost.gpus} | {_tokens(cost.generated_tokens)} | "
            f"{_tokens(cost.prefill_tokens)} | {_tokens(cost.train_tokens)} | "
            f"{cost.gpu_seconds / 3600:.2f} | {_duration(cost.wall_seconds)} |"
        )
    notes = "\n".join(f"- {line}" for line in result.assumptions)
    return f"{header}\n" + "\n".join(rows) + f"\n\nAssumptions:\n{notes}"
