"""The blocking LMDB store of the response cache, and its keys, on real LMDB files."""

from __future__ import annotations

import inspect
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waiting import ManualClock

KEY = b"k" * 32  # a scope-label key

from appliance.cache.keys import cache_key, canonical_bytes, load_label_key, scope_hash
from appliance.cache.store import DB_ENTRIES, DB_META, DB_ORDER, FORMAT_VERSION, CacheEntry, ResponseCache

MiB = 1024 * 1024


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_000_000.0)


@pytest.fixture
def make_cache(tmp_path, clock):
    """Open caches under tmp_path; all are closed at the end of the test."""
    opened: list[ResponseCache] = []

    def make(name: str = "cache", max_bytes: int = MiB, ttl_s: float = 60.0, **options) -> ResponseCache:
        options.setdefault("clock", clock)
        cache = ResponseCache(tmp_path / name, max_bytes, ttl_s, **options)
        assert cache.open()
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        cache.close()


def key_of(i: int) -> bytes:
    return cache_key("scope", "m", 1, "h", {"i": i})


def payload_of(i: int) -> bytes:
    """A 200-500 KB payload that only entry ``i`` has."""
    size = 200_000 + (i * 7919) % 300_000
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def entry(payload: bytes = b"response", model: str = "m", scope: str = "scope") -> CacheEntry:
    return CacheEntry(model=model, scope_hash=scope_hash(scope, KEY), payload=payload)


def consistent(cache: ResponseCache, keys) -> dict:
    """Check that stats agree with what ``keys`` read back, and return the payloads found."""
    found = {key: hit.payload for key in keys if (hit := cache.get(key)) is not None}
    stats = cache.stats()
    assert stats["entries"] == len(found)
    assert stats["bytes"] == sum(map(len, found.values())) <= stats["max_bytes"]
    return found


# -- basics ------------------------------------------------------------------------------------


def test_round_trip_and_miss(make_cache, clock):
    cache = make_cache()
    result = cache.put(b"k" * 32, entry(b"hello"))
    assert result.stored and result.evicted == []
    hit = cache.get(b"k" * 32)
    assert hit == CacheEntry("m", scope_hash("scope", KEY), b"hello", clock.now, clock.now + 60.0)
    assert cache.get(b"x" * 32) is None
    assert cache.stats() == {"entries": 1, "bytes": 5, "max_bytes": MiB, "healthy": True}


def test_replace_adjusts_bytes_and_order(make_cache, clock):
    cache = make_cache(max_bytes=200)
    cache.put(b"a", entry(b"1" * 50))
    clock.advance()
    cache.put(b"b", entry(b"2" * 50))
    clock.advance()
    assert cache.put(b"a", entry(b"3" * 30)).evicted == []  # a replacement is no eviction
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] == 80
    assert cache.get(b"a").payload == b"3" * 30
    for key in (b"c", b"d"):
        clock.advance()
        assert cache.put(key, entry(b"4" * 50)).evicted == []
    # "a" was rewritten after "b", so "b" is now the oldest.
    clock.advance()
    assert cache.put(b"e", entry(b"5" * 50)).evicted == [("m", scope_hash("scope", KEY), 50)]
    assert cache.get(b"b") is None and cache.get(b"a") is not None
    assert cache.stats()["bytes"] == 180
    consistent(cache, [b"a", b"b", b"c", b"d", b"e"])


def test_closed_or_unopened_cache_is_a_miss(tmp_path):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0)
    assert not cache.healthy and not (tmp_path / "c").exists()  # no I/O before open()
    assert cache.get(b"k") is None
    assert cache.put(b"k", entry()).stored is False
    assert cache.purge() == 0
    assert cache.stats() == {"entries": 0, "bytes": 0, "max_bytes": MiB, "healthy": False}
    assert cache.open() and cache.put(b"k", entry()).stored
    cache.close()
    assert not cache.healthy and cache.get(b"k") is None


@pytest.mark.parametrize("max_bytes, ttl_s", [(0, 1.0), (-1, 1.0), (MiB, 0.0), (MiB, float("nan"))])
def test_bad_configuration_fails_fast(tmp_path, max_bytes, ttl_s):
    with pytest.raises(ValueError):
        ResponseCache(tmp_path, max_bytes, ttl_s)


