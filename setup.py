"""Builds the request path's modules into C extensions with mypyc, where a C compiler is.

The metadata is in pyproject.toml; this file only adds the compiled modules. They are the
same source, compiled (mypyc turns the type-annotated modules into C, the way black and mypy
ship): on the benchmark (tests/benchmarks) the compiled build serves about a fifth more
requests per second than the same code interpreted.

``SIDECAR_COMPILE`` chooses:

- ``auto`` (default): compile when a C compiler and Python's headers work, else install the
  pure-Python modules and say so (the package is complete either way);
- ``1``: compile or fail (the container image and the benchmark);
- ``0``: pure Python only.

A compiled build records each compiled module's source digest in ``sidecar/_compiled.json``.
At import, ``sidecar`` checks it: after an edit to any compiled module (an editable install),
every module is loaded from its source instead, so a stale build is never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

#: the modules on a request's path (the rest starts, configures or reloads: interpreted)
COMPILED = [
    "sidecar/listener.py",
    "sidecar/listener_state.py",
    "sidecar/http1/client.py",
    "sidecar/http1/heads.py",
    "sidecar/http1/bodies.py",
    "sidecar/http1/inbound.py",
    "sidecar/tls_transport.py",
    "sidecar/handshakes.py",
    "sidecar/flow.py",
    "sidecar/gateway.py",
    "sidecar/request.py",
    "sidecar/plan.py",
    "sidecar/headers.py",
    "sidecar/frontproxy.py",
    "sidecar/hosts.py",
    "sidecar/addresses.py",
    "sidecar/forwarder.py",
    "sidecar/fallback/forward.py",
    "sidecar/fallback/server.py",
    "sidecar/fallback/websocket.py",
    "sidecar/http1/upstream.py",
    "sidecar/http1/pool.py",
    "sidecar/policy.py",
    "sidecar/readings.py",
    "sidecar/rules.py",
    "sidecar/identifiers.py",
    "sidecar/servers.py",
    "sidecar/sni.py",
    "sidecar/metrics.py",
    "sidecar/accesslog.py",
    "sidecar/loglines.py",
    "sidecar/responses.py",
    "sidecar/identity/cache.py",
    "sidecar/identity/intents.py",
    "sidecar/identity/legacy.py",
    # issue #15's leaves, on the request path once the listener uses them
    "sidecar/certformats.py",
    "sidecar/sfv.py",
    "sidecar/xfcc.py",
    "sidecar/proxyproto.py",
    "sidecar/sessions.py",
    "sidecar/identity/shared/record.py",
    "sidecar/identity/shared/store.py",
    # the status page's collectors, and trust reports (from a response's report headers)
    "sidecar/observe.py",
    "sidecar/identity/report_values.py",
    "sidecar/identity/report_gate.py",
    "sidecar/identity/reports.py",
    "sidecar/revocation/gate.py",
]
#: C written by hand, built with the compiled build: the session table's callbacks
#: (tls_sessions) and the reader of many TLS records at once (tls_records); no libssl
#: headers needed: libssl's functions are passed in by address
C_EXTENSIONS = {
    "sidecar._sessions_c": "sidecar/_sessions_c.c",
    "sidecar._records_c": "sidecar/_records_c.c",
}
MANIFEST = "sidecar/_compiled.json"
#: the setup.py commands that build (the others only read metadata)
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
# mypy's own version is what compiles: the build is reproducible for a given mypy.
MYPY = "mypy==2.4.1"
#: type stubs for dependencies that ship none (the compiled modules import config, which
#: reads YAML)
STUBS = ["types-PyYAML"]


def _choice() -> str:
    value = os.environ.get("SIDECAR_COMPILE", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"SIDECAR_COMPILE must be auto, 1 or 0, not {value!r}")
    return value


def _can_compile() -> bool:
    """A C compiler that builds against this Python's headers."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler, get_python_inc

    try:
        compiler = new_compiler()
        customize_compiler(compiler)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "probe.c")
            source.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
            compiler.compile([str(source)], output_dir=tmp, include_dirs=[get_python_inc()])
    # Whatever stops the probe means no compiling here. Not only CompileError: which
    # distutils raises it (setuptools' copy or its alias) depends on the setuptools version.
    except Exception:
        return False
    return True


def _digest(path: str) -> str:
    return hashlib.sha256((ROOT / path).read_bytes()).hexdigest()


class BuildExt(build_ext):
    """build_ext that writes the manifest of what it compiled next to the extensions."""

    def run(self) -> None:
        super().run()
        manifest = {
            "compiler": MYPY,
            "modules": {
                **{path.removesuffix(".py").replace("/", "."): _digest(path) for path in COMPILED},
                **{module: _digest(path) for module, path in C_EXTENSIONS.items()},
            },
        }
        base = ROOT if self.inplace else Path(self.build_lib)
        target = base / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(manifest, indent=1) + "\n")


def _runtime_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _options() -> dict[str, Any]:
    choice = _choice()
    if choice == "0":
        return {}
    if not _can_compile():
        if choice == "1":
            sys.exit(
                "SIDECAR_COMPILE=1 but no C compiler works with this Python's headers "
                "(Debian: apt-get install gcc python3-dev)"
            )
        print(
            "sidecar: no working C compiler: installing the pure-Python modules "
            "(about a fifth slower; see the README's Performance section)",
            file=sys.stderr,
        )
        return {}
    try:
        from mypyc.build import mypycify
    except ImportError:
        # Asked for while the build's requirements are gathered: mypy, and the runtime
        # dependencies, whose types the compiled code is checked and specialised against.
        return {"setup_requires": [MYPY, *STUBS, *_runtime_requirements()]}
    if not BUILDS & set(sys.argv[1:]):
        return {}  # metadata only (egg_info, dist_info): nothing to compile yet
    # Type-checked with the project's mypy settings (pyproject.toml), as in CI; with a cache
    # of its own, so that what a developer's mypy has cached cannot stand in for a missing
    # build requirement.
    flags = ["--cache-dir=build/mypyc-cache"]
    return {
        "ext_modules": [
            *mypycify([*flags, *COMPILED], opt_level="3", group_name="sidecar"),
            *(
                Extension(module, [path], extra_compile_args=["-O2"])
                for module, path in C_EXTENSIONS.items()
            ),
        ],
        "cmdclass": {"build_ext": BuildExt},
    }


setup(**_options())
