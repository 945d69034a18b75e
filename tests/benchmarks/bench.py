"""The sidecar against nginx and Envoy as reference mTLS proxies, scenario by scenario.

Run it with ``tests/benchmarks/run.sh`` (which installs nginx, wrk, Envoy and a C compiler
when missing and builds the client-certificate shim); this module is the part after that::

    python -m tests.benchmarks.bench --shim build/benchmarks/client_cert_shim.so [options]

The arms are nginx (``worker_processes N``), Envoy (``--concurrency N``) and the sidecar
(``listen.workers N``) for each N of ``--workers`` (e.g. ``1,2``). Each scenario runs on every
arm, interleaved by repetition (nginx, Envoy, sidecar at N=1, the same at N=2, then again),
``--reps`` times; per scenario and arm it reports the median req/s, p50 and p99 latency (wrk's
histogram), the proxy's CPU per request, its peak RSS, and the ratios to nginx at the same N.
The same goes to a JSON file. See README.md in this folder for what each scenario means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import loadgen, stack
from .stack import BenchPKI, Placement, Proc

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str = "/"
    connections: int = 32
    method: str = "GET"
    body_size: int = 0
    close: bool = False
    resume: bool = True
    #: run against the variants that log every request (nginx access_log, sidecar at info)
    logging: bool = False
    #: targets (ratios sidecar/nginx): throughput at least, p99 at most
    min_rps_ratio: float | None = None
    max_p99_ratio: float | None = None
    #: S3: report RSS growth per in-flight request, and probe it with 4 MiB bodies at this path
    streaming: bool = False
    probe_path: str | None = None
    #: the revocation rows: a third target, the sidecar with ``ocsp`` (tls.ocsp: soft, its
    #: answer cached) or ``crl`` (a 10,000-entry CRL), compared with the same sidecar without
    revocation: str | None = None
    #: route policy (issue #16): two sidecars, with this many routes each with matchers
    #: (few, many), the first in place of "sidecar"; checked: req/s few / many <= max_cost_ratio
    routes: tuple[int, int] | None = None
    max_cost_ratio: float | None = None
    #: issue #15: a third target, a sidecar behind a front proxy (plain HTTP, the certificate
    #: in ssl-client-cert, verified again); checked: its proxy CPU per request <=
    #: max_cost_ratio x the TLS sidecar's
    front_proxy: bool = False


SCENARIOS = [
    Scenario(
        "S1-c32",
        "keep-alive GET, cached verdict, 32 connections",
        connections=32,
        min_rps_ratio=0.5,
        max_p99_ratio=2.0,
    ),
    Scenario(
        "S1-c128",
        "keep-alive GET, cached verdict, 128 connections",
        connections=128,
        min_rps_ratio=0.5,
        max_p99_ratio=2.0,
    ),
    Scenario(
        "S1-c32-log",
        "S1-c32 with per-request logging (sidecar log.level info, nginx access_log)",
        connections=32,
        logging=True,
    ),
    Scenario(
        "S1-routes",
        "S1-c32 with 50 routes each with matchers (last column) against 3 such routes (sidecar)",
        connections=32,
        routes=(3, 50),
        max_cost_ratio=1.1,
    ),
    Scenario(
        "S1-front",
        "S1-c32 behind a front proxy: plain HTTP, the certificate in ssl-client-cert (last column)",
        connections=32,
        front_proxy=True,
        max_cost_ratio=1.2,
    ),
    Scenario(
        "S2-new",
        "new connection + full TLS handshake with client cert per request",
        connections=32,
        close=True,
        resume=False,
        min_rps_ratio=0.45,
    ),
    Scenario(
        "S2-resume",
        "new connection per request, TLS session resumed",
        connections=32,
        close=True,
        resume=True,
        min_rps_ratio=0.6,
    ),
    Scenario(
        "S1-c32-ocsp",
        "S1-c32, and the sidecar with tls.ocsp: soft (the answer cached) against itself without",
        connections=32,
        revocation="ocsp",
    ),
    Scenario(
        "S1-c32-crl",
        "S1-c32, and the sidecar with a 10,000-entry CRL (tls.crl) against itself without",
        connections=32,
        revocation="crl",
    ),
    Scenario(
        "S2-new-ocsp",
        "S2-new, and the sidecar with tls.ocsp: soft (the answer cached) against itself without",
        connections=32,
        close=True,
        resume=False,
        revocation="ocsp",
    ),
    Scenario(
        "S2-new-crl",
        "S2-new, and the sidecar with a 10,000-entry CRL (tls.crl) against itself without",
        connections=32,
        close=True,
        resume=False,
        revocation="crl",
    ),
    Scenario(
        "S3-upload",
        "1 MiB POST upload, streamed",
        path="/upload",
        method="POST",
        body_size=MiB,
        connections=16,
        min_rps_ratio=0.8,
        streaming=True,
        probe_path="/upload",
    ),
    Scenario(
        "S3-download",
        "1 MiB GET download, streamed",
        path="/download",
        connections=16,
        min_rps_ratio=0.8,
        streaming=True,
        probe_path="/download4",
    ),
]
#: S3's body-size probe calls it whole-body buffering when 4 MiB bodies instead of 1 MiB make
#: the RSS grow by this much more per in-flight request (a streaming proxy's stays flat)
BUFFERING_KIB = 1024
#: a measurement during which other processes used more CPU than this (cores) is made again
OTHER_LOAD_LIMIT = 0.3


@dataclass
class Target:
    """One proxy under test: how to reach it and which process tree is it."""

    name: str  # nginx | sidecar | nginx-2w | envoy-1w | ...
    port: int
    proc: Proc
    #: for the equal-workers table: which proxy ("nginx", "envoy", "sidecar", "sidecar-b")
    #: with how many workers; "" for the targets of the sidecar-only comparisons
    arm: str = ""
    workers: int = 0

    #: plain HTTP with the certificate in a header, as from a front proxy (S1-front)
    front: bool = False

    def meta(self) -> dict[str, Any]:
        return {
            "port": self.port,
            **({"arm": self.arm, "workers": self.workers} if self.arm else {}),
        }


@dataclass
class Bench:
    args: argparse.Namespace
    folder: Path
    pki: BenchPKI
    placement: Placement
    shim: Path
    #: the sidecar package to run (a commit's, extracted), or None for the installed one
    src: Path | None = None
    procs: list[Proc] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: each sidecar process started: its build ("compiled" or "interpreted")
    builds: dict[str, str] = field(default_factory=dict)
    #: nginx as the reference proxy, by worker count
    references: dict[int, Proc] = field(default_factory=dict)
    #: every arm at every worker count, in the order a repetition runs them
    arms: list[Target] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, flush=True)

    @property
    def primary(self) -> int:
        """The worker count of the sidecar-only comparisons (logging, routes, S4, profile,
        --versus): the first of ``--workers``."""
        workers: list[int] = self.args.workers
        return workers[0]

    def port(self, key: str) -> int:
        """The port named ``key``, chosen on first use."""
        if key not in self.ports:
            self.ports[key] = stack.free_port()
        return self.ports[key]

    def _suffix(self, workers: int) -> str:
        return "" if workers == self.primary else f"_w{workers}"

    # ---- processes ----------------------------------------------------------------------

    def start_fixed(self) -> None:
        p = self.ports
        for name in (
            "upstream",
            "reference",
            "reference_log",
            "sidecar",
            "sidecar_log",
            "admin",
            "admin_log",
            "verdicts",
            "sidecar_s4",
            "admin_s4",
            "sidecar_probe",
            "admin_probe",
            "sidecar_b",
            "admin_b",
            "sidecar_rev",
            "admin_rev",
            "redis",
            "sidecar_fleet_a",
            "admin_fleet_a",
            "sidecar_fleet_b",
            "admin_fleet_b",
            "sidecar_shared",
            "admin_shared",
            "sidecar_few_routes",
            "admin_few_routes",
            "sidecar_many_routes",
            "admin_many_routes",
            "sidecar_front",
            "admin_front",
        ):
            p[name] = stack.free_port()
        up = stack.start_nginx(
            "upstream-nginx",
            stack.upstream_conf(self.folder, p["upstream"]),
            self.folder,
            self.placement.rest,
        )
        self.procs.append(up)
        stack.wait_port(up, p["upstream"])
        self.upstream = up
        for workers in self.args.workers:
            suffix = self._suffix(workers)
            name = "reference" + suffix.replace("_", "-")
            ref_conf = stack.reference_conf(
                self.folder,
                self.pki,
                port=self.port("reference" + suffix),
                log_port=self.port("reference_log" + suffix),
                upstream_port=p["upstream"],
                workers=workers,
                name=name,
            )
            ref = stack.start_nginx(f"{name}-nginx", ref_conf, self.folder, self.placement.proxy)
            self.procs.append(ref)
            stack.wait_port(ref, p["reference" + suffix])
            self.references[workers] = ref
        self.reference = self.references[self.primary]

    def start_arms(self) -> Target:
        """nginx (started by ``start_fixed``), Envoy and the sidecar at each worker count, as
        ``self.arms``; returns the sidecar at the primary count (started as "sidecar")."""
        primary: Target | None = None
        for workers in self.args.workers:
            suffix = self._suffix(workers)
            self.arms.append(
                Target(
                    f"nginx-{workers}w",
                    self.ports["reference" + suffix],
                    self.references[workers],
                    "nginx",
                    workers,
                )
            )
            if not self.args.no_envoy:
                name = "envoy" + suffix.replace("_", "-")
                port = self.port("envoy" + suffix)
                conf = stack.envoy_conf(
                    self.folder,
                    self.pki,
                    port=port,
                    upstream_port=self.ports["upstream"],
                    name=name,
                )
                envoy = stack.start_envoy(name, conf, self.folder, self.placement.proxy, workers)
                self.procs.append(envoy)
                stack.wait_port(envoy, port)
                self.arms.append(Target(f"envoy-{workers}w", port, envoy, "envoy", workers))
            name = "sidecar" + suffix.replace("_", "-")
            self.port("sidecar" + suffix)
            self.port("admin" + suffix)
            proc = self.start_sidecar(name, "sidecar" + suffix, "admin" + suffix, workers=workers)
            target = Target(
                f"sidecar-{workers}w", self.ports["sidecar" + suffix], proc, "sidecar", workers
            )
            self.arms.append(target)
            if workers == self.primary:
                primary = target
        assert primary is not None
        return primary

    def start_sidecar(
        self,
        name: str,
        port_key: str,
        admin_key: str,
        *,
        log_level: str = "warning",
        http_backend: str | None = None,
        src: Path | None = None,
        env: dict[str, str] | None = None,
        tls_extra: dict[str, Any] | None = None,
        shared_url: str | None = None,
        workers: int | None = None,
        routes: list[dict[str, Any]] | None = None,
        front_proxy: bool = False,
    ) -> Proc:
        conf = stack.sidecar_conf(
            self.folder,
            self.pki,
            name=name,
            port=self.ports[port_key],
            admin_port=self.ports[admin_key],
            upstream_port=self.ports["upstream"],
            workers=self.primary if workers is None else workers,
            log_level=log_level,
            http_backend=http_backend,
            tls_extra=tls_extra,
            shared_url=shared_url,
            routes=routes,
            front_proxy=front_proxy,
        )
        proc = stack.start_sidecar(
            name, conf, self.folder, self.placement.proxy, src=src or self.src, env=env
        )
        self.procs.append(proc)
        stack.wait_port(proc, self.ports[port_key])
        self.builds[name] = stack.build_of(self.ports[admin_key])
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    # ---- checks -------------------------------------------------------------------------

    def checks(self, targets: list[Target]) -> dict[str, Any]:
        """Every arm does the same thing before they are compared: with the load's certificate
        the upstream receives the same identity and forwarding headers (the client's copies
        replaced), without a certificate the request is refused, a trusted certificate bound
        to nobody gets 403; wrk without the shim gets only refusals from nginx."""
        pki = self.pki
        with_cert = stack.client_context(pki, pki.client_cert, pki.client_key)
        without = stack.client_context(pki, None)
        from tests.pki import make_leaf

        stranger = self.folder / "stranger.pem"
        leaf = make_leaf(pki.issuer, "stranger")  # trusted CA, bound to nobody
        stranger.write_bytes(leaf.pem + leaf.key_pem)
        unknown = stack.client_context(pki, stranger)
        out: dict[str, Any] = {}
        expected = {
            "cert": stack.der_b64(pki.client_der),
            "userinfo": stack.BENCH_USER.header_value,
        }
        forged = {
            "X-USERINFO": "forged",
            "X-APP-CERTIFICATE": "forged",
            "X-Forwarded-For": "192.0.2.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "forged.example",
            "X-Real-IP": "192.0.2.1",
            "X-Request-ID": "forged",
        }
        problems = []
        for t in targets:
            status, body, headers = stack.https_get(t.port, "/__headers", with_cert, forged)
            seen = stack.decode_json(body) if status == 200 else {}
            response_id = next((v for k, v in headers.items() if k.lower() == "x-request-id"), "")
            forwarding = {
                "xff": "127.0.0.1",
                "proto": "https",
                "host": f"127.0.0.1:{t.port}",
                "real_ip": "127.0.0.1",
            }
            c = out[t.name] = {
                "with_certificate": status,
                "tls": stack.tls_parameters(t.port, with_cert),
                "identity_headers_match": status == 200
                and all(seen.get(k) == v for k, v in expected.items()),
                "forwarded_headers": {k: seen.get(k) for k in forwarding},
                "forwarded_headers_match": all(seen.get(k) == v for k, v in forwarding.items()),
                "request_id": seen.get("request_id"),
                # the upstream's id is the one on the response, and not the client's
                "request_id_on_response": bool(response_id)
                and response_id == seen.get("request_id")
                and response_id != "forged",
                "without_certificate": stack.https_get(t.port, "/", without)[0],
                "unbound_certificate": stack.https_get(t.port, "/", unknown)[0],
            }
            if c["with_certificate"] != 200 or not c["identity_headers_match"]:
                problems.append(f"{t.name}: request with the client certificate: {c}")
            if not c["forwarded_headers_match"] or not c["request_id_on_response"]:
                problems.append(f"{t.name}: forwarding headers or request id differ: {c}")
            if c["without_certificate"] not in (400, 401, 0):
                problems.append(
                    f"{t.name}: a request without a certificate got {c['without_certificate']}"
                )
            if c["unbound_certificate"] not in (403, 0):
                problems.append(f"{t.name}: an unbound certificate got {c['unbound_certificate']}")
        # wrk as it is (no shim) against nginx: every answer must be a refusal.
        nginx = next(t for t in targets if t.arm == "nginx")
        script = loadgen.lua_script(self.folder, "check")
        bare = loadgen.run_wrk(
            f"https://127.0.0.1:{nginx.port}/",
            connections=4,
            threads=1,
            seconds=1,
            script=script,
            shim=None,
            cert=None,
            key=None,
            cpus=self.placement.rest,
            folder=self.folder,
        )
        out[nginx.name]["wrk_without_shim"] = {
            "requests": bare.requests,
            "non_2xx": bare.errors["status"],
        }
        if bare.requests == 0 or bare.errors["status"] != bare.requests:
            problems.append(f"nginx answered wrk without a client certificate: {bare.as_dict()}")
        out["problems"] = problems
        return out

    # ---- memory per idle connection ------------------------------------------------------

    def idle_probe(self, targets: list[Target]) -> dict[str, Any]:
        """RSS per idle keep-alive connection of each proxy: ``--idle-connections`` TLS
        connections, each after one request, held open while the proxy's processes' RSS is
        read. Run first, on processes that have served only the checks (a process keeps the
        memory it once used, so later the growth would undercount)."""
        count = self.args.idle_connections
        self.say(f"\n== idle connections: RSS per open keep-alive connection ({count} connections)")
        ctx = stack.client_context(self.pki, self.pki.client_cert, self.pki.client_key)
        out: dict[str, Any] = {"connections": count, "arms": []}
        for t in targets:
            pids = stack.tree(t.proc.pid)
            before = stack.rss_kib(pids)
            opened, during = loadgen.hold_idle(t.port, count, ctx, partial(stack.rss_kib, pids))
            per = round((during - before) / opened, 1) if opened else None
            out["arms"].append(
                {
                    "target": t.name,
                    "arm": t.arm,
                    "workers": t.workers,
                    "opened": opened,
                    "rss_before_kib": before,
                    "rss_with_connections_kib": during,
                    "kib_per_connection": per,
                }
            )
            self.say(
                f"   {t.name:<11} {opened} open: RSS {before} -> {during} KiB, "
                f"{per if per is not None else '-'} KiB per connection"
            )
        return out

    # ---- one measurement ----------------------------------------------------------------

    def run_once(self, target: Target, scenario: Scenario, seconds: float) -> dict[str, Any]:
        pids = stack.tree(target.proc.pid)
        up_pids = stack.tree(self.upstream.pid)
        stack.reset_hwm(pids)
        rss_before = stack.rss_kib(pids)
        kernel = stack.ksoftirqd_pids()  # network softirq work for our traffic, when deferred
        cpu0, up0 = stack.cpu_seconds(pids), stack.cpu_seconds(up_pids)
        k0 = stack.cpu_seconds(kernel)
        busy0, steal0 = loadgen.busy_seconds()
        t0 = time.monotonic()
        res = loadgen.run_wrk(
            f"{'http' if target.front else 'https'}://127.0.0.1:{target.port}{scenario.path}",
            connections=scenario.connections,
            threads=self.args.wrk_threads or self.placement.client_threads,
            seconds=seconds,
            script=self.script(scenario, front=target.front),
            shim=None if target.front else self.shim,
            cert=self.pki.client_cert,
            key=self.pki.client_key,
            resume=scenario.resume,
            cpus=self.placement.rest,
            folder=self.folder,
        )
        wall = time.monotonic() - t0
        busy1, steal1 = loadgen.busy_seconds()
        proxy_cpu = stack.cpu_seconds(pids) - cpu0
        up_cpu = stack.cpu_seconds(up_pids) - up0
        ours = proxy_cpu + up_cpu + res.cpu_seconds + (stack.cpu_seconds(kernel) - k0)
        return {
            **res.as_dict(),
            "wall_seconds": round(wall, 3),
            "rss_before_kib": rss_before,
            "peak_rss_kib": stack.hwm_kib(pids),
            "proxy_cores": round(proxy_cpu / wall, 3),
            "upstream_cores": round(up_cpu / wall, 3),
            "wrk_cores": round(res.cpu_seconds / wall, 3),
            "other_load_cores": round(max(0.0, (busy1 - busy0) - ours) / wall, 3),
            "steal_cores": round((steal1 - steal0) / wall, 3),
            "requests_per_proxy_cpu_second": round(res.requests / proxy_cpu, 1)
            if proxy_cpu > 0
            else None,
            "proxy_cpu_us_per_request": round(proxy_cpu / res.requests * 1e6, 1)
            if res.requests
            else None,
        }

    def script(self, scenario: Scenario, *, front: bool = False) -> Path:
        return loadgen.lua_script(
            self.folder,
            f"{scenario.key}-front" if front else scenario.key,
            method=scenario.method,
            body_size=scenario.body_size,
            close=scenario.close,
            headers=stack.front_header(self.pki) if front else None,
            think_ms=scenario.connections * 1000 / self.args.rate if self.args.rate else None,
        )

    # ---- a scenario on both proxies ------------------------------------------------------

    def scenario(self, scenario: Scenario, targets: list[Target]) -> dict[str, Any]:
        self.say(f"\n== {scenario.key}: {scenario.title}")
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        idle: dict[str, int] = {}
        peak: dict[str, int] = {}
        for t in targets:
            idle[t.name] = stack.rss_kib(stack.tree(t.proc.pid))
            loadgen.wait_quiet(self.args.quiet_wait)
            warm = self.run_once(t, scenario, self.args.warmup)
            peak[t.name] = warm["peak_rss_kib"]
            self.say(f"   warm-up {t.name:<8} {warm['rps']:>9.0f} req/s")
        discarded: dict[str, int] = {t.name: 0 for t in targets}
        for rep in range(1, self.args.reps + 1):
            for t in targets:
                for attempt in range(self.args.retries + 1):
                    load = loadgen.wait_quiet(self.args.quiet_wait)
                    r = self.run_once(t, scenario, self.args.duration)
                    r["other_load_before_cores"] = round(load, 3)
                    # the hypervisor's other guests count as other load: on a VM whose CPUs
                    # were stolen for part of a run, every arm measured then is slower alike
                    other = r["other_load_cores"] + r["steal_cores"]
                    if other <= OTHER_LOAD_LIMIT or attempt == self.args.retries:
                        break
                    discarded[t.name] += 1
                    self.say(
                        f"   rep {rep} {t.name:<8} discarded: other processes used {r['other_load_cores']:.2f} "
                        f"cores meanwhile, the hypervisor took {r['steal_cores']:.2f}"
                    )
                runs[t.name].append(r)
                peak[t.name] = max(peak[t.name], r["peak_rss_kib"])
                errors = sum(r["errors"].values())
                flag = f"  ({errors} errors: {r['errors']})" if errors else ""
                hs = (
                    f"  handshakes full={r['handshakes_full']} resumed={r['handshakes_resumed']}"
                    if scenario.close
                    else ""
                )
                self.say(
                    f"   rep {rep} {t.name:<8} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>8.2f} ms"
                    f"  proxy {r['proxy_cores']:.2f} cores  other load {r['other_load_cores']:.2f}{hs}{flag}"
                )
        summary = {
            name: summarize(rs, idle[name], peak[name], scenario) for name, rs in runs.items()
        }
        for name in summary:
            summary[name]["discarded_runs"] = discarded[name]
        result: dict[str, Any] = {
            "scenario": scenario.__dict__,
            "targets": {t.name: t.meta() for t in targets},
            "runs": runs,
            "summary": summary,
        }
        if scenario.key in self.probes:
            result["body_size_probe"] = self.probes[scenario.key]
        return compared(result)

    # ---- the revocation rows ----------------------------------------------------------------

    def start_revocation(self, kind: str) -> Proc:
        """The sidecar again, with revocation on: ``ocsp`` (soft, asking a local ``openssl
        ocsp`` responder, whose answer it keeps for the whole run) or ``crl`` (a 10,000-entry
        CRL of the client intermediate). The first request (the check below) warms it."""
        if kind == "ocsp":
            responder, port = stack.start_ocsp_responder(self.folder, self.pki, self.placement.rest)
            self.procs.append(responder)
            extra: dict[str, Any] = {
                "ocsp": "soft",
                "ocsp_responder": f"http://127.0.0.1:{port}",
                "ocsp_max_age": "1h",
            }
        else:
            extra = {"crl": [str(stack.write_crl(self.folder, self.pki))]}
        return self.start_sidecar(f"sidecar-{kind}", "sidecar_rev", "admin_rev", tls_extra=extra)

    def revocation_check(self, kind: str) -> dict[str, Any]:
        """The revocation sidecar answers like the other, and really checked: its metrics say
        so (for OCSP, one question asked and its answer held: the cache is warm)."""
        pki = self.pki
        with_cert = stack.client_context(pki, pki.client_cert, pki.client_key)
        status = stack.https_get(self.ports["sidecar_rev"], "/", with_cert)[0]
        if kind == "ocsp":  # the answer is asked at the handshake: wait until it is held
            for _ in range(50):
                if stack.metric(self.ports["admin_rev"], "sidecar_ocsp_cache_entries") >= 1:
                    break
                time.sleep(0.1)
            status = stack.https_get(self.ports["sidecar_rev"], "/", with_cert)[0]
        admin = self.ports["admin_rev"]
        out: dict[str, Any] = {
            "status": status,
            "checks_good": stack.metric(admin, "sidecar_revocation_checks_total", outcome="good"),
            "ocsp_answers_held": stack.metric(admin, "sidecar_ocsp_cache_entries"),
            "ocsp_questions": stack.metric(admin, "sidecar_ocsp_requests_total"),
        }
        problems = []
        if status != 200 or out["checks_good"] < 1:
            problems.append(f"the {kind} sidecar did not check and allow: {out}")
        if kind == "ocsp" and (out["ocsp_answers_held"] != 1 or out["ocsp_questions"] != 1):
            problems.append(f"the OCSP answer is not cached: {out}")
        out["problems"] = problems
        return out

    # ---- S3: does the sidecar's memory grow with the body size? ------------------------

    def route_scenario(self, scenario: Scenario, reference: Target) -> dict[str, Any]:
        """S1-routes: the same load on two sidecars whose configurations differ only in how
        many routes (each with certificate matchers, an address rule, methods) they have."""
        assert scenario.routes is not None
        targets = [reference]
        started = []
        try:
            for count, kind in zip(scenario.routes, ("few", "many"), strict=True):
                name = f"sidecar-{count}-routes"
                proc = self.start_sidecar(
                    name,
                    f"sidecar_{kind}_routes",
                    f"admin_{kind}_routes",
                    routes=stack.matcher_routes(count, self.pki.client_der, self.pki.issuer.cert),
                )
                started.append(proc)
                port = self.ports[f"sidecar_{kind}_routes"]
                context = stack.client_context(self.pki, self.pki.client_cert, self.pki.client_key)
                status = stack.https_get(port, "/", context)[0]
                if status != 200:  # measuring refusals would say nothing
                    raise RuntimeError(f"{name}: GET / with the load's certificate got {status}")
                targets.append(Target(name, port, proc))
            return self.scenario(scenario, targets)
        finally:
            for proc in started:
                self.stop(proc)

    def front_scenario(
        self, scenario: Scenario, reference: Target, sidecar: Target
    ) -> dict[str, Any]:
        """S1-front: the load's certificate through a front proxy's header (a sidecar with
        listen.tls: false and front_proxy), against the same certificate over TLS."""
        proc = self.start_sidecar("sidecar-front", "sidecar_front", "admin_front", front_proxy=True)
        try:
            port = self.ports["sidecar_front"]
            status = stack.http_get(port, "/", stack.front_header(self.pki))[0]
            if status != 200:  # measuring refusals would say nothing
                raise RuntimeError(f"sidecar-front: GET / with the load's header got {status}")
            if stack.http_get(port, "/")[0] != 401:
                raise RuntimeError("sidecar-front: GET / without the header did not get 401")
            front = Target("sidecar-front", port, proc, front=True)
            return self.scenario(scenario, [reference, sidecar, front])
        finally:
            self.stop(proc)

    def body_probe(self, scenario: Scenario) -> dict[str, Any]:
        """RSS growth per in-flight request of a fresh sidecar, with 1 MiB and 4 MiB bodies.

        A proxy that buffers whole bodies grows by about the body size per in-flight request;
        one that streams grows by its (bounded) buffers, whatever the body size.
        """
        assert scenario.probe_path is not None
        self.say(f"   body-size probe ({scenario.key}, fresh sidecar each time):")
        sizes: dict[str, Any] = {}
        small = dataclasses.replace(SCENARIOS[0], connections=scenario.connections)
        for mib in (1, 4):
            variant = dataclasses.replace(
                scenario,
                key=f"{scenario.key}-{mib}m",
                path=scenario.path if mib == 1 else scenario.probe_path,
                body_size=mib * MiB if scenario.body_size else 0,
            )
            proc = self.start_sidecar("sidecar-probe", "sidecar_probe", "admin_probe")
            try:
                target = Target("sidecar", self.ports["sidecar_probe"], proc)
                self.run_once(target, small, 1.0)  # connections, TLS sessions, pools
                idle = stack.rss_kib(stack.tree(proc.pid))
                loadgen.wait_quiet(self.args.quiet_wait)
                r = self.run_once(target, variant, self.args.duration)
            finally:
                self.stop(proc)
            growth = max(0, r["peak_rss_kib"] - idle)
            per = round(growth / scenario.connections, 1)
            sizes[f"{mib} MiB"] = {
                "idle_rss_kib": idle,
                "peak_rss_kib": r["peak_rss_kib"],
                "growth_per_in_flight_kib": per,
                "rps": round(r["rps"], 1),
                "errors": sum(r["errors"].values()),
            }
            self.say(
                f"     {mib} MiB bodies: RSS +{per:.0f} KiB per in-flight request ({r['rps']:.0f} req/s)"
            )
        extra = (
            sizes["4 MiB"]["growth_per_in_flight_kib"] - sizes["1 MiB"]["growth_per_in_flight_kib"]
        )
        return {
            "connections": scenario.connections,
            "sizes": sizes,
            "extra_per_in_flight_kib_for_4x_body": round(extra, 1),
            "buffers_whole_bodies": extra >= BUFFERING_KIB,
        }

    # ---- S4 --------------------------------------------------------------------------------

    def s4(self) -> dict[str, Any]:
        self.say(
            "\n== S4: 1,000 distinct client certificates at once, identity backend with 20 ms latency"
        )
        certs_dir = self.folder / "s4-certs"
        if certs_dir.exists():
            shutil.rmtree(certs_dir)  # issued by an earlier run's CA
        t0 = time.monotonic()
        self.pki.many_clients(self.args.s4_certs, certs_dir)
        self.say(
            f"   made {self.args.s4_certs} client certificates in {time.monotonic() - t0:.1f} s"
        )
        hot = self.folder / "hot.pem"
        hot.write_bytes(self.pki.client_cert.read_bytes() + self.pki.client_key.read_bytes())
        py = sys.executable
        verdicts = self._start_verdicts()
        url = f"http://127.0.0.1:{self.ports['verdicts']}"
        result: dict[str, Any] = {
            "certificates": self.args.s4_certs,
            "backend_latency_ms": self.args.s4_latency * 1000,
        }
        try:
            for mode in ("preconnected", "arrival"):
                _post(url + "/reset")
                try:
                    sidecar = self.start_sidecar(
                        "sidecar-s4", "sidecar_s4", "admin_s4", http_backend=url + "/verdict"
                    )
                except RuntimeError as exc:
                    result["status"] = "pending"
                    result["reason"] = (
                        "the sidecar does not start with identity.backend http: "
                        + str(exc).splitlines()[-1]
                    )
                    self.say(f"   PENDING: {result['reason']}")
                    return result
                try:
                    pids = stack.tree(sidecar.pid)
                    stack.reset_hwm(pids)
                    rss0 = stack.rss_kib(pids)
                    loadgen.wait_quiet(self.args.quiet_wait)
                    sampler = CpuSampler(pids)
                    drive = subprocess.run(
                        [
                            py,
                            "-m",
                            "tests.benchmarks.s4",
                            "drive",
                            "--port",
                            str(self.ports["sidecar_s4"]),
                            "--certs",
                            str(certs_dir),
                            "--hot",
                            str(hot),
                            "--count",
                            str(self.args.s4_certs),
                            "--duplicates",
                            str(self.args.s4_duplicates),
                            "--mode",
                            mode,
                            # the hot client's probes in a process of their own: on the
                            # driver's loop they waited behind its own 1,000 handshakes
                            "--hot-process",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False,
                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                        preexec_fn=_pin(self.placement.rest),
                    )
                    sampler.stop()
                    if drive.returncode != 0:
                        raise RuntimeError(f"s4 driver failed: {drive.stderr[-2000:]}")
                    doc = json.loads(drive.stdout)
                    # Was the sidecar's CPU saturated while the burst was in flight?
                    doc["sidecar_cores_during_burst"] = sampler.cores(*doc["burst_window"])
                    doc["sidecar_peak_rss_kib"] = stack.hwm_kib(pids)
                    doc["sidecar_rss_before_kib"] = rss0
                finally:
                    self.stop(sidecar)
                doc["identity"] = self.s4_calls(url, certs_dir)
                result[mode] = doc
                self.say(_s4_line(mode, doc))
        finally:
            self.stop(verdicts)
        pre = result["preconnected"]
        result["pass_one_call_per_certificate"] = all(
            result[m]["identity"]["one_call_each"] for m in ("preconnected", "arrival")
        )
        result["pass_hits_p50"] = (
            pre["hot_during_burst"].get("count", 0) >= 5
            and pre["hot_during_burst"]["p50_ms"] < self.args.s4_latency * 1000
        )
        result["pass_hits_unaffected"] = (
            pre["hot_during_burst"].get("count", 0) >= 5
            and pre["hot_during_burst"]["p99_ms"] < self.args.s4_latency * 1000
        )
        result["status"] = "measured"
        return result

    # ---- S4-fleet and S1 with the shared cache ----------------------------------------------

    def redis(self) -> str:
        """A Redis for the shared verdict cache (started once), as a URL."""
        if not any(p.name == "redis" for p in self.procs):
            proc = stack.start_redis(self.folder, self.ports["redis"], self.placement.rest)
            self.procs.append(proc)
            stack.wait_port(proc, self.ports["redis"])
        return f"redis://127.0.0.1:{self.ports['redis']}"

    def flush_redis(self) -> None:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.ports["redis"]) as client:
            client.flushall()

    def s4_fleet(self) -> dict[str, Any]:
        """S4 across a fleet: two replicas of two workers each (four sidecar processes) share
        one Redis; every one of 1,000 new certificates reaches both replicas at the same
        moment. The identity calls (target: exactly 1,000), the latency of those first
        requests, and the same burst without the shared cache for comparison."""
        count = self.args.s4_certs
        self.say(
            f"\n== S4-fleet: {count} new certificates at once on 2 replicas x 2 workers sharing "
            f"one Redis, identity backend with {self.args.s4_latency * 1000:g} ms latency"
        )
        certs_dir = self.folder / "s4-certs"
        if not certs_dir.exists() or len(list(certs_dir.glob("client-*.pem"))) < count:
            if certs_dir.exists():
                shutil.rmtree(certs_dir)
            self.pki.many_clients(count, certs_dir)
        hot = self.folder / "hot.pem"
        hot.write_bytes(self.pki.client_cert.read_bytes() + self.pki.client_key.read_bytes())
        verdicts = self._start_verdicts()
        url = f"http://127.0.0.1:{self.ports['verdicts']}"
        redis_url = self.redis()
        result: dict[str, Any] = {
            "certificates": count,
            "replicas": 2,
            "workers_per_replica": 2,
            "backend_latency_ms": self.args.s4_latency * 1000,
        }
        runs = [("shared", "preconnected"), ("shared", "arrival"), ("local", "preconnected")]
        try:
            for cache, mode in runs:
                _post(url + "/reset")
                self.flush_redis()
                fleet = [
                    self.start_sidecar(
                        f"sidecar-fleet-{r}",
                        f"sidecar_fleet_{r}",
                        f"admin_fleet_{r}",
                        http_backend=url + "/verdict",
                        shared_url=redis_url if cache == "shared" else None,
                        workers=2,
                    )
                    for r in ("a", "b")
                ]
                try:
                    pids = [pid for proc in fleet for pid in stack.tree(proc.pid)]
                    loadgen.wait_quiet(self.args.quiet_wait)
                    sampler = CpuSampler(pids)
                    drive = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "tests.benchmarks.s4",
                            "drive",
                            "--port",
                            str(self.ports["sidecar_fleet_a"]),
                            "--port",
                            str(self.ports["sidecar_fleet_b"]),
                            "--certs",
                            str(certs_dir),
                            "--hot",
                            str(hot),
                            "--count",
                            str(count),
                            "--duplicates",
                            "0",
                            "--mode",
                            mode,
                        ],
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=False,
                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                        preexec_fn=_pin(self.placement.rest),
                    )
                    sampler.stop()
                    if drive.returncode != 0:
                        raise RuntimeError(f"s4 driver failed: {drive.stderr[-2000:]}")
                    doc = json.loads(drive.stdout)
                    doc["sidecar_cores_during_burst"] = sampler.cores(*doc["burst_window"])
                finally:
                    for proc in fleet:
                        self.stop(proc)
                doc["identity"] = self.s4_calls(url, certs_dir)
                result[f"{cache}-{mode}"] = doc
                self.say(f"   {cache:<6} " + _s4_line(mode, doc).strip())
        finally:
            self.stop(verdicts)
        result["pass_exactly_one_call_each"] = all(
            result[f"shared-{mode}"]["identity"]["one_call_each"]
            for mode in ("preconnected", "arrival")
        )
        result["status"] = "measured"
        return result

    def _start_verdicts(self) -> Proc:
        verdicts = stack.start(
            "verdicts",
            [
                sys.executable,
                "-m",
                "tests.benchmarks.s4",
                "verdicts",
                "--port",
                str(self.ports["verdicts"]),
                "--latency",
                str(self.args.s4_latency),
            ],
            self.folder,
            self.placement.rest,
            env={"PYTHONPATH": str(ROOT)},
        )
        self.procs.append(verdicts)
        stack.wait_port(verdicts, self.ports["verdicts"])
        return verdicts

    def s1_shared(self, plain: Target) -> dict[str, Any]:
        """S1-c32 on the sidecar with the shared cache on, against the same build with it off,
        interleaved: a hit in the local cache must not touch Redis (target >= 0.95x)."""
        shared = self.start_sidecar(
            "sidecar-shared", "sidecar_shared", "admin_shared", shared_url=self.redis()
        )
        try:
            scenario = Scenario(
                "S1-c32-shared",
                "S1-c32, identity.cache.shared on (a Redis) / off",
                connections=32,
                min_rps_ratio=0.95,
            )
            return self.scenario(
                scenario, [plain, Target("sidecar-shared", self.ports["sidecar_shared"], shared)]
            )
        finally:
            self.stop(shared)

    def s4_calls(self, url: str, certs_dir: Path) -> dict[str, Any]:
        import hashlib
        import urllib.request

        with urllib.request.urlopen(url + "/stats", timeout=10) as resp:
            stats = json.loads(resp.read())
        per = stats["per_certificate"]
        burst = [
            hashlib.sha256(stack.pem_to_der(p)).hexdigest()
            for p in sorted(certs_dir.glob("client-*.pem"))[: self.args.s4_certs]
        ]
        counts = Counter(per.get(sha, 0) for sha in burst)
        return {
            "calls_total": stats["calls"],
            "calls_for_burst_certificates": sum(per.get(sha, 0) for sha in burst),
            "certificates_by_call_count": {str(k): v for k, v in sorted(counts.items())},
            "peak_calls_in_flight": stats["peak_in_flight"],
            "one_call_each": counts == Counter({1: len(burst)}),
        }

    # ---- profile ------------------------------------------------------------------------

    def profile(self, sidecar: Target) -> dict[str, Any]:
        """py-spy samples the sidecar during S1-c32 (a run of its own, not one of the measured)."""
        pyspy = Path(sys.executable).parent / "py-spy"
        if not pyspy.exists():
            return {"status": "skipped", "reason": "py-spy is not installed in the venv"}
        self.say(
            f"\n== profile: py-spy on the sidecar during S1-c32 ({self.args.profile_seconds:g} s)"
        )
        out: dict[str, Any] = {}
        for native in (False, True):
            raw = self.folder / f"profile{'-native' if native else ''}.txt"
            argv = [
                str(pyspy),
                "record",
                "--pid",
                str(sidecar.proc.pid),
                "--rate",
                "50" if native else "250",
                "--duration",
                f"{self.args.profile_seconds:g}",
                "--format",
                "raw",
                "--output",
                str(raw),
            ]
            # py-spy stops the process for each sample (consistent stacks); --native unwinds C
            # frames too, which takes long enough to slow the sidecar down, hence 50 Hz
            if native:
                argv.append("--native")
            loadgen.wait_quiet(self.args.quiet_wait)
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            scenario = SCENARIOS[0]
            r = self.run_once(sidecar, scenario, self.args.profile_seconds)
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0 or not raw.exists():
                out["native" if native else "python"] = {
                    "status": "failed",
                    "error": err.decode(errors="replace")[-500:],
                }
                continue
            out["native" if native else "python"] = {
                "file": str(raw),
                "rps_while_profiling": round(r["rps"]),
                **summarize_profile(raw, native=native),
            }
        return out


class CpuSampler:
    """CPU seconds of a process tree every 50 ms, in a thread, to read utilisation afterwards."""

    def __init__(self, pids: list[int]) -> None:
        self.samples: list[tuple[float, float]] = []
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), stack.cpu_seconds(self._pids)))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, start: float, end: float) -> float | None:
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after or after[0][0] <= before[-1][0]:
            return None
        (t0, c0), (t1, c1) = before[-1], after[0]
        return round((c1 - c0) / (t1 - t0), 2)


# ---- statistics ---------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _pair_ratio(
    runs: dict[str, list[dict[str, Any]]] | None, names: list[str], key: str
) -> float | None:
    """Median over the repetitions of sidecar/nginx for ``key`` (runs interleaved A B A B)."""
    if not runs or any(name not in runs for name in names):
        return None
    pairs = [
        b[key] / a[key] for a, b in zip(runs[names[0]], runs[names[1]], strict=False) if a[key]
    ]
    return round(_median(pairs), 3) if pairs else None


def _pair_wins(
    runs: dict[str, list[dict[str, Any]]] | None, names: list[str], key: str
) -> list[int] | None:
    """In how many repetitions each of the two had the higher ``key``."""
    if not runs or any(name not in runs for name in names):
        return None
    pairs = list(zip(runs[names[0]], runs[names[1]], strict=False))
    second = sum(1 for a, b in pairs if b[key] > a[key])
    return [len(pairs) - second, second]


def summarize(
    runs: list[dict[str, Any]], idle_rss: int, peak_rss: int, scenario: Scenario
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "reps": len(runs),
        "rps": round(_median([r["rps"] for r in runs]), 1),
        "rps_min": round(min(r["rps"] for r in runs), 1),
        "rps_max": round(max(r["rps"] for r in runs), 1),
        "p50_ms": round(_median([r["p50_ms"] for r in runs]), 3),
        "p99_ms": round(_median([r["p99_ms"] for r in runs]), 3),
        "peak_rss_kib": peak_rss,
        "idle_rss_kib": idle_rss,
        "proxy_cores": round(_median([r["proxy_cores"] for r in runs]), 3),
        "requests_per_proxy_cpu_second": round(
            _median([r["requests_per_proxy_cpu_second"] or 0 for r in runs]), 1
        ),
        "proxy_cpu_us_per_request": round(_median([_cpu_us(r) for r in runs]), 1),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "failed_runs": sum(1 for r in runs if r["requests"] == 0),
        "requests": sum(r["requests"] for r in runs),
        "other_load_cores_max": max(r["other_load_cores"] for r in runs),
    }
    if scenario.streaming:
        # wrk counts received bytes only: an upload's throughput is its bodies sent
        per_run = [
            (r["requests"] * scenario.body_size if scenario.body_size else r["bytes"])
            / r["seconds"]
            / MiB
            for r in runs
        ]
        out["mib_per_s"] = round(_median(per_run), 1)
    if scenario.close:
        full = sum(r["handshakes_full"] for r in runs)
        resumed = sum(r["handshakes_resumed"] for r in runs)
        out["handshakes_full"] = full
        out["handshakes_resumed"] = resumed
        out["resumed_fraction"] = round(resumed / (full + resumed), 3) if full + resumed else 0.0
        # wrk's latency starts after the handshake; Little's law gives the whole cycle.
        out["connection_cycle_ms"] = (
            round(scenario.connections / out["rps"] * 1000, 3) if out["rps"] else None
        )
    if scenario.streaming:
        growth = max(0, peak_rss - idle_rss)
        out["rss_growth_kib"] = growth
        out["rss_growth_per_in_flight_kib"] = round(growth / scenario.connections, 1)
    return out


def _cpu_us(run: dict[str, Any]) -> float:
    """The proxy's CPU per request in one run, in microseconds (older results: from requests
    per CPU-second)."""
    if run.get("proxy_cpu_us_per_request") is not None:
        return float(run["proxy_cpu_us_per_request"])
    rate = run.get("requests_per_proxy_cpu_second")
    return 1e6 / rate if rate else 0.0


def compared(s: dict[str, Any]) -> dict[str, Any]:
    """``s`` (one scenario's results) with its comparisons (re)computed from the summaries:
    ``comparison``, the sidecar against nginx at the primary worker count (with the
    scenario's targets), and ``arms``, every arm against nginx at its own worker count."""
    view = legacy_view(s)
    s["comparison"] = compare(
        view["summary"], Scenario(**s["scenario"]), s.get("body_size_probe"), view.get("runs")
    )
    s["arms"] = compare_arms(s)
    return s


def legacy_view(s: dict[str, Any]) -> dict[str, Any]:
    """The scenario as the sidecar-only comparisons see it: nginx and the sidecar at the
    primary worker count, and the --versus build when there is one. Results without arms
    (the sidecar-only scenarios, older files) are that already."""
    targets: dict[str, dict[str, Any]] = s["targets"]
    if not any("arm" in meta for meta in targets.values()):
        return s
    primary = next(iter(targets.values()))["workers"]
    names = [
        name
        for arm in ("nginx", "sidecar", "sidecar-b")
        for name, meta in targets.items()
        if meta.get("arm") == arm and meta["workers"] == primary
    ]
    runs = s.get("runs")
    return {
        **s,
        "targets": {n: targets[n] for n in names},
        "summary": {n: s["summary"][n] for n in names},
        "runs": {n: runs[n] for n in names} if runs else None,
    }


def compare_arms(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Each arm against nginx with as many workers, in the order they ran; empty for results
    without arms."""
    targets: dict[str, dict[str, Any]] = s["targets"]
    summary, runs = s["summary"], s.get("runs")
    nginx = {meta["workers"]: name for name, meta in targets.items() if meta.get("arm") == "nginx"}
    rows = []
    for name, meta in targets.items():
        if "arm" not in meta or meta["workers"] not in nginx:
            continue
        ref_name = nginx[meta["workers"]]
        ref, me = summary[ref_name], summary[name]
        pair = [ref_name, name]
        row: dict[str, Any] = {
            "target": name,
            "arm": meta["arm"],
            "workers": meta["workers"],
            "rps": me["rps"],
            "rps_ratio": round(me["rps"] / ref["rps"], 3) if ref["rps"] else None,
            "rps_ratio_pairs": _pair_ratio(runs, pair, "rps") if name != ref_name else None,
            "cpu_us_per_request": me.get("proxy_cpu_us_per_request")
            or (
                round(1e6 / me["requests_per_proxy_cpu_second"], 1)
                if me["requests_per_proxy_cpu_second"]
                else None
            ),
            "p50_ms": me["p50_ms"],
            "p99_ms": me["p99_ms"],
            "p99_ratio": round(me["p99_ms"] / ref["p99_ms"], 2) if ref["p99_ms"] else None,
            "p99_ratio_pairs": _pair_ratio(runs, pair, "p99_ms") if name != ref_name else None,
            "proxy_cores": me["proxy_cores"],
            "peak_rss_kib": me["peak_rss_kib"],
            "errors": me["errors"] + me["failed_runs"],
            "other_load_cores_max": me["other_load_cores_max"],
        }
        for key in ("mib_per_s", "resumed_fraction"):
            if key in me:
                row[key] = me[key]
        rows.append(row)
    return rows


def compare(
    summary: dict[str, dict[str, Any]],
    scenario: Scenario,
    probe: dict[str, Any] | None = None,
    runs: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    names = list(summary)
    if len(names) < 2:
        return {}
    ref, sc = summary[names[0]], summary[names[1]]
    out: dict[str, Any] = {
        # The median of each repetition's own ratio (nginx's run and the sidecar's just after
        # it): on a machine whose speed drifts, a pair close in time cancels more of the
        # drift than the ratio of the two medians (which decides the targets, as before).
        "rps_ratio_pairs": _pair_ratio(runs, names, "rps"),
        "p99_ratio_pairs": _pair_ratio(runs, names, "p99_ms"),
        "rps_ratio": round(sc["rps"] / ref["rps"], 3) if ref["rps"] else None,
        "p50_ratio": round(sc["p50_ms"] / ref["p50_ms"], 2) if ref["p50_ms"] else None,
        "p99_ratio": round(sc["p99_ms"] / ref["p99_ms"], 2) if ref["p99_ms"] else None,
        "rss_ratio": round(sc["peak_rss_kib"] / ref["peak_rss_kib"], 2)
        if ref["peak_rss_kib"]
        else None,
        "cpu_efficiency_ratio": (
            round(sc["requests_per_proxy_cpu_second"] / ref["requests_per_proxy_cpu_second"], 3)
            if ref["requests_per_proxy_cpu_second"]
            else None
        ),
    }
    checks: dict[str, bool] = {}
    if scenario.min_rps_ratio is not None and out["rps_ratio"] is not None:
        checks["req/s"] = out["rps_ratio"] >= scenario.min_rps_ratio
    if scenario.max_p99_ratio is not None and out["p99_ratio"] is not None:
        checks["p99"] = out["p99_ratio"] <= scenario.max_p99_ratio
    if scenario.streaming and probe is not None:
        checks["streaming"] = not probe["buffers_whole_bodies"]
    if scenario.streaming or checks:
        checks["no errors"] = not (
            sc["errors"] or ref["errors"] or sc["failed_runs"] or ref["failed_runs"]
        )
    if scenario.front_proxy and len(names) == 3:
        # S1-front: proxy CPU per request behind a front proxy, against over TLS
        tls_rate = sc["requests_per_proxy_cpu_second"]
        front_rate = summary[names[2]]["requests_per_proxy_cpu_second"]
        out["cost_ratio"] = round(tls_rate / front_rate, 3) if tls_rate and front_rate else None
        if scenario.max_cost_ratio is not None:
            checks["cost"] = (
                out["cost_ratio"] is not None and out["cost_ratio"] <= scenario.max_cost_ratio
            )
    elif scenario.max_cost_ratio is not None and len(names) == 3:
        # S1-routes: what the many routes cost per request, against the few
        many = summary[names[2]]["rps"]
        out["cost_ratio"] = round(sc["rps"] / many, 3) if many else None
        checks["cost"] = (
            out["cost_ratio"] is not None and out["cost_ratio"] <= scenario.max_cost_ratio
        )
    if len(names) == 3:  # --versus: the other build against the one under test
        other = summary[names[2]]
        out["versus"] = {
            "rps_ratio": round(other["rps"] / sc["rps"], 3) if sc["rps"] else None,
            "rps_ratio_pairs": _pair_ratio(runs, names[1:], "rps"),
            "p99_ratio": round(other["p99_ms"] / sc["p99_ms"], 2) if sc["p99_ms"] else None,
            "rps": other["rps"],
            "pair_wins": _pair_wins(runs, names[1:], "rps"),
        }
    if scenario.logging and len(names) == 5:
        # --versus: each build with the access log on against itself with it off (target 0.9)
        out["log_on_off"] = {
            build: {
                "rps_ratio": round(summary[on]["rps"] / summary[off]["rps"], 3)
                if summary[off]["rps"]
                else None,
                "rps_ratio_pairs": _pair_ratio(runs, [off, on], "rps"),
                "cpu_ratio_pairs": _pair_ratio(runs, [off, on], "proxy_cpu_us_per_request"),
            }
            for build, on, off in (("under test", *names[1:3]), ("versus", *names[3:5]))
        }
    out["target"] = _target_text(scenario)
    out["checks"] = checks
    out["meets_target"] = all(checks.values()) if checks else None
    return out


def _target_text(s: Scenario) -> str:
    parts = []
    if s.min_rps_ratio is not None:
        parts.append(f"req/s >= {s.min_rps_ratio:g}x")
    if s.max_p99_ratio is not None:
        parts.append(f"p99 <= {s.max_p99_ratio:g}x")
    if s.streaming:
        parts.append(
            "no whole-body buffering (RSS per in-flight request flat from 1 to 4 MiB bodies)"
        )
    if s.front_proxy and s.max_cost_ratio is not None:
        parts.append(
            f"proxy CPU per request behind a front proxy <= {s.max_cost_ratio:g}x over TLS"
        )
    if s.max_cost_ratio is not None and s.routes is not None:
        parts.append(
            f"req/s with {s.routes[0]} routes <= {s.max_cost_ratio:g}x req/s with {s.routes[1]}"
        )
    return ", ".join(parts) or "(reported only)"


def summarize_profile(raw: Path, *, native: bool, top: int = 40) -> dict[str, Any]:
    """Top functions by own samples and by inclusive samples, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack_text.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        files[frames[-1].rpartition(" (")[2].rstrip(")") or frames[-1]] += count
        for f in set(frames):
            incl[f] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": n, "percent": round(100 * n / total, 1)}
            for f, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": rows(own),
        "inclusive": rows(incl),
        "self_by_file": rows(files),
    }


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` → ``func (file.py)``; the process/thread frames are dropped."""
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")) or not frame:
        return ""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/sidecar/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/sidecar/":
                path = "sidecar/" + path
            break
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{name} ({path})" if path else name


def _post(url: str) -> None:
    import urllib.request

    req = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10):
        pass


def _pin(cpus: tuple[int, ...] | None) -> Any:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _s4_line(mode: str, doc: dict[str, Any]) -> str:
    ident = doc["identity"]
    during = doc["hot_during_burst"]
    base = doc["hot_baseline"]
    return (
        f"   {mode:<12} burst {doc['burst_seconds']:.2f} s  statuses {doc['burst_statuses']}  identity calls "
        f"{ident['calls_for_burst_certificates']} for {doc['certificates']} certs (+{doc['duplicate_connections']} duplicate connections)"
        f"  hot p50/p99 {base.get('p50_ms')}/{base.get('p99_ms')} ms alone, "
        f"{during.get('p50_ms')}/{during.get('p99_ms')} ms during ({during.get('count')} hits)"
        f"  sidecar CPU during the burst {doc.get('sidecar_cores_during_burst')} cores"
    )


# ---- machine and versions ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not found"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else ""

    import ssl as ssl_mod

    import aiohttp

    # nginx -V: "built with OpenSSL 3.0.x ... (running with OpenSSL 3.0.y ...)"
    built = subprocess.run(
        [stack.nginx_binary(), "-V"], capture_output=True, text=True, timeout=10, check=False
    )
    nginx_ssl = next(
        (ln.strip() for ln in built.stderr.splitlines() if ln.startswith("built with")), ""
    )
    envoy = stack.envoy_binary()

    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_openssl": ssl_mod.OPENSSL_VERSION,
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "nginx": version([stack.nginx_binary(), "-v"]),
        "nginx_openssl": nginx_ssl,
        # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        "envoy": "envoy " + version([envoy, "--version"]).split("version:")[-1].strip()
        if envoy
        else "envoy not found",
        "wrk": version([loadgen.wrk_binary(), "-v"]).split("Copyright")[0].strip(),
        "openssl": version(["openssl", "version"]),
        "sidecar_commit": version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
    }


# ---- output -------------------------------------------------------------------------------


def _floor2(ratio: float | None) -> str:
    """Two decimals, rounded down, so that a ratio shown as 0.80 really is at least 0.80."""
    return "-" if ratio is None else f"{math.floor(ratio * 100) / 100:.2f}"


def _pairs(ratio: float | None, *, floor: bool = False) -> str:
    if ratio is None:
        return ""
    return f" ({_floor2(ratio)})" if floor else f" ({ratio:.2f})"


def _kib(v: int) -> str:
    return f"{v / 1024:.0f} MiB" if v >= 10240 else f"{v} KiB"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (also printed)."""
    head = (
        "| scenario | nginx req/s | sidecar req/s | ratio (of pairs) | p50 ms nginx / sidecar | p99 ms nginx / sidecar | p99 ratio (of pairs) "
        "| peak RSS nginx / sidecar | proxy CPU nginx / sidecar | req per CPU-s ratio | target | met | other load |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |\n"
    )
    lines = []
    for s in map(legacy_view, results["scenarios"]):
        key = s["scenario"]["key"]
        a, b = (s["summary"][n] for n in list(s["targets"])[:2])
        c = s["comparison"]
        extra = ""
        if "resumed_fraction" in b:
            extra = f" (resumed {a['resumed_fraction']:.0%} / {b['resumed_fraction']:.0%})"
        if "rss_growth_per_in_flight_kib" in b:
            extra = (
                f" ({a.get('mib_per_s', 0):.0f} / {b.get('mib_per_s', 0):.0f} MiB/s; RSS growth per"
                f" in-flight request {a['rss_growth_per_in_flight_kib']:.0f} / {b['rss_growth_per_in_flight_kib']:.0f} KiB"
            )
            probe = s.get("body_size_probe")
            if probe:
                sz = probe["sizes"]
                extra += (
                    f"; fresh sidecar: {sz['1 MiB']['growth_per_in_flight_kib']:.0f} KiB with 1 MiB,"
                    f" {sz['4 MiB']['growth_per_in_flight_kib']:.0f} KiB with 4 MiB bodies"
                )
            extra += ")"
        met = {True: "yes", False: "**no**", None: "-"}[c["meets_target"]]
        if c["meets_target"] is False:
            met += " (" + ", ".join(k for k, ok in c.get("checks", {}).items() if not ok) + ")"
        lines.append(
            f"| {key}{extra} | {a['rps']:.0f} | {b['rps']:.0f} | **{_floor2(c['rps_ratio'])}**{_pairs(c.get('rps_ratio_pairs'), floor=True)} | {a['p50_ms']:.2f} / {b['p50_ms']:.2f} "
            f"| {a['p99_ms']:.2f} / {b['p99_ms']:.2f} | {c['p99_ratio']:.2f}{_pairs(c.get('p99_ratio_pairs'))} | {_kib(a['peak_rss_kib'])} / {_kib(b['peak_rss_kib'])} "
            f"| {a['proxy_cores']:.2f} / {b['proxy_cores']:.2f} | {c['cpu_efficiency_ratio']:.2f} | {c['target']} | {met} "
            f"| {max(a['other_load_cores_max'], b['other_load_cores_max']):.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def legacy_workers(results: dict[str, Any]) -> int:
    workers = results["parameters"].get("workers", 1)
    return int(workers[0] if isinstance(workers, list) else workers)


_ARM_NAMES = {"nginx": "nginx", "envoy": "Envoy", "sidecar": "sidecar", "sidecar-b": "sidecar-b"}


def _scenario_cell(s: dict[str, Any]) -> str:
    key = s["scenario"]["key"]
    if s["scenario"].get("streaming"):
        return f"{key} ({s['scenario']['connections']} connections, 1 MiB bodies)"
    return f"{key} ({s['scenario']['connections']} connections)"


def _ratio(value: float | None, pairs: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ({pairs:.2f})" if pairs is not None else "")


def arms_table(results: dict[str, Any]) -> str:
    """Every arm at every worker count: req/s and its ratio to nginx with as many workers, the
    proxy's CPU per request, latency and its ratio."""
    head = (
        "| scenario | workers | proxy | req/s | ratio to nginx (of pairs) | CPU µs per request "
        "| p50 / p99 ms | p99 ratio (of pairs) | proxy CPU cores | peak RSS | errors |\n"
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for s in results["scenarios"]:
        for row in s.get("arms") or []:
            rate = f"{row['rps']:.0f}"
            if "mib_per_s" in row:
                rate += f" ({row['mib_per_s']:.0f} MiB/s)"
            if "resumed_fraction" in row:
                rate += f" ({row['resumed_fraction']:.0%} resumed)"
            nginx = row["arm"] == "nginx"
            cpu = row["cpu_us_per_request"]
            lines.append(
                f"| {_scenario_cell(s)} | {row['workers']} | {_ARM_NAMES.get(row['arm'], row['arm'])} "
                f"| {rate} | {'1' if nginx else _ratio(row['rps_ratio'], row['rps_ratio_pairs'])} "
                f"| {cpu:.0f} | {row['p50_ms']:.2f} / {row['p99_ms']:.2f} "
                f"| {'1' if nginx else _ratio(row['p99_ratio'], row['p99_ratio_pairs'])} "
                f"| {row['proxy_cores']:.2f} | {_kib(row['peak_rss_kib'])} | {row['errors']} |"
                if cpu is not None
                else f"| {_scenario_cell(s)} | {row['workers']} | {row['arm']} | {rate} | - | - | - | - | - | - | {row['errors']} |"
            )
    return head + "\n".join(lines) + "\n"


def idle_text(idle: dict[str, Any]) -> str:
    """Memory per idle keep-alive connection, each arm (fresh processes)."""
    rows = [
        f"| {r['workers']} | {_ARM_NAMES.get(r['arm'], r['arm'])} | {r['opened']} "
        f"| {_kib(r['rss_before_kib'])} | "
        f"{'-' if r['kib_per_connection'] is None else format(r['kib_per_connection'], '.0f')} |"
        for r in idle["arms"]
    ]
    return (
        f"\nMemory per idle connection: {idle['connections']} TLS keep-alive connections, one "
        "request each, held open (RSS of the proxy's processes; fresh processes):\n\n"
        "| workers | proxy | open | RSS before | KiB per connection |\n"
        "| ---: | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def single_worker_table(results: dict[str, Any]) -> str:
    """The sidecar with one worker against nginx and Envoy with the most workers of the run:
    what one sidecar process gets beside a full-size reference (issue #19's first table)."""
    lines = []
    for s in results["scenarios"]:
        rows = s.get("arms") or []
        counts = sorted({r["workers"] for r in rows})
        if len(counts) < 2 or counts[0] != 1:
            continue
        most = counts[-1]
        one = next((r for r in rows if r["arm"] == "sidecar" and r["workers"] == 1), None)
        if one is None:
            continue
        cells = []
        for arm in ("nginx", "envoy"):
            ref = next((r for r in rows if r["arm"] == arm and r["workers"] == most), None)
            if ref is None or not ref["rps"] or not ref["p99_ms"]:
                cells.append("-")
                continue
            pairs = _pair_ratio(s.get("runs"), [ref["target"], one["target"]], "rps")
            cells.append(
                f"{one['rps'] / ref['rps']:.2f}{f' ({pairs:.2f})' if pairs is not None else ''}"
                f" / {one['p99_ms'] / ref['p99_ms']:.2f}"
            )
        lines.append(f"| {_scenario_cell(s)} | {one['rps']:.0f} | {cells[0]} | {cells[1]} |")
    if not lines:
        return ""
    most = max(r["workers"] for s in results["scenarios"] for r in s.get("arms") or [])
    return (
        f"The sidecar with 1 worker against nginx and Envoy with {most} (req/s ratio, of pairs; "
        "p99 ratio):\n\n"
        f"| scenario | sidecar, 1 worker, req/s | ratio to nginx, {most} workers | ratio to Envoy, {most} workers |\n"
        "| --- | ---: | ---: | ---: |\n" + "\n".join(lines) + "\n"
    )


def s4_text(s4: dict[str, Any]) -> str:
    if s4.get("status") != "measured":
        return f"S4: {s4.get('status', 'not run')}: {s4.get('reason', '')}\n"
    out = []
    for mode in ("preconnected", "arrival"):
        d = s4[mode]
        i = d["identity"]
        out.append(
            f"S4 {mode}: {d['certificates']} certificates (+{d['duplicate_connections']} duplicate connections) in "
            f"{d['burst_seconds']:.2f} s, statuses {d['burst_statuses']}; identity calls {i['calls_for_burst_certificates']} "
            f"(per certificate: {i['certificates_by_call_count']}, peak in flight {i['peak_calls_in_flight']}); "
            f"cache-hit latency p50/p99 {d['hot_baseline'].get('p50_ms')}/{d['hot_baseline'].get('p99_ms')} ms alone, "
            f"{d['hot_during_burst'].get('p50_ms')}/{d['hot_during_burst'].get('p99_ms')} ms during the burst "
            f"(max {d['hot_during_burst'].get('max_ms')} ms, {d['hot_during_burst'].get('count')} hits); "
            f"misses p50/p99 {d['burst_latency'].get('p50_ms')}/{d['burst_latency'].get('p99_ms')} ms; "
            f"sidecar CPU during the burst {d.get('sidecar_cores_during_burst')} cores"
        )
    out.append(
        f"S4 one identity call per certificate: {'yes' if s4['pass_one_call_per_certificate'] else 'NO'}; "
        f"typical cache hit never waits for a backend call (p50 during the burst < backend latency): "
        f"{'yes' if s4['pass_hits_p50'] else 'NO'}; "
        f"cache hits unaffected (p99 during the burst < backend latency): {'yes' if s4['pass_hits_unaffected'] else 'NO'}"
    )
    return "\n".join(out) + "\n"


def fleet_text(results: dict[str, Any]) -> str:
    out = []
    s1 = results.get("s1_shared")
    if s1 is not None:
        off, on = (s1["summary"][n] for n in list(s1["targets"])[:2])
        c = compare(s1["summary"], Scenario(**s1["scenario"]), None, s1.get("runs"))
        out.append(
            f"S1-c32, shared cache on / off: {on['rps']:.0f} / {off['rps']:.0f} req/s, ratio "
            f"**{_floor2(c['rps_ratio'])}**{_pairs(c.get('rps_ratio_pairs'), floor=True)} "
            f"(target >= 0.95: {'met' if c['meets_target'] else 'NOT met'}); requests per "
            f"CPU-second of the proxy {on['requests_per_proxy_cpu_second']:.0f} / "
            f"{off['requests_per_proxy_cpu_second']:.0f} (ratio {c['cpu_efficiency_ratio']:.2f}); "
            f"p99 {on['p99_ms']:.2f} / {off['p99_ms']:.2f} ms; other load up to "
            f"{max(on['other_load_cores_max'], off['other_load_cores_max']):.2f} cores"
        )
    fleet = results.get("s4_fleet")
    if fleet is not None and fleet.get("status") == "measured":
        for key in ("shared-preconnected", "shared-arrival", "local-preconnected"):
            d = fleet.get(key)
            if d is None:
                continue
            i = d["identity"]
            out.append(
                f"S4-fleet {key} ({fleet['replicas']} replicas x {fleet['workers_per_replica']} "
                f"workers, each of {d['certificates']} certificates to every replica): identity "
                f"calls {i['calls_for_burst_certificates']} (per certificate: "
                f"{i['certificates_by_call_count']}); statuses {d['burst_statuses']}; first "
                f"requests p50/p99 {d['burst_latency'].get('p50_ms')}/"
                f"{d['burst_latency'].get('p99_ms')} ms, all answered in {d['burst_seconds']:.2f} s; "
                f"cache hits during the burst p50/p99 {d['hot_during_burst'].get('p50_ms')}/"
                f"{d['hot_during_burst'].get('p99_ms')} ms; sidecars' CPU "
                f"{d.get('sidecar_cores_during_burst')} cores"
            )
        out.append(
            "S4-fleet exactly one identity call per certificate with the shared cache: "
            + ("yes" if fleet["pass_exactly_one_call_each"] else "NO")
        )
    return "\n".join(out) + "\n" if out else ""


def profile_text(profile: dict[str, Any], top: int = 12) -> str:
    out = []
    for kind in ("python", "native"):
        p = profile.get(kind)
        if not p or "self" not in p:
            continue
        out.append(
            f"py-spy ({kind} frames), {p['samples']} samples at {p['rps_while_profiling']} req/s,"
            " top by own samples:"
        )
        out.extend(f"  {r['percent']:5.1f}%  {r['function']}" for r in p["self"][:top])
        out.append("  own samples by file:")
        out.extend(f"  {r['percent']:5.1f}%  {r['function']}" for r in p["self_by_file"][:top])
        out.append("  top inclusive (below the event loop's own frames):")
        below = [r for r in p["inclusive"] if r["percent"] < 70]
        out.extend(f"  {r['percent']:5.1f}%  {r['function']}" for r in below[:top])
    return "\n".join(out) + "\n"


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shim", type=Path, help="the built client_cert_shim.so (required to measure)")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="measure nothing: print the tables of an earlier results JSON again",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=ROOT / "build" / "benchmarks",
        help="state folder (PKI, configs, logs, results)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: DIR/results.json)"
    )
    p.add_argument(
        "--duration", type=float, default=8.0, help="seconds per measurement (default 8)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of warm-up per proxy and scenario (default 2)",
    )
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions per proxy (interleaved; default 3)"
    )
    p.add_argument(
        "--sidecar-ref",
        default=None,
        help="benchmark the sidecar as committed at this git ref (e.g. HEAD) instead of the working tree",
    )
    p.add_argument(
        "--versus",
        default=None,
        metavar="REF",
        help="also run the sidecar as committed at REF, interleaved with the other two, in the "
        "scenarios without logging; reported as its ratio to the sidecar under test",
    )
    p.add_argument(
        "--versus-pure",
        action="store_true",
        help="run the --versus build interpreted (SIDECAR_PURE=1): with --versus REF and "
        "--sidecar-ref REF, the compiled and the interpreted build of one commit",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="worker counts, comma-separated (e.g. 1,2): nginx's worker_processes, Envoy's "
        "--concurrency and the sidecar's listen.workers, each count measured in the same run; "
        "the first is also the count of the sidecar-only comparisons (default 1)",
    )
    p.add_argument(
        "--no-envoy", action="store_true", help="leave Envoy out (nginx and the sidecar only)"
    )
    p.add_argument(
        "--idle-connections",
        type=int,
        default=500,
        help="open this many keep-alive connections to each proxy before the scenarios and "
        "report its RSS per connection (default 500; 0 skips it)",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=None,
        help="wrk's threads (default: one per CPU of the load generator, or half the CPUs "
        "when nothing is pinned)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="REQ_PER_S",
        help="offer about this many requests per second in every run instead of as many as "
        "the target answers: each connection waits a random time (exponential, mean "
        "connections / rate) between an answer and its next request, so that latencies are "
        "compared at one load; the rate reached is reported (it is a little lower, by the "
        "latency)",
    )
    p.add_argument(
        "--scenarios",
        default="all",
        help="comma-separated scenario keys (S1-c32, S2-new, ..., S4-fleet), groups (S1, S2, "
        "S3, S4: S4 and S4-fleet) or all",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the proxy and the load generator to separate CPUs",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="wait up to this long for other load to stop before each measurement",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"measure again when other processes (or the hypervisor: steal) used more than {OTHER_LOAD_LIMIT} cores meanwhile (default 2)",
    )
    p.add_argument("--s4-certs", type=int, default=1000)
    p.add_argument(
        "--s4-duplicates",
        type=int,
        default=200,
        help="extra S4 connections reusing certificates at the same moment",
    )
    p.add_argument(
        "--s4-latency",
        type=float,
        default=0.02,
        help="identity backend latency in seconds (default 0.02)",
    )
    p.add_argument(
        "--profile-seconds", type=float, default=10.0, help="py-spy duration; 0 skips the profile"
    )
    args = p.parse_args(argv)
    if args.shim is None and args.report is None:
        p.error("--shim is required (tests/benchmarks/run.sh builds it)")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    try:
        args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers: comma-separated numbers, not {args.workers!r}")
    if not args.workers or min(args.workers) < 1 or len(set(args.workers)) != len(args.workers):
        p.error("--workers: one or more distinct counts, each at least 1")
    if args.wrk_threads is not None and args.wrk_threads < 1:
        p.error("--wrk-threads must be at least 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be above 0")
    return args


@dataclass(frozen=True)
class Extras:
    """The runs besides SCENARIOS: S4 (one sidecar), S4-fleet (with S1-c32-shared)."""

    s4: bool = False
    fleet: bool = False


def selected(spec: str) -> tuple[list[Scenario], Extras]:
    if spec == "all":
        return SCENARIOS, Extras(s4=True, fleet=True)
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    chosen = [
        s
        for s in SCENARIOS
        if any(s.key == k or ("-" not in k and s.key.startswith(k + "-")) for k in keys)
    ]
    fleet = any(k in ("S4", "S4-fleet", "S1-c32-shared") for k in keys)
    return chosen, Extras(s4="S4" in keys, fleet=fleet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # kill/SIGTERM stops what the run started too (the finally below), as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    folder: Path = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    scenarios, extras = selected(args.scenarios)
    placement = Placement.choose(not args.no_pin, max(args.workers))
    pki = BenchPKI.create(folder / "pki")
    bench = Bench(args, folder, pki, placement, args.shim.resolve())
    info = machine()
    if args.sidecar_ref:
        sha, bench.src = stack.export_commit(ROOT, args.sidecar_ref, folder)
        info["sidecar_source"] = f"commit {sha} ({args.sidecar_ref})"
    else:
        info["sidecar_source"] = f"working tree ({info['sidecar_commit']})"
    versus_src: Path | None = None
    if args.versus:
        sha_b, versus_src = stack.export_commit(ROOT, args.versus, folder)
        info["versus_source"] = f"commit {sha_b} ({args.versus})"
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; {info['nginx']} "
        f"({info['nginx_openssl']}); {info['envoy']}; {info['wrk']}; Python {info['python']} "
        f"({info['python_openssl']}), aiohttp {info['aiohttp']}, uvloop {info['uvloop']}"
    )
    print(f"sidecar: {info['sidecar_source']}")
    print(
        f"placement: {placement.describe()}; wrk threads {args.wrk_threads or placement.client_threads}; "
        f"{'offered rate ' + format(args.rate, 'g') + ' req/s; ' if args.rate else ''}"
        f"{args.reps} reps x {args.duration:g} s (+{args.warmup:g} s warm-up), workers {','.join(map(str, args.workers))}"
    )
    results: dict[str, Any] = {
        "machine": info,
        "parameters": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "placement": placement.describe(),
        },
        "scenarios": [],
    }
    out_path: Path = args.out or folder / "results.json"
    try:
        bench.start_fixed()
        sc_t = bench.start_arms()
        sc_t = dataclasses.replace(sc_t, name="sidecar", arm="", workers=0)
        ref_t = Target("nginx", bench.ports["reference"], bench.reference)
        info["sidecar_build"] = bench.builds["sidecar"]
        print(f"sidecar build: {info['sidecar_build']}")
        results["checks"] = checks = bench.checks(bench.arms)
        for t in bench.arms:
            print(f"check {t.name}: {json.dumps(checks[t.name])}")
        if checks["problems"]:
            print("checks failed:\n  " + "\n  ".join(checks["problems"]), file=sys.stderr)
            return 1
        if args.idle_connections > 0:
            results["idle_connections"] = bench.idle_probe(bench.arms)
            _write(out_path, results)
        versus: list[Target] = []
        if versus_src is not None:
            other = bench.start_sidecar(
                "sidecar-b",
                "sidecar_b",
                "admin_b",
                src=versus_src,
                env={"SIDECAR_PURE": "1"} if args.versus_pure else None,
            )
            versus.append(
                Target("sidecar-b", bench.ports["sidecar_b"], other, "sidecar-b", bench.primary)
            )
            info["versus_build"] = bench.builds["sidecar-b"]
            print(f"sidecar-b build: {info['versus_build']}")
        for scenario in scenarios:
            if scenario.revocation is not None:
                revoking = bench.start_revocation(scenario.revocation)
                try:
                    check = bench.revocation_check(scenario.revocation)
                    print(f"check sidecar-{scenario.revocation}: {json.dumps(check)}")
                    if check["problems"]:
                        print(
                            "checks failed:\n  " + "\n  ".join(check["problems"]), file=sys.stderr
                        )
                        return 1
                    rev_t = Target(
                        f"sidecar-{scenario.revocation}", bench.ports["sidecar_rev"], revoking
                    )
                    results["scenarios"].append(bench.scenario(scenario, [ref_t, sc_t, rev_t]))
                    results["scenarios"][-1]["revocation_check"] = check
                    # after the runs: every request was checked, none asked the responder again
                    results["scenarios"][-1]["revocation_after"] = bench.revocation_check(
                        scenario.revocation
                    )
                finally:
                    bench.stop(revoking)
                _write(out_path, results)
                continue
            if scenario.logging:
                logger = bench.start_sidecar(
                    "sidecar-info", "sidecar_log", "admin_log", log_level="info"
                )
                loggers = [logger]
                try:
                    targets = [
                        Target("nginx", bench.ports["reference_log"], bench.reference),
                        Target("sidecar", bench.ports["sidecar_log"], logger),
                    ]
                    if versus_src is not None:
                        # what the access log costs each build: both at info and at warning,
                        # interleaved in the same rounds (read the ratios from the summary)
                        bench.port("sidecar_b_log")
                        bench.port("admin_b_log")
                        other_log = bench.start_sidecar(
                            "sidecar-b-info",
                            "sidecar_b_log",
                            "admin_b_log",
                            log_level="info",
                            src=versus_src,
                            env={"SIDECAR_PURE": "1"} if args.versus_pure else None,
                        )
                        loggers.append(other_log)
                        targets += [
                            Target("sidecar-off", sc_t.port, sc_t.proc),
                            Target("sidecar-b-info", bench.ports["sidecar_b_log"], other_log),
                            Target("sidecar-b-off", versus[0].port, versus[0].proc),
                        ]
                    results["scenarios"].append(bench.scenario(scenario, targets))
                finally:
                    for proc in loggers:
                        bench.stop(proc)
            elif scenario.routes is not None:
                results["scenarios"].append(bench.route_scenario(scenario, ref_t))
            elif scenario.front_proxy:
                results["scenarios"].append(bench.front_scenario(scenario, ref_t, sc_t))
            else:
                if scenario.probe_path is not None:
                    bench.probes[scenario.key] = bench.body_probe(scenario)
                results["scenarios"].append(bench.scenario(scenario, [*bench.arms, *versus]))
            _write(out_path, results)
        if args.profile_seconds > 0:
            results["profile"] = bench.profile(sc_t)
            _write(out_path, results)
        if extras.s4:
            results["s4"] = bench.s4()
            _write(out_path, results)
        if extras.fleet:
            results["s1_shared"] = bench.s1_shared(sc_t)
            _write(out_path, results)
            results["s4_fleet"] = bench.s4_fleet()
            _write(out_path, results)
    finally:
        for proc in reversed(bench.procs):
            proc.stop()
    text = report(results)
    print("\n" + text)
    md_path = out_path.with_suffix(".md")
    md_path.write_text(text)
    print(f"results: {out_path} and {md_path}")
    return 0


def report(results: dict[str, Any]) -> str:
    """The Markdown report of a results document (comparisons recomputed from the summaries)."""
    info = results["machine"]
    for s in results["scenarios"]:
        compared(s)
    params = results["parameters"]
    workers = params.get("workers", 1)
    workers_text = ",".join(map(str, workers)) if isinstance(workers, list) else str(workers)
    head = (
        f"{info['date']}, {info['nproc']} CPUs ({info['cpu_model']}"
        f"{', Linux ' + info['kernel'] if 'kernel' in info else ''}), sidecar "
        f"{info.get('sidecar_source', info.get('sidecar_commit'))}"
        f"{' (' + info['sidecar_build'] + ')' if 'sidecar_build' in info else ''}; "
        f"{info['nginx']}"
        f"{' (' + info['nginx_openssl'] + ')' if info.get('nginx_openssl') else ''}, "
        f"{'no Envoy' if params.get('no_envoy') else info.get('envoy', 'no Envoy')}, {info['wrk']}, "
        f"Python {info['python']} ({info.get('python_openssl', '?')}), "
        f"aiohttp {info['aiohttp']}, uvloop {info['uvloop']}; "
        f"{params.get('placement', '')}"
        f"{'; wrk threads ' + str(params['wrk_threads']) if params.get('wrk_threads') else ''}"
        f"{'; offered rate ' + format(params['rate'], 'g') + ' req/s' if params.get('rate') else ''}; "
        f"workers {workers_text}; "
        f"{params.get('reps')} reps x {params.get('duration')} s\n\n"
    )
    arms = any(s.get("arms") for s in results["scenarios"])
    return (
        head
        + (arms_table(results) + "\n" + single_worker_table(results) if arms else "")
        + (idle_text(results["idle_connections"]) if "idle_connections" in results else "")
        + (
            (
                "\nThe sidecar against nginx at "
                f"{legacy_workers(results)} worker(s), with the scenarios' targets:\n\n"
                if arms
                else ""
            )
            + table(results)
            if results["scenarios"]
            else ""
        )
        + versus_text(results)
        + revocation_text(results)
        + "\n"
        + (s4_text(results["s4"]) if "s4" in results else "")
        + (fleet_text(results) if "s4_fleet" in results or "s1_shared" in results else "")
        + "\n"
        + (profile_text(results["profile"]) if "profile" in results else "")
    )


def revocation_text(results: dict[str, Any]) -> str:
    """The revocation rows: the sidecar with revocation on against itself without, same runs."""
    rows = [s for s in results["scenarios"] if s["scenario"].get("revocation")]
    if not rows:
        return ""
    lines = [
        "\nrevocation: the sidecar with it on / the same sidecar without, same runs interleaved:\n",
        "| scenario | without req/s | with req/s | req/s ratio (of pairs) | runs won: without / with "
        "| p99 ms without / with | req per CPU-s without / with (ratio) | requests checked, OCSP questions |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for s in rows:
        names = list(s["targets"])
        plain, revoking = s["summary"][names[1]], s["summary"][names[2]]
        v = s["comparison"].get("versus", {})
        wins = v.get("pair_wins") or ["-", "-"]
        per_cpu = plain["requests_per_proxy_cpu_second"], revoking["requests_per_proxy_cpu_second"]
        efficiency = f" ({per_cpu[1] / per_cpu[0]:.2f})" if per_cpu[0] else ""
        after = s.get("revocation_after", {})
        lines.append(
            f"| {s['scenario']['key']} | {plain['rps']:.0f} | {revoking['rps']:.0f} "
            f"| **{_floor2(v.get('rps_ratio'))}**{_pairs(v.get('rps_ratio_pairs'), floor=True)} "
            f"| {wins[0]} / {wins[1]} | {plain['p99_ms']:.2f} / {revoking['p99_ms']:.2f} "
            f"| {per_cpu[0]:.0f} / {per_cpu[1]:.0f}{efficiency} "
            f"| {after.get('checks_good', 0):.0f}, {after.get('ocsp_questions', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def versus_text(results: dict[str, Any]) -> str:
    """With ``--versus``: each scenario's other build against the sidecar under test."""
    source = results["machine"].get("versus_source")
    if "versus_build" in results["machine"]:
        source = f"{source} ({results['machine']['versus_build']})"
    rows = [
        s
        for s in results["scenarios"]
        if "versus" in s["comparison"] and not s["scenario"].get("revocation")
    ]
    if source is None or not rows:
        return ""
    lines = [
        f"\n`--versus` {source} / the sidecar under test, same runs interleaved:\n",
        "| scenario | its req/s | req/s ratio (of pairs) | runs won: under test / other | p99 ratio |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for s in rows:
        v = s["comparison"]["versus"]
        wins = v.get("pair_wins") or ["-", "-"]
        pairs = v.get("rps_ratio_pairs")
        lines.append(
            f"| {s['scenario']['key']} | {v['rps']:.0f} | {v['rps_ratio']:.3f}"
            f"{f' ({pairs:.3f})' if pairs is not None else ''} | {wins[0]} / {wins[1]} "
            f"| {v['p99_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _write(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
