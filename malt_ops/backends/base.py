"""The inference interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from malt_ops.prompts import Messages


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions per prompt."""
    temperature: float = 0.3
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


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
