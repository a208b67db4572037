"""The storm test of `make bench` (bench/run.py runs it): one legitimate login a second, its
latency calm and then during a flood of wrong codes from another address (bench/load.py's
`storm` in its own process), with what the proxy's audit log says it did with the flood.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import load
from bench.common import RUNS, log, median, median_dict, ms, ratio
from bench.engine import LoginResult, percentile
from bench.stack import CpuMeter
from tests.servers.common import LOOPBACK

# The flood generator, run as a script in its own process.
LOAD_SCRIPT = Path(__file__).resolve().parent / "load.py"

# Loopback addresses: the legitimate storm-test client, and one storm source per run (a fresh
# address each run, so one run's failures do not block the next run's storm from the start).
LEGIT_SOURCE = "127.0.0.2"
STORM_SOURCES = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
STORM_HEAD_START = 0.2  # seconds between starting the storm and the first legitimate login


def measure(bench) -> dict:
    """The storm against apppass with `serve.workers: auto` (the target is set for workers)."""
    proxy = bench.stack.proxy("storm", workers="auto")
    proxy.start()
    try:
        return _measure(bench, proxy)
    finally:
        proxy.stop()


def _measure(bench, proxy) -> dict:
    p, s = bench.p, bench.stack
    port = proxy.plain_port
    legit = bench.legit
    warm = load.legit_logins(LOOPBACK, port, legit.login, legit.secret, 1, source=LEGIT_SOURCE)
    if warm.ok != 1:
        raise RuntimeError(f"storm: the legitimate client cannot log in: {warm.replies}")
    runs = []
    for i in range(RUNS):
        calm = load.legit_logins(
            LOOPBACK, port, legit.login, legit.secret, p.storm_seconds, source=LEGIT_SOURCE
        )
        source = STORM_SOURCES[i]
        mark = len(proxy.audit_lines())
        drops0 = _listen_overflows()
        meter = CpuMeter(s, proxy).start()
        gen = subprocess.Popen(
            [
                sys.executable,
                str(LOAD_SCRIPT),
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
            time.sleep(STORM_HEAD_START)  # the storm is under way before the first measured login
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
        for line in proxy.audit_lines()[mark:]:
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
            "workers": "auto",
        },
        "runs": runs,
        "calm": calm,
        "storm": stormy,
        "cpu_pct": median_dict([r["cpu_pct"] for r in runs]),
        "p50_ratio": ratio(stormy["p50_ms"], calm["p50_ms"]),
        "p99_ratio": ratio(stormy["p99_ms"], calm["p99_ms"]),
        "later_p99_ratio": ratio(stormy["later_p99_ms"], calm["later_p99_ms"]),
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
            "listen_queue_overflows": median([r["flood"]["listen_queue_overflows"] for r in runs]),
            **{
                k: median([r["flood"]["outcomes"][k] for r in runs])
                for k in ("checked", "limited", "temporary", "error")
            },
        },
    }


def _legit(r: LoginResult, skip_s: float) -> dict:
    """Latency percentiles of the legitimate client; `later_*`: only the logins started after
    `skip_s` seconds (in a storm: once the limiter has caught up and the backlog of
    verifications it let through has drained: the steady state)."""
    later = [lat for t, lat in r.samples if lat is not None and t >= skip_s]
    return {
        "p50_ms": ms(percentile(r.latencies, 50)),
        "p99_ms": ms(percentile(r.latencies, 99)),
        "max_ms": ms(max(r.latencies, default=0)),
        "later_p99_ms": ms(percentile(later, 99)),
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
