"""Several worker processes sharing the TLS port, behind one supervisor.

With ``listen.workers`` above 1, ``sidecar run`` becomes a supervisor: it starts N copies of
itself as workers (each binds the port with ``SO_REUSEPORT`` and keeps its own verdict cache),
serves the admin listener for all of them, and relays signals. Each worker serves a private
admin listener on a Unix socket; the supervisor's ``/metrics`` merges theirs (counters of a
worker that died are carried so totals never go backwards), ``/readyz`` is ready when every
worker is, and ``/cache/purge`` reaches every worker. A worker that dies is logged and
restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from . import log
from .config import Config

_MAX_GAUGES = ("_timestamp_seconds", "_expiring_soon")
_MONOTONIC = frozenset({"counter", "histogram", "summary"})
#: (family name, sample name, sorted labels)
_Key = tuple[str, str, tuple[tuple[str, str], ...]]
_STARTUP_TIMEOUT = 30.0


@dataclass
class Worker:
    index: int
    socket: Path
    process: asyncio.subprocess.Process | None = None
    #: counter and histogram samples of earlier incarnations of this worker slot
    retired: dict[_Key, float] = field(default_factory=dict)
    last: dict[_Key, float] = field(default_factory=dict)
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, config_path: Path, *, log_format: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.log_format = log_format
        self.log = log.get_logger("sidecar.supervisor")
        self.runtime = Path(tempfile.mkdtemp(prefix="sidecar-"))
        count = config.listen.worker_count()
        self.workers = [Worker(i, self.runtime / f"worker-{i}.sock") for i in range(count)]
        self.stopping = False

    # ---- processes ------------------------------------------------------------------------

    async def _spawn(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            worker.socket.unlink()
        args = [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            str(self.config_path),
            "--worker-socket",
            str(worker.socket),
            "--worker-index",
            str(worker.index),
        ]
        if self.log_format:
            args += ["--log-format", self.log_format]
        worker.process = await asyncio.create_subprocess_exec(*args)
        self.log.info("worker_started", worker=worker.index, pid=worker.process.pid)

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that exits while we are not stopping."""
        delay = 0.5
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping:  # set while we waited (mypy keeps the loop's narrowing)
                return  # type: ignore[unreachable]
            self.log.error(
                "worker_died",
                worker=worker.index,
                pid=worker.process.pid,
                exit_code=code,
                restart_in=delay,
            )
            for key, value in worker.last.items():
                worker.retired[key] = worker.retired.get(key, 0.0) + value
            worker.last = {}
            worker.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            if not self.stopping:
                await self._spawn(worker)

    async def _wait_ready(self) -> bool:
        deadline = asyncio.get_running_loop().time() + _STARTUP_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            if any(
                w.process is not None and w.process.returncode is not None for w in self.workers
            ):
                return False
            states = await asyncio.gather(*(self._ask(w, "GET", "/readyz") for w in self.workers))
            if all(s is not None and s[0] == 200 for s in states):
                return True
            await asyncio.sleep(0.1)
        return False

    async def _ask(self, worker: Worker, method: str, path: str) -> tuple[int, str] | None:
        if not worker.socket.exists():
            return None
        try:
            connector = aiohttp.UnixConnector(path=str(worker.socket))
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=5)
                ) as s,
                s.request(method, f"http://worker{path}") as resp,
            ):
                return resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    # ---- the admin listener -----------------------------------------------------------------

    def admin_app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            alive = sum(
                1 for w in self.workers if w.process is not None and w.process.returncode is None
            )
            status = 200 if alive else 503
            return web.json_response(
                {"status": "ok" if alive else "no worker", "workers_alive": alive}, status=status
            )

        async def readyz(request: web.Request) -> web.Response:
            if self.stopping:
                return web.json_response({"ready": False, "reason": "draining"}, status=503)
            answers = await asyncio.gather(*(self._ask(w, "GET", "/readyz") for w in self.workers))
            for worker, answer in zip(self.workers, answers, strict=True):
                if answer is None or answer[0] != 200:
                    reason = json.loads(answer[1]).get("reason") if answer else "not answering"
                    return web.json_response(
                        {"ready": False, "reason": f"worker {worker.index}: {reason}"}, status=503
                    )
            return web.json_response({"ready": True, "workers": len(self.workers)})

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(
                text=await self.merged_metrics(),
                content_type="text/plain",
                charset="utf-8",
                headers={"X-Content-Type-Options": "nosniff"},
            )

        async def purge(request: web.Request) -> web.Response:
            path = "/cache/purge" + (f"?{request.query_string}" if request.query_string else "")
            answers = await asyncio.gather(*(self._ask(w, "POST", path) for w in self.workers))
            purged = 0
            for answer in answers:
                if answer is None:
                    continue
                if answer[0] != 200:
                    return web.Response(
                        status=answer[0], text=answer[1], content_type="application/json"
                    )
                purged += int(json.loads(answer[1]).get("purged", 0))
            reached = sum(1 for a in answers if a is not None)
            return web.json_response(
                {"purged": purged, "workers": reached},
                status=200 if reached == len(self.workers) else 207,
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/cache/purge", purge)
        return app

    async def merged_metrics(self) -> str:
        """Every worker's metrics summed by name and labels (timestamps: the largest)."""
        answers = await asyncio.gather(*(self._ask(w, "GET", "/metrics") for w in self.workers))
        totals: dict[_Key, float] = {}
        kinds: dict[str, tuple[str, str]] = {}
        for worker, answer in zip(self.workers, answers, strict=True):
            if answer is not None and answer[0] == 200:
                current: dict[_Key, float] = {}
                for family in text_string_to_metric_families(answer[1]):
                    kinds[family.name] = (family.type, family.documentation)
                    for sample in family.samples:
                        if not sample.name.endswith("_created"):
                            current[
                                (family.name, sample.name, tuple(sorted(sample.labels.items())))
                            ] = sample.value
                worker.last = {k: v for k, v in current.items() if kinds[k[0]][0] in _MONOTONIC}
            else:
                current = dict(worker.last)  # not answering this time: its last counters
            for key, value in worker.retired.items():
                current[key] = current.get(key, 0.0) + value
            for key, value in current.items():
                if key[0].endswith(_MAX_GAUGES):
                    totals[key] = max(totals.get(key, value), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value
        lines: list[str] = []
        for name, (kind, doc) in kinds.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            for (family_name, sample_name, labels), value in totals.items():
                if family_name == name:
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(
                        f"{sample_name}{{{text}}} {value!r}" if text else f"{sample_name} {value!r}"
                    )
        restarts = sum(w.restarts for w in self.workers)
        lines += [
            "# HELP sidecar_worker_restarts Workers restarted after they died.",
            "# TYPE sidecar_worker_restarts counter",
            f"sidecar_worker_restarts_total {float(restarts)!r}",
            "# HELP sidecar_workers Worker processes configured.",
            "# TYPE sidecar_workers gauge",
            f"sidecar_workers {float(len(self.workers))!r}",
        ]
        return "\n".join(lines) + "\n"

    # ---- run --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop, force = asyncio.Event(), asyncio.Event()

        def on_stop() -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        try:
            for worker in self.workers:
                await self._spawn(worker)
            if not await self._wait_ready():
                self.log.error("workers_failed_to_start")
                self.stopping = True
                self._signal_all(signal.SIGINT)
                await self._reap(5.0)
                return 1
            runner = web.AppRunner(self.admin_app(), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, self.config.admin.host, self.config.admin.port)
            await site.start()
            watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
            self.log.info(
                "supervising",
                workers=len(self.workers),
                admin=f"{self.config.admin.host}:{self.config.admin.port}",
            )
            await stop.wait()
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            reaping = asyncio.create_task(self._reap(None))
            forced = asyncio.create_task(force.wait())
            await asyncio.wait({reaping, forced}, return_when=asyncio.FIRST_COMPLETED)
            if not reaping.done():
                self._signal_all(signal.SIGINT)  # a worker's second signal stops it at once
                await self._reap(5.0)
            forced.cancel()
            for task in watchers:
                task.cancel()
            await runner.cleanup()
            return 0
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    async def _reap(self, limit: float | None) -> None:
        procs = [w.process for w in self.workers if w.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), limit)
        except TimeoutError:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
