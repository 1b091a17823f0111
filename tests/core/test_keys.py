"""The API key store: tokens, hashing at rest, revocation, validation, concurrent writers, ``appliance keys``."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.keys import KEY_PREFIX, ApiKey, KeyStore, KeyStoreError


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "state" / "keys.json")


def test_token_verifies_and_anything_else_does_not(store):
    key, token = store.create(name="web", tenant="acme", models=["minilm"], requests_per_minute=5)
    assert token.startswith(f"{KEY_PREFIX}{key.id}_") and len(key.id) == 12
    keys = store.load()
    assert len(keys) == 1
    assert keys.verify(token) == key
    secret = token.split("_", 2)[2]
    other_id = "0" * 12 if key.id != "0" * 12 else "1" * 12
    for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), f"{KEY_PREFIX}{other_id}_{secret}",
                  f"{KEY_PREFIX}{key.id}_", f"{KEY_PREFIX}{key.id}", secret, token.upper(), "", "Bearer " + token):
        assert keys.verify(wrong) is None, wrong


def test_missing_file_is_an_empty_store(store):
    assert len(store.load()) == 0
    assert store.keys() == []
    assert store.mtime_ns() == 0
    assert not store.path.parent.exists()  # reading creates nothing


def test_keys_are_hashed_at_rest_in_private_files(tmp_path):
    old_umask = os.umask(0)
    try:
        store = KeyStore(tmp_path / "new-folder" / "keys.json")
        _, token = store.create(name="web", tenant="acme")
    finally:
        os.umask(old_umask)
    secret = token.split("_", 2)[2]
    data = store.path.read_bytes()
    assert secret.encode() not in data and token.encode() not in data
    assert f"sha256:{hashlib.sha256(secret.encode()).hexdigest()}".encode() in data
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["keys.json", "keys.json.lock"]
    assert store.mtime_ns() > 0


def test_revoke_by_id_and_by_name(store):
    first, first_token = store.create(name="one", tenant="acme")
    second, second_token = store.create(name="two", tenant="acme")
    assert store.revoke(first.id).revoked > 0
    revoked = store.revoke("two")
    assert revoked.id == second.id and not revoked.active
    keys = store.load()
    assert len(keys) == 0
    assert keys.verify(first_token) is None and keys.verify(second_token) is None
    assert [(key.name, key.active) for key in store.keys()] == [("one", False), ("two", False)]
    with pytest.raises(KeyStoreError, match="already revoked"):
        store.revoke(first.id)
    with pytest.raises(KeyStoreError, match="already revoked"):
        store.revoke("two")
    with pytest.raises(KeyStoreError, match="no key has the id or name 'three'"):
        store.revoke("three")


def test_names_are_unique_among_active_keys(store):
    old, _ = store.create(name="web", tenant="acme")
    with pytest.raises(KeyStoreError, match=f"already exists \\(id {old.id}\\)"):
        store.create(name="web", tenant="other")
    store.revoke("web")
    new, token = store.create(name="web", tenant="acme")
    assert new.id != old.id
    assert store.load().verify(token) == new
    assert store.revoke("web").id == new.id  # the name picks the active key, not the revoked one


def test_create_rejects_bad_values(store):
    with pytest.raises(KeyStoreError, match="name = 'a b' is not allowed: expected a string \\(1 to 64 characters"):
        store.create(name="a b", tenant="acme")
    with pytest.raises(KeyStoreError, match="tenant = '' is not allowed"):
        store.create(name="ok", tenant="")
    with pytest.raises(KeyStoreError,
                       match="cache_scope = 'global' is not allowed: expected one of 'tenant', 'key', 'none'"):
        store.create(name="ok", tenant="acme", cache_scope="global")
    with pytest.raises(KeyStoreError, match="tokens_per_minute = -1"):
        store.create(name="ok", tenant="acme", tokens_per_minute=-1)
    with pytest.raises(KeyStoreError, match="a key without retention keeps its data on the device; drop --cloud"):
        store.create(name="ok", tenant="acme", cloud=True, retention=False)
    assert not store.path.exists()


def test_scope_and_may_use():
    key = ApiKey(id="0123456789ab", name="web", tenant="acme", models=())
    assert key.scope() == "tenant:acme"
    assert ApiKey(id="0123456789ab", name="web", tenant="acme", models=(), cache_scope="key").scope() == \
        "key:0123456789ab"
    assert ApiKey(id="0123456789ab", name="web", tenant="acme", models=(), cache_scope="none").scope() is None
    assert ApiKey(id="0123456789ab", name="web", tenant="acme", models=(), retention=False).scope() is None
    assert key.may_use("anything") and key.may_use()
    limited = ApiKey(id="0123456789ab", name="web", tenant="acme", models=("minilm", "chat"))
    assert limited.may_use("minilm") and limited.may_use("smollm2", "chat")
    assert not limited.may_use("smollm2") and not limited.may_use()


def _record(**changes) -> dict:
    record = {"id": "0123456789ab", "name": "web", "tenant": "acme", "models": [], "cloud": False,
              "cache_scope": "tenant", "requests_per_minute": 0, "tokens_per_minute": 0, "admin": False,
              "workflow": "", "created": 1.0, "revoked": 0.0, "hash": "sha256:" + "0" * 64}
    return record | changes


@pytest.mark.parametrize("content,fragments", [
    ('{"version": 1, "keys": [', ["is not valid JSON", "line 1"]),
    ('[]', ['must be a JSON object {"version": 1']),
    ('{"version": 2, "keys": []}', ['"version": 1']),
    (json.dumps({"version": 1, "keys": [_record(cache_scope="global")]}),
     ["key 0123456789ab (web)", "cache_scope = 'global' is not allowed: expected one of 'tenant', 'key', 'none'"]),
    (json.dumps({"version": 1, "keys": [_record(requests_per_minute=-1)]}),
     ["key 0123456789ab (web)", "requests_per_minute = -1 is not allowed: expected an integer >= 0 (0 = unlimited)"]),
    (json.dumps({"version": 1, "keys": [_record(tokens_per_minute=1.5)]}),
     ["tokens_per_minute = 1.5 is not allowed: expected an integer"]),
    (json.dumps({"version": 1, "keys": [_record(cloud="yes")]}),
     ["cloud = 'yes' is not allowed: expected true or false"]),
    (json.dumps({"version": 1, "keys": [_record(tenant="a/b")]}), ["tenant = 'a/b' is not allowed"]),
    (json.dumps({"version": 1, "keys": [_record(hash="md5:00")]}), ["hash must read 'sha256:'"]),
    (json.dumps({"version": 1, "keys": [_record(rpm=5)]}), ["unknown field 'rpm'"]),
    (json.dumps({"version": 1, "keys": [_record(lane="fast")]}),
     ["lane = 'fast' is not allowed: expected one of 'interactive', 'batch'"]),
    (json.dumps({"version": 1, "keys": [_record(workflow="a b")]}), ["workflow = 'a b' is not allowed", "'' for none"]),
    (json.dumps({"version": 1, "keys": [_record(models=["a,b"])]}), ["models = ['a,b']", "without spaces or commas"]),
    (json.dumps({"version": 1, "keys": [_record(name="web\n")]}), ["name = 'web\\n' is not allowed"]),
    (json.dumps({"version": 1, "keys": [_record(id="ABC")]}), ["id = 'ABC'", "12 lowercase hex digits"]),
    (json.dumps({"version": 1, "keys": [_record(created=float("inf"))]}), ["created and revoked must be unix times"]),
    (json.dumps({"version": 1, "keys": [{k: v for k, v in _record().items() if k != "tenant"}]}),
     ["missing field 'tenant'"]),
    (json.dumps({"version": 1, "keys": [_record(), _record(name="other")]}), ["two keys have the id 0123456789ab"]),
    (json.dumps({"version": 1, "keys": [_record(), _record(id="ba9876543210")]}), ["both active and named 'web'"]),
])
def test_invalid_files_are_reported_clearly(store, content, fragments):
    store.path.parent.mkdir()
    store.path.write_text(content)
    for action in (store.load, store.keys, lambda: store.create(name="new", tenant="acme")):
        with pytest.raises(KeyStoreError) as error:
            action()
        assert str(store.path) in str(error.value)
        for fragment in fragments:
            assert fragment in str(error.value)
    assert store.path.read_text() == content  # a broken file is never overwritten


CREATE_KEYS = """
import sys
from pathlib import Path
from appliance.keys import KeyStore
store = KeyStore(Path(sys.argv[1]))
for i in range(5):
    print(store.create(name=f"w{sys.argv[2]}-k{i}", tenant="acme")[1])