# -- TTL -------------------------------------------------------------------------------------


def test_entry_expires_at_its_ttl(make_cache, clock):
    cache = make_cache(ttl_s=10.0)
    cache.put(b"k", entry())
    clock.advance(9.999)
    assert cache.get(b"k") is not None
    clock.advance(0.001)
    assert cache.get(b"k") is None  # now == expires
    clock.advance(100)
    assert cache.get(b"k") is None


def test_per_put_ttl_override(make_cache, clock):
    cache = make_cache(ttl_s=10.0)
    start = clock.now
    cache.put(b"short", entry(), ttl_s=2.0)
    cache.put(b"long", entry(), ttl_s=100.0)
    assert cache.get(b"long").expires == start + 100.0
    clock.advance(5)
    assert cache.get(b"short") is None and cache.get(b"long") is not None
    clock.advance(94.9)
    assert cache.get(b"long") is not None
    assert cache.put(b"never", entry(), ttl_s=0).stored is False


# -- eviction ----------------------------------------------------------------------------------


def test_eviction_is_oldest_first_and_reported(make_cache, clock):
    cache = make_cache(max_bytes=1000)
    for i in range(10):
        assert cache.put(bytes([i]), entry(b"x" * 100, model=f"m{i}", scope=f"s{i}")).stored
        clock.advance()
    assert cache.stats()["bytes"] == 1000
    result = cache.put(b"\x0a", entry(b"y" * 100))
    assert result.stored and result.evicted == [("m0", scope_hash("s0", KEY), 100)]
    clock.advance()
    result = cache.put(b"\x0b", entry(b"z" * 250))  # needs three to go
    assert result.evicted == [(f"m{i}", scope_hash(f"s{i}", KEY), 100) for i in (1, 2, 3)]
    found = consistent(cache, [bytes([i]) for i in range(12)])
    assert sorted(found) == [bytes([i]) for i in range(4, 12)]
    assert cache.stats()["bytes"] == 950


def test_expired_entries_go_before_live_ones(make_cache, clock):
    cache = make_cache(max_bytes=1000, ttl_s=1000.0)
    cache.put(b"old-live", entry(b"a" * 250))
    clock.advance()
    cache.put(b"young-expiring", entry(b"b" * 250), ttl_s=5.0)
    clock.advance()
    cache.put(b"c", entry(b"c" * 250))
    clock.advance()
    cache.put(b"d", entry(b"d" * 250))
    clock.advance(10)
    result = cache.put(b"e", entry(b"e" * 250))
    assert result.evicted == [("m", scope_hash("scope", KEY), 250)]
    assert cache.get(b"young-expiring") is None
    assert cache.get(b"old-live") is not None
    consistent(cache, [b"old-live", b"young-expiring", b"c", b"d", b"e"])


def test_expired_entries_are_swept_even_when_there_is_room(make_cache, clock):
    cache = make_cache(ttl_s=5.0)
    for i in range(3):
        cache.put(bytes([i]), entry(b"x" * 10))
    clock.advance(5)
    result = cache.put(b"new", entry(b"y" * 10))
    assert len(result.evicted) == 3
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 10


def test_oversize_entry_is_refused(make_cache):
    cache = make_cache(max_bytes=1000)
    cache.put(b"small", entry(b"s" * 100))
    result = cache.put(b"big", entry(b"b" * 251))
    assert result.stored is False and result.evicted == []
    assert cache.get(b"big") is None
    assert cache.put(b"quarter", entry(b"q" * 250)).stored
    consistent(cache, [b"small", b"big", b"quarter"])


def test_map_full_evicts_and_retries(make_cache):
    # A map far smaller than max_bytes: only MapFullError can bound the store.
    cache = make_cache(max_bytes=64 * MiB, map_size=MiB)
    stored = evicted = 0
    for i in range(40):
        result = cache.put(i.to_bytes(32, "big"), entry(bytes([i]) * 60_000))
        stored += result.stored
        evicted += len(result.evicted)
    assert evicted > 0 and stored >= 35
    assert cache.healthy and cache.get((39).to_bytes(32, "big")) is not None
    consistent(cache, [i.to_bytes(32, "big") for i in range(40)])


