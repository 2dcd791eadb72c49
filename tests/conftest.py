"""Shared fixtures: recipes in a temporary store, and the real SmolLM2 model loaded once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Airflow reads its home at import: give the test session its own, never ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="malt-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_RECIPE = REPO / "recipes" / "local.yaml"


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Write a recipe based on recipes/local.yaml with the store under tmp_path."""

    def make(**sections) -> Path:
        data = yaml.safe_load(LOCAL_RECIPE.read_text())
        data["storage"] = {"root": str(tmp_path / "store")}
        data["run"] = {"state_dir": str(tmp_path / "state")}
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from malt_ops.config import ModelConfig
    from malt_ops.models import resolve_model_dir

    return resolve_model_dir(ModelConfig())


@pytest.fixture(scope="session")
def hf_backend(model_dir: Path):
    from malt_ops.backends.hf import HFBackend

    return HFBackend(model_dir, batch_size=16)
