"""``helm template`` without a helm binary: coalesce values, check them against the chart's
``values.schema.json``, and execute the templates with the Go renderer beside this file.

    python helm/render/helm_template.py [--values FILE ...] [--name R] [--namespace NS]

The Go program (``main.go``: Go's text/template, sprig, Helm's include/tpl/required/toYaml)
is built once per source version under ``build/helm-render/`` and reused. Building needs the
Debian packages ``golang-go`` and ``golang-github-masterminds-sprig-dev`` (offline; GOPATH
mode, no module download).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHART = ROOT / "helm" / "ultrakv"
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
SPRIG = Path(GOPATH) / "src/github.com/Masterminds/sprig"
DEFAULT_KUBE_VERSION = "v1.34.0"


class RendererUnavailable(RuntimeError):
    """Go or sprig is not installed, so the renderer cannot be built."""


class ValuesError(ValueError):
    """The coalesced values break ``values.schema.json`` (Helm refuses to render them)."""


def build_renderer() -> Path:
    """The renderer binary, built from ``main.go`` if this version was not built before."""
    source = (HERE / "main.go").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = ROOT / "build" / "helm-render" / digest / "render"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RendererUnavailable("the go compiler is not installed (apt-get install golang-go)")
    if not SPRIG.is_dir():
        raise RendererUnavailable(
            f"sprig sources are not at {SPRIG} (apt-get install golang-github-masterminds-sprig-dev)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
           "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(ROOT / "build" / "go-cache"))
    tmp = binary.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders never see half a file
    proc = subprocess.run([go, "build", "-o", str(tmp), "main.go"], cwd=HERE, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the chart renderer failed:\n{proc.stderr}")
    tmp.replace(binary)
    return binary


def coalesce(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the chart's: maps merge key by key, anything else is
    replaced, and ``null`` removes a default key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(files: list[str | Path] = (), overrides: dict[str, Any] | None = None,
                chart: Path = CHART) -> dict[str, Any]:
    """The chart's defaults with ``files`` and then ``overrides`` merged over them, checked
    against the chart's schema (raises :class:`ValuesError` naming the path and the rule)."""
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    for f in files:
        values = coalesce(values, yaml.safe_load(Path(f).read_text()) or {})
    if overrides:
        values = coalesce(values, overrides)
    validate_values(values, chart)
    return values


def validate_values(values: dict[str, Any], chart: Path = CHART) -> None:
    """Raise :class:`ValuesError` when ``values`` break the chart's ``values.schema.json``."""
    import jsonschema

    schema = json.loads((chart / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"- {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                 for e in errors]
        raise ValuesError("values don't meet the specifications of the schema(s):\n"
                          + "\n".join(lines))


def render(values: dict[str, Any], name: str = "ultrakv", namespace: str = "default",
           api_versions: tuple[str, ...] = (), notes: bool = False,
           kube_version: str = DEFAULT_KUBE_VERSION, chart: Path = CHART,
           existing: list[dict[str, Any]] | None = None) -> str:
    """The chart's manifests (or NOTES.txt) for already coalesced, checked ``values``;
    ``existing``: the objects ``lookup`` finds, as a cluster being upgraded holds them."""
    binary = build_renderer()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(values, f)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as held:
        json.dump(existing or [], held)
    try:
        cmd = [str(binary), "-chart", str(chart), "-values", f.name, "-name", name,
               "-namespace", namespace, "-kube-version", kube_version,
               "-api-versions", ",".join(api_versions), "-existing", held.name]
        proc = subprocess.run(cmd + (["-notes"] if notes else []), capture_output=True,
                              text=True)
    finally:
        os.unlink(f.name)
        os.unlink(held.name)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    return proc.stdout


def render_objects(values: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """The rendered manifests as Kubernetes objects (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(render(values, **kwargs)) if doc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", "-f", action="append", default=[], help="values file")
    parser.add_argument("--name", default="ultrakv", help="release name")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--api-versions", default="",
                        help="comma list, e.g. monitoring.coreos.com/v1 for the ServiceMonitor")
    parser.add_argument("--notes", action="store_true", help="print NOTES.txt instead")
    args = parser.parse_args(argv)
    try:
        values = load_values(args.values)
        apis = tuple(a for a in args.api_versions.split(",") if a)
        sys.stdout.write(render(values, args.name, args.namespace, apis, args.notes))
    except (ValuesError, RendererUnavailable, RuntimeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
