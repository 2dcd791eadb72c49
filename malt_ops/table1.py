"""The paper's Table 1 settings: the names a recipe may gate or compare on.

Below both config (which checks promotion.gate_setting and baseline_setting at load) and the
evaluate stage (which computes them), so the recipe can be checked without importing a stage.
"""

from __future__ import annotations

SETTINGS = [
    ("SA", "base", "generator", False),
    ("SA+MV", "base", "generator", True),
    ("MA", "base", "refiner", False),
    ("MA+MV", "base", "refiner", True),
    ("STaR SA", "star", "generator", False),
    ("STaR SA+MV", "star", "generator", True),
    ("STaR MA", "star", "refiner", False),
    ("STaR MA+MV", "star", "refiner", True),
    ("MALT w/o MV", "malt", "refiner", False),
    ("MALT", "malt", "refiner", True),
]
"""(name, system, turn whose answer counts, majority vote over the chains)."""

SETTING_NAMES = tuple(name for name, *_ in SETTINGS)
MALT_SETTINGS = tuple(name for name, system, *_ in SETTINGS if system == "malt")
