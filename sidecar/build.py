"""Which build of the request path runs: compiled by mypyc (see setup.py) or interpreted.

A compiled build leaves ``_compiled.json`` beside the package: each compiled module and the
digest of the source it was compiled from. ``choose`` runs once, from ``sidecar/__init__``,
before any of those modules is imported. If a source changed since (an editable install, then
an edit), or ``SIDECAR_PURE=1`` is set, every ``sidecar`` module is loaded from its source:
never a stale compiled module, and never a mix of the two builds.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
MANIFEST_NAME = "_compiled.json"


@dataclass(frozen=True)
class Build:
    #: the request path's modules run compiled
    compiled: bool
    #: why a compiled build present here is not used (None when it is, or there is none)
    note: str | None = None

    def describe(self) -> str:
        return "compiled" if self.compiled else "interpreted"


class SourceOnly(importlib.abc.MetaPathFinder):
    """A meta path finder: a package's modules from their ``.py`` files, whatever else (a
    compiled module) is beside them."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self.prefix) or not path:
            return None
        for folder in path:
            finder = importlib.machinery.FileFinder(
                folder,
                (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            )
            spec = finder.find_spec(fullname)
            if spec is not None:
                return spec
        return None


def _module_path(package: Path, module: str) -> Path:
    """A module's path without its suffix: ``sidecar.identity.cache`` -> ``identity/cache``."""
    return package.joinpath(*module.split(".")[1:])


def _stale(package: Path, modules: dict[str, str]) -> list[str]:
    stale = []
    for module, digest in modules.items():
        try:
            # a module of Python compiled by mypyc, or an extension written in C
            source = _module_path(package, module).with_suffix(".py")
            if not source.exists():
                source = source.with_suffix(".c")
            current = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            current = ""
        if current != digest:
            stale.append(module)
    return stale


def _is_extension(package: Path, module: str) -> bool:
    path = _module_path(package, module)
    return any(
        path.with_name(path.name + suffix).exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def choose(package: Path = PACKAGE, environ: Mapping[str, str] = os.environ) -> Build:
    """Decide, before the first compiled module is imported, which build this process runs
    (``package``: the package's folder; its name is the folder's)."""
    manifest = package / MANIFEST_NAME
    try:
        modules = json.loads(manifest.read_text())["modules"]
        if not isinstance(modules, dict) or not modules:
            raise ValueError("no modules listed")
    except FileNotFoundError:
        return Build(compiled=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _interpreted(package, f"{MANIFEST_NAME} is unreadable ({exc!r})")
    if environ.get("SIDECAR_PURE", "") not in ("", "0"):
        return _interpreted(package, "SIDECAR_PURE is set")
    stale = _stale(package, modules)
    if stale:
        return _interpreted(
            package,
            "changed since they were compiled: "
            + ", ".join(sorted(stale))
            + " (rebuild: pip install -e . or pip install .)",
        )
    missing = [module for module in modules if not _is_extension(package, module)]
    if missing:
        return _interpreted(package, "compiled modules missing: " + ", ".join(sorted(missing)))
    return Build(compiled=True)


def _interpreted(package: Path, note: str) -> Build:
    name = package.name
    if not any(isinstance(f, SourceOnly) and f.prefix == name + "." for f in sys.meta_path):
        sys.meta_path.insert(0, SourceOnly(name))
    return Build(compiled=False, note=note)
