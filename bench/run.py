"""`make bench`: apppass's latency, throughput and memory against the real stack (Dovecot as the
upstream, `apppass serve` in front of it, on loopback), each next to its reference measured in
the same run. Prints a table and writes it with every run's figures as JSON.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--only NAME[,NAME]]

Tests (NAME): cold, warm, relay, memory, storm. Every figure is the median of 3 runs, and each
run measures the proxy and its reference back to back; a ratio is the ratio of the two medians
shown (the per-run ratios are in the JSON).
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
from bench.codes import raw_rate  # noqa: E402
from bench.stack import CpuMeter, Stack, append_message, dovecot_version  # noqa: E402
from tests.servers.common import LOOPBACK  # noqa: E402

TESTS = ("cold", "warm", "relay", "memory", "storm")
RUNS = 3
DEFAULT_JSON = REPO / "bench" / "results.json"

# Targets from the issue: (as shown in the table, whether a figure meets it).
TARGETS = {
    "cold": ("ratio >= 0.9", lambda r: r >= 0.9),
    "warm": ("ratio >= 0.6", lambda r: r >= 0.6),
    "relay": ("ratio >= 0.8", lambda r: r >= 0.8),
    "memory": ("<= 24 KiB", lambda kib: kib <= 24),
    "storm": ("p99 <= 2x calm", lambda r: r <= 2.0),
}

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
    relay_octets=20_000_000,
    relay_seconds=0.15,
    memory_levels=(100, 300),
    memory_tls_levels=(),
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

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        s, p = self.stack, self.p
        log(f"starting Dovecot in {s.dovecot.root}, proxy files in {s.root}")
        s.start()
        wants = set(self.tests)
        n_warmup = 2 * p.cold_concurrency
        n_cold = RUNS * p.cold_logins + n_warmup if wants & {"cold", "warm"} else 0
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
            f"{self.proxy.tls_port} (TLS); upstream Dovecot {s.dovecot.imap_port}"
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
        runs = []
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
            "ratio": _ratio(
                median([r["proxy_per_s"] for r in runs]), median([r["raw_per_s"] for r in runs])
            ),
        }

    # -- 2. warm logins ----------------------------------------------------------------------

    def warm(self) -> dict:
        p, s = self.p, self.stack
        # Warm-up, not measured: Dovecot starts its imap processes, each user logs in once.
        load.logins(
            LOOPBACK,
            s.dovecot.imap_port,
            s.dovecot_credentials(),
            4 * len(s.users),
            p.warm_concurrency,
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
            run = {"cache_fill_ok": pre.ok}
            for side, port, creds, proxy in (
                ("proxy", self.proxy.plain_port, codes, self.proxy),
                ("direct", s.dovecot.imap_port, direct_creds, None),
            ):
                meter = CpuMeter(s, proxy).start()
                r = load.logins(LOOPBACK, port, creds, p.warm_logins, p.warm_concurrency)
                cpu = meter.stop()
                one = load.logins(LOOPBACK, port, creds, p.single_logins, 1)
                run[side] = {
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
            run["ratio"] = round(run["proxy"]["per_s"] / run["direct"]["per_s"], 3)
            runs.append(run)
            log(
                f"warm run {i + 1}: apppass {run['proxy']['per_s']}/s "
                f"p50 {run['proxy']['p50_ms']} ms "
                f"p99 {run['proxy']['p99_ms']} ms (cpu {run['proxy']['cpu_pct']}); direct "
                f"{run['direct']['per_s']}/s p50 {run['direct']['p50_ms']} ms p99 "
                f"{run['direct']['p99_ms']} ms (cpu {run['direct']['cpu_pct']})"
            )
        return {
            "params": {
                "logins_per_run": p.warm_logins,
                "concurrency": p.warm_concurrency,
                "single_client_logins": p.single_logins,
            },
            "runs": runs,
            **_side_medians(
                runs,
                ("proxy", "direct"),
                ("per_s", "p50_ms", "p99_ms", "single_p50_ms", "single_p99_ms"),
            ),
            "ratio": _ratio(
                median([r["proxy"]["per_s"] for r in runs]),
                median([r["direct"]["per_s"] for r in runs]),
            ),
        }

    # -- 3. relay throughput -----------------------------------------------------------------

    def relay(self) -> dict:
        p, s = self.p, self.stack
        tls_proxy = s.proxy("tls-upstream", upstream_tls="implicit")
        tls_proxy.start()
        user, code = s.relay_user, self.relay_code.secret
        password = s.dovecot.users[user]
        paths = {
            "plain": {
                "proxy": (self.proxy, self.proxy.plain_port, code, None),
                "direct": (None, s.dovecot.imap_port, password, None),
            },
            "tls": {
                "proxy": (tls_proxy, tls_proxy.tls_port, code, s.client_ssl),
                "direct": (None, s.dovecot.imaps_port, password, s.client_ssl),
            },
        }
        runs = []
        try:
            for i in range(RUNS):
                run = {}
                for mode, sides in paths.items():
                    run[mode] = {}
                    for side, (proxy, port, secret, ctx) in sides.items():
                        meter = CpuMeter(s, proxy).start()
                        r = load.fetch(LOOPBACK, port, user, secret, p.relay_seconds, ssl_ctx=ctx)
                        run[mode][side] = {
                            "mb_per_s": round(r.mb_per_s, 1),
                            "octets": r.octets,
                            "fetches": len(r.seconds),
                            "cpu_pct": meter.stop(),
                        }
                    run[mode]["ratio"] = round(
                        run[mode]["proxy"]["mb_per_s"] / run[mode]["direct"]["mb_per_s"], 3
                    )
                runs.append(run)
                log(
                    f"relay run {i + 1}: plain {run['plain']['proxy']['mb_per_s']} vs "
                    f"{run['plain']['direct']['mb_per_s']} MB/s "
                    f"(cpu {run['plain']['proxy']['cpu_pct']}); "
                    f"TLS {run['tls']['proxy']['mb_per_s']} vs "
                    f"{run['tls']['direct']['mb_per_s']} MB/s "
                    f"(cpu {run['tls']['proxy']['cpu_pct']})"
                )
        finally:
            tls_proxy.stop()
        out = {
            "params": {
                "message_octets": self.relay_octets,
                "min_seconds_per_path": p.relay_seconds,
                "tls": "client-apppass implicit TLS, apppass-Dovecot implicit TLS (imaps)",
            },
            "runs": runs,
        }
        for mode in paths:
            out[mode] = {
                side: median([r[mode][side]["mb_per_s"] for r in runs])
                for side in ("proxy", "direct")
            }
            out[mode]["ratio"] = _ratio(out[mode]["proxy"], out[mode]["direct"])
        return out

    # -- 4. memory ---------------------------------------------------------------------------

    def memory(self) -> dict:
        p, s = self.p, self.stack
        out = {
            "params": {
                "levels": p.memory_levels,
                "tls_levels": p.memory_tls_levels,
                "codes": p.memory_codes,
                "upstream": "plain (Dovecot imap port)",
            }
        }
        for mode, levels, port_of, ctx in (
            ("plain", p.memory_levels, lambda x: x.plain_port, None),
            ("tls", p.memory_tls_levels, lambda x: x.tls_port, s.client_ssl),
        ):
            if not levels:
                continue
            runs = [
                self._memory_run(i, mode, levels, port_of(self.proxy), ctx) for i in range(RUNS)
            ]
            out[mode] = {
                "runs": runs,
                "reached": median([r["reached"] for r in runs]),
                "started_mib": median([r["started_kib"] / 1024 for r in runs]),
                "baseline_mib": median([r["baseline_kib"] / 1024 for r in runs]),
                "rss_mib": {
                    str(lv): median(
                        [
                            r["rss_kib"].get(str(lv), 0) / 1024
                            for r in runs
                            if str(lv) in r["rss_kib"]
                        ]
                    )
                    for lv in levels
                },
                "kib_per_session": median([r["kib_per_session"] for r in runs]),
                "dovecot_kib_per_session": median([r["dovecot_kib_per_session"] for r in runs]),
                "dovecot_pss_mib": {
                    lv: median([r["dovecot_pss_kib"].get(lv, 0) / 1024 for r in runs])
                    for lv in runs[0]["dovecot_pss_kib"]
                },
                "kib_per_session_from_start": median(
                    [r["kib_per_session_from_start"] for r in runs]
                ),
            }
        # Leave a fresh proxy for whatever runs next.
        self.proxy.restart()
        return out

    def _memory_run(self, i: int, mode: str, levels, port: int, ctx) -> dict:
        s = self.stack
        # Both restarted: Dovecot's imap processes keep the memory of sessions that ended, so
        # its figures (the reference) are only meaningful from fresh processes.
        self.proxy.stop()
        s.dovecot.restart()
        self.proxy.start()
        time.sleep(self.p.memory_settle)
        start_kib = self.proxy.rss_kib()
        # Warm-up: every code verified once (cache), the thread pools started.
        pre = load.logins(LOOPBACK, port, self.memory_codes, len(self.memory_codes), 4, ssl_ctx=ctx)
        if pre.ok != len(self.memory_codes):
            raise RuntimeError(f"memory warm-up failed: {pre.replies}")
        time.sleep(self.p.memory_settle)
        base_kib, base_fds = self.proxy.rss_kib(), self.proxy.fd_count()
        soft, _ = self.proxy.nofile_limit()
        # Two descriptors per session (client and upstream) on top of what the proxy holds idle.
        room = (soft - base_fds - 32) // 2
        pool = load.SessionPool(LOOPBACK, port, self.memory_codes, concurrency=32, ssl_ctx=ctx)
        rss, opened, fds, dovecot_pss = {}, {}, {}, {}
        try:
            for level in levels:
                target = min(level, room)
                r = pool.grow_to(target)
                if pool.open < target:
                    log(f"memory: only {pool.open} of {target} sessions opened: {r.replies}")
                pool.idle(self.p.memory_settle)
                rss[str(level)] = self.proxy.rss_kib()
                fds[str(level)] = self.proxy.fd_count()
                dovecot_pss[str(level)] = s.dovecot_pss_kib()
                opened[str(level)] = pool.open
                if target < level:
                    log(
                        f"memory: {level:,} sessions need {2 * level + base_fds:,} descriptors; "
                        f"the limit is {soft:,}: measured at {target:,}"
                    )
                    break
        finally:
            pool.close()
        first, last = str(levels[0]), list(rss)[-1]
        n_first, n_last = opened[first], opened[last]
        slope = (rss[last] - rss[first]) / (n_last - n_first) if n_last > n_first else None
        run = {
            "mode": mode,
            "started_kib": start_kib,
            "baseline_kib": base_kib,
            "baseline_fds": base_fds,
            "nofile": soft,
            "rss_kib": rss,
            "opened": opened,
            "fds": fds,
            "reached": n_last,
            "kib_per_session": round(slope, 2) if slope is not None else None,
            "kib_per_session_from_start": round((rss[last] - base_kib) / max(1, n_last), 2),
            "dovecot_pss_kib": dovecot_pss,
            "dovecot_kib_per_session": round(
                (dovecot_pss[last] - dovecot_pss[first]) / (n_last - n_first), 2
            )
            if n_last > n_first
            else None,
        }
        log(
            f"memory {mode} run {i + 1}: {start_kib / 1024:.1f} MiB at start, after the first "
            f"logins {base_kib / 1024:.1f} MiB, "
            + ", ".join(f"{k}: {v / 1024:.1f} MiB" for k, v in rss.items())
            + f" ({n_last} sessions open at the top); {run['kib_per_session']} KiB/session"
        )
        return run

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


def _side_medians(runs: list[dict], sides, keys) -> dict:
    return {side: {k: median([r[side][k] for r in runs]) for k in keys} for side in sides}


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


# -- the table -------------------------------------------------------------------------------


def table(data: dict) -> str:
    m, res = data["meta"], data["results"]
    rows: list[tuple] = [("measure", "apppass", "reference", "ratio", "target", "")]

    def status(test, value):
        if value is None:
            return ""
        return "met" if TARGETS[test][1](value) else "NOT met"

    def f(x, digits=1):
        return "-" if x is None else f"{x:,.{digits}f}"

    if "cold" in res:
        c = res["cold"]
        rows.append(
            (
                "cold logins/s (new code each)",
                f(c["proxy_per_s"]),
                f"{f(c['raw_per_s'])} raw argon2",
                f(c["ratio"], 2),
                TARGETS["cold"][0],
                status("cold", c["ratio"]),
            )
        )
    if "warm" in res:
        w = res["warm"]
        conc = w["params"]["concurrency"]
        rows.append(
            (
                f"warm logins/s ({conc} clients)",
                f(w["proxy"]["per_s"]),
                f"{f(w['direct']['per_s'])} Dovecot",
                f(w["ratio"], 2),
                TARGETS["warm"][0],
                status("warm", w["ratio"]),
            )
        )
        for key, label in (
            ("p50_ms", f"warm login p50 ms ({conc} clients)"),
            ("p99_ms", f"warm login p99 ms ({conc} clients)"),
            ("single_p50_ms", "warm login p50 ms (1 client)"),
            ("single_p99_ms", "warm login p99 ms (1 client)"),
        ):
            a, b = w["proxy"][key], w["direct"][key]
            rows.append(
                (label, f(a, 2), f"{f(b, 2)} Dovecot", f"{a / b:.2f}x" if b else "-", "", "")
            )
    if "relay" in res:
        r = res["relay"]
        mb = r["params"]["message_octets"] / 1e6
        for mode, label in (("plain", "plaintext"), ("tls", "TLS both sides")):
            rows.append(
                (
                    f"relay MB/s, {mb:.0f} MB FETCH, {label}",
                    f(r[mode]["proxy"]),
                    f"{f(r[mode]['direct'])} Dovecot",
                    f(r[mode]["ratio"], 2),
                    TARGETS["relay"][0],
                    status("relay", r[mode]["ratio"]),
                )
            )
    if "memory" in res:
        mem = res["memory"]
        for mode, label in (("plain", "plaintext"), ("tls", "TLS clients")):
            if mode not in mem:
                continue
            x = mem[mode]
            levels = list(x["rss_mib"])
            reached = int(x["reached"])
            shown = [f"{int(lv):,}" for lv in levels[:-1]] + [f"{min(reached, int(levels[-1])):,}"]
            rows.append(
                (
                    f"proxy RSS MiB at start / after 1st logins ({label})",
                    f"{x['started_mib']:.1f} / {x['baseline_mib']:.1f}",
                    "",
                    "",
                    "",
                    "",
                )
            )
            dovecot = x.get("dovecot_pss_mib", {}).get(levels[-1])
            rows.append(
                (
                    f"proxy RSS MiB at {' / '.join(shown)} idle sessions ({label})",
                    " / ".join(f"{v:.1f}" for v in x["rss_mib"].values()),
                    f"Dovecot PSS {dovecot:,.0f} MiB at the top" if dovecot else "",
                    "",
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"KiB per idle session ({label})",
                    f(x["kib_per_session"]),
                    f"{f(x.get('dovecot_kib_per_session'))} Dovecot",
                    "",
                    TARGETS["memory"][0] if mode == "plain" else "",
                    status("memory", x["kib_per_session"]) if mode == "plain" else "",
                )
            )
    if "storm" in res:
        st = res["storm"]
        rate = st["params"]["rate"]
        rows.append(
            (
                f"storm: legit p50 ms ({rate:.0f} bad/s)",
                f(st["storm"]["p50_ms"], 2),
                f"{f(st['calm']['p50_ms'], 2)} calm",
                f"{st['p50_ratio']:.2f}x",
                "",
                "",
            )
        )
        rows.append(
            (
                f"storm: legit p99 ms ({rate:.0f} bad/s)",
                f(st["storm"]["p99_ms"], 2),
                f"{f(st['calm']['p99_ms'], 2)} calm",
                f"{st['p99_ratio']:.2f}x",
                "<= 2x calm",
                status("storm", st["p99_ratio"]),
            )
        )
        rows.append(
            (
                "storm: legit p99 ms, 2nd half of the storm",
                f(st["storm"]["later_p99_ms"], 2),
                f"{f(st['calm']['later_p99_ms'], 2)} calm",
                f"{st['later_p99_ratio']:.2f}x" if st["later_p99_ratio"] else "-",
                "",
                "",
            )
        )
        sl = st["slow_logins"]
        when = ", ".join(
            f"{lat:.0f} ms at {t:.1f} s" if lat is not None else f"failed at {t:.1f} s"
            for t, lat in sl["at_s_and_ms"][:4]
        )
        rows.append(
            (
                f"storm: legit logins > 2x calm p99 ({sl['limit_ms']:.0f} ms), all runs",
                f"{sl['count']} of {sl['of']}",
                when,
                "",
                "",
                "",
            )
        )
        fl = st["flood"]
        rows.append(
            (
                "storm: the flood's outcome per run",
                f"{fl['rate']:.0f}/s sent",
                (
                    f"{fl['checked']:.0f} checked, {fl['temporary']:.0f} pool full, "
                    f"{fl['limited']:.0f} limited"
                ),
                "",
                "",
                "",
            )
        )
        rows.append(
            (
                "storm: limiter engaged / pool full until",
                f"{f(st['limiter_engaged_after_s'], 2)} s",
                f"{f(st['pool_full_until_s'], 2)} s",
                "",
                "",
                "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [
        (
            f"apppass bench ({m['profile']}, {m['commit']}): {m['cpus']} CPUs ({m['cpu_model']}), "
            f"Python {m['python']}, "
            f"Dovecot {m['dovecot']}, argon2id {m['argon2']}; median of {m['runs']} runs; "
            f"{m['seconds']:.0f} s"
            + (
                f"; other CPU load at most {m['max_other_cpu_pct']:.0f}% of a core"
                if m.get("max_other_cpu_pct") is not None
                else ""
            )
        )
    ]
    for n, row in enumerate(rows):
        lines.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


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
