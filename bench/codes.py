"""Code verification throughput: through the store path (find, argon2id in the pool, claim)
against raw argon2-cffi with the same parameters and thread count. Goal: ratio >= 0.9.

    .venv/bin/python bench/codes.py [--seconds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argon2 import PasswordHasher, Type

from proxy.codes.generate import generate
from proxy.codes.hashing import CodeHasher
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import AsyncCodeStore, NewCode
from proxy.config import Argon2Settings


def raw_rate(settings: Argon2Settings, encoded: str, code: str, seconds: float) -> float:
    """Verifications/s by `threads` plain threads calling argon2-cffi directly."""
    ph = PasswordHasher(
        time_cost=settings.time_cost,
        memory_cost=settings.memory_kib,
        parallelism=settings.parallelism,
        type=Type.ID,
    )
    count = [0] * settings.threads
    stop = time.perf_counter() + seconds

    def work(i):
        while time.perf_counter() < stop:
            ph.verify(encoded, code)
            count[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(settings.threads)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.perf_counter() - start)


def store_rate(settings: Argon2Settings, seconds: float) -> float:
    """Verifications/s through find + CodeHasher pool + claim, on the reactor, with enough attempts
    in flight to keep the pool busy."""
    from twisted.internet import defer, reactor

    tmp = tempfile.mkdtemp(prefix="apppass-bench-")
    sync_store = SqliteCodeStore(Path(tmp) / "bench.db")
    hasher = CodeHasher(settings)
    code = generate()
    rec = sync_store.create(
        NewCode("acct", "bench", "bench", code.selector, hasher.hash(code.value), ("imap",)), cap=25
    )
    store = AsyncCodeStore(sync_store, reactor)
    hasher.start(reactor)
    done = [0]
    result = {}

    @defer.inlineCallbacks
    def one_attempt():
        found = yield store.find(rec.account_key, code.selector)
        ok = yield hasher.verify(found.hash, code.value)
        assert ok
        yield store.claim(found.id, "imap", "127.0.0.1")
        done[0] += 1

    @defer.inlineCallbacks
    def client(stop):
        while time.perf_counter() < stop:
            yield one_attempt()

    @defer.inlineCallbacks
    def run():
        start = time.perf_counter()
        stop = start + seconds
        yield defer.gatherResults([client(stop) for _ in range(settings.threads * 2)])
        result["rate"] = done[0] / (time.perf_counter() - start)
        hasher.stop()
        store.stop()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    return result["rate"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    settings = Argon2Settings(threads=a.threads)
    code = generate().value
    encoded = CodeHasher(settings).hash(code)
    raw = raw_rate(settings, encoded, code, a.seconds)
    through = store_rate(settings, a.seconds)
    out = {
        "argon2": f"t={settings.time_cost} m={settings.memory_kib}KiB p={settings.parallelism}",
        "threads": settings.threads,
        "raw_per_s": round(raw, 1),
        "store_path_per_s": round(through, 1),
        "ratio": round(through / raw, 3),
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"argon2id {out['argon2']}, {out['threads']} threads")
        print(f"raw argon2-cffi verifications/s   {out['raw_per_s']:>8}")
        print(f"store path verifications/s        {out['store_path_per_s']:>8}")
        print(f"ratio (goal >= 0.9)               {out['ratio']:>8}")
    return out


if __name__ == "__main__":
    main()