# -- purge -------------------------------------------------------------------------------------


def test_purge_by_scope_model_and_both(make_cache):
    cache = make_cache()
    keys = {}
    for scope in ("alice", "bob"):
        for model in ("chat", "embed"):
            for n in range(3):
                key = cache_key(scope, model, 1, "h", n)
                keys[key] = (scope, model)
                cache.put(key, entry(f"{scope}/{model}/{n}".encode(), model=model, scope=scope))
    assert cache.purge(scope_hash=scope_hash("alice", KEY), model="chat") == 3
    assert cache.purge(scope_hash=scope_hash("bob", KEY)) == 6
    assert cache.purge(model="nope") == 0
    found = consistent(cache, keys)
    assert {keys[key] for key in found} == {("alice", "embed")}
    assert cache.purge(model="embed") == 3
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    cache.put(b"k", entry(b"x"))
    assert cache.purge() == 1 and cache.stats()["bytes"] == 0


# -- damage --------------------------------------------------------------------------------------


def _rewrite_raw(path: Path, key: bytes, change) -> None:
    """Replace the raw LMDB value under ``key`` by ``change(value)`` (the cache must be closed)."""
    env = lmdb.open(str(path), max_dbs=4)
    try:
        entries = env.open_db(DB_ENTRIES)
        with env.begin(write=True) as txn:
            txn.put(key, change(txn.get(key, db=entries)), db=entries)
    finally:
        env.close()


def _flip(offset: int):
    def change(value: bytes) -> bytes:
        data = bytearray(value)
        data[offset] ^= 0x01
        return bytes(data)

    return change


@pytest.mark.parametrize(
    "change",
    [
        lambda value: b"garbage",
        lambda value: value[:-1],
        _flip(-1),  # checksum
        _flip(-40),  # payload
        _flip(5),  # created
        lambda value: msgpack.packb(msgpack.unpackb(value)[:-1] + [b"\0" * 16]),
    ],
    ids=["garbage", "truncated", "checksum", "payload", "created", "zero-checksum"],
)
def test_damaged_entry_is_a_logged_miss_and_dropped(tmp_path, clock, caplog, change):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert cache.open()
    cache.put(b"bad", entry(b"p" * 100))
    cache.put(b"good", entry(b"g" * 10))
    cache.close()
    _rewrite_raw(tmp_path / "c", b"bad", change)

    assert cache.open()
    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        assert cache.get(b"bad") is None
    assert any(r.levelno == logging.ERROR and r.name == "appliance.cache" for r in caplog.records)
    assert cache.stats() == {"entries": 1, "bytes": 10, "max_bytes": MiB, "healthy": True}
    assert cache.get(b"good").payload == b"g" * 10
    assert cache.put(b"bad", entry(b"new")).stored and cache.get(b"bad").payload == b"new"
    consistent(cache, [b"bad", b"good"])
    cache.close()


def test_value_moved_to_another_key_is_a_miss(tmp_path, clock, caplog):
    """The checksum binds an entry to its key: a value under the wrong key is never served."""
    cache = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert cache.open()
    alice, bob = cache_key("alice", "m", 1, "h", "q"), cache_key("bob", "m", 1, "h", "q")
    cache.put(alice, entry(b"alice's answer", scope="alice"))
    cache.put(bob, entry(b"bob's answer", scope="bob"))
    cache.close()
    env = lmdb.open(str(tmp_path / "c"), max_dbs=4)
    entries = env.open_db(DB_ENTRIES)
    with env.begin(write=True) as txn:
        txn.put(bob, txn.get(alice, db=entries), db=entries)
    env.close()
    assert cache.open()
    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        assert cache.get(bob) is None
    assert cache.get(alice).payload == b"alice's answer"
    consistent(cache, [alice, bob])
    cache.close()


def test_damaged_index_clears_the_cache(tmp_path, clock, caplog):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert cache.open()
    cache.put(b"k", entry(b"x" * 10))
    cache.close()
    env = lmdb.open(str(tmp_path / "c"), max_dbs=4)
    order = env.open_db(DB_ORDER)
    with env.begin(write=True) as txn:
        okey = next(iter(txn.cursor(db=order)))[0]
        txn.put(okey, b"\xc1", db=order)  # 0xc1 is never valid msgpack
    env.close()
    assert cache.open()
    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        assert cache.purge(model="m") == 0
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert cache.stats() == {"entries": 0, "bytes": 0, "max_bytes": MiB, "healthy": True}
    assert cache.put(b"k", entry(b"y")).stored and cache.get(b"k").payload == b"y"
    cache.close()


