"""The login tests of `make bench` (bench/run.py runs them): cold logins (a code never used
before: one argon2 verification each, next to raw argon2), warm logins (verified-credential
cache hits, in plaintext and over STARTTLS, next to Dovecot direct and nginx) and workers (warm
logins with 1, 2 and N `serve.workers`). Each takes the Bench (its stack, proxy, nginx, codes
and profile) and returns its results for the table and the JSON.
"""

from __future__ import annotations

import os

from bench import load
from bench.codes import raw_rate
from bench.common import RUNS, SIDES, log, median, median_dict, medians, ms, ratio
from bench.engine import percentile
from bench.stack import CpuMeter
from tests.servers.common import LOOPBACK

# The warm test's client modes.
WARM_MODES = ("plain", "starttls")
# Workers test: passes over the codes before measuring, so that every worker (each with its own
# verified-credential cache, unless they share one) has seen them (a guess: connections are
# spread by the kernel).
WORKER_FILL_PASSES = 4


# -- cold logins -----------------------------------------------------------------------------


def cold(bench) -> dict:
    p, s = bench.p, bench.stack
    settings = s.settings.codes.argon2
    from proxy.codes.hashing import CodeHasher

    probe = "ABCDEFGHJKLMNPQR"
    encoded = CodeHasher(settings).hash(probe)
    # Warm-up, not measured: argon2's memory is touched once in both processes (the first
    # verifications in a fresh process or thread are slower), the proxy's pools start.
    raw_rate(settings, encoded, probe, 0.5)
    load.logins(
        LOOPBACK,
        bench.proxy.plain_port,
        bench.warmup_codes,
        len(bench.warmup_codes),
        p.cold_concurrency,
    )
    runs: list[dict] = []
    for i in range(RUNS):
        meter = CpuMeter(s, bench.proxy).start()
        r = load.logins(
            LOOPBACK,
            bench.proxy.plain_port,
            bench.cold_codes[i],
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
                "p50_ms": ms(percentile(r.latencies, 50)),
                "p99_ms": ms(percentile(r.latencies, 99)),
                "cpu_pct": cpu,
            }
        )
        log(
            f"cold run {i + 1}: {r.rate:.1f} logins/s via apppass ({r.ok} ok, "
            f"{r.failed + r.errors} not), raw argon2 {raw:.1f}/s; cpu {cpu}"
        )
    return {
        "params": {
            "argon2": f"t={settings.time_cost} m={settings.memory_kib}KiB p={settings.parallelism}",
            "threads": settings.threads,
            "logins_per_run": p.cold_logins,
            "concurrency": p.cold_concurrency,
            "raw_seconds": p.raw_seconds,
        },
        "runs": runs,
        **medians(runs, ("proxy_per_s", "raw_per_s", "p50_ms", "p99_ms")),
        "cpu_pct": median_dict([r["cpu_pct"] for r in runs]),
        "ratio": ratio(
            median([r["proxy_per_s"] for r in runs]), median([r["raw_per_s"] for r in runs])
        ),
    }


# -- warm logins -----------------------------------------------------------------------------


def _warm_sides(bench, mode: str, codes: list, direct_creds: list) -> list[tuple]:
    """(side, port, credentials, proxy process or None) for one client mode."""
    s = bench.stack
    tls = mode == "starttls"
    proxy_port = bench.proxy.starttls_port if tls else bench.proxy.plain_port
    sides = [
        ("proxy", proxy_port, codes, bench.proxy),
        ("direct", s.dovecot.imap_port, direct_creds, None),
    ]
    if bench.nginx is not None:
        nginx_port = bench.nginx.starttls_port if tls else bench.nginx.plain_port
        sides.append(("nginx", nginx_port, direct_creds, None))
    return sides


