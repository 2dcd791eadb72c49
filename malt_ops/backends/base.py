"""The inference interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malt_ops.errors import MaltError
from malt_ops.prompts import Messages
from malt_ops.seeding import check_samples, derive_seed


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions per prompt."""
    temperature: float = 0.3
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    """Used only without ``seeds``: prompt i then gets ``derive_seed(seed, i)``."""
    seeds: tuple[int, ...] | None = None
    """One request seed per prompt (``malt_ops.seeding.derive_seed``): sample k of prompt i
    draws its randomness from (seeds[i], k) alone, whatever else is in the batch."""

    def prompt_seeds(self, count: int) -> tuple[int, ...]:
        """The request seed of each of ``count`` prompts."""
        check_samples(self.n)
        if self.seeds is None:
            return tuple(derive_seed(self.seed, index) for index in range(count))
        if len(self.seeds) != count:
            raise MaltError(f"{len(self.seeds)} seeds for {count} prompts: give one per prompt")
        return tuple(self.seeds)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool
    """False when generation stopped at max_new_tokens instead of an end-of-turn token."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    by_adapter: dict[str, int] = field(default_factory=dict)
    encoded_tokens: int = 0
    """Prompt tokens really run through the model: a prefix shared by several prompts or
    samples counts once (``prompt_tokens`` counts every prompt in full)."""
    prefill_seconds: float = 0.0
    """Of ``seconds``, spent encoding prompts (hf continuous scheduler; 0 where not split)."""
    decode_seconds: float = 0.0
    decode_rows: int = 0
    """Rows computed over all decode steps, finished or padding rows included (hf backend)."""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


class InferenceBackend(ABC):
    """One base model, several named role adapters, batched sampling."""

    usage: Usage

    @abstractmethod
    def add_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter directory under ``name`` (each name once per backend)."""

    @abstractmethod
    def generate(
        self,
        prompts: list[Messages],
        params: SamplingParams,
        adapter: str | None = None,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        """``params.n`` completions for each chat prompt; ``adapter`` None = the base model."""

    @property
    @abstractmethod
    def tokenizer(self): ...


class ModelBackend(InferenceBackend):
    """What the hf and vllm backends share: the tokenizer, adapter-name checks, usage counts."""

    _tokenizer: Any
    adapters: dict[str, str]
    """Loaded adapter name -> the directory it came from."""

    @property
    def tokenizer(self):
        return self._tokenizer

    def _new_adapter_dir(self, name: str, path: str) -> Path:
        """``path`` as a directory, once ``name`` is free and the directory holds a PEFT adapter."""
        if name in self.adapters:
            raise MaltError(
                f"adapter name '{name}' is already loaded; give each adapter version its own name"
            )
        directory = Path(path)
        if not (directory / "adapter_config.json").exists():
            raise MaltError(
                f"adapter {path} has no adapter_config.json: not a PEFT adapter directory"
            )
        return directory

    def _require_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise MaltError(f"adapter '{adapter}' is not loaded (loaded: {sorted(self.adapters)})")

    def _count_usage(
        self, results: list[list[Completion]], adapter: str | None, seconds: float
    ) -> None:
        """Add one generate call's tokens and time to ``usage`` (by adapter, None = base)."""
        self.usage.seconds += seconds
        self.usage.calls += 1
        key = adapter or "base"
        for completions in results:
            for completion in completions:
                self.usage.prompt_tokens += completion.prompt_tokens
                self.usage.completion_tokens += completion.completion_tokens
                self.usage.by_adapter[key] = (
                    self.usage.by_adapter.get(key, 0) + completion.completion_tokens
                )
