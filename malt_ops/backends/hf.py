"""transformers + peft backend: one base model in memory, several named LoRA adapters.

The hot path is the prompt's forward pass: a verifier or refiner prompt is several hundred
tokens and each is sampled ``n`` times, so with ``n > 1`` each prompt is encoded once and its
KV cache repeated for its ``n`` samples (``share_prompt_cache``) instead of letting
``generate(num_return_sequences=n)`` encode ``n`` copies. Prompts are batched longest first
and left-padded, so each batch pads little.

Sampling is reproducible per sample, not per batch: sample ``k`` of prompt ``i`` draws from its
own ``torch.Generator`` seeded ``seeds[i] + k`` (``RowSampler``, ``sampler.sample_rows``), so it
is the same whatever else is batched with it. generate() samples the whole batch from the one global RNG,
which is why it runs in greedy mode over our own warpers and sampler. Every generation setting
is ours (``generation_config``): the model's generation_config.json contributes none.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from malt_ops.backends.base import Completion, ModelBackend, SamplingParams, Usage
from malt_ops.backends.sampler import sample_rows
from malt_ops.console import progress_stream
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
        scheduler: str = "continuous",
    ) -> None:
        self._tokenizer = load_tokenizer(model_dir)
        self._tokenizer.padding_side = "left"
        self.model = load_model(model_dir, dtype)
        self.model.eval()
        self.batch_size = batch_size
        self.share_prompt_cache = share_prompt_cache
        """Encode each prompt once for its n samples (False: n copies, as generate() does).
        Static scheduler only; the continuous one always shares."""
        if scheduler not in ("static", "continuous"):
            raise MaltError(f"hf scheduler '{scheduler}' is unknown: use static or continuous")
        self.scheduler = scheduler
        """continuous: ``backends.continuous`` (rows refilled, prefixes shared);
        static: generate() over fixed left-padded batches, longest first."""
        self.adapters: dict[str, str] = {}
        self.usage = Usage()
        eos = self.model.generation_config.eos_token_id
        self._stop_ids = set(eos if isinstance(eos, list) else [eos]) | {
            self._tokenizer.eos_token_id
        }
        self._stop_ids.discard(None)
        # generate() fills every setting our config leaves None from the model's own
        # generation config (transformers' _prepare_generation_config), so the file's values
        # (repetition_penalty, suppress_tokens, ...) would leak in; replace it with the
        # library's blank one with only the special token ids (so a direct model.generate()
        # still stops at the end of a turn).
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self._stop_ids),
            pad_token_id=self._tokenizer.pad_token_id,
            bos_token_id=self._tokenizer.bos_token_id,
        )

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
        results: list[list[Completion]] = [[] for _ in texts]
        started = time.perf_counter()
        bar = tqdm(
            total=len(texts) * params.n,
            desc=desc,
            unit="seq",
            leave=False,
            file=progress_stream(),
        )
        seeds = params.prompt_seeds(len(texts))
        with self._adapter_context(adapter):
            if self.scheduler == "continuous":
                self._generate_continuous(encoded, params, seeds, results, bar)
            else:
                self._generate_static(encoded, params, seeds, results, bar)
        bar.close()
        self._count_usage(results, adapter, time.perf_counter() - started)
        return results

    def _generate_continuous(self, encoded, params, seeds, results, bar) -> None:
        from malt_ops.backends.continuous import ContinuousScheduler

        if not encoded:
            return
        scheduler = ContinuousScheduler(
            self.model,
            encoded,
            n=params.n,
            seeds=list(seeds),
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_ids=self._stop_ids,
            pad_id=self._tokenizer.pad_token_id,
            slots=self.batch_size,
            on_row_done=lambda: bar.update(1),
        )
        for index, samples in enumerate(scheduler.run()):
            results[index] = [self._completion(tokens, len(encoded[index])) for tokens in samples]
        self.usage.encoded_tokens += scheduler.stats.encoded_tokens
        self.usage.prefill_seconds += scheduler.stats.prefill_seconds
        self.usage.decode_seconds += scheduler.stats.decode_seconds
        self.usage.decode_rows += scheduler.stats.slot_steps

    def _generate_static(self, encoded, params, seeds, results, bar) -> None:
        # Longest first, so each batch pads little and memory peaks early.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, self.batch_size // params.n)
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            batch = self._tokenizer.pad(
                {"input_ids": [encoded[i] for i in chunk]},
                return_tensors="pt",
                padding_side="left",
            )
            if params.n > 1 and self.share_prompt_cache and batch["input_ids"].shape[1] > 1:
                inputs = self._shared_prompt_cache(batch, params.n)
                self.usage.encoded_tokens += sum(len(encoded[i]) - 1 + params.n for i in chunk)
            else:  # n copies of each prompt (generate() repeats rows only when sampling)
                inputs = {k: v.repeat_interleave(params.n, dim=0) for k, v in batch.items()}
                self.usage.encoded_tokens += sum(len(encoded[i]) * params.n for i in chunk)
            # Rows are prompt-major either way: row = prompt * n + k.
            row_seeds = [seeds[i] + k for i in chunk for k in range(params.n)]
            output = self.model.generate(
                **inputs,
                generation_config=self.generation_config(params),
                logits_processor=sampling_processors(params, row_seeds),
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            self.usage.decode_rows += len(new_tokens) * (
                len(new_tokens[0]) - 1 if new_tokens else 0
            )
            for row, tokens in enumerate(new_tokens):
                index = chunk[row // params.n]
                results[index].append(self._completion(tokens, len(encoded[index])))
            bar.update(len(new_tokens))

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """Every setting generate() reads, from ``params``; sampling itself is ``RowSampler``'s.

        Greedy mode: the warpers and the sampler come as logits processors (see
        ``sampling_processors``). Every other processor is given its neutral value rather than
        None, since generate() would take a None from the model's config.
        """
        # The library's own neutral values (private, but it is the list generate() fills
        # from), then ours on top.
        neutral = GenerationConfig._get_default_generation_params()
        return GenerationConfig(
            **neutral
            | dict(
                # Left None, the lengths count as unset: no "both set" warning next to
                # max_new_tokens (the model's own config, replaced in __init__, is blank).
                max_length=None,
                min_length=None,
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                num_beams=1,
                num_return_sequences=1,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                min_p=None,
                typical_p=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                eos_token_id=sorted(self._stop_ids),
                pad_token_id=self._tokenizer.pad_token_id,
                bos_token_id=self._tokenizer.bos_token_id,
            )
        )

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


class RowSampler(LogitsProcessor):
    """``sample_rows`` inside generate(): the sampled token keeps score 0 and every other
    token gets -inf, so generate()'s greedy argmax picks exactly the sampled token."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise MaltError(f"{scores.shape[0]} rows for {len(self.generators)} row seeds")
        picked = sample_rows(scores, self.generators)
        chosen = torch.full_like(scores, float("-inf"), dtype=torch.float32)
        return chosen.scatter_(1, picked.unsqueeze(-1), 0.0)


def sampling_processors(params: SamplingParams, row_seeds: list[int]) -> LogitsProcessorList:
    """Temperature, top-p, then one sample per row from its seed; nothing for greedy."""
    if params.temperature <= 0:
        return LogitsProcessorList()
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(params.temperature)]
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*processors, RowSampler(row_seeds)])
