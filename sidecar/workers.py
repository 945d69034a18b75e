"""Several worker processes sharing the TLS port, behind one supervisor.

With ``listen.workers`` above 1, ``sidecar run`` becomes a supervisor: it starts N copies of
itself as workers (each binds the port with ``SO_REUSEPORT`` and keeps its own verdict cache),
serves the admin listener for all of them, and relays signals. Each worker serves a private
admin listener on a Unix socket; the supervisor's ``/metrics`` merges theirs (counters of a
worker that died are carried so totals never go backwards), ``/readyz`` is ready when every
worker is, ``/cache/purge`` reaches every worker, the status page (``GET /``) merges their
status documents, and a trust report (``POST /identityplus/...``) goes to exactly one
worker. A worker whose report changed a certificate's profile tells the supervisor on its
own Unix socket (``/workers/forget``), which drops that verdict in every worker. A worker
that dies is logged and restarted.

A worker starts with SIGHUP blocked (``Child``) and unblocks it once its handler is in place,
so no SIGHUP can kill a worker while it starts. The supervisor relays SIGHUP only to workers
that have started; one still starting gets it as soon as it has (it may have read the file
before the change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from . import BUILD, __version__, log, status, tls_sessions, tls_tickets
from .admin import ADMIN_HEADER, explain_refusal, guard
from .admin_reports import peer_allowed
from .config import Config
from .revocation.admin import FLEET_HEADER, fingerprint_of, write_runtime

#: merged by the largest value: the same everywhere (a date, a list every worker holds)
_MAX_GAUGES = ("_timestamp_seconds", "_expiring_soon", "_deny_list_entries")
#: merged by the smallest value: the worker whose CRL goes stale first is the one to alert on
_MIN_GAUGES = ("_next_update_timestamp_seconds",)
_MONOTONIC = frozenset({"counter", "histogram", "summary"})
#: (family name, sample name, sorted labels)
_Key = tuple[str, str, tuple[tuple[str, str], ...]]
_STARTUP_TIMEOUT = 30.0


class _Undelivered(Exception):
    """A request to a worker that certainly did not reach it (no connection was made)."""


class _Lost(Exception):
    """A request to a worker whose answer did not come: it may have been acted on."""


class Child:
    """A worker process, started by ``subprocess.Popen`` while SIGHUP is blocked: the signal
    mask survives fork and exec, so the worker starts with SIGHUP held (uvloop's spawn would
    clear the mask). Its exit is watched through a pidfd on the event loop (a thread where
    there is none)."""

    def __init__(self, args: Sequence[str], pass_fds: Sequence[int] = ()) -> None:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self._popen = subprocess.Popen(args, pass_fds=pass_fds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.pid = self._popen.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux 5.3 or newer
            threading.Thread(target=self._wait_in_thread, args=(loop,), daemon=True).start()
        else:
            loop.add_reader(pidfd, self._on_exit, loop, pidfd)

    def _on_exit(self, loop: asyncio.AbstractEventLoop, pidfd: int) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        self._set_exited(self._popen.wait())  # reaps it; at once, it has exited

    def _wait_in_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        code = self._popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._set_exited, code)

    def _set_exited(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def returncode(self) -> int | None:
        """The exit code once the exit has been seen (negative: the signal that ended it)."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if not self._exited.done():
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class Worker:
    index: int
    socket: Path
    process: Child | None = None
    #: its SIGHUP handler is in place: it answered /readyz with anything but "starting"
    started: bool = False
    #: a SIGHUP came while it was starting: relayed once it has started
    reload_pending: bool = False
    #: counter and histogram samples of earlier incarnations of this worker slot
    retired: dict[_Key, float] = field(default_factory=dict)
    last: dict[_Key, float] = field(default_factory=dict)
    restarts: int = 0


def _sent_to(answers: list[tuple[int, str, dict[str, str]] | None]) -> str | None:
    """The fleet a relayed ``POST /deny`` reached: the one a worker's answer names
    (``FLEET_HEADER``) where it says ``"fleet": true``; None when no answer says so (the
    shared cache was unavailable, no worker answered, or there is no shared cache)."""
    for answer in answers:
        if answer is None or answer[0] != 200:
            continue
        named = (v for k, v in answer[2].items() if k.lower() == FLEET_HEADER.lower())
        fleet = next(named, None)
        with contextlib.suppress(ValueError, AttributeError):
            if fleet and _FLEET_ID.fullmatch(fleet) and json.loads(answer[1]).get("fleet") is True:
                return fleet
    return None