"""


def test_concurrent_creates_lose_no_key(store):
    # Separate interpreters (not multiprocessing): they share nothing but the file and its lock.
    workers = [subprocess.Popen([sys.executable, "-c", CREATE_KEYS, str(store.path), str(worker)],
                                stdout=subprocess.PIPE, text=True) for worker in range(4)]
    tokens = [line for worker in workers for line in worker.communicate(timeout=120)[0].split()]
    assert all(worker.returncode == 0 for worker in workers)
    keys = store.load()
    assert len(tokens) == 20 and len(keys) == 20 == len({key.id for key in store.keys()})
    assert all(keys.verify(token) is not None for token in tokens)


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    file = tmp_path / "appliance.toml"
    file.write_text(f"[paths]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    return str(file)


def test_cli_create_list_revoke(config_file, tmp_path, capsys):
    assert main(["--config", config_file, "keys", "create", "--name", "web", "--tenant", "acme", "--models",
                 "minilm, chat", "--cloud", "--cache-scope", "key", "--rpm", "60", "--tpm", "1000", "--admin",
                 "--workflow", "support"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and token.startswith(KEY_PREFIX)
    key = KeyStore(tmp_path / "state" / "keys.json").load().verify(token)
    assert key is not None and key.id in err and "shown once" in err and "within a few seconds" in err
    assert key.models == ("minilm", "chat") and key.cloud and key.admin and key.cache_scope == "key"
    assert (key.requests_per_minute, key.tokens_per_minute, key.workflow) == (60, 1000, "support")

    assert main(["--config", config_file, "keys", "list"]) == 0
    table = capsys.readouterr().out
    assert key.id in table and "web" in table and "minilm,chat" in table and "active" in table
    assert "sha256" not in table and token.split("_", 2)[2] not in table

    assert main(["--config", config_file, "keys", "revoke", "web"]) == 0
    assert key.id in capsys.readouterr().out
    assert main(["--config", config_file, "keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(entry["id"], entry["state"], entry["models"]) for entry in listed] == \
        [(key.id, "revoked", ["minilm", "chat"])]
    assert "hash" not in listed[0]

    assert main(["--config", config_file, "keys", "revoke", "web"]) == 1
    assert "already revoked" in capsys.readouterr().err
    assert main(["--config", config_file, "keys", "create", "--name", "bad name", "--tenant", "acme"]) == 1
    assert "not allowed" in capsys.readouterr().err
    assert main(["--config", config_file, "keys", "create", "--name", "quiet", "--tenant", "acme",
                 "--no-retention"]) == 0
    quiet = KeyStore(tmp_path / "state" / "keys.json").load().verify(capsys.readouterr().out.strip())
    assert quiet is not None and not quiet.retention and quiet.scope() is None
    assert main(["--config", config_file, "keys", "list"]) == 0
    assert "none (no retention)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["--config", config_file, "keys", "create", "--name", "x", "--tenant", "acme", "--rpm", "-5"])
    assert usage.value.code == 2


def test_cli_token_alone_on_stdout_in_a_subprocess(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_PATHS_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "keys", "create", "--name", "web", "--tenant",
                          "acme"], env=env, capture_output=True, text=True, check=True)
    token = run.stdout.removesuffix("\n")
    assert "\n" not in token and token.startswith(KEY_PREFIX)
    assert KeyStore(tmp_path / "state" / "keys.json").load().verify(token) is not None
    listing = subprocess.run([sys.executable, "-m", "appliance.cli", "keys", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert token.split("_")[1] in listing and "sha256" not in listing
