"""transformers + peft backend: one base model in memory, several named LoRA adapters."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from malt_ops.backends.base import Completion, InferenceBackend, SamplingParams, Usage
from malt_ops.errors import MaltError
from malt_ops.models import load_model, load_tokenizer
from malt_ops.prompts import Messages, render


class HFBackend(InferenceBackend):
    def __init__(self, model_dir: Path, dtype: str = "float32", batch_size: int = 16) -> None:
        self._tokenizer = load_tokenizer(model_dir)
        self._tokenizer.padding_side = "left"
        self.model = load_model(model_dir, dtype)
        self.model.eval()
        self.batch_size = batch_size
        self.adapters: dict[str, str] = {}
        self.usage = Usage()
        eos = self.model.generation_config.eos_token_id
        self._stop_ids = set(eos if isinstance(eos, list) else [eos]) | {
            self._tokenizer.eos_token_id
        }
        self._stop_ids.discard(None)

    @property
    def tokenizer(self):
        return self._tokenizer

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapters:
            raise MaltError(
                f"adapter name '{name}' is already loaded; give each adapter version its own name"
            )
        if not (Path(path) / "adapter_config.json").exists():
            raise MaltError(
                f"adapter {path} has no adapter_config.json: not a PEFT adapter directory"
            )
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        except Exception as exc:
            raise MaltError(f"could not load adapter {path}: {str(exc).splitlines()[0]}") from None
        self.model.eval()
        self.adapters[name] = path

    def _adapter_context(self, adapter: str | None):
        if adapter is None:
            if hasattr(self.model, "disable_adapter"):
                return self.model.disable_adapter()
            return contextlib.nullcontext()
        if adapter not in self.adapters:
            raise MaltError(f"adapter '{adapter}' is not loaded (loaded: {sorted(self.adapters)})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[Messages],
        params: SamplingParams,
        adapter: str | None = None,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        texts = [render(self._tokenizer, messages) for messages in prompts]
        encoded = [self._tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        # Longest first, so each batch pads little and memory peaks early.
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, self.batch_size // params.n)
        results: list[list[Completion]] = [[] for _ in texts]
        started = time.perf_counter()
        bar = tqdm(total=len(texts) * params.n, desc=desc, unit="seq", leave=False)
        with self._adapter_context(adapter):
            for batch_index, start in enumerate(range(0, len(order), per_batch)):
                chunk = order[start : start + per_batch]
                batch = self._tokenizer.pad(
                    {"input_ids": [encoded[i] for i in chunk]},
                    return_tensors="pt",
                    padding_side="left",
                )
                torch.manual_seed(params.seed * 100_003 + batch_index)
                sampling = params.temperature > 0
                output = self.model.generate(
                    **batch,
                    do_sample=sampling,
                    temperature=params.temperature if sampling else None,
                    top_p=params.top_p if sampling else None,
                    top_k=None,
                    max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n,
                    pad_token_id=self._tokenizer.pad_token_id,
                )
                new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
                for row, tokens in enumerate(new_tokens):
                    index = chunk[row // params.n]
                    results[index].append(self._completion(tokens, len(encoded[index])))
                bar.update(len(new_tokens))
        bar.close()
        elapsed = time.perf_counter() - started
        self.usage.seconds += elapsed
        self.usage.calls += 1
        for completions in results:
            for completion in completions:
                self.usage.prompt_tokens += completion.prompt_tokens
                self.usage.completion_tokens += completion.completion_tokens
                key = adapter or "base"
                self.usage.by_adapter[key] = (
                    self.usage.by_adapter.get(key, 0) + completion.completion_tokens
                )
        return results

    def _completion(self, tokens: list[int], prompt_tokens: int) -> Completion:
        finished = False
        for position, token in enumerate(tokens):
            if token in self._stop_ids:
                tokens, finished = tokens[:position], True
                break
        text = self._tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens) + int(finished),
            finished=finished,
        )
