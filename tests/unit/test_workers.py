"""serve.workers, the pure parts: how many workers `auto` is, the restart back-off, each
worker's part of the connection caps, the setting's errors, and the worker's number in its log
lines. The processes themselves: tests/integration/test_workers.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from proxy.codes.hashing import pool_share
from proxy.config import Argon2Settings, ConfigError, parse
from proxy.limits import LimitSettings, share_of
from proxy.oplog import LogSettings, configure, log, unconfigure
from proxy.sdnotify import Notifier
from proxy.workerlink import WorkerRole
from proxy.workers import (
    MAX_START_FAILURES,
    METRICS_PREFIX,
    OUTBOX_MAX,
    RESTART_MAX_SECONDS,
    STABLE_SECONDS,
    Backoff,
    Supervisor,
    available_cpus,
    cgroup_cpu_quota,
    describe_exit,
    remove_stale_metrics,
    resolve_workers,
)

# --- how many ----------------------------------------------------------------------------------


def test_auto_is_one_worker_per_cpu_this_process_may_use():
    assert resolve_workers("auto", lambda: 6) == 6
    assert resolve_workers("auto", lambda: 0) == 1
    assert resolve_workers(3, lambda: 6) == 3
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def cgroup(tmp_path, own: str, limits: dict[str, str]) -> tuple[str, str]:
    """A cgroup v2 tree under tmp_path with cpu.max files; (root, /proc/self/cgroup file)."""
    root = tmp_path / "cgroup"
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(value + "\n")
    mine = tmp_path / "self-cgroup"
    mine.write_text(own)
    return str(root), str(mine)


@pytest.mark.parametrize(
    "own, limits, quota",
    [
        ("0::/\n", {".": "max 100000"}, None),  # a container without --cpus
        ("0::/\n", {".": "200000 100000"}, 2),  # docker run --cpus=2
        ("0::/\n", {".": "150000 100000"}, 2),  # 1.5 CPUs: a second worker still has work
        ("0::/system.slice/apppass.service\n", {"system.slice/apppass.service": "50000 100000"}, 1),
        (  # the tightest limit on the way up counts
            "0::/a/b\n",
            {"a": "300000 100000", "a/b": "max 100000"},
            3,
        ),
        ("12:cpu,cpuacct:/x\n", {}, None),  # cgroup v1 only: not read
    ],
)
def test_a_cgroup_cpu_quota_caps_auto_workers(tmp_path, own, limits, quota):
    root, mine = cgroup(tmp_path, own, limits)
    assert cgroup_cpu_quota(root, mine) == quota


def test_available_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path):
    # This process's own cgroup path, under a root whose top holds the quota: one CPU.
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(str(tmp_path)) == 1
    assert available_cpus(str(tmp_path / "none")) == len(os.sched_getaffinity(0))


# --- restarts ----------------------------------------------------------------------------------


def test_a_worker_dying_at_start_waits_longer_each_time_then_the_supervisor_gives_up():
    backoff = Backoff()
    delays = [backoff.exited(was_ready=False, uptime=0.5) for _ in range(MAX_START_FAILURES)]
    assert delays == [0.25, 0.5, 1.0, 2.0, None]


def test_a_worker_that_ran_a_while_is_restarted_at_once_and_the_count_starts_again():
    backoff = Backoff()
    assert backoff.exited(was_ready=False, uptime=0.5) == 0.25
    assert backoff.exited(was_ready=True, uptime=STABLE_SECONDS) == 0.0
    assert backoff.exited(was_ready=False, uptime=0.5) == 0.25


def test_a_worker_crashing_soon_after_ready_backs_off_but_is_never_given_up():
    backoff = Backoff()
    delays = [backoff.exited(was_ready=True, uptime=1.0) for _ in range(20)]
    assert None not in delays
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert max(delays) == RESTART_MAX_SECONDS


def test_metrics_folders_of_supervisors_no_longer_running_are_removed(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid names no process now
    stale = tmp_path / f"{METRICS_PREFIX}{ended.pid}-abc123"
    running = tmp_path / f"{METRICS_PREFIX}{os.getpid()}-def456"
    unrelated = tmp_path / "apppass-metrics-notapid"
    for folder in (stale, running, unrelated):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    remove_stale_metrics(str(tmp_path))
    assert not stale.exists()
    assert running.exists() and unrelated.exists()


def test_an_exit_in_words():
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


def test_a_worker_role_survives_its_command_line():
    role = WorkerRole(2, 4, 9, {"imap": 5, "web-127.0.0.1:8080": 6})
    args = role.argv()
    listen = [args[i + 1] for i, a in enumerate(args) if a == "--listen"]
    assert WorkerRole.parse(2, 4, 9, listen) == role


# --- the verified cache, passed on ---------------------------------------------------------------


@pytest.fixture
def linked(base):
    """A supervisor of 3 workers whose links are socketpairs (no processes): its end, and the
    workers' ends, non-blocking."""
    supervisor = Supervisor(parse(BASE, base_dir=base), 3, {}, Notifier())
    ends = []
    for worker in supervisor.workers:
        worker.link, theirs = socket.socketpair()
        worker.link.setblocking(False)
        theirs.setblocking(False)
        ends.append(theirs)
    wake, _ = socket.socketpair()
    yield supervisor, ends, wake
    shutil.rmtree(supervisor.metrics_dir)


