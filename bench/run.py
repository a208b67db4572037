"""`make bench`: apppass's latency, throughput and memory against the real stack (Dovecot as the
upstream, `apppass serve` in front of it, on loopback), each next to its reference measured in
the same run (Dovecot direct, or raw argon2) and next to its peer, the nginx mail proxy in front
of the same Dovecot (tests/servers/nginx.py). Prints a table and writes it with every run's
figures as JSON.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--only NAME[,NAME]]

Tests (NAME): cold, warm, relay, memory, storm, workers. Every figure is the median of 3 runs,
and each run measures the proxy, its reference and nginx back to back; a ratio is the ratio of
the two medians shown (the per-run ratios are in the JSON). A run that cannot start nginx says
so and measures the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import load  # noqa: E402
from bench import memory as memory_test  # noqa: E402
from bench.codes import raw_rate  # noqa: E402
from bench.stack import CpuMeter, Stack, append_message, dovecot_version  # noqa: E402
from bench.table import table  # noqa: E402
from tests.servers.common import LOOPBACK, ServerError  # noqa: E402
from tests.servers.nginx import NginxMail, nginx_version  # noqa: E402

TESTS = ("cold", "warm", "relay", "memory", "storm", "workers")
RUNS = 3
DEFAULT_JSON = REPO / "bench" / "results.json"

# The warm test's sides, in the order each run measures them, and its client modes.
SIDES = ("proxy", "direct", "nginx")
WARM_MODES = ("plain", "starttls")
# The relay test also runs nginx with this relay buffer (nginx's default is one page): what
# apppass reads at once (Twisted's 64 KiB), so that buffer size is not the whole difference.
NGINX_WIDE_BUFFER = "64k"
# Workers test: passes over the codes before measuring, so that every worker (each with its own
# verified-credential cache, unless they share one) has seen them (a guess: connections are
# spread by the kernel).
WORKER_FILL_PASSES = 4

# Loopback addresses: the legitimate storm-test client, and one storm source per run (a fresh
# address each run, so one run's failures do not block the next run's storm from the start).
LEGIT_SOURCE = "127.0.0.2"
STORM_SOURCES = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
STORM_HEAD_START = 0.2  # seconds between starting the storm and the first legitimate login


@dataclass(frozen=True)
class Profile:
    name: str
    cold_logins: int  # per run, each with a code never used before
    cold_concurrency: int
    raw_seconds: float  # raw argon2-cffi measurement per run
    warm_logins: int  # per run and side
    warm_concurrency: int
    single_logins: int  # logins by one client, per run and side (unloaded latency)
    warm_tls_logins: int  # the same over STARTTLS (a full TLS handshake each)
    single_tls_logins: int
    relay_octets: int
    relay_seconds: float  # FETCHes are repeated for at least this long per run and path
    memory_levels: tuple[int, ...]  # idle sessions at which RSS is read
    memory_tls_levels: tuple[int, ...]  # the same with TLS clients (implicit TLS listener)
    memory_codes: int
    memory_settle: float  # seconds between reaching a level and reading RSS
    storm_seconds: float  # per run, calm and storm each
    storm_rate: float


FULL = Profile(
    "full",
    cold_logins=150,
    cold_concurrency=8,
    raw_seconds=3.0,
    warm_logins=3000,
    warm_concurrency=16,
    single_logins=300,
    warm_tls_logins=1000,
    single_tls_logins=100,
    relay_octets=20_000_000,
    relay_seconds=1.5,
    memory_levels=(1000, 5000, 10000),
    memory_tls_levels=(250, 1000),
    memory_codes=20,
    memory_settle=1.0,
    storm_seconds=12,
    storm_rate=500,
)
QUICK = Profile(
    "quick",
    cold_logins=20,
    cold_concurrency=8,
    raw_seconds=0.7,
    warm_logins=300,
    warm_concurrency=16,
    single_logins=30,
    warm_tls_logins=100,
    single_tls_logins=10,
    relay_octets=20_000_000,
    relay_seconds=0.15,
    memory_levels=(100, 300),
    memory_tls_levels=(50, 150),
    memory_codes=5,
    memory_settle=0.3,
    storm_seconds=2,
    storm_rate=500,
)


def _ratio(a, b):
    """a / b, rounded; None when either is missing or b is 0."""
    return round(a / b, 3) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


class Bench:
    def __init__(self, profile: Profile, tests: list[str]) -> None:
        self.p = profile
        self.tests = tests
        self.stack = Stack(users=40)
        self.results: dict = {}
        self.cold_codes: list[list] = []
        self.memory_codes: list = []
        self.legit = None
        self.relay_code = None
        self.nginx: NginxMail | None = None
        self.nginx_error: str | None = None
        self.runs = RUNS

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        s, p = self.stack, self.p
        log(f"starting Dovecot in {s.dovecot.root}, proxy files in {s.root}")
        s.start()
        wants = set(self.tests)
        n_warmup = 2 * p.cold_concurrency
        n_cold = RUNS * p.cold_logins + n_warmup if wants & {"cold", "warm", "workers"} else 0
        n_mem = p.memory_codes if "memory" in wants else 0
        t0 = time.perf_counter()
        if n_cold:
            codes = s.issue_codes(n_cold, "cold")
            self.warmup_codes, codes = codes[:n_warmup], codes[n_warmup:]
            self.cold_codes = [
                codes[i * p.cold_logins : (i + 1) * p.cold_logins] for i in range(RUNS)
            ]
        if n_mem:
            self.memory_codes = s.issue_codes(n_mem, "memory", users=s.users[-n_mem:])
        if "storm" in wants:
            self.legit = s.issue_codes(1, "storm legit", users=[s.users[1]])[0]
        if "relay" in wants:
            self.relay_code = s.issue_codes(1, "relay", users=[s.relay_user])[0]
            self.relay_octets = append_message(
                LOOPBACK,
                s.dovecot.imap_port,
                s.relay_user,
                s.dovecot.users[s.relay_user],
                p.relay_octets,
            )
        n_codes = n_cold + n_mem + len(wants & {"storm", "relay"})
        log(f"issued {n_codes} codes in {time.perf_counter() - t0:.1f}s")
        self.proxy = s.proxy("plain")
        self.proxy.start()
        log(
            f"apppass pid {self.proxy.pid}, listening on {self.proxy.plain_port} (plain), "
            f"{self.proxy.starttls_port} (STARTTLS), {self.proxy.tls_port} (TLS); upstream "
            f"Dovecot {s.dovecot.imap_port}"
        )
        if wants & {"warm", "relay", "memory", "workers"}:
            self.start_nginx()

    def start_nginx(self) -> None:
        """nginx and its auth service, checked with one login; on failure the reason is logged
        and kept for the table, and every test goes on without nginx."""
        s = self.stack
        try:
            nginx = s.start_nginx()
            check = load.logins(LOOPBACK, nginx.plain_port, s.dovecot_credentials()[:1], 1, 1)
            if check.ok != 1:
                raise ServerError(f"a login through nginx failed: {check.replies}")
        except (ServerError, OSError, RuntimeError) as exc:
            self.nginx_error = str(exc).splitlines()[0][:300]
            log(f"nginx: cannot start, the benchmark goes on without it: {exc}")
            if s.nginx is not None:
                s.nginx.stop()
            return
        self.nginx = nginx
        log(
            f"nginx pids {nginx.pids()} (auth service {nginx.auth.pid}), listening on "
            f"{nginx.plain_port} (plain), {nginx.starttls_port} (STARTTLS), {nginx.tls_port} "
            f"(TLS); upstream Dovecot {s.dovecot.imap_port} (plaintext)"
        )

    # -- 1. cold logins ----------------------------------------------------------------------

    def cold(self) -> dict:
        p, s = self.p, self.stack
        settings = s.settings.codes.argon2
        from proxy.codes.hashing import CodeHasher

        probe = "ABCDEFGHJKLMNPQR"
        encoded = CodeHasher(settings).hash(probe)
        # Warm-up, not measured: argon2's memory is touched once in both processes (the first
        # verifications in a fresh process or thread are slower), the proxy's pools start.
        raw_rate(settings, encoded, probe, 0.5)
        load.logins(
            LOOPBACK,
            self.proxy.plain_port,
            self.warmup_codes,
            len(self.warmup_codes),
            p.cold_concurrency,
        )
        runs: list[dict] = []
        for i in range(RUNS):
            meter = CpuMeter(s, self.proxy).start()
            r = load.logins(
                LOOPBACK,
                self.proxy.plain_port,
                self.cold_codes[i],
                p.cold_logins,
                p.cold_concurrency,
                deadline_s=120,
            )
            cpu = meter.stop()
            raw = raw_rate(settings, encoded, probe, p.raw_seconds)
            runs.append(
                {
                    "proxy_per_s": round(r.rate, 1),
                    "raw_per_s": round(raw, 1),
                    "ratio": round(r.rate / raw, 3),
                    "ok": r.ok,
                    "failed": r.failed,
                    "errors": r.errors,
                    "replies": r.replies,
                    "p50_ms": ms(load.percentile(r.latencies, 50)),
                    "p99_ms": ms(load.percentile(r.latencies, 99)),
                    "cpu_pct": cpu,
                }
            )
            log(
                f"cold run {i + 1}: {r.rate:.1f} logins/s via apppass ({r.ok} ok, "
                f"{r.failed + r.errors} not), raw argon2 {raw:.1f}/s; cpu {cpu}"
            )
        return {
            "params": {
                "argon2": f"t={settings.time_cost} m={settings.memory_kib}KiB "
                f"p={settings.parallelism}",
                "threads": settings.threads,
                "logins_per_run": p.cold_logins,
                "concurrency": p.cold_concurrency,
                "raw_seconds": p.raw_seconds,
            },
            "runs": runs,
            **_medians(runs, ("proxy_per_s", "raw_per_s", "p50_ms", "p99_ms")),
            "cpu_pct": _median_dict([r["cpu_pct"] for r in runs]),
            "ratio": _ratio(
                median([r["proxy_per_s"] for r in runs]), median([r["raw_per_s"] for r in runs])
            ),
        }

    # -- 2. warm logins ----------------------------------------------------------------------

    def _warm_sides(self, mode: str, codes: list, direct_creds: list) -> list[tuple]:
        """(side, port, credentials, proxy process or None) for one client mode."""
        s = self.stack
        tls = mode == "starttls"
        proxy_port = self.proxy.starttls_port if tls else self.proxy.plain_port
        sides = [
            ("proxy", proxy_port, codes, self.proxy),
            ("direct", s.dovecot.imap_port, direct_creds, None),
        ]
        if self.nginx is not None:
            nginx_port = self.nginx.starttls_port if tls else self.nginx.plain_port
            sides.append(("nginx", nginx_port, direct_creds, None))
        return sides

    def warm(self) -> dict:
        p, s = self.p, self.stack
        # Warm-up, not measured: Dovecot starts its imap processes, each user logs in once
        # (directly and through nginx, whose workers then have their pools), and each side
        # does a few STARTTLS logins (the first TLS handshakes of a process are slower).
        users = s.dovecot_credentials()
        load.logins(LOOPBACK, s.dovecot.imap_port, users, 4 * len(users), p.warm_concurrency)
        if self.nginx is not None:
            load.logins(LOOPBACK, self.nginx.plain_port, users, 4 * len(users), p.warm_concurrency)
        for _, port, creds, _ in self._warm_sides("starttls", self.warmup_codes, users):
            load.logins(
                LOOPBACK,
                port,
                creds,
                2 * p.warm_concurrency,
                p.warm_concurrency,
                starttls=s.client_ssl,
            )
        runs = []
        for i in range(RUNS):
            codes = self.cold_codes[i]
            direct_creds = s.dovecot_credentials([c.login for c in codes])
            # Make sure the codes are in the verified-credential cache (they are when the cold
            # test ran just before; with --only warm this pass pays their argon2 once).
            pre = load.logins(
                LOOPBACK, self.proxy.plain_port, codes, len(codes), p.cold_concurrency
            )
            run: dict = {"cache_fill_ok": pre.ok}
            for mode in WARM_MODES:
                tls = s.client_ssl if mode == "starttls" else None
                many = p.warm_tls_logins if tls else p.warm_logins
                few = p.single_tls_logins if tls else p.single_logins
                run[mode] = {}
                for side, port, creds, proxy in self._warm_sides(mode, codes, direct_creds):
                    meter = CpuMeter(s, proxy).start()
                    r = load.logins(LOOPBACK, port, creds, many, p.warm_concurrency, starttls=tls)
                    cpu = meter.stop()
                    one = load.logins(LOOPBACK, port, creds, few, 1, starttls=tls)
                    run[mode][side] = {
                        "per_s": round(r.rate, 1),
                        "ok": r.ok,
                        "not_ok": r.failed + r.errors,
                        "replies": r.replies,
                        "p50_ms": ms(load.percentile(r.latencies, 50)),
                        "p99_ms": ms(load.percentile(r.latencies, 99)),
                        "single_p50_ms": ms(load.percentile(one.latencies, 50)),
                        "single_p99_ms": ms(load.percentile(one.latencies, 99)),
                        "single_not_ok": one.failed + one.errors,
                        "cpu_pct": cpu,
                    }
                x = run[mode]
                x["ratio"] = _ratio(x["proxy"]["per_s"], x["direct"]["per_s"])
                if "nginx" in x:
                    x["ratio_nginx"] = _ratio(x["proxy"]["per_s"], x["nginx"]["per_s"])
                log(
                    f"warm {mode} run {i + 1}: "
                    + "; ".join(
                        f"{side} {x[side]['per_s']}/s p50 {x[side]['p50_ms']} ms "
                        f"p99 {x[side]['p99_ms']} ms, 1 client p50 {x[side]['single_p50_ms']} ms"
                        f" ({x[side]['not_ok'] + x[side]['single_not_ok']} not ok; "
                        f"cpu {x[side]['cpu_pct']})"
                        for side in SIDES
                        if side in x
                    )
                )
            runs.append(run)
        out: dict = {
            "params": {
                "logins_per_run": p.warm_logins,
                "starttls_logins_per_run": p.warm_tls_logins,
                "concurrency": p.warm_concurrency,
                "single_client_logins": p.single_logins,
                "starttls_single_client_logins": p.single_tls_logins,
                "upstream": "plaintext (Dovecot's imap port) for apppass and nginx",
            },
            "runs": runs,
        }
        keys = ("per_s", "p50_ms", "p99_ms", "single_p50_ms", "single_p99_ms")
        for mode in WARM_MODES:
            sides = [side for side in SIDES if side in runs[0][mode]]
            x = {
                side: {k: median([r[mode][side][k] for r in runs]) for k in keys} for side in sides
            }
            x["cpu_pct"] = {
                side: _median_dict([r[mode][side]["cpu_pct"] for r in runs]) for side in sides
            }
            x["ratio"] = _ratio(x["proxy"]["per_s"], x["direct"]["per_s"])
            if "nginx" in x:
                x["ratio_nginx"] = _ratio(x["proxy"]["per_s"], x["nginx"]["per_s"])
            out[mode] = x
        return out

    # -- 3. relay throughput -----------------------------------------------------------------

    def relay(self) -> dict:
        p, s = self.p, self.stack
        tls_proxy = s.proxy("tls-upstream", upstream_tls="implicit")
        tls_proxy.start()
        user, code = s.relay_user, self.relay_code.secret
        password = s.dovecot.users[user]
        paths: dict[str, dict] = {
            "plain": {
                "proxy": (self.proxy, self.proxy.plain_port, code, None),
                "direct": (None, s.dovecot.imap_port, password, None),
            },
            "tls": {
                "proxy": (tls_proxy, tls_proxy.tls_port, code, s.client_ssl),
                "direct": (None, s.dovecot.imaps_port, password, s.client_ssl),
            },
        }
        # nginx only in plaintext: it has no TLS to the upstream. Besides its default relay
        # buffer (one page), nginx with a 64 KiB one, what apppass reads at once.
        wide = None
        if self.nginx is not None:
            paths["plain"]["nginx"] = (None, self.nginx.plain_port, password, None)
            wide = s.nginx_variant(proxy_buffer=NGINX_WIDE_BUFFER)
            try:
                wide.start()
                paths["plain"]["nginx_64k"] = (None, wide.plain_port, password, None)
            except (ServerError, OSError) as exc:
                log(f"relay: nginx with proxy_buffer {NGINX_WIDE_BUFFER} did not start: {exc}")
        runs = []
        try:
            for i in range(RUNS):
                run: dict = {}
                for mode, sides in paths.items():
                    run[mode] = {}
                    for side, (proxy, port, secret, ctx) in sides.items():
                        meter = CpuMeter(s, proxy, wide if side == "nginx_64k" else None).start()
                        r = load.fetch(LOOPBACK, port, user, secret, p.relay_seconds, ssl_ctx=ctx)
                        run[mode][side] = {
                            "mb_per_s": round(r.mb_per_s, 1),
                            "octets": r.octets,
                            "fetches": len(r.seconds),
                            "cpu_pct": meter.stop(),
                        }
                    x = run[mode]
                    x["ratio"] = _ratio(x["proxy"]["mb_per_s"], x["direct"]["mb_per_s"])
                    if "nginx" in x:
                        x["ratio_nginx"] = _ratio(x["proxy"]["mb_per_s"], x["nginx"]["mb_per_s"])
                runs.append(run)
                log(
                    f"relay run {i + 1}: "
                    + "; ".join(
                        f"{mode} "
                        + ", ".join(
                            f"{side} {run[mode][side]['mb_per_s']} MB/s "
                            f"(cpu {run[mode][side]['cpu_pct']})"
                            for side in (*SIDES, "nginx_64k")
                            if side in run[mode]
                        )
                        for mode in paths
                    )
                )
        finally:
            tls_proxy.stop()
            if wide is not None:
                wide.cleanup()
        out: dict = {
            "params": {
                "message_octets": self.relay_octets,
                "min_seconds_per_path": p.relay_seconds,
                "tls": "client-apppass implicit TLS, apppass-Dovecot implicit TLS (imaps)",
                "nginx": "plaintext only (nginx has no upstream TLS)",
                "nginx_64k": f"nginx with proxy_buffer {NGINX_WIDE_BUFFER}",
            },
            "runs": runs,
        }
        for mode, sides in paths.items():
            m: dict = {side: median([r[mode][side]["mb_per_s"] for r in runs]) for side in sides}
            m["cpu_pct"] = {
                side: _median_dict([r[mode][side]["cpu_pct"] for r in runs]) for side in sides
            }
            m["ratio"] = _ratio(m["proxy"], m["direct"])
            if "nginx" in sides:
                m["ratio_nginx"] = _ratio(m["proxy"], m["nginx"])
            if "nginx_64k" in sides:
                m["ratio_nginx_64k"] = _ratio(m["proxy"], m["nginx_64k"])
            out[mode] = m
        return out

    # -- 4. memory ---------------------------------------------------------------------------

    def memory(self) -> dict:
        return memory_test.measure(self)

    # -- 5. storm ----------------------------------------------------------------------------

    def storm(self) -> dict:
        p, s = self.p, self.stack
        port = self.proxy.plain_port
        legit = self.legit
        warm = load.legit_logins(LOOPBACK, port, legit.login, legit.secret, 1, source=LEGIT_SOURCE)
        if warm.ok != 1:
            raise RuntimeError(f"storm: the legitimate client cannot log in: {warm.replies}")
        runs = []
        for i in range(RUNS):
            calm = load.legit_logins(
                LOOPBACK, port, legit.login, legit.secret, p.storm_seconds, source=LEGIT_SOURCE
            )
            source = STORM_SOURCES[i]
            mark = len(self.proxy.audit_lines())
            drops0 = _listen_overflows()
            meter = CpuMeter(s, self.proxy).start()
            gen = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "bench" / "load.py"),
                    "storm",
                    "--port",
                    str(port),
                    "--rate",
                    str(p.storm_rate),
                    "--seconds",
                    str(p.storm_seconds + 0.5),
                    "--source",
                    source,
                    "--login",
                    s.users[0],
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                time.sleep(
                    STORM_HEAD_START
                )  # the storm is under way before the first measured login
                stormy = load.legit_logins(
                    LOOPBACK, port, legit.login, legit.secret, p.storm_seconds, source=LEGIT_SOURCE
                )
                out, _ = gen.communicate(timeout=p.storm_seconds + 60)
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
            flood = json.loads(out)
            cpu = meter.stop(extra_generator_cpu=flood["generator_cpu_s"])
            flood["listen_queue_overflows"] = _listen_overflows() - drops0
            refusals: dict[str, int] = {}
            first = first_limit = last_pool_full = None
            for line in self.proxy.audit_lines()[mark:]:
                event = json.loads(line)
                if event.get("event") == "auth" and event.get("client") == source:
                    key = event.get("refusal") or event.get("result")
                    refusals[key] = refusals.get(key, 0) + 1
                    if key == "temporary":
                        why = f"temporary: {event.get('reason')}"
                        refusals[why] = refusals.get(why, 0) + 1
                    first = first or _ts(event["ts"])
                    if key == "limit" and first_limit is None:
                        first_limit = _ts(event["ts"])
                    if event.get("reason") == "verification pool full":
                        last_pool_full = _ts(event["ts"])
            half = p.storm_seconds / 2
            run = {
                "calm": _legit(calm, half),
                "storm": _legit(stormy, half),
                "flood": flood,
                "audit_refusals": refusals,
                "limiter_engaged_after_s": round(first_limit - first, 3) if first_limit else None,
                "pool_full_until_s": round(last_pool_full - first, 3) if last_pool_full else None,
                "cpu_pct": cpu,
            }
            run["p50_ratio"] = round(run["storm"]["p50_ms"] / run["calm"]["p50_ms"], 3)
            run["p99_ratio"] = round(run["storm"]["p99_ms"] / run["calm"]["p99_ms"], 3)
            runs.append(run)
            log(
                f"storm run {i + 1}: legit p50/p99 "
                f"{run['calm']['p50_ms']}/{run['calm']['p99_ms']} ms "
                f"calm, {run['storm']['p50_ms']}/{run['storm']['p99_ms']} ms in the storm "
                f"({run['storm']['later_p99_ms']} ms after its first second; "
                f"{run['storm']['not_ok']} not ok); flood {flood['rate']}/s {flood['outcomes']}, "
                f"limiter engaged after {run['limiter_engaged_after_s']} s, "
                f"argon2 pool full until {run['pool_full_until_s']} s; "
                f"cpu {cpu}"
            )
        keys = ("p50_ms", "p99_ms", "later_p99_ms")
        calm = {k: median([r["calm"][k] for r in runs]) for k in keys}
        stormy = {k: median([r["storm"][k] for r in runs]) for k in keys}
        # Legitimate logins slower than twice the calm p99, and when (seconds after the storm
        # started; the legitimate client starts STORM_HEAD_START after it).
        slow_limit = 2 * (calm["p99_ms"] or 0)
        samples = [(t + STORM_HEAD_START, lat) for r in runs for t, lat in r["storm"]["samples"]]
        slow = [(round(t, 1), lat) for t, lat in samples if lat is None or lat > slow_limit]
        return {
            "params": {
                "rate": p.storm_rate,
                "seconds": p.storm_seconds,
                "legit_source": LEGIT_SOURCE,
                "storm_sources": STORM_SOURCES[:RUNS],
                "failure_delay": "0s",
                "ip_failures_per_minute": s.settings.auth.ip_failures_per_minute,
            },
            "runs": runs,
            "calm": calm,
            "storm": stormy,
            "cpu_pct": _median_dict([r["cpu_pct"] for r in runs]),
            "p50_ratio": _ratio(stormy["p50_ms"], calm["p50_ms"]),
            "p99_ratio": _ratio(stormy["p99_ms"], calm["p99_ms"]),
            "later_p99_ratio": _ratio(stormy["later_p99_ms"], calm["later_p99_ms"]),
            "slow_logins": {
                "limit_ms": round(slow_limit, 2),
                "count": len(slow),
                "of": len(samples),
                "at_s_and_ms": slow,
            },
            "limiter_engaged_after_s": median([r["limiter_engaged_after_s"] for r in runs]),
            "pool_full_until_s": median([r["pool_full_until_s"] for r in runs]),
            "legit_not_ok": sum(r["storm"]["not_ok"] for r in runs),
            "flood": {
                "rate": median([r["flood"]["rate"] for r in runs]),
                "listen_queue_overflows": median(
                    [r["flood"]["listen_queue_overflows"] for r in runs]
                ),
                **{
                    k: median([r["flood"]["outcomes"][k] for r in runs])
                    for k in ("checked", "limited", "temporary", "error")
                },
            },
        }

    # -- 6. workers (the hook for `serve.workers`) ---------------------------------------------

    def workers(self) -> dict:
        """Warm logins/s (plaintext, 16 clients) with 1, 2 and N `serve.workers` (N = cores),
        each next to nginx: the scaling per core. HOOK: runs by itself once apppass's config
        takes `serve.workers` (Stack.serve_workers_supported); until then it says so."""
        p, s = self.p, self.stack
        if not s.serve_workers_supported():
            why = "skipped: this apppass has no serve.workers yet"
            log(f"workers: {why}")
            return {"skipped": why}
        counts = sorted({1, 2, os.cpu_count() or 2})
        proxies = {n: s.proxy(f"workers-{n}", workers=n) for n in counts}
        runs = []
        for i in range(RUNS):
            codes = self.cold_codes[i]
            run: dict = {}
            for n, proxy in proxies.items():
                proxy.start()
                try:
                    load.logins(
                        LOOPBACK,
                        proxy.plain_port,
                        codes,
                        WORKER_FILL_PASSES * len(codes),
                        p.cold_concurrency,
                    )
                    meter = CpuMeter(s, proxy).start()
                    r = load.logins(
                        LOOPBACK, proxy.plain_port, codes, p.warm_logins, p.warm_concurrency
                    )
                    run[str(n)] = {
                        "per_s": round(r.rate, 1),
                        "not_ok": r.failed + r.errors,
                        "p99_ms": ms(load.percentile(r.latencies, 99)),
                        "cpu_pct": meter.stop(),
                    }
                finally:
                    proxy.stop()
            if self.nginx is not None:
                creds = s.dovecot_credentials([c.login for c in codes])
                meter = CpuMeter(s, None).start()
                r = load.logins(
                    LOOPBACK, self.nginx.plain_port, creds, p.warm_logins, p.warm_concurrency
                )
                run["nginx"] = {"per_s": round(r.rate, 1), "cpu_pct": meter.stop()}
            runs.append(run)
            log(
                f"workers run {i + 1}: " + ", ".join(f"{k}: {v['per_s']}/s" for k, v in run.items())
            )
        per_s = {str(n): median([r[str(n)]["per_s"] for r in runs]) for n in counts}
        nginx = median([r["nginx"]["per_s"] for r in runs]) if self.nginx is not None else None
        return {
            "params": {"counts": counts, "logins_per_run": p.warm_logins},
            "runs": runs,
            "per_s": per_s,
            "nginx_per_s": nginx,
            "ratio_nginx": {n: _ratio(v, nginx) for n, v in per_s.items()},
        }

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> dict:
        started = time.perf_counter()
        self.loadavg_at_start = os.getloadavg()
        if self.loadavg_at_start[0] > 0.5:
            log(
                f"warning: the machine is busy before the benchmark (load average "
                f"{self.loadavg_at_start[0]:.2f}): figures will be lower and noisier"
            )
        try:
            self.setup()
            for name in TESTS:
                if name in self.tests:
                    t0 = time.perf_counter()
                    log(f"--- {name} ---")
                    self.results[name] = getattr(self, name)()
                    self.results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            self.stack.cleanup()
        meta = self.meta(time.perf_counter() - started)
        meta["max_other_cpu_pct"] = max(_walk_other(self.results), default=None)
        return {"meta": meta, "results": self.results}

    def meta(self, seconds: float) -> dict:
        a = self.stack.settings.codes.argon2
        return {
            "profile": self.p.name,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": _commit(),
            "loadavg_at_start": self.loadavg_at_start,
            "seconds": round(seconds, 1),
            "runs": RUNS,
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "dovecot": dovecot_version(),
            "nginx": nginx_version(),
            "nginx_error": self.nginx_error,
            "kernel": platform.release(),
            "argon2": f"t={a.time_cost} m={a.memory_kib}KiB p={a.parallelism} threads={a.threads}",
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "profile_params": asdict(self.p),
        }


def _legit(r: load.LoginResult, skip_s: float) -> dict:
    """Latency percentiles of the legitimate client; `later_*`: only the logins started after
    `skip_s` seconds (in a storm: once the limiter has caught up and the backlog of
    verifications it let through has drained: the steady state)."""
    later = [lat for t, lat in r.samples if lat is not None and t >= skip_s]
    return {
        "p50_ms": ms(load.percentile(r.latencies, 50)),
        "p99_ms": ms(load.percentile(r.latencies, 99)),
        "max_ms": ms(max(r.latencies, default=0)),
        "later_p99_ms": ms(load.percentile(later, 99)),
        "ok": r.ok,
        "not_ok": r.failed + r.errors,
        "replies": r.replies,
        "samples": [(round(t, 3), None if lat is None else ms(lat)) for t, lat in r.samples],
    }


def _listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs dropped because a listener's accept queue was full (any
    listener on this machine; during the storm, the proxy's)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=True):  # header, values, ...
        if head.startswith("TcpExt:"):
            return dict(zip(head.split()[1:], map(int, values.split()[1:]), strict=True)).get(
                "ListenOverflows", 0
            )
    return 0


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def _medians(runs: list[dict], keys) -> dict:
    return {k: median([r[k] for r in runs]) for k in keys}


def _median_dict(dicts: list[dict]) -> dict:
    """Key by key, the median of the figures of several runs (CPU shares)."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: median([d.get(k) for d in dicts]) for k in keys}


