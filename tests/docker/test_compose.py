"""docker/: the compose file parses and everything it names exists in the repository.

No Docker engine is needed: builds are not run, references are checked.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml  # the dev extra

from config.settings import REPO_ROOT, Settings
from worker.cli import app

DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    found = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def stages(instructions: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) in order."""
    result: list[tuple[str, list[tuple[str, str]]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else words[0]
            result.append((name, [(keyword, rest)]))
        elif result:
            result[-1][1].append((keyword, rest))
    return result


def builds(services: dict[str, dict[str, Any]]) -> list[tuple[str, Path, Path, str | None]]:
    """(service, context, Dockerfile, target) of every service built from this repo."""
    found = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (DOCKER / build.get("context", ".")).resolve()
        found.append(
            (name, context, context / build.get("dockerfile", "Dockerfile"), build.get("target"))
        )
    return found


def command_words(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def cli_has(words: list[str]) -> bool:
    """Whether `cxr-screen WORDS...` names an existing (sub)command of the Typer app."""
    command: Any = typer.main.get_command(app)
    matched = 0
    for word in words:
        children = getattr(command, "commands", None)
        if word.startswith("-") or not children:
            break
        if word not in children:
            return False
        command = children[word]
        matched += 1
    return matched > 0 and not getattr(command, "commands", None)


def celery_app_of(words: list[str]) -> str | None:
    for flag in ("-A", "--app"):
        if flag in words:
            return words[words.index(flag) + 1]
    return next((w.split("=", 1)[1] for w in words if w.startswith("--app=")), None)


# --- the compose file ---------------------------------------------------------------------


def test_compose_has_the_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)


def test_redis_keeps_every_queued_message(services: dict[str, dict[str, Any]]) -> None:
    words = command_words(services["redis"]["command"])
    assert words[0] == "redis-server"
    assert words[words.index("--maxmemory-policy") + 1] == "noeviction"
    assert words[words.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "healthcheck" in services["redis"]


def test_postgres_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    (volume,) = postgres["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/var/lib/postgresql/data" and name in compose["volumes"]
    words = command_words(postgres["healthcheck"]["test"])
    assert "pg_isready" in words
    # the image's first-start server answers on the socket only: check as workers connect
    assert words[words.index("-h") + 1] == "127.0.0.1"


def test_workers_start_after_a_successful_migration(services: dict[str, dict[str, Any]]) -> None:
    migrate, worker = services["migrate"], services["worker"]
    assert command_words(migrate["command"]) == ["cxr-screen", "db", "upgrade"]
    assert migrate.get("restart") == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert command_words(worker["command"]) == ["cxr-screen", "worker"]
    conditions = {name: dep["condition"] for name, dep in worker["depends_on"].items()}
    assert conditions == {
        "migrate": "service_completed_successfully",
        "redis": "service_healthy",
        "postgres": "service_healthy",
    }
    # Scalable with --scale: no fixed container name, no host port to collide on.
    assert "container_name" not in worker and "ports" not in worker


def test_everyone_uses_the_same_broker_and_database(services: dict[str, dict[str, Any]]) -> None:
    worker, migrate, flower = services["worker"], services["migrate"], services["flower"]
    assert worker["environment"] == migrate["environment"]
    assert flower["environment"]["CXR_BROKER_URL"] == worker["environment"]["CXR_BROKER_URL"]
    assert worker["environment"]["CXR_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in worker["environment"]["CXR_DATABASE_URL"]
    assert worker["environment"]["CXR_BROKER_URL"].startswith("redis://redis:6379/")
    assert celery_app_of(command_words(flower["command"])) == "worker.celery_app"
    assert "flower" in command_words(flower["command"])


def test_every_cxr_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    known = {f"CXR_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        for key in service.get("environment") or {}:
            if key.startswith("CXR_"):
                assert key in known, f"{name}: {key} is not a setting in config/settings.py"


def test_secrets_are_required_not_defaulted(services: dict[str, dict[str, Any]]) -> None:
    env = services["worker"]["environment"]
    assert "${CXR_HASH_KEY:?" in env["CXR_HASH_KEY"]
    assert "${POSTGRES_PASSWORD:?" in env["CXR_DATABASE_URL"]
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])


# --- references: files, stages, commands ------------------------------------------------


def test_build_contexts_dockerfiles_and_targets_exist(services: dict[str, dict[str, Any]]) -> None:
    found = builds(services)
    assert {name for name, *_ in found} >= {"migrate", "worker", "flower"}
    for name, context, dockerfile, target in found:
        assert context == REPO_ROOT, f"{name}: build context {context}"
        assert dockerfile.is_file(), f"{name}: no Dockerfile at {dockerfile}"
        names = [stage for stage, _ in stages(dockerfile_instructions(dockerfile))]
        assert target is None or target in names, f"{name}: no stage {target} in {dockerfile}"


def test_copy_sources_exist_and_are_not_ignored(services: dict[str, dict[str, Any]]) -> None:
    for _, context, dockerfile, _ in builds(services):
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        patterns = [
            line.strip()
            for line in (ignore.read_text().splitlines() if ignore.exists() else [])
            if line.strip() and not line.startswith("#")
        ]
        for keyword, rest in dockerfile_instructions(dockerfile):
            if keyword not in ("COPY", "ADD"):
                continue
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(rest)):
                continue
            for source in words[:-1]:
                matches = list(context.glob(source.rstrip("/"))) or [context / source]
                assert any(m.exists() for m in matches), f"COPY source {source} missing"
                assert not ignored(source.rstrip("/"), patterns), f"{source} is .dockerignored"


def ignored(path: str, patterns: list[str]) -> bool:
    """The last matching .dockerignore pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if bare == "**" or fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
            result = not negate
    return result


def test_the_worker_image(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = DOCKER / "Dockerfile"
    all_stages = stages(dockerfile_instructions(dockerfile))
    names = [name for name, _ in all_stages]
    bases = [instructions[0][1].split()[0] for _, instructions in all_stages]
    assert all(b == "python:3.11-slim" or b in names for b in bases), bases
    assert all_stages[-1][0] == "worker", "a plain `docker build` gives the worker image"
    worker = dict(all_stages[-1][1])
    assert worker["USER"] not in ("root", "0"), "the worker runs as a non-root user"
    assert worker["WORKDIR"] == "/home/cxr", "a working folder that user can write"
    assert command_words(_exec_form(worker["CMD"])) == ["cxr-screen", "worker"]
    text = dockerfile.read_text()
    installs = [shlex.split(line) for line in re.findall(r"pip install ([^\n&]+)", text)]
    assert ["."] in installs, "the worker install: pip install ."
    assert not any("train" in word or "tensorflow" in word for line in installs for word in line)
    assert re.search(r"^COPY models/cxr-compact/ models/cxr-compact/", text, re.M), (
        "the build stage installs the shipped model"
    )


def test_the_image_holds_every_module_the_cli_and_the_worker_import(tmp_path: Path) -> None:
    """The image installs what its build stage copies, nothing else: the console script
    and the Celery app must import from that tree alone (the CLI once imported training
    commands the image did not copy, and no command could start)."""
    build_stage_tree(tmp_path)
    outside = (
        "import sys, worker.cli, worker.celery_app, worker.tasks\n"
        "ours = {'config', 'db', 'worker', 'training'}\n"
        "print(sorted(name for name, module in sys.modules.items()\n"
        "    if name.split('.')[0] in ours\n"
        "    and not str(getattr(module, '__file__', '')).startswith(sys.argv[1])))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", outside, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"imported from outside the image: {done.stdout}"


def build_stage_tree(folder: Path) -> None:
    """What the Dockerfile's build stage copies, copied into ``folder``."""
    build = dict(stages(dockerfile_instructions(DOCKER / "Dockerfile")))["build"]
    folder.mkdir(parents=True, exist_ok=True)
    for keyword, rest in build:
        words = shlex.split(rest)
        if keyword == "COPY" and not any(w.startswith("--from") for w in words):
            for source in words[:-1]:
                origin = REPO_ROOT / source.rstrip("/")
                target = folder / source.rstrip("/")
                if origin.is_dir():
                    shutil.copytree(origin, target)
                else:
                    shutil.copy2(origin, target)


@pytest.mark.slow
def test_the_wheel_the_image_installs_carries_the_shipped_model(tmp_path: Path) -> None:
    """A wheel had no model: installed anywhere but in a checkout, every command that
    needs one failed with "no model card at .../site-packages/models/cxr-compact"."""
    tree = tmp_path / "src"
    build_stage_tree(tree)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*command, "--quiet", "-w", str(tmp_path / "dist"), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cxr_screen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/data/", 1)[1] for n in names if ".data/data/share/" in n}
    model = "share/cxr-screen/models/cxr-compact"
    assert shipped == {f"{model}/{f}" for f in ("model_card.json", "model.tflite", "model.keras")}
    assert "worker/imaging/polarity.json" in names


def test_healthchecks_run_commands_that_exist() -> None:
    for name, instructions in stages(dockerfile_instructions(DOCKER / "Dockerfile")):
        for keyword, rest in instructions:
            if keyword != "HEALTHCHECK":
                continue
            command = rest.split(" CMD ", 1)[1]
            words = command_words(_exec_form(command))
            if words[0] == "celery":
                module = celery_app_of(words)
                assert module and importlib.util.find_spec(module), f"{name}: -A {module}"
                if name == "worker":
                    assert words[words.index("-A") + 2 : words.index("-A") + 4] == [
                        "inspect",
                        "ping",
                    ]


@pytest.mark.parametrize("source", ["compose", "dockerfile"])
def test_named_commands_exist(services: dict[str, dict[str, Any]], source: str) -> None:
    commands: list[list[str]] = []
    if source == "compose":
        commands = [command_words(s["command"]) for s in services.values() if "command" in s]
    else:
        for keyword, rest in dockerfile_instructions(DOCKER / "Dockerfile"):
            if keyword == "CMD":
                commands.append(command_words(_exec_form(rest)))
    assert commands
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cxr-screen"] == "worker.cli:main"
    for words in commands:
        if words[0] == "cxr-screen":
            assert cli_has(words[1:]), f"`{' '.join(words)}`: no such cxr-screen command"
        elif words[0] == "celery":
            module = celery_app_of(words)
            assert module and importlib.util.find_spec(module), f"no module {module}"
            celery = importlib.import_module(module)
            assert type(getattr(celery, "app", None)).__name__ == "Celery", module


def test_cli_has_rejects_unknown_commands() -> None:
    assert cli_has(["db", "upgrade"]) and cli_has(["report"])
    assert not cli_has(["db", "downgrade"]) and not cli_has(["no-such-command"])


def _exec_form(arguments: str) -> Any:
    """A Dockerfile CMD in exec form (JSON list) or shell form (a string)."""
    stripped = arguments.strip()
    return json.loads(stripped) if stripped.startswith("[") else stripped
