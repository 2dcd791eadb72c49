"""transformers + peft backend: one base model in memory, several named LoRA adapters.

The hot path is the prompt's forward pass: a verifier or refiner prompt is several hundred
tokens and each is sampled ``n`` times, so with ``n > 1`` each prompt is encoded once and its
KV cache repeated for its ``n`` samples (``share_prompt_cache``) instead of letting
``generate(num_return_sequences=n)`` encode ``n`` copies. Prompts are batched longest first
and left-padded, so each batch pads little.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from malt_ops.backends.base import Completion, ModelBackend, SamplingParams, Usage
from malt_ops.errors import MaltError
from malt_ops.models import load_model, load_tokenizer
from malt_ops.prompts import Messages, render


class HFBackend(ModelBackend):
    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        batch_size: int = 16,
        share_prompt_cache: bool = True,
    ) -> None:
        self._tokenizer = load_tokenizer(model_dir)
        self._tokenizer.padding_side = "left"
        self.model = load_model(model_dir, dtype)
        self.model.eval()
        self.batch_size = batch_size
        self.share_prompt_cache = share_prompt_cache
        """Encode each prompt once for its n samples (False: n copies, as generate() does)."""
        self.adapters: dict[str, str] = {}
        self.usage = Usage()
        eos = self.model.generation_config.eos_token_id
        self._stop_ids = set(eos if isinstance(eos, list) else [eos]) | {
            self._tokenizer.eos_token_id
        }
        self._stop_ids.discard(None)

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        self._new_adapter_dir(name, path)
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
        self._require_adapter(adapter)
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
                inputs, copies = dict(batch), params.n
                if params.n > 1 and self.share_prompt_cache and batch["input_ids"].shape[1] > 1:
                    inputs, copies = self._shared_prompt_cache(batch, params.n), 1
                output = self.model.generate(
                    **inputs,
                    do_sample=sampling,
                    temperature=params.temperature if sampling else None,
                    top_p=params.top_p if sampling else None,
                    top_k=None,
                    max_new_tokens=params.max_new_tokens,
                    num_return_sequences=copies,
                    pad_token_id=self._tokenizer.pad_token_id,
                )
                new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
                for row, tokens in enumerate(new_tokens):
                    index = chunk[row // params.n]
                    results[index].append(self._completion(tokens, len(encoded[index])))
                bar.update(len(new_tokens))
        bar.close()
        self._count_usage(results, adapter, time.perf_counter() - started)
        return results

    def _shared_prompt_cache(self, batch, n: int) -> dict:
        """generate() inputs for ``n`` samples per prompt, with each prompt encoded once.

        All but the last prompt token go through the model once per prompt; the KV cache is
        then repeated for the ``n`` samples, and generate() encodes only the last token of each
        copy. Position ids are generate()'s own (counted over the attention mask, so left
        padding does not shift them), so the cached keys line up with the tokens that follow.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        prefix = self.model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = prefix.past_key_values
        cache.batch_repeat_interleave(n)
        return {
            "input_ids": ids.repeat_interleave(n, dim=0),
            "attention_mask": mask.repeat_interleave(n, dim=0),
            "past_key_values": cache,
        }

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