def _walk_other(node):
    """Every `other` CPU figure (percent of a core) in the results: busy time on the machine that
    neither the proxy, Dovecot nor the generator used (softirq, and whatever else ran)."""
    if isinstance(node, dict):
        if "other" in node and isinstance(node["other"], (int, float)) and "generator" in node:
            yield node["other"]
        for value in node.values():
            yield from _walk_other(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_other(value)


def _commit() -> str:
    """The commit measured (read-only git), with "+changes" when proxy/ differs from it."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "proxy")
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+changes" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def raise_nofile() -> tuple[int, int]:
    """Soft descriptor limit up to the hard one (the proxy and Dovecot inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts: under a minute")
    ap.add_argument(
        "--json", default=str(DEFAULT_JSON), help=f"where to write results (default {DEFAULT_JSON})"
    )
    ap.add_argument("--only", action="append", help=f"run only these tests: {', '.join(TESTS)}")
    a = ap.parse_args(argv)
    tests = list(TESTS)
    if a.only:
        tests = [t.strip() for item in a.only for t in item.split(",") if t.strip()]
        unknown = [t for t in tests if t not in TESTS]
        if unknown:
            ap.error(f"unknown test {', '.join(unknown)}; choose from {', '.join(TESTS)}")
    soft, hard = raise_nofile()
    log(f"RLIMIT_NOFILE {soft}/{hard}")
    data = Bench(QUICK if a.quick else FULL, tests).run()
    text = table(data)
    data["table"] = text
    Path(a.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(text)
    print(f"\n(JSON with every run: {a.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