def test_store_of_another_format_is_cleared_on_open(tmp_path, caplog):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0)
    assert cache.open()
    cache.put(b"k", entry())
    cache.close()
    env = lmdb.open(str(tmp_path / "c"), max_dbs=4)
    meta = env.open_db(DB_META)
    with env.begin(write=True) as txn:
        txn.put(b"format", (FORMAT_VERSION + 1).to_bytes(8, "big"), db=meta)
    env.close()
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        assert cache.open()
    assert caplog.records and cache.get(b"k") is None
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    cache.close()


def test_second_open_in_one_process_is_refused_not_raised(tmp_path, caplog):
    first, second = ResponseCache(tmp_path / "c", MiB, 60.0), ResponseCache(tmp_path / "c", MiB, 60.0)
    assert first.open()
    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        assert second.open() is False  # LMDB must not be opened twice by one process
    first.close()
    assert second.open()
    second.close()


def test_damaged_store_file_leaves_cache_off(tmp_path, caplog):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0)
    assert cache.open()
    cache.put(b"k", entry())
    cache.close()
    data = tmp_path / "c" / "data.mdb"
    data.write_bytes(random.Random(0).randbytes(data.stat().st_size))

    with caplog.at_level(logging.ERROR, logger="appliance.cache"):
        assert cache.open() is False
    assert [r.name for r in caplog.records if r.levelno == logging.ERROR] == ["appliance.cache"]
    assert not cache.healthy
    assert cache.get(b"k") is None
    assert cache.put(b"k", entry()).stored is False
    assert cache.purge() == 0
    assert cache.stats()["healthy"] is False
    cache.close()


# -- files -------------------------------------------------------------------------------------


@pytest.fixture
def permissive_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("existing", [False, True])
def test_folder_and_files_are_private(tmp_path, permissive_umask, existing):
    folder = tmp_path / "c"
    if existing:
        folder.mkdir(mode=0o755)
        for name in ("data.mdb", "lock.mdb"):  # an old store made wider than it should be
            (folder / name).touch(mode=0o644)
    cache = ResponseCache(folder, MiB, 60.0)
    assert cache.open()
    cache.put(b"k", entry())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    cache.close()


def test_entries_survive_reopen(tmp_path, clock):
    cache = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert cache.open()
    for i in range(5):
        cache.put(bytes([i]), entry(bytes([i]) * (i + 1)))
    cache.close()
    again = ResponseCache(tmp_path / "c", MiB, 60.0, clock=clock)
    assert again.open()
    found = consistent(again, [bytes([i]) for i in range(5)])
    assert found == {bytes([i]): bytes([i]) * (i + 1) for i in range(5)}
    again.close()


# -- concurrency -------------------------------------------------------------------------------


def test_threads_share_one_store(make_cache):
    cache = make_cache(max_bytes=4 * MiB)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                key = cache_key("s", "m", 1, "h", [worker, i])
                assert cache.put(key, entry(f"{worker}:{i}".encode() * 50)).stored
                assert cache.get(key).payload == f"{worker}:{i}".encode() * 50
                cache.stats()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = consistent(cache, [cache_key("s", "m", 1, "h", [w, i]) for w in range(4) for i in range(40)])
    assert len(found) == 160


def process_key(worker: int, i: int) -> bytes:
    return cache_key("s", "m", 1, "h", [worker, i])


def process_payload(worker: int, i: int) -> bytes:
    return bytes([worker]) * (1000 + i)


def _script(body: str, *helpers) -> str:
    """A ``python -c`` script: the store's imports, the source of ``helpers``, then ``body``.

    Children run a script rather than a function of this module, which a spawned interpreter
    cannot always import (pytest's importlib mode leaves the tests folder off sys.path).
    """
    imports = textwrap.dedent("""
        import sys
        from pathlib import Path
        from appliance.cache.keys import cache_key
        from appliance.cache.store import CacheEntry, ResponseCache
    """)
    sources = [textwrap.dedent(inspect.getsource(helper)) for helper in helpers]
    return "\n".join([imports, *sources, textwrap.dedent(body)])