def _deciding(answers: list[tuple[int, str]]) -> tuple[int, str]:
    """The workers' answer to a relayed ``POST`` or ``DELETE /deny`` that the supervisor
    gives: one that made the change and told the fleet (200), else one that made it here
    only (207), else the first. Workers hear a fleet's entries one by one, so a ``DELETE``
    soon after another replica's ``POST`` can find the entry in one worker (200) and not
    yet in another (404): it was on the list and is off it now."""
    for wanted in (200, 207):
        found = next((a for a in answers if a[0] == wanted), None)
        if found is not None:
            return found
    return answers[0]


#: a fleet's name (``SharedCache.fleet_id``)
_FLEET_ID = re.compile(r"[0-9a-f]{16}")


class Supervisor:
    def __init__(self, config: Config, config_path: Path, *, log_format: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.log_format = log_format
        self.log = log.get_logger("sidecar.supervisor")
        self.runtime = Path(tempfile.mkdtemp(prefix="sidecar-"))
        count = config.listen.worker_count()
        self.workers = [Worker(i, self.runtime / f"worker-{i}.sock") for i in range(count)]
        #: where workers tell the supervisor which verdicts every worker must drop
        self.control = self.runtime / "supervisor.sock"
        self.stopping = False
        self.started = time.time()
        #: run-time deny entries (POST /deny), kept for workers started later
        self.denied: set[str] = set()
        #: those of them a worker has told a fleet of, and which (see revocation.admin)
        self.sent: dict[str, str] = {}
        #: the session ticket keys' secret, the same for every worker (restarted ones too)
        self._ticket_secret = tls_tickets.new_secret()
        #: the table the workers share their TLS sessions in (tls_sessions), made once: its
        #: size is tls.session_cache at start (the default if 0 then: a reload may turn it on)
        self._sessions: int | None = None
        try:
            slots = config.tls.session_cache or tls_tickets.SESSION_CACHE_SIZE
            self._sessions = tls_sessions.create(min(slots, tls_sessions.MAX_SLOTS))
        except (OSError, ValueError) as exc:
            self.log.warning(
                "tls_sessions_not_shared", reason=str(exc), hint="session tickets are used"
            )

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
            "--supervisor-socket",
            str(self.control),
        ]
        if self.log_format:
            args += ["--log-format", self.log_format]
        # The ticket secret goes through a pipe the worker inherits, reads once and closes:
        # not argv or the environment (both readable in /proc for the worker's whole life).
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, self._ticket_secret)  # 32 bytes: far below a pipe's buffer
        finally:
            os.close(write_end)
        args += [tls_tickets.PIPE_OPTION, str(read_end)]
        passed = [read_end]
        if self._sessions is not None:
            args += [tls_sessions.OPTION, str(self._sessions)]
            passed.append(self._sessions)
        # A new process reads the file anew: an earlier SIGHUP has nothing left to do.
        worker.started = worker.reload_pending = False
        try:
            worker.process = Child(args, pass_fds=tuple(passed))
        finally:
            os.close(read_end)
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
                await self._until_started(worker)

    async def _wait_ready(self) -> bool:
        deadline = asyncio.get_running_loop().time() + _STARTUP_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            if any(
                w.process is not None and w.process.returncode is not None for w in self.workers
            ):
                return False
            states = await asyncio.gather(*(self._ask(w, "GET", "/readyz") for w in self.workers))
            for worker, state in zip(self.workers, states, strict=True):
                self._note_readiness(worker, state)
            if all(s is not None and s[0] == 200 for s in states):
                return True
            await asyncio.sleep(0.1)
        return False

    async def _until_started(self, worker: Worker) -> None:
        """Ask a restarted worker's /readyz until it has started (or exited, or the start-up
        time is over: then the supervisor's own /readyz goes on asking)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT
        while not worker.started and not self.stopping and loop.time() < deadline:
            process = worker.process
            if process is None or process.returncode is not None:
                return
            self._note_readiness(worker, await self._ask(worker, "GET", "/readyz"))
            await asyncio.sleep(0.1)

    def _note_readiness(self, worker: Worker, answer: tuple[int, str] | None) -> None:
        """A worker's /readyz answered: once it says anything but "starting", its SIGHUP
        handler is in place (it is installed in the same step of the event loop that ends the
        start), and a SIGHUP held for it goes now."""
        if worker.started or answer is None:
            return
        status, body = answer
        if status != 200:
            try:
                reason = json.loads(body).get("reason")
            except (ValueError, AttributeError):
                return
            if reason == "starting":
                return
        worker.started = True
        if worker.reload_pending and worker.process is not None:
            worker.reload_pending = False
            worker.process.send_signal(signal.SIGHUP)
            self.log.info("reload_relayed", workers=[worker.index], late=True)

    def _relay_reload(self) -> None:
        """SIGHUP: every worker that has started reloads now, one still starting once it has."""
        now: list[int] = []
        later: list[int] = []
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None:
                continue  # being restarted: the new process reads the file anew
            if worker.started:
                process.send_signal(signal.SIGHUP)
                now.append(worker.index)
            else:
                worker.reload_pending = True
                later.append(worker.index)
        self.log.info("reload_relayed", workers=now, when_started=later)

    async def _ask_with_headers(
        self, worker: Worker, method: str, path: str
    ) -> tuple[int, str, dict[str, str]] | None:
        try:
            return await self._request(worker, method, path)
        except (_Undelivered, _Lost):
            return None

    async def _ask(self, worker: Worker, method: str, path: str) -> tuple[int, str] | None:
        answer = await self._ask_with_headers(worker, method, path)
        return (answer[0], answer[1]) if answer is not None else None

    async def _request(
        self,
        worker: Worker,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> tuple[int, str, dict[str, str]]:
        """One request to a worker's admin socket: status, body, headers. Raises
        ``_Undelivered`` when no connection could be made, ``_Lost`` when the answer did
        not come."""
        if not worker.socket.exists():
            raise _Undelivered(f"worker {worker.index} has no socket")
        # as any client of the admin listener: a name it is known by, and the header
        sent = {ADMIN_HEADER: "1", **(headers or {})}
        try:
            connector = aiohttp.UnixConnector(path=str(worker.socket))
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as s,
                s.request(method, f"http://localhost{path}", data=body, headers=sent) as resp,
            ):
                return resp.status, await resp.text(), dict(resp.headers)
        except aiohttp.ClientConnectorError as exc:
            raise _Undelivered(str(exc)) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Lost(repr(exc)) from None

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
                self._note_readiness(worker, answer)
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
            told: list[bool] = []  # with a shared cache: did each worker tell the fleet?
            for answer in answers:
                if answer is None:
                    continue
                if answer[0] not in (200, 207):
                    return web.Response(
                        status=answer[0], text=answer[1], content_type="application/json"
                    )
                doc = json.loads(answer[1])
                purged += int(doc.get("purged", 0))
                if "fleet" in doc:
                    told.append(bool(doc["fleet"]))
            reached = sum(1 for a in answers if a is not None)
            body: dict[str, object] = {"purged": purged, "workers": reached}
            if told:
                body["fleet"] = any(told)  # one worker's message reaches every replica
            complete = reached == len(self.workers) and (not told or any(told))
            return web.json_response(body, status=200 if complete else 207)

        async def explain(request: web.Request) -> web.Response:
            refused = explain_refusal(request, self.config.admin.explain_from)
            if refused is not None:
                return refused
            path = "/explain" + (f"?{request.query_string}" if request.query_string else "")
            answers = [
                a
                for a in await asyncio.gather(*(self._ask(w, "GET", path) for w in self.workers))
                if a is not None
            ]
            if not answers:
                return web.json_response({"error": "no worker answered"}, status=503)
            # The worker that saw the certificate knows it (each remembers its own clients).
            status, text = next((a for a in answers if a[0] == 200), answers[0])
            return web.Response(status=status, text=text, content_type="application/json")

        async def deny(request: web.Request) -> web.Response:
            """The deny-list: every worker's. Entries are written down for workers started
            later before they are relayed (see revocation.admin)."""
            if request.method == "GET":
                answers = await asyncio.gather(
                    *(self._ask(w, "GET", "/deny") for w in self.workers)
                )
                first = next((a for a in answers if a is not None and a[0] == 200), None)
                if first is None:
                    return web.json_response({"error": "no worker answered"}, status=503)
                return web.Response(text=first[1], content_type="application/json")
            try:
                sha256 = fingerprint_of(request.query)
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            if request.method == "POST":
                self.denied.add(sha256)
                self.sent.pop(sha256, None)  # until a worker says a fleet has it
                write_runtime(self.runtime, self.denied, self.sent)
            path = f"/deny?sha256={sha256}"
            full = await asyncio.gather(
                *(self._ask_with_headers(w, request.method, path) for w in self.workers)
            )
            answers = [(a[0], a[1]) if a is not None else None for a in full]
            if request.method == "POST":
                fleet = _sent_to(full)
                if fleet is not None:
                    self.sent[sha256] = fleet
                    write_runtime(self.runtime, self.denied, self.sent)
            elif sha256 in self.denied:
                # taken off, whatever the workers answered (207: here only for now; 404: one
                # had it no longer): a worker started later must not find it
                self.denied.discard(sha256)
                self.sent.pop(sha256, None)
                write_runtime(self.runtime, self.denied, self.sent)
            reached = [a for a in answers if a is not None]
            if not reached:
                return web.json_response({"error": "no worker answered"}, status=503)
            status, text = _deciding(reached)
            doc = json.loads(text)
            doc["workers"] = len(reached)
            if status == 200 and len(reached) != len(self.workers):
                status = 207
            return web.json_response(doc, status=status)

        app = web.Application(middlewares=[guard(self.config.admin)])
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/cache/purge", purge)
        app.router.add_route("GET", "/deny", deny)
        app.router.add_route("POST", "/deny", deny)
        app.router.add_route("DELETE", "/deny", deny)
        app.router.add_get("/explain", explain)
        app.router.add_get("/", self._status)
        app.router.add_post("/identityplus/{kind}", self._report)
        return app

    async def _status(self, request: web.Request) -> web.Response:
        """Every worker's status document, merged, with the supervisor's own facts."""

        async def ask(worker: Worker) -> status.Document | None:
            try:
                code, text, _ = await self._request(
                    worker, "GET", "/", headers={"Accept": "application/json"}
                )
                doc: status.Document = json.loads(text)
            except (_Undelivered, _Lost, ValueError):
                return None
            return doc if code == 200 and isinstance(doc, dict) else None

        docs = await asyncio.gather(*(ask(w) for w in self.workers))
        now = time.time()
        supervisor = {
            "version": __version__,
            "build": BUILD.describe(),
            "pid": os.getpid(),
            "started": self.started,
            "uptime_seconds": round(now - self.started, 1),
            "workers": len(self.workers),
            "worker_list": [
                {
                    "index": w.index,
                    "pid": w.process.pid if w.process is not None else None,
                    "alive": w.process is not None and w.process.returncode is None,
                    "ready": w.started,
                    "restarts": w.restarts,
                    "answered": doc is not None,
                }
                for w, doc in zip(self.workers, docs, strict=True)
            ],
        }
        return status.respond(status.merge(docs, supervisor), request.headers.get("Accept"))

    async def _report(self, request: web.Request) -> web.Response:
        """A trust report, to exactly one worker: the first that takes it. Another worker is
        tried only when the report certainly did not start there (no connection, or the
        certificate named by fingerprint is one it has not seen)."""
        if not peer_allowed(request.remote, self.config.admin.reports_from):
            self.log.warning(
                "admin_request_refused",
                method=request.method,
                path=request.path[:200],
                client=request.remote,
                status=403,
                reason="trust reports from a peer that is not local",
            )
            return web.json_response(
                {
                    "error": "trust reports are accepted from loopback addresses only, and "
                    "from the networks listed in admin.reports_from"
                },
                status=403,
            )
        if request.content_type != "application/json":
            return web.json_response(
                {"error": "send the report as Content-Type: application/json"}, status=415
            )
        body = await request.read()
        identityplus = self.config.identity.identityplus
        wait = identityplus.reports.admin_wait if identityplus is not None else 10.0
        last: tuple[int, str, dict[str, str]] | None = None
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None or not worker.started:
                continue
            try:
                answer = await self._request(
                    worker,
                    "POST",
                    f"/identityplus/{request.match_info['kind']}",
                    body=body,
                    headers={"Content-Type": "application/json"},
                    timeout=wait + 10.0,
                )
            except _Undelivered:
                continue
            except _Lost as exc:
                return web.json_response(
                    {
                        "error": f"worker {worker.index} did not answer ({exc}); the report "
                        "may have been queued there: see GET /"
                    },
                    status=502,
                )
            last = answer
            if answer[0] == 404 and _unknown_certificate(answer[1]):
                continue
            break
        if last is None:
            return web.json_response({"error": "no worker is ready to take it"}, status=503)
        code, text, headers = last
        kept = {k: v for k, v in headers.items() if k.lower() == "retry-after"}
        return web.Response(status=code, text=text, content_type="application/json", headers=kept)

    def control_app(self) -> web.Application:
        """The supervisor's own socket, for its workers only (``self.control``)."""

        async def forget(request: web.Request) -> web.Response:
            doc = await request.json()
            sha256, serial = doc.get("sha256"), doc.get("serial")
            query = f"sha256={sha256}" if sha256 else f"serial={serial}"
            answers = await asyncio.gather(
                *(self._ask(w, "POST", f"/cache/purge?{query}") for w in self.workers)
            )
            # 207: dropped in that worker, but the shared cache could not be told
            reached = sum(1 for a in answers if a is not None and a[0] in (200, 207))
            return web.json_response({"workers": reached})

        async def sent(request: web.Request) -> web.Response:
            """A worker sent a deny entry made while the shared cache was unavailable to its
            fleet (``{"sha256": ..., "fleet": SharedCache.fleet_id}``)."""
            try:
                doc = await request.json()
                sha256 = fingerprint_of({"sha256": str(doc["sha256"])})
                fleet = doc["fleet"]
                if not isinstance(fleet, str) or not _FLEET_ID.fullmatch(fleet):
                    raise ValueError(f"not a fleet: {fleet!r}")
            except (ValueError, KeyError, TypeError) as exc:
                return web.json_response({"error": f"not a sent entry: {exc}"}, status=400)
            if sha256 in self.denied and self.sent.get(sha256) != fleet:
                self.sent[sha256] = fleet
                write_runtime(self.runtime, self.denied, self.sent)
            return web.json_response({"sent": len(self.sent)})

        app = web.Application()
        app.router.add_post("/workers/forget", forget)
        app.router.add_post("/workers/deny-sent", sent)
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
                if key[0].endswith(_MIN_GAUGES):
                    totals[key] = min(totals.get(key, value), value)
                elif key[0].endswith(_MAX_GAUGES):
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
        if self._sessions is not None:
            problem = tls_sessions.not_dumpable()  # its descriptor: not for /proc/<pid>/fd
            if problem is not None:
                self.log.warning("tls_sessions_exposed", reason=problem)

        def on_stop() -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._relay_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held since __main__.run
        control = web.AppRunner(self.control_app(), access_log=None, handle_signals=False)
        try:
            await control.setup()
            await web.UnixSite(control, str(self.control)).start()
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
            # As in __main__._serve: draining workers reload nothing, and after the loop has
            # removed its handler a SIGHUP would end the supervisor with the wrong exit code.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
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
            await control.cleanup()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            shutil.rmtree(self.runtime, ignore_errors=True)
            if self._sessions is not None:
                os.close(self._sessions)
                self._sessions = None

    async def _reap(self, limit: float | None) -> None:
        procs = [w.process for w in self.workers if w.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), limit)
        except TimeoutError:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


def _unknown_certificate(text: str) -> bool:
    """A worker's 404 saying it has not seen the certificate named by fingerprint."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("unknown_certificate") is True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
