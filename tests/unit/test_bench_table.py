"""`make bench`'s table (bench/table.py): the CPU each proxy spends per warm login, from the
runs' CPU shares and rates (a run without nginx has no nginx figure)."""

from __future__ import annotations

from bench.table import _cpu_ms


def run(proxy_pct, proxy_rate, nginx_pct=None, auth_pct=None, nginx_rate=None) -> dict:
    sides = {"proxy": {"per_s": proxy_rate, "cpu_pct": {"proxy": proxy_pct, "dovecot": 60.0}}}
    if nginx_pct is not None:
        sides["nginx"] = {
            "per_s": nginx_rate,
            "cpu_pct": {"nginx": nginx_pct, "nginx_auth": auth_pct, "dovecot": 110.0},
        }
    return {"plain": sides}


def test_cpu_per_login_is_the_median_over_the_runs_of_share_over_rate():
    runs = [
        run(90.0, 1000.0, 40.0, 10.0, 2000.0),  # 0.9 ms; nginx 0.25 ms with its auth service
        run(100.0, 800.0, 45.0, 11.0, 1600.0),  # 1.25 ms; 0.35 ms
        run(80.0, 1000.0, 42.0, 12.0, 1800.0),  # 0.8 ms; 0.3 ms
    ]
    assert _cpu_ms(runs, "plain") == (0.9, 0.3)


def test_a_run_without_nginx_has_no_nginx_figure():
    assert _cpu_ms([run(90.0, 1000.0)], "plain") == (0.9, None)
