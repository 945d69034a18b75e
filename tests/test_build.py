"""The compiled build (setup.py, sidecar/build.py): a stale or unverifiable compiled module is
never run, and which build runs is visible."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sidecar
from sidecar.build import SourceOnly, choose

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """``fakepkg``: a module ``mod`` whose source says "source", beside a file with an
    extension module's name that cannot be loaded (what a stale build would be); manifest
    written by the test."""
    folder = tmp_path / "fakepkg"
    (folder / "sub").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "sub" / "__init__.py").write_text("")
    for module in ("mod.py", "sub/deep.py"):
        (folder / module).write_text("VALUE = 'source'\n")
        (folder / module).with_suffix(SUFFIX).write_bytes(b"not an ELF file")
    sys.path.insert(0, str(tmp_path))
    before = list(sys.meta_path)
    yield folder
    sys.path.remove(str(tmp_path))
    sys.meta_path[:] = before
    for name in [n for n in sys.modules if n == "fakepkg" or n.startswith("fakepkg.")]:
        del sys.modules[name]


def finders() -> list[SourceOnly]:
    return [f for f in sys.meta_path if isinstance(f, SourceOnly) and f.prefix == "fakepkg."]


def manifest(folder: Path, **digests: str) -> None:
    (folder / "_compiled.json").write_text(json.dumps({"modules": digests}))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_stand_in_is_what_python_would_load(package: Path) -> None:
    # Without the finder Python prefers the extension module: the fixture's file is taken
    # for one, and fails to load. (This is what makes the other tests meaningful.)
    with pytest.raises(ImportError):
        importlib.import_module("fakepkg.mod")


def test_no_manifest_means_an_interpreted_build_and_no_finder(package: Path) -> None:
    build = choose(package, {})
    assert not build.compiled and build.note is None
    assert not finders()


def test_a_current_build_is_used(package: Path) -> None:
    manifest(
        package,
        **{
            "fakepkg.mod": digest(package / "mod.py"),
            "fakepkg.sub.deep": digest(package / "sub" / "deep.py"),
        },
    )
    build = choose(package, {})
    assert build.compiled and build.note is None
    assert build.describe() == "compiled"


def test_an_edited_source_loads_every_module_from_source(package: Path) -> None:
    manifest(
        package,
        **{
            "fakepkg.mod": digest(package / "mod.py"),
            "fakepkg.sub.deep": "0" * 64,  # compiled from another source
        },
    )
    build = choose(package, {})
    assert not build.compiled
    assert build.note is not None and "fakepkg.sub.deep" in build.note
    assert "fakepkg.mod" not in build.note
    # every module of the package from its source, not only the stale one
    assert importlib.import_module("fakepkg.mod").VALUE == "source"
    assert importlib.import_module("fakepkg.sub.deep").VALUE == "source"


def test_an_extension_written_in_c_is_checked_against_its_c_source(package: Path) -> None:
    """``_sessions_c`` has a C source, no Python one: an edit to the C after the build means
    the interpreted build too (which uses the Python callbacks), never a stale extension."""
    c_source = package / "native.c"
    c_source.write_text("/* the extension's source */\n")
    (package / "native").with_suffix(SUFFIX).write_bytes(b"not an ELF file")
    digests = {"fakepkg.mod": digest(package / "mod.py"), "fakepkg.native": digest(c_source)}
    manifest(package, **digests)
    assert choose(package, {}).compiled
    c_source.write_text("/* edited since */\n")
    build = choose(package, {})
    assert not build.compiled
    assert build.note is not None and "fakepkg.native" in build.note


def test_sidecar_pure_forces_the_sources(package: Path) -> None:
    manifest(package, **{"fakepkg.mod": digest(package / "mod.py")})
    build = choose(package, {"SIDECAR_PURE": "1"})
    assert not build.compiled and build.note == "SIDECAR_PURE is set"
    assert importlib.import_module("fakepkg.mod").VALUE == "source"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "unreadable"),
        (json.dumps({"modules": {}}), "unreadable"),
        (json.dumps({"other": 1}), "unreadable"),
        (json.dumps({"modules": {"fakepkg.gone": "0" * 64}}), "changed since"),
    ],
)
def test_a_manifest_that_cannot_be_trusted_means_sources(
    package: Path, content: str, expected: str
) -> None:
    (package / "_compiled.json").write_text(content)
    build = choose(package, {})
    assert not build.compiled
    assert build.note is not None and expected in build.note
    assert importlib.import_module("fakepkg.mod").VALUE == "source"


def test_a_missing_extension_module_means_sources(package: Path) -> None:
    (package / "mod").with_suffix(SUFFIX).unlink()
    manifest(package, **{"fakepkg.mod": digest(package / "mod.py")})
    build = choose(package, {})
    assert not build.compiled
    assert build.note is not None and "missing: fakepkg.mod" in build.note


def test_the_finder_installs_once(package: Path) -> None:
    manifest(package, **{"fakepkg.mod": "0" * 64})
    choose(package, {})
    choose(package, {})
    assert len(finders()) == 1


def run_sidecar_python(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, **env},
    ).stdout.strip()


WHICH = "import sidecar, sidecar.listener as l; print(sidecar.BUILD.describe(), l.__file__)"


@pytest.mark.skipif(not sidecar.BUILD.compiled, reason="this checkout is not compiled")
def test_this_checkout_runs_its_compiled_modules_unless_told_not_to() -> None:
    describe, path = run_sidecar_python(WHICH).split()
    assert describe == "compiled" and path.endswith(SUFFIX)
    describe, path = run_sidecar_python(WHICH, SIDECAR_PURE="1").split()
    assert describe == "interpreted" and path.endswith("listener.py")


def test_version_and_metric_say_which_build_runs() -> None:
    from sidecar.metrics import Metrics

    expected = sidecar.BUILD.describe()
    version = run_sidecar_python(
        "import sys; from sidecar.__main__ import main; sys.exit(main(['--version']))"
    )
    assert version == f"sidecar {sidecar.__version__} ({expected})"
    metrics = Metrics()
    value = metrics.registry.get_sample_value(
        "sidecar_build_info", {"version": sidecar.__version__, "build": expected}
    )
    assert value == 1.0


def run_setup(**env: str) -> subprocess.CompletedProcess[str]:
    """``setup.py --name``: setup.py decides whether to compile before setuptools reads the
    metadata, and says why it will not."""
    return subprocess.run(
        [sys.executable, "setup.py", "--name"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_setup_refuses_an_unknown_sidecar_compile() -> None:
    result = run_setup(SIDECAR_COMPILE="maybe")
    assert result.returncode != 0
    assert "SIDECAR_COMPILE must be auto, 1 or 0, not 'maybe'" in result.stderr


def test_setup_required_to_compile_without_a_compiler_fails_and_says_why() -> None:
    result = run_setup(SIDECAR_COMPILE="1", CC="/nonexistent/cc")
    assert result.returncode != 0
    assert "SIDECAR_COMPILE=1 but no C compiler works" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_without_a_compiler_installs_the_plain_modules_and_says_so() -> None:
    result = run_setup(SIDECAR_COMPILE="auto", CC="/nonexistent/cc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "mtls-identity-sidecar"
    assert "no working C compiler: installing the pure-Python modules" in result.stderr