def received(end: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := end.recv(65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_an_entry_from_one_worker_goes_to_every_other_worker(linked):
    supervisor, ends, wake = linked
    line = b'verified {"digest":"00","code":7}\n'
    ends[0].sendall(b"alive\n" + line[:10])
    supervisor._step(wake)
    ends[0].sendall(line[10:])
    supervisor._step(wake)
    assert [received(end) for end in ends] == [b"", line, line]


def test_a_worker_that_does_not_read_holds_back_no_one(linked):
    supervisor, ends, wake = linked
    line = b"verified " + b"x" * 1000 + b"\n"
    for _ in range(2 * OUTBOX_MAX // len(line)):  # worker 3 never reads
        ends[0].sendall(line)
        supervisor._step(wake)
        assert received(ends[1]) == line
    stuck = supervisor.workers[2]
    assert 0 < len(stuck.outbox) <= OUTBOX_MAX + len(line)
    got = received(ends[2])  # it reads again: what was kept arrives, in whole lines
    while stuck.outbox:
        supervisor._step(wake)
        got += received(ends[2])
    assert got and got == line * (len(got) // len(line))


# --- caps --------------------------------------------------------------------------------------


def test_each_worker_holds_its_part_of_every_cap_rounded_up():
    caps = LimitSettings(
        max_connections=10_000, max_preauth_per_address=5, max_sessions_per_account=1
    )
    assert share_of(caps, 1) == caps
    assert share_of(caps, 2) == LimitSettings(5_000, 3, 1)
    assert share_of(caps, 3) == LimitSettings(3_334, 2, 1)


def test_each_worker_gets_its_part_of_the_argon2_pool():
    pool = Argon2Settings(threads=2, queue=64)
    assert pool_share(pool, 1) == pool
    assert pool_share(pool, 2) == Argon2Settings(threads=1, queue=64)
    assert pool_share(pool, 3) == Argon2Settings(threads=1, queue=64)
    assert pool_share(Argon2Settings(threads=8, queue=64), 3).threads == 3


# --- the setting -------------------------------------------------------------------------------

BASE = {
    "store": {"sqlite": "codes.db"},
    "directory": {"static": "users.yaml"},
}


@pytest.fixture
def base(tmp_path):
    (tmp_path / "users.yaml").write_text("accounts: {alice: {id: key-alice}}\n")
    return tmp_path


@pytest.mark.parametrize("value", ["auto", 1, 2, 256])
def test_serve_workers_takes_auto_or_a_count(base, value):
    settings = parse({**BASE, "serve": {"workers": value}}, base_dir=base)
    assert settings.serve.workers == value


def test_serve_workers_defaults_to_one_process(base):
    assert parse(BASE, base_dir=base).serve.workers == 1


@pytest.mark.parametrize("value", [0, -1, 257, "many", True, 1.5, "2"])
def test_a_bad_serve_workers_names_the_key(base, value):
    with pytest.raises(ConfigError) as info:
        parse({**BASE, "serve": {"workers": value}}, source="apppass.yaml", base_dir=base)
    (problem,) = info.value.problems
    assert problem.startswith(
        "apppass.yaml: serve.workers: must be auto or a number of processes from 1 to 256 (got "
    )


# --- the log -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_workers_log_lines_carry_its_number(monkeypatch, form):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    handler = configure(LogSettings(format=form), out, worker=2)
    try:
        log.info("serving")
    finally:
        unconfigure(handler)
    line = out.getvalue().strip()
    if form == "json":
        assert (json.loads(line)["message"], json.loads(line)["worker"]) == ("serving", 2)
    else:
        assert line.endswith("info worker 2: serving")
