"""deploy/: every file parses, every `python -m jobs.…` in it (and in README's commands) is accepted by our own parser,
and the versions it pins agree with pyproject.toml and the Makefile, so the files cannot rot silently."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

from embedder.config import UserError
from jobs import arguments

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
CLUSTER = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
RAYJOB = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())


def makefile_pins() -> dict[str, str]:
    """The torch/torchvision releases the Makefile installs."""
    return dict(re.findall(r"\b(torch|torchvision)==([\w.]+)", (REPO / "Makefile").read_text()))


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined (also inside # comments, whose markers are dropped)."""
    lines, pending = [], ""
    for line in text.splitlines():
        body = line.strip()
        if pending:
            body = body.lstrip("#").strip()
        if body.endswith("\\"):
            pending += body[:-1] + " "
            continue
        lines.append(pending + body)
        pending = ""
    return lines


def pip_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` on a `pip install` command in `text`."""
    pins = {}
    for line in logical_lines(text):
        if "pip install" in line:
            for token in shlex.split(line.split("pip install", 1)[1]):
                if "==" in token:
                    requirement = Requirement(token)
                    pins[requirement.name.lower()] = str(requirement.specifier).removeprefix("==")
    return pins


def entrypoints(text: str) -> list[list[str]]:
    """Every `python -m jobs.X ARGS` in `text` as [X, *ARGS]."""
    found = []
    for line in logical_lines(text):
        match = re.search(r"python3? -m jobs\.(\w+)(.*)", line)
        if match:
            found.append([match.group(1), *shlex.split(match.group(2).rstrip("`"))])
    return found


def readme_commands() -> str:
    """The fenced code blocks of README.md."""
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M))


def test_every_entrypoint_is_accepted_by_the_parser_as_inside_a_ray_job(monkeypatch):
    files = {path.relative_to(REPO).as_posix(): path.read_text() for path in sorted(DEPLOY.rglob("*")) if path.is_file()}
    files["README.md (commands)"] = readme_commands()
    # Inside `ray job submit` (and a RayJob) relative paths are refused; the shipped commands must pass that check.
    monkeypatch.setenv(arguments.RAY_JOB_ENV, "{}")
    checked = {}
    for name, text in files.items():
        for argv in entrypoints(text):
            try:
                args = arguments.build_parser().parse_args(argv)
                if args.command in ("run", "embed"):
                    arguments.config_from_args(args)
            except (SystemExit, UserError) as e:
                pytest.fail(f"{name}: `python -m jobs.{' '.join(argv)}` is refused: {e}")
            checked.setdefault(name, []).append(argv)
    assert {"deploy/kuberay/rayjob.yaml", "deploy/cluster.yaml", "deploy/runtime_env.yaml", "README.md (commands)"} <= set(checked)
    assert ["run", *shlex.split(RAYJOB["spec"]["entrypoint"].removeprefix("python -m jobs.run"))] in checked["deploy/kuberay/rayjob.yaml"]


def test_the_dockerfile_pins_what_the_project_is_tested_with():
    image = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu$", DOCKERFILE, flags=re.M)
    assert image, "FROM must be Ray's official GPU image, pinned to a release"
    ray_version, python = image.group(1), f"{image.group(2)}.{image.group(3)}"
    pins = pip_pins(DOCKERFILE)
    assert {k: pins[k] for k in makefile_pins()} == makefile_pins()
    assert pins["ray"] == ray_version
    assert python + ".0" in Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
    for dependency in map(Requirement, PYPROJECT["project"]["dependencies"]):
        assert dependency.name.lower() in pins, f"{dependency.name} is a dependency but the image does not pin it"
        assert pins[dependency.name.lower()] in dependency.specifier, f"{dependency.name}=={pins[dependency.name.lower()]} vs {dependency}"
    copied = set(re.findall(r"^COPY \S+ (\w+) ", DOCKERFILE, flags=re.M))
    assert {name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]} <= copied


def test_the_rayjob_runs_our_image_on_gpu_workers_with_token_auth():
    assert (RAYJOB["apiVersion"], RAYJOB["kind"]) == ("ray.io/v1", "RayJob")
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    assert cluster["rayVersion"] == pip_pins(DOCKERFILE)["ray"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
    images = {c["image"] for c in head + workers}
    assert images == {f"REGISTRY/imgindex:{PYPROJECT['project']['version']}"}
    assert workers and all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in workers)
    # Credentials come from a Secret, never written into the manifest.
    assert all("env" not in c for c in head + workers) and all(c["envFrom"][0]["secretRef"]["name"] for c in head + workers)


def test_the_cluster_launcher_config_is_valid_for_ray_and_turns_token_auth_on():
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)
    assert CLUSTER["docker"]["image"] == re.search(r"^FROM (\S+)$", DOCKERFILE, flags=re.M).group(1)
    setup = pip_pins("\n".join(CLUSTER["setup_commands"]))
    assert {k: setup[k] for k in makefile_pins()} == makefile_pins()
    head_start = CLUSTER["head_start_ray_commands"][-1]
    assert "RAY_AUTH_MODE=token ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert CLUSTER["worker_start_ray_commands"][-1].startswith("RAY_AUTH_MODE=token ray start")
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in CLUSTER["rsync_filter"] and ".venv" in CLUSTER["rsync_exclude"]
    gpu_types = [t for name, t in CLUSTER["available_node_types"].items() if name != CLUSTER["head_node_type"]]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu_types)