def warm(bench) -> dict:
    p, s = bench.p, bench.stack
    # Warm-up, not measured: Dovecot starts its imap processes, each user logs in once
    # (directly and through nginx, whose workers then have their pools), and each side
    # does a few STARTTLS logins (the first TLS handshakes of a process are slower).
    users = s.dovecot_credentials()
    load.logins(LOOPBACK, s.dovecot.imap_port, users, 4 * len(users), p.warm_concurrency)
    if bench.nginx is not None:
        load.logins(LOOPBACK, bench.nginx.plain_port, users, 4 * len(users), p.warm_concurrency)
    for _, port, creds, _ in _warm_sides(bench, "starttls", bench.warmup_codes, users):
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
        codes = bench.cold_codes[i]
        direct_creds = s.dovecot_credentials([c.login for c in codes])
        # Make sure the codes are in the verified-credential cache (they are when the cold
        # test ran just before; with --only warm this pass pays their argon2 once).
        pre = load.logins(LOOPBACK, bench.proxy.plain_port, codes, len(codes), p.cold_concurrency)
        run: dict = {"cache_fill_ok": pre.ok}
        for mode in WARM_MODES:
            tls = s.client_ssl if mode == "starttls" else None
            many = p.warm_tls_logins if tls else p.warm_logins
            few = p.single_tls_logins if tls else p.single_logins
            run[mode] = {}
            for side, port, creds, proxy in _warm_sides(bench, mode, codes, direct_creds):
                meter = CpuMeter(s, proxy).start()
                r = load.logins(LOOPBACK, port, creds, many, p.warm_concurrency, starttls=tls)
                cpu = meter.stop()
                one = load.logins(LOOPBACK, port, creds, few, 1, starttls=tls)
                run[mode][side] = {
                    "per_s": round(r.rate, 1),
                    "ok": r.ok,
                    "not_ok": r.failed + r.errors,
                    "replies": r.replies,
                    "p50_ms": ms(percentile(r.latencies, 50)),
                    "p99_ms": ms(percentile(r.latencies, 99)),
                    "single_p50_ms": ms(percentile(one.latencies, 50)),
                    "single_p99_ms": ms(percentile(one.latencies, 99)),
                    "single_not_ok": one.failed + one.errors,
                    "cpu_pct": cpu,
                }
            x = run[mode]
            x["ratio"] = ratio(x["proxy"]["per_s"], x["direct"]["per_s"])
            if "nginx" in x:
                x["ratio_nginx"] = ratio(x["proxy"]["per_s"], x["nginx"]["per_s"])
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
        x = {side: {k: median([r[mode][side][k] for r in runs]) for k in keys} for side in sides}
        x["cpu_pct"] = {
            side: median_dict([r[mode][side]["cpu_pct"] for r in runs]) for side in sides
        }
        x["ratio"] = ratio(x["proxy"]["per_s"], x["direct"]["per_s"])
        if "nginx" in x:
            x["ratio_nginx"] = ratio(x["proxy"]["per_s"], x["nginx"]["per_s"])
        out[mode] = x
    return out


# -- workers ---------------------------------------------------------------------------------


def workers(bench) -> dict:
    """Warm logins/s (16 clients, plaintext and STARTTLS) with 1, 2 and N `serve.workers`
    (N = cores), each next to nginx: the scaling per core."""
    p, s = bench.p, bench.stack
    counts = sorted({1, 2, os.cpu_count() or 2})
    proxies = {n: s.proxy(f"workers-{n}", workers=n) for n in counts}
    runs = []
    for i in range(RUNS):
        codes = bench.cold_codes[i]
        run: dict = {mode: {} for mode in WARM_MODES}
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
                for mode in WARM_MODES:
                    tls = s.client_ssl if mode == "starttls" else None
                    port = proxy.starttls_port if tls else proxy.plain_port
                    many = p.warm_tls_logins if tls else p.warm_logins
                    meter = CpuMeter(s, proxy).start()
                    r = load.logins(LOOPBACK, port, codes, many, p.warm_concurrency, starttls=tls)
                    run[mode][str(n)] = {
                        "per_s": round(r.rate, 1),
                        "not_ok": r.failed + r.errors,
                        "p99_ms": ms(percentile(r.latencies, 99)),
                        "cpu_pct": meter.stop(),
                    }
            finally:
                proxy.stop()
        if bench.nginx is not None:
            creds = s.dovecot_credentials([c.login for c in codes])
            for mode in WARM_MODES:
                tls = s.client_ssl if mode == "starttls" else None
                port = bench.nginx.starttls_port if tls else bench.nginx.plain_port
                many = p.warm_tls_logins if tls else p.warm_logins
                meter = CpuMeter(s, None).start()
                r = load.logins(LOOPBACK, port, creds, many, p.warm_concurrency, starttls=tls)
                run[mode]["nginx"] = {"per_s": round(r.rate, 1), "cpu_pct": meter.stop()}
        runs.append(run)
        for mode in WARM_MODES:
            log(
                f"workers {mode} run {i + 1}: "
                + ", ".join(f"{k}: {v['per_s']}/s" for k, v in run[mode].items())
            )
    out: dict = {"params": {"counts": counts, "logins_per_run": p.warm_logins}, "runs": runs}
    for mode in WARM_MODES:
        per_s = {str(n): median([r[mode][str(n)]["per_s"] for r in runs]) for n in counts}
        nginx = (
            median([r[mode]["nginx"]["per_s"] for r in runs]) if bench.nginx is not None else None
        )
        out[mode] = {
            "per_s": per_s,
            "nginx_per_s": nginx,
            "ratio_nginx": {n: ratio(v, nginx) for n, v in per_s.items()},
        }
    return out