_CONCURRENT_WRITER = """
    worker = int(sys.argv[2])
    cache = ResponseCache(Path(sys.argv[1]), 8 * 1024 * 1024, 600.0, sync=False)
    assert cache.open()
    print("open", flush=True)
    sys.stdin.read()  # start together when the parent closes stdin, so that the writes overlap
    for i in range(150):
        assert cache.put(process_key(worker, i), CacheEntry("m", "s", process_payload(worker, i))).stored
    cache.close()
"""


def test_several_processes_share_one_file(tmp_path):
    path = tmp_path / "c"
    script = _script(_CONCURRENT_WRITER, process_key, process_payload)
    workers = [subprocess.Popen([sys.executable, "-c", script, str(path), str(w)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for w in range(3)]
    assert [worker.stdout.readline() for worker in workers] == ["open\n"] * 3
    for worker in workers:
        worker.stdin.close()  # all three are open: now they write together
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0, 0]
    for worker in workers:
        worker.stdout.close()
    cache = ResponseCache(path, 8 * MiB, 600.0)
    assert cache.open()
    written = {process_key(w, i): process_payload(w, i) for w in range(3) for i in range(150)}
    assert consistent(cache, written) == written
    cache.close()


_KILLED_WRITER = """
    cache = ResponseCache(Path(sys.argv[1]), 3 * 1024 * 1024, 3600.0, sync=False)
    assert cache.open()
    i = 0
    while True:
        assert cache.put(key_of(i), CacheEntry("m", "s", payload_of(i))).stored
        print(i, flush=True)
        i += 1
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_write_leaves_whole_entries(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "c"
    child = subprocess.Popen([sys.executable, "-c", _script(_KILLED_WRITER, key_of, payload_of), str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(rng.randint(4, 12)):  # at least a few, and often enough to have evicted some
            last = int(child.stdout.readline())
        threading.Event().wait(rng.uniform(0, 0.03))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    last = max([last, *map(int, child.stdout.read().split())])
    child.stdout.close()
    cache = ResponseCache(path, 3 * MiB, 3600.0)
    assert cache.open() and cache.healthy
    # Entries up to the last one reported, and perhaps the next, committed but not yet reported.
    keys = [key_of(i) for i in range(last + 2)]
    found = consistent(cache, keys)
    assert found and all(payload == payload_of(keys.index(key)) for key, payload in found.items())
    assert cache.put(b"after", entry(b"still works")).stored
    assert cache.get(b"after").payload == b"still works"
    cache.close()


# -- the property: a hit is only ever what that scope stored for that request -------------------

SCOPES = ["alice", "bob", "tenant:acme", ""]
REQUESTS = [
    {"prompt": "hi", "max_tokens": 5},
    {"max_tokens": 5, "prompt": "hi"},  # the same request, keys in another order
    {"prompt": "hi", "max_tokens": 5.0},
    {"prompt": "hi", "max_tokens": "5"},
    {"messages": [{"role": "user", "content": "hi"}]},
    ["prompt", "hi", "max_tokens", 5],
]


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans()), max_size=30))
def test_hits_only_what_the_same_scope_stored(operations):
    with tempfile.TemporaryDirectory() as folder:
        cache = ResponseCache(Path(folder) / "c", MiB, 60.0, clock=ManualClock(1_000_000.0))
        assert cache.open()
        try:
            stored: dict[tuple[str, bytes], bytes] = {}
            for n, (s, r, is_put) in enumerate(operations):
                scope, request = SCOPES[s], REQUESTS[r]
                key = cache_key(scope, "m", 1, "h", request)
                model_key = (scope, canonical_bytes(request))
                if is_put:
                    payload = msgpack.packb([scope, request, n])
                    assert cache.put(key, entry(payload, scope=scope)).stored
                    stored[model_key] = payload
                else:
                    hit = cache.get(key)
                    if model_key not in stored:
                        assert hit is None
                    else:
                        assert hit.payload == stored[model_key] and hit.scope_hash == scope_hash(scope, KEY)
                        assert msgpack.unpackb(hit.payload)[0] == scope
        finally:
            cache.close()


# -- keys --------------------------------------------------------------------------------------


def test_canonical_bytes_ignores_dict_order():
    one = {"a": 1, "b": {"x": [1, 2], "y": None}, "c": "z"}
    two = {"c": "z", "b": {"y": None, "x": [1, 2]}, "a": 1}
    assert canonical_bytes(one) == canonical_bytes(two)
    assert canonical_bytes((1, 2)) == canonical_bytes([1, 2])
    assert canonical_bytes([1, 2]) != canonical_bytes([2, 1])


@settings(max_examples=50, database=None)
@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=8), st.randoms())
def test_canonical_bytes_of_shuffled_dicts_agree(value, rng):
    items = list(value.items())
    rng.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(value)


def test_canonical_bytes_distinguishes_types():
    values = [1, 1.0, "1", True, b"1", [1], {"1": 1}, None, 0, False, "", [], {}, [["a", 1]], {"a": 1}, 2**70,
              str(2**70)]
    encodings = [canonical_bytes(v) for v in values]
    assert len(set(encodings)) == len(values)


@pytest.mark.parametrize("value", [object(), {1, 2}, [1, object()], {"a": {"b": 1j}}])
def test_canonical_bytes_rejects_unsupported_types(value):
    with pytest.raises(TypeError):
        canonical_bytes(value)


def test_canonical_bytes_rejects_absurd_nesting():
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError):
        canonical_bytes(deep)


def test_cache_key_binds_every_part():
    base = ("scope", "model", 1, "build", {"q": 1})
    variants = [
        ("scope2", "model", 1, "build", {"q": 1}),
        ("scope", "model2", 1, "build", {"q": 1}),
        ("scope", "model", 2, "build", {"q": 1}),
        ("scope", "model", 1, "build2", {"q": 1}),
        ("scope", "model", 1, "build", {"q": 2}),
        ("scopem", "odel", 1, "build", {"q": 1}),  # moving a boundary changes the key
    ]
    key = cache_key(*base)
    assert len(key) == 32 and cache_key(*base) == key
    assert len({key, *(cache_key(*v) for v in variants)}) == len(variants) + 1


def test_scope_hash_is_a_short_stable_label_keyed_by_the_install():
    label = scope_hash("tenant:acme", KEY)
    assert len(label) == 16 and int(label, 16) >= 0
    assert label == scope_hash("tenant:acme", KEY) != scope_hash("tenant:acm", KEY)
    assert "acme" not in label
    assert scope_hash("tenant:acme", b"another install") != label  # a guessed name cannot be checked without the key


def test_workers_racing_to_make_the_label_key_all_read_the_one_that_won(tmp_path):
    """Worker processes open the cache at once on a new install: none may read the key file half-written (a worker
    once failed its start on an empty one), all must end up with the same key, and no temporary file is left."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(20):
        path = tmp_path / f"scope-label-{attempt}.key"
        start, results = context.Barrier(4), context.Queue()
        racers = [context.Process(target=_race_for_the_key, args=(str(path), start, results)) for _ in range(4)]
        try:
            for racer in racers:
                racer.start()
            found = [results.get(timeout=30) for _ in racers]
            for racer in racers:
                racer.join(30)
        finally:
            for racer in racers:
                if racer.is_alive():
                    racer.terminate()
        assert [racer.exitcode for racer in racers] == [0] * 4
        assert all(isinstance(key, bytes) for key in found), found
        assert len(set(found)) == 1 and found[0] == path.read_bytes() and len(found[0]) == 32
    # No temporary file left: each key and its lock file only.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name for i in range(20) for name in (f"scope-label-{i}.key", f"scope-label-{i}.key.lock"))


def _race_for_the_key(path: str, start: Any, results: Any) -> None:
    start.wait(30)
    try:
        outcome: object = load_label_key(Path(path))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names it
        outcome = repr(exc)
    results.put(outcome)


def test_the_label_key_is_made_once_owner_only_and_then_read(tmp_path):
    path = tmp_path / "scope-label.key"
    key = load_label_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_label_key(path) == key
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not the 32"):
        load_label_key(path)
