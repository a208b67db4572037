"""The relay test of `make bench` (bench/run.py runs it): MB/s of one big message FETCHed again
and again through apppass, next to Dovecot direct and to nginx (with its default relay buffer
and with a 64 KiB one), in plaintext and with TLS on both sides of apppass.
"""

from __future__ import annotations

from bench import load
from bench.common import RUNS, SIDES, log, median, median_dict, ratio
from bench.stack import CpuMeter
from tests.servers.common import LOOPBACK, ServerError

# The relay test also runs nginx with this relay buffer (nginx's default is one page): what
# apppass reads at once (Twisted's 64 KiB), so that buffer size is not the whole difference.
NGINX_WIDE_BUFFER = "64k"


def measure(bench) -> dict:
    p, s = bench.p, bench.stack
    tls_proxy = s.proxy("tls-upstream", upstream_tls="implicit")
    tls_proxy.start()
    user, code = s.relay_user, bench.relay_code.secret
    password = s.dovecot.users[user]
    paths: dict[str, dict] = {
        "plain": {
            "proxy": (bench.proxy, bench.proxy.plain_port, code, None),
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
    if bench.nginx is not None:
        paths["plain"]["nginx"] = (None, bench.nginx.plain_port, password, None)
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
                x["ratio"] = ratio(x["proxy"]["mb_per_s"], x["direct"]["mb_per_s"])
                if "nginx" in x:
                    x["ratio_nginx"] = ratio(x["proxy"]["mb_per_s"], x["nginx"]["mb_per_s"])
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
            "message_octets": bench.relay_octets,
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
            side: median_dict([r[mode][side]["cpu_pct"] for r in runs]) for side in sides
        }
        m["ratio"] = ratio(m["proxy"], m["direct"])
        if "nginx" in sides:
            m["ratio_nginx"] = ratio(m["proxy"], m["nginx"])
        if "nginx_64k" in sides:
            m["ratio_nginx_64k"] = ratio(m["proxy"], m["nginx_64k"])
        out[mode] = m
    return out
