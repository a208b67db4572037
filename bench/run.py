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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import load, logins, relay, storm  # noqa: E402
from bench import memory as memory_test  # noqa: E402
from bench.common import RUNS, log  # noqa: E402
from bench.stack import Stack, append_message, dovecot_version  # noqa: E402
from bench.table import table  # noqa: E402
from tests.servers.common import LOOPBACK, ServerError  # noqa: E402
from tests.servers.nginx import NginxMail, nginx_version  # noqa: E402

TESTS = ("cold", "warm", "relay", "memory", "storm", "workers")
DEFAULT_JSON = REPO / "bench" / "results.json"

# Each test, by name: a function of the Bench (its stack, proxy, nginx, codes and profile) that
# returns the test's results; one module per kind of test.
MEASURE = {
    "cold": logins.cold,
    "warm": logins.warm,
    "relay": relay.measure,
    "memory": memory_test.measure,
    "storm": storm.measure,
    "workers": logins.workers,
}


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


class Bench:
    """The stack, apppass and nginx started once, and the codes every test uses, issued up front:
    the test modules read them from here."""

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
                    self.results[name] = MEASURE[name](self)
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
