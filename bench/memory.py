"""The memory test of `make bench`: resident memory at start, and what an idle logged-in session
costs, for apppass and for its peer nginx, against the same Dovecot (run.py calls `measure`).

Each run restarts both proxies and Dovecot (Dovecot's imap processes keep the memory of sessions
that ended, so its figures are only meaningful from fresh processes; the proxies are stopped
first, so that Dovecot has no sessions left to end when it stops), opens idle
sessions in steps and reads the memory at each step; the cost of a session is the slope between
the first and the last step. Runs alternate: apppass run 1, nginx run 1, apppass run 2, ...

What is read: apppass's VmRSS (one process, as before), and for the comparison at start the PSS
of each side (proportional set size, shared pages counted once: nginx is a master and a worker
per core, whose RSS figures would count its code once per process). nginx's per-session figure
is the slope of its processes' PSS (what sessions add is private memory, where PSS = RSS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import load
from bench.common import log, median
from tests.servers.common import LOOPBACK

# Descriptors kept free besides what the sessions use (logs, listeners, the store).
SPARE_FDS = 32


@dataclass
class Side:
    """One proxy as the memory test drives it."""

    name: str
    kib: Callable[[], int]  # the memory figure whose slope is the per-session cost
    pss_kib: Callable[[], int]
    room: Callable[[], int]  # idle sessions that fit its descriptor limits
    ports: dict[str, int]  # mode (plain, tls) -> port
    creds: list


def fresh(bench) -> None:
    """Both proxies stopped, Dovecot restarted, both started again."""
    bench.proxy.stop()
    if bench.nginx:
        bench.nginx.stop()
    bench.stack.dovecot.restart()
    bench.proxy.start()
    if bench.nginx:
        bench.nginx.start()


def apppass_side(bench) -> Side:
    proxy = bench.proxy

    def room() -> int:
        # Two descriptors per session (client and upstream) on top of what it holds idle.
        soft, _ = proxy.nofile_limit()
        return (soft - proxy.fd_count() - SPARE_FDS) // 2

    return Side(
        "apppass",
        proxy.rss_kib,
        proxy.pss_kib,
        room,
        {"plain": proxy.plain_port, "tls": proxy.tls_port},
        bench.memory_codes,
    )


def nginx_side(bench) -> Side:
    s, nginx = bench.stack, bench.nginx

    def room() -> int:
        # Every session may land in one worker: two of its connections each.
        return (nginx.worker_connections - SPARE_FDS) // 2

    return Side(
        "nginx",
        nginx.pss_kib,
        nginx.pss_kib,
        room,
        {"plain": nginx.plain_port, "tls": nginx.tls_port},
        s.dovecot_credentials([c.login for c in bench.memory_codes]),
    )


def measure(bench) -> dict:
    p, s = bench.p, bench.stack
    sides = [apppass_side(bench)] + ([nginx_side(bench)] if bench.nginx else [])
    out: dict = {
        "params": {
            "levels": p.memory_levels,
            "tls_levels": p.memory_tls_levels,
            "codes": p.memory_codes,
            "upstream": "plain (Dovecot imap port), for apppass and nginx",
            "apppass_figure": "VmRSS of its process",
            "nginx_figure": "PSS of its master and workers",
        }
    }
    for mode, levels, ctx in (
        ("plain", p.memory_levels, None),
        ("tls", p.memory_tls_levels, s.client_ssl),
    ):
        if not levels:
            continue
        runs: dict[str, list] = {side.name: [] for side in sides}
        for i in range(bench.runs):
            for side in sides:
                runs[side.name].append(_run(bench, side, i, mode, levels, ctx))
        out[mode] = _summary(runs["apppass"], levels)
        if bench.nginx:
            out[mode]["nginx"] = _summary(runs["nginx"], levels)
            out[mode]["nginx"]["runs"] = runs["nginx"]
    out["start"] = _start(out)
    fresh(bench)  # for whatever runs next
    return out


def _start(out: dict) -> dict:
    """Resident memory at start (PSS), over every run of both modes."""
    runs = [r for mode in ("plain", "tls") if mode in out for r in out[mode]["runs"]]
    start = {"apppass_pss_mib": median([r["started_pss_kib"] / 1024 for r in runs])}
    nginx_runs = [
        r
        for mode in ("plain", "tls")
        if "nginx" in out.get(mode, {})
        for r in out[mode]["nginx"]["runs"]
    ]
    if nginx_runs:
        start["nginx_pss_mib"] = median([r["started_pss_kib"] / 1024 for r in nginx_runs])
        start["nginx_rss_sum_mib"] = median([r["started_rss_kib"] / 1024 for r in nginx_runs])
        start["nginx_auth_rss_mib"] = median([r["auth_rss_kib"] / 1024 for r in nginx_runs])
        start["ratio"] = round(start["apppass_pss_mib"] / start["nginx_pss_mib"], 3)
    return start


def _summary(runs: list[dict], levels) -> dict:
    return {
        "runs": runs,
        "reached": median([r["reached"] for r in runs]),
        "started_mib": median([r["started_kib"] / 1024 for r in runs]),
        "started_pss_mib": median([r["started_pss_kib"] / 1024 for r in runs]),
        "baseline_mib": median([r["baseline_kib"] / 1024 for r in runs]),
        "rss_mib": {
            str(lv): median(
                [r["rss_kib"].get(str(lv), 0) / 1024 for r in runs if str(lv) in r["rss_kib"]]
            )
            for lv in levels
        },
        "kib_per_session": median([r["kib_per_session"] for r in runs]),
        "dovecot_kib_per_session": median([r["dovecot_kib_per_session"] for r in runs]),
        "dovecot_pss_mib": {
            lv: median([r["dovecot_pss_kib"].get(lv, 0) / 1024 for r in runs])
            for lv in runs[0]["dovecot_pss_kib"]
        },
        "kib_per_session_from_start": median([r["kib_per_session_from_start"] for r in runs]),
    }


def _run(bench, side: Side, i: int, mode: str, levels, ctx) -> dict:
    s, settle = bench.stack, bench.p.memory_settle
    port = side.ports[mode]
    fresh(bench)
    time.sleep(settle)
    start_kib, start_pss = side.kib(), side.pss_kib()
    auth_rss = _auth_rss_kib(bench) if side.name == "nginx" else None
    # Warm-up: every code verified once (cache), the thread pools started.
    pre = load.logins(LOOPBACK, port, side.creds, len(side.creds), 4, ssl_ctx=ctx)
    if pre.ok != len(side.creds):
        raise RuntimeError(f"memory warm-up through {side.name} failed: {pre.replies}")
    time.sleep(settle)
    base_kib = side.kib()
    room = side.room()
    pool = load.SessionPool(LOOPBACK, port, side.creds, concurrency=32, ssl_ctx=ctx)
    rss, opened, dovecot_pss = {}, {}, {}
    try:
        for level in levels:
            target = min(level, room)
            r = pool.grow_to(target)
            if pool.open < target:
                log(f"memory {side.name}: only {pool.open} of {target} sessions: {r.replies}")
            pool.idle(settle)
            rss[str(level)] = side.kib()
            dovecot_pss[str(level)] = s.dovecot_pss_kib()
            opened[str(level)] = pool.open
            if target < level:
                log(
                    f"memory {side.name}: {level:,} sessions do not fit its descriptor limits: "
                    f"measured at {target:,}"
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
        "started_pss_kib": start_pss,
        "started_rss_kib": bench.nginx.rss_kib() if side.name == "nginx" else start_kib,
        "auth_rss_kib": auth_rss,
        "baseline_kib": base_kib,
        "room": room,
        "rss_kib": rss,
        "opened": opened,
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
        f"memory {side.name} {mode} run {i + 1}: {start_kib / 1024:.1f} MiB at start "
        f"(PSS {start_pss / 1024:.1f}), after the first logins {base_kib / 1024:.1f} MiB, "
        + ", ".join(f"{k}: {v / 1024:.1f} MiB" for k, v in rss.items())
        + f" ({n_last} sessions open at the top); {run['kib_per_session']} KiB/session"
    )
    return run


def _auth_rss_kib(bench) -> int | None:
    pid = bench.nginx.auth.pid
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
