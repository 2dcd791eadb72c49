"""Pip constraints for one image build, derived from the repository's lock.

requirements/lock.txt is resolved for a developer machine (Python 3.11, CPU): it pins
``torch==2.13.0+cpu``, a CPU-only local wheel. An image build runs this script inside the
image it is building and installs with ``pip install --constraint <output>``, so every
package the image adds comes at the version the test suite ran with, except:

* ``torch``, ``triton`` and ``nvidia-*``: never pinned. The GPU images keep the CUDA build
  of torch their base image ships; the light images install no torch at all.
* ``--skip-installed``: nothing the base image already ships is pinned either, so the
  stacks that vLLM, PyTorch and Airflow publish stay as they tested them (pip's default
  ``only-if-needed`` strategy then leaves them alone unless a new package needs another
  version). ``--keep PATTERN`` pins matching names from the lock all the same.
* ``--expect NAME``: the build fails unless the base image ships NAME at the lock's version
  (local labels such as ``+cu126`` ignored), so a base tag that drifts from the lock stops
  the build here instead of pip quietly pulling a second torch or Airflow.

Standard library only: it runs on whatever Python the base image has.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from importlib import metadata

NEVER_PINNED = ("torch", "triton", "nvidia-*")
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*(?P<version>[^\s;]+)"
    r"(?P<marker>\s*;.*)?$"
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without its local label: 2.13.0+cu126 -> 2.13.0."""
    return version.split("+", 1)[0]


def read_lock(path: str) -> dict[str, tuple[str, str]]:
    """``{canonical name: (version, marker)}`` for every pin in a ``uv pip compile`` lock."""
    pins: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as lock:
        for number, raw in enumerate(lock, 1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith(("#", "-")):
                continue
            match = PIN.match(line)
            if match is None:
                raise SystemExit(f"{path}:{number}: not a 'name==version' pin: {line}")
            pins[canonical(match["name"])] = (match["version"], match["marker"] or "")
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, canonical(p)) for p in patterns)


def constraints(
    pins: dict[str, tuple[str, str]],
    present: dict[str, str],
    skip_installed: bool,
    keep: list[str],
    expect: list[str],
) -> list[str]:
    for name in map(canonical, expect):
        if name not in pins:
            raise SystemExit(f"--expect {name}: the lock does not pin it")
        if name not in present:
            raise SystemExit(f"--expect {name}: the base image does not ship it")
        if public(present[name]) != public(pins[name][0]):
            raise SystemExit(
                f"the base image ships {name} {present[name]} but the lock pins "
                f"{pins[name][0]}: use the base tag that matches the lock"
            )
    lines = []
    for name, (version, marker) in sorted(pins.items()):
        if matches(name, NEVER_PINNED):
            continue
        if skip_installed and name in present and not matches(name, keep):
            continue
        lines.append(f"{name}=={version}{marker}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("lock", help="requirements/lock.txt")
    parser.add_argument(
        "--skip-installed",
        action="store_true",
        help="leave out what this interpreter already has (the base image's packages)",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="pin names matching PATTERN even when installed (repeatable)",
    )
    parser.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="NAME",
        help="fail unless NAME is installed at the lock's version (repeatable)",
    )
    args = parser.parse_args(argv)
    lines = constraints(
        read_lock(args.lock), installed(), args.skip_installed, args.keep, args.expect
    )
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
