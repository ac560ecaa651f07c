"""Security settings end to end: the shared token, TLS, --require-passwords, the password a
protected VM needs to be connected, the per-VM slowdown of password guessing, and secrets kept
out of logs and replies (protocol.md: Security settings, Presence, auth, connect_vm, authorize_vm).

Real servers only (in process on 127.0.0.1:0, or ``python -m vmserver`` subprocesses); nothing of
ours is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import vmclient
import vmserver.commands
import vmserver.config
import vmserver.server
from conftest import Wire, running, vm_args

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 15.0

TOKEN = "tok-Zq8Xk3-s3cr3t-T0KEN"
# Settings the surrounding environment must not leak into the subprocesses we start.
CLEAN_ENV = {"VMSERVER_TOKEN": "", "VMSERVER_TOKEN_FILE": "", "VMSERVER_REQUIRE_PASSWORDS": "",
             "VMSERVER_TLS_CERT": "", "VMSERVER_TLS_KEY": ""}


@contextlib.asynccontextmanager
async def session(port: int) -> AsyncIterator[Wire]:
    w = await Wire.open(port)
    try:
        yield w
    finally:
        await w.close()


async def reply(w: Wire, cmd: str, **args) -> dict:
    """One request; the whole reply object (for its message)."""
    return await w.call(cmd, **args)


def failed(r: dict, code: str) -> str:
    """Insist the reply is an error with ``code``; return its message."""
    assert r["ok"] is False, r
    assert r["error"]["code"] == code, r
    return r["error"]["message"]


def assert_no_traceback(log: bytes | str) -> None:
    text = log.decode(errors="replace") if isinstance(log, bytes) else log
    assert "Traceback" not in text, text


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMSERVER_")}
    env.update(extra)
    return env


def run_console(port: int, *words: str, options: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vmclient --port PORT [options] WORDS`` with pipes."""
    return subprocess.run(
        [sys.executable, "-m", "vmclient", "--host", "127.0.0.1", "--port", str(port), *options, *words],
        input="", capture_output=True, text=True, cwd=ROOT, env=env or client_env(), timeout=RUN_TIMEOUT)


# --- 1. the shared token -----------------------------------------------------------------------


async def test_token_gate_for_every_command(db):
    async with running(db, token=TOKEN) as srv, session(srv.address[1]) as w:
        assert w.greeting["hello"]["auth_required"] is True
        assert "auth" in w.greeting["hello"]["commands"]
        gated = sorted(set(vmserver.commands.COMMANDS) - {"health", "auth"})
        assert gated, "the registry lists commands besides health and auth"
        for name in gated:
            # without arguments, and with arguments that would otherwise be valid
            assert await w.error(name) == "unauthenticated", name
            assert await w.error(name, **vm_args(f"pre-{name}", f"d-{name}")) == "unauthenticated", name
            await w.send(f"{name} vm_id=inline-{name}")
            assert failed(await w.recv(), "unauthenticated")
        assert await w.ok("health") == "OK"

        started = time.monotonic()
        message = failed(await reply(w, "auth", token="wrong-token"), "auth_failed")
        assert time.monotonic() - started >= 0.4, "a wrong token is answered after half a second"
        assert "wrong-token" not in message
        assert await w.error("get_all_vms") == "unauthenticated"  # still locked out
        await w.send("auth token=another-wrong-one")  # the session may try again
        assert failed(await w.recv(), "auth_failed")
        assert await w.ok("auth", token=TOKEN) == "OK"

        # now everything works, and nothing refused before auth left a trace
        assert await w.ok("get_all_vms") == []
        assert await w.ok("get_all_disks") == []
        assert (await w.ok("add_vm", **vm_args("vm-1", "disk-1")))["vm_id"] == "vm-1"
        assert (await w.ok("connect_vm", vm_id="vm-1"))["connected"] is True
        assert (await w.ok("authorize_vm", vm_id="vm-1"))["authorized"] is True

        # the token is per session: a second session starts unauthenticated
        async with session(srv.address[1]) as b:
            assert b.greeting["hello"]["auth_required"] is True
            assert await b.error("get_all_vms") == "unauthenticated"
            assert await b.error("add_vm", **vm_args("vm-2")) == "unauthenticated"
            assert await b.ok("health") == "OK"
            await b.send(f"auth token={TOKEN}")
            assert (await b.recv())["result"] == "OK"
            assert [vm["vm_id"] for vm in await b.ok("get_all_vms")] == ["vm-1"]
        # and a new session after that one is unauthenticated again
        async with session(srv.address[1]) as c:
            assert await c.error("get_connected_vms") == "unauthenticated"


async def test_no_token_configured_auth_always_ok(server, wire):
    assert wire.greeting["hello"]["auth_required"] is False
    assert await wire.ok("get_all_vms") == []
    assert await wire.ok("auth", token="anything") == "OK"
    await wire.send("auth token=whatever-at-all")
    assert (await wire.recv())["result"] == "OK"
    assert await wire.ok("health") == "OK"


async def test_auth_with_malformed_token_is_not_an_internal_error(db):
    """A token that is not encodable text (a lone surrogate) is the client's mistake, like a bad
    password: invalid_args or auth_failed, never ``internal`` with a traceback in the log."""
    async with running(db, token=TOKEN) as srv, session(srv.address[1]) as w:
        await w.send('{"cmd":"auth","args":{"token":"\\ud800abc"}}')
        r = await w.recv()
        assert r["ok"] is False
        assert r["error"]["code"] in ("invalid_args", "auth_failed"), r
        assert await w.error("get_all_vms") == "unauthenticated"
        assert await w.ok("auth", token=TOKEN) == "OK"


async def _token_server_works(port: int, token: str) -> None:
    async with session(port) as w:
        assert w.greeting["hello"]["auth_required"] is True
        assert await w.error("add_vm", **vm_args("vm-t")) == "unauthenticated"
        assert await w.error("auth", token=token + "x") == "auth_failed"
        assert await w.ok("auth", token=token) == "OK"
        assert (await w.ok("add_vm", **vm_args("vm-t")))["vm_id"] == "vm-t"


async def test_cli_token_file_env_and_flag(spawn, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ways = [
        ("--token-file", ["--token-file", str(token_file)], {}),
        ("VMSERVER_TOKEN", [], {"VMSERVER_TOKEN": TOKEN}),
        ("VMSERVER_TOKEN_FILE", [], {"VMSERVER_TOKEN_FILE": str(token_file)}),
        ("--token", ["--token", TOKEN], {}),
    ]
    procs = []
    for i, (_, extra, env) in enumerate(ways):  # start them all, then test them (startup overlaps)
        procs.append(spawn("--port", "0", "--db", str(tmp_path / f"t{i}.db"), *extra, env={**CLEAN_ENV, **env}))
    for (how, _, _), p in zip(ways, procs):
        port = p.wait_listening()
        await _token_server_works(port, TOKEN)
        assert p.stop() == 0, how
        assert_no_traceback(p.log)
        assert b"token required" in p.log, how


@pytest.mark.parametrize("content", [None, "", "\n", "   \n"], ids=["missing", "empty", "newline", "blank"])
def test_cli_unusable_token_file_is_usage_error(spawn, tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    p = spawn("--port", "0", "--db", str(tmp_path / "t.db"), "--token-file", str(path), env=CLEAN_ENV)
    assert p.run_to_exit() == 2
    text = p.log.decode(errors="replace")
    assert "token file" in text and str(path) in text, text
    assert_no_traceback(p.log)


async def test_client_library_token(db):
    async with running(db, token=TOKEN) as srv:
        port = srv.address[1]
        async with vmclient.Client(port=port, token=TOKEN, timeout=10) as c:
            assert c.server_info["auth_required"] is True
            assert await c.health() == "OK"
            assert (await c.add_vm("vm-c", ram=1, cpu=1, disks=[]))["vm_id"] == "vm-c"
        with pytest.raises(vmclient.ConnectError) as info:
            await vmclient.Client(port=port, token="not-" + TOKEN, timeout=10).connect()
        assert TOKEN not in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, vmclient.AuthFailed) and cause.request["args"]["token"] == "***"
        async with vmclient.Client(port=port, timeout=10) as c:
            assert await c.health() == "OK"
            with pytest.raises(vmclient.Unauthenticated):
                await c.get_all_vms()
            with pytest.raises(vmclient.Unauthenticated):
                await c.add_vm("vm-d", ram=1, cpu=1, disks=[])
            assert await c.auth(TOKEN) == "OK"
            assert [vm["vm_id"] for vm in await c.get_all_vms()] == ["vm-c"]


def test_console_token_env_and_file(spawn, tmp_path):
    p = spawn("--port", "0", "--db", str(tmp_path / "c.db"), "--token", TOKEN, env=CLEAN_ENV)
    port = p.wait_listening()

    r = run_console(port, "health", env=client_env(VMSERVER_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    r = run_console(port, "get_all_vms", env=client_env(VMSERVER_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []

    token_file = tmp_path / "client-token"
    token_file.write_text(TOKEN + "\n")
    r = run_console(port, "get_all_vms", options=("--token-file", str(token_file)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []

    r = run_console(port, "get_all_vms")  # no token: the command is refused
    assert r.returncode == 1
    assert "unauthenticated" in r.stdout + r.stderr
    r = run_console(port, "get_all_vms", env=client_env(VMSERVER_TOKEN="wrong-" + TOKEN))
    assert r.returncode == 2  # the token was refused at connect: a connection error
    for out in (r.stdout, r.stderr):
        assert TOKEN not in out
        assert_no_traceback(out)
    assert p.stop() == 0


# --- 2. TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for CN=localhost, IP:127.0.0.1: (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert_pem, key_pem = d / "cert.pem", d / "key.pem"
    r = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_pem), "-out", str(cert_pem),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {r.stderr.decode(errors='replace')}")
    return str(cert_pem), str(key_pem)


async def _plain_client_gets_no_greeting(port: int) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        try:
            first = await asyncio.wait_for(reader.readline(), 1.0)
        except asyncio.TimeoutError:
            first = b""  # nothing came: the server waits for a TLS ClientHello
        except (ConnectionError, OSError):
            first = b""
        assert b"hello" not in first and b"vmserver" not in first, first
        # a plain request is not answered; the connection ends (well before any idle timeout)
        try:
            writer.write(b"health\n")
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 5.0)
        except (ConnectionError, OSError):
            rest = b""
        assert b'"ok"' not in rest and b"OK" not in rest, rest
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def test_tls_server(db, cert):
    cert_pem, key_pem = cert
    async with running(db, tls_cert=cert_pem, tls_key=key_pem) as srv:
        port = srv.address[1]
        async with vmclient.Client(port=port, tls=True, cafile=cert_pem, timeout=10) as c:
            assert await c.health() == "OK"
            assert (await c.add_vm("vm-tls", ram=1, cpu=1, disks=[{"disk_id": "d-tls", "size": 1}]))["id"] == 1

        await _plain_client_gets_no_greeting(port)
        with pytest.raises(vmclient.ConnectError):  # the library, speaking plain TCP, gets no greeting
            await vmclient.Client(port=port, connect_timeout=1.0).connect()

        with pytest.raises(vmclient.ConnectError) as info:  # TLS, but the self-signed cert is not trusted
            await vmclient.Client(port=port, tls=True, connect_timeout=5.0).connect()
        text = str(info.value).lower()
        assert "tls" in text or "certificate" in text, text

        # the server survived all that and keeps serving TLS clients
        async with vmclient.Client(port=port, tls=True, cafile=cert_pem, timeout=10) as c:
            assert await c.health() == "OK"
            assert [vm["vm_id"] for vm in await c.get_all_vms()] == ["vm-tls"]
            assert c.connected


def test_cli_tls_cert_without_key_is_usage_error(spawn, tmp_path, cert):
    cert_pem, key_pem = cert
    for args in (["--tls-cert", cert_pem], ["--tls-key", key_pem]):
        p = spawn("--port", "0", "--db", str(tmp_path / "x.db"), *args, env=CLEAN_ENV)
        assert p.run_to_exit() == 2, args
        assert b"--tls-cert and --tls-key" in p.log
        assert_no_traceback(p.log)


@pytest.mark.parametrize("which", ["garbage-cert", "garbage-key", "missing-cert", "missing-key"])
def test_cli_bad_certificate_exits_1(spawn, tmp_path, cert, which):
    cert_pem, key_pem = cert
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    bad = str(garbage) if which.startswith("garbage") else str(tmp_path / "missing.pem")
    tls = [bad, key_pem] if which.endswith("cert") else [cert_pem, bad]
    p = spawn("--port", "0", "--db", str(tmp_path / "x.db"), "--tls-cert", tls[0], "--tls-key", tls[1],
              env=CLEAN_ENV)
    assert p.run_to_exit() == 1
    text = p.log.decode(errors="replace")
    assert "listening on" not in text
    assert_no_traceback(p.log)
    [line] = [line for line in text.splitlines() if "cannot start" in line]
    # a clear message: it says it is about TLS, and names the file at fault
    assert "TLS" in line and bad in line, line


def test_console_tls_cafile(spawn, tmp_path, cert):
    cert_pem, key_pem = cert
    p = spawn("--port", "0", "--db", str(tmp_path / "c.db"), "--tls-cert", cert_pem, "--tls-key", key_pem,
              env=CLEAN_ENV)
    port = p.wait_listening()
    assert b"TLS" in p.log
    r = run_console(port, "health", options=("--cafile", cert_pem))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    r = run_console(port, "add_vm", "vm_id=vm-1", "ram=1", "cpu=1", "disks=[]", options=("--tls", "--cafile", cert_pem))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vm_id"] == "vm-1"
    r = run_console(port, "health", options=("--tls",))  # not trusted
    assert r.returncode == 2
    assert "TLS" in r.stderr or "certificate" in r.stderr.lower(), r.stderr
    assert_no_traceback(r.stderr)
    assert p.stop() == 0
    assert_no_traceback(p.log)


# --- 3. --require-passwords --------------------------------------------------------------------


async def test_require_passwords(db):
    async with running(db, require_passwords=True) as srv, session(srv.address[1]) as a:
        message = failed(await reply(a, "add_vm", **vm_args("vm-1", "disk-1")), "invalid_args")
        assert "password" in message
        message = failed(await reply(a, "connect_vm", **vm_args("vm-2", "disk-2")), "invalid_args")
        assert "password" in message
        assert await a.ok("get_all_vms") == []  # nothing was registered

        assert (await a.ok("add_vm", **vm_args("vm-1", "disk-1"), password="pw-one"))["vm_id"] == "vm-1"
        assert (await a.ok("connect_vm", **vm_args("vm-2", "disk-2"), password="pw-two"))["connected"] is True
        assert (await a.ok("connect_vm", vm_id="vm-1", password="pw-one"))["connected"] is True
        assert await a.error("authorize_vm", vm_id="vm-1") == "auth_failed"
        assert (await a.ok("authorize_vm", vm_id="vm-1", password="pw-one"))["authorized"] is True
        assert (await a.ok("authorize_vm", vm_id="vm-2", password="pw-two"))["authorized"] is True
        assert (await a.ok("update_vm", vm_id="vm-1", ram=4096))["ram"] == 4096
        assert (await a.ok("disconnect_vm", vm_id="vm-2"))["connected"] is False
        async with session(srv.address[1]) as b:
            assert await b.error("connect_vm", vm_id="vm-2") == "invalid_args"  # no password given
            assert await b.error("connect_vm", vm_id="vm-2", password="nope") == "auth_failed"
            assert (await b.ok("connect_vm", vm_id="vm-2", password="pw-two"))["connected"] is True


async def test_require_passwords_refuses_vm_stored_without_one(db):
    async with running(db) as srv, session(srv.address[1]) as w:
        await w.ok("add_vm", **vm_args("legacy", "legacy-disk"))
        await w.ok("add_vm", **vm_args("modern", "modern-disk"), password="pw-modern")
    async with running(db, require_passwords=True) as srv, session(srv.address[1]) as w:
        message = failed(await reply(w, "connect_vm", vm_id="legacy", password="any-password"), "auth_failed")
        assert "requires" in message and "password" in message, message
        assert (await w.ok("connect_vm", vm_id="modern", password="pw-modern"))["connected"] is True
        [legacy] = [vm for vm in await w.ok("get_all_vms") if vm["vm_id"] == "legacy"]
        assert legacy["connected"] is False


async def test_cli_require_passwords_flag_and_env(spawn, tmp_path):
    ways = [(["--require-passwords"], {}, True),
            ([], {"VMSERVER_REQUIRE_PASSWORDS": "1"}, True),
            ([], {"VMSERVER_REQUIRE_PASSWORDS": "0"}, False)]
    procs = [spawn("--port", "0", "--db", str(tmp_path / f"r{i}.db"), *args, env={**CLEAN_ENV, **env})
             for i, (args, env, _) in enumerate(ways)]
    for (args, env, on), p in zip(ways, procs):
        port = p.wait_listening()
        async with session(port) as w:
            if on:
                assert await w.error("add_vm", **vm_args("vm-1")) == "invalid_args", (args, env)
                assert (await w.ok("add_vm", **vm_args("vm-1"), password="pw"))["vm_id"] == "vm-1"
            else:
                assert (await w.ok("add_vm", **vm_args("vm-1")))["vm_id"] == "vm-1"
        assert p.stop() == 0
        assert (b"passwords required" in p.log) is on, p.log
        assert_no_traceback(p.log)


# --- 4. connecting a password-protected VM -----------------------------------------------------


async def test_connect_protected_vm_needs_its_password(server, connect):
    a, b, c = await connect(), await connect(), await connect()
    await a.ok("add_vm", **vm_args("vm-p", "disk-p"), password="pw-right")

    message = failed(await reply(b, "connect_vm", vm_id="vm-p"), "auth_failed")
    assert "password" in message
    assert await b.error("connect_vm", vm_id="vm-p", password="pw-wrong") == "auth_failed"
    assert await b.ok("get_connected_vms") == []  # no squatting
    vm = await b.ok("connect_vm", vm_id="vm-p", password="pw-right")
    assert vm["connected"] is True

    # held by B: others get conflict, even with the right password
    assert await c.error("connect_vm", vm_id="vm-p", password="pw-right") == "conflict"
    assert await a.error("connect_vm", vm_id="vm-p") == "conflict"
    # the holder may reconnect (a no-op) without the password
    assert (await b.ok("connect_vm", vm_id="vm-p"))["connected"] is True
    assert (await b.ok("authorize_vm", vm_id="vm-p", password="pw-right"))["authorized"] is True
    assert (await b.ok("connect_vm", vm_id="vm-p"))["authorized"] is True  # the no-op changed nothing

    # a VM registered by connect_vm with a password is protected the same way
    assert (await c.ok("connect_vm", **vm_args("vm-q", "disk-q"), password="pw-q"))["connected"] is True
    assert await a.error("connect_vm", vm_id="vm-q", password="pw-q") == "conflict"
    await c.ok("disconnect_vm", vm_id="vm-q")
    assert await a.error("connect_vm", vm_id="vm-q") == "auth_failed"
    assert await a.error("connect_vm", vm_id="vm-q", password="pw-p") == "auth_failed"
    assert (await a.ok("connect_vm", vm_id="vm-q", password="pw-q"))["connected"] is True

    # a VM without a password needs none
    await a.ok("add_vm", **vm_args("vm-open"))
    assert (await c.ok("connect_vm", vm_id="vm-open"))["connected"] is True


# --- 5. guessing is slowed down per VM ---------------------------------------------------------


async def _until_not_locked(w: Wire, cmd: str, deadline_s: float = 3.0, **args) -> dict:
    """Repeat a request while it is refused with 'try again in'; the first other reply."""
    end = time.monotonic() + deadline_s
    while True:
        r = await w.call(cmd, **args)
        locked = r["ok"] is False and "try again in" in r["error"]["message"]
        if not locked:
            return r
        assert r["error"]["code"] == "auth_failed"
        assert time.monotonic() < end, f"still locked after {deadline_s}s: {r}"
        await asyncio.sleep(0.1)


async def test_password_guessing_is_slowed_down_per_vm(db):
    async with running(db, auth_failures_allowed=2) as srv, \
            session(srv.address[1]) as a, session(srv.address[1]) as b:
        await a.ok("add_vm", **vm_args("vm-a"), password="pw-a")
        await a.ok("add_vm", **vm_args("vm-b"), password="pw-b")
        await a.ok("connect_vm", vm_id="vm-a", password="pw-a")

        for _ in range(2):
            assert "wrong password" in failed(await reply(a, "authorize_vm", vm_id="vm-a", password="guess"),
                                              "auth_failed")
        locked_at = time.monotonic()
        message = failed(await reply(a, "authorize_vm", vm_id="vm-a", password="pw-a"), "auth_failed")
        assert "try again in" in message, message
        assert "pw-a" not in message
        # the lock is per VM, not per session: B is refused too, even with the right password
        await a.ok("disconnect_vm", vm_id="vm-a")
        assert "try again in" in failed(await reply(b, "connect_vm", vm_id="vm-a", password="pw-a"), "auth_failed")
        # another VM is not affected
        assert (await b.ok("connect_vm", vm_id="vm-b", password="pw-b"))["connected"] is True
        assert (await b.ok("authorize_vm", vm_id="vm-b", password="pw-b"))["authorized"] is True

        # after the lock (1 s for the first one) the right password works
        r = await _until_not_locked(b, "connect_vm", vm_id="vm-a", password="pw-a")
        assert r["ok"] is True, r
        assert time.monotonic() - locked_at >= 0.8, "the first lock lasts about a second"
        # ... and resets the count: one wrong password now does not lock
        assert "wrong password" in failed(await reply(b, "authorize_vm", vm_id="vm-a", password="guess"),
                                          "auth_failed")
        assert (await b.ok("authorize_vm", vm_id="vm-a", password="pw-a"))["authorized"] is True


async def test_connect_and_authorize_failures_count_together(db):
    async with running(db, auth_failures_allowed=2) as srv, \
            session(srv.address[1]) as a, session(srv.address[1]) as b:
        await a.ok("add_vm", **vm_args("vm-c"), password="pw-c")
        await a.ok("connect_vm", vm_id="vm-c", password="pw-c")
        assert "wrong password" in failed(await reply(a, "authorize_vm", vm_id="vm-c", password="guess-1"),
                                          "auth_failed")
        await a.ok("disconnect_vm", vm_id="vm-c")
        assert "wrong password" in failed(await reply(b, "connect_vm", vm_id="vm-c", password="guess-2"),
                                          "auth_failed")
        # 1 authorize_vm + 1 connect_vm failure = 2: locked for both commands
        assert "try again in" in failed(await reply(b, "connect_vm", vm_id="vm-c", password="pw-c"), "auth_failed")
        assert "try again in" in failed(await reply(a, "connect_vm", vm_id="vm-c", password="pw-c"), "auth_failed")
        assert await b.ok("get_connected_vms") == []

        # failures keep counting after a lock ends: the next wrong one locks again, for longer (2 s)
        r = await _until_not_locked(b, "connect_vm", vm_id="vm-c", password="guess-3")
        assert "wrong password" in failed(r, "auth_failed")
        message = failed(await reply(b, "connect_vm", vm_id="vm-c", password="pw-c"), "auth_failed")
        assert "try again in 2s" in message, message


async def test_concurrent_guesses_do_not_bypass_the_slowdown(db):
    """Guesses sent at once from many sessions must not all be checked: once ``allowed`` wrong
    passwords are in, the rest are refused with 'try again in' (otherwise N connections give N
    guesses per lock period instead of one)."""
    async with running(db, auth_failures_allowed=2) as srv, session(srv.address[1]) as a:
        await a.ok("add_vm", **vm_args("vm-g"), password="pw-g")
        guessers = [await Wire.open(srv.address[1]) for _ in range(10)]
        try:
            replies = await asyncio.gather(*(
                w.call("connect_vm", vm_id="vm-g", password=f"guess-{i}") for i, w in enumerate(guessers)))
        finally:
            for w in guessers:
                await w.close()
        messages = [failed(r, "auth_failed") for r in replies]
        checked = [m for m in messages if "wrong password" in m]
        assert len(checked) <= 2, f"{len(checked)} of 10 concurrent guesses were checked: {messages}"


# --- 6. secrets never in logs, errors or replies -----------------------------------------------

S_TOKEN = "TOKEN-qv7Rw2-Ultra-Secret"
S_WRONG_TOKEN = "WRONGTOKEN-Lm4Pz9"
S_PW = "PASSWORD-right-8Hn3Kd"
S_PW2 = "PASSWORD-second-3Jw6Yt"
S_WRONG = ["PASSWORD-wrong-A1x9", "PASSWORD-wrong-B2y8", "PASSWORD-wrong-C3z7", "PASSWORD-wrong-D4w6",
           "[PASSWORD-wrong-E5v5"]
S_LONG = "PASSWORD-toolong-Q5r1" + "x" * 1100
S_TYPED = ["PASSWORD-inlist-K7t2", "PASSWORD-inobject-N8u3"]
SECRETS = [S_TOKEN, S_WRONG_TOKEN, S_PW, S_PW2, *S_WRONG, S_LONG[:30], *S_TYPED]


async def test_secrets_never_in_logs_or_replies(spawn, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(S_TOKEN + "\n")
    p = spawn("--port", "0", "--db", str(tmp_path / "s.db"), "--log-level", "DEBUG", "--token-file", str(token_file),
              env=CLEAN_ENV)
    port = p.wait_listening()
    lines: list[bytes] = []

    async def send(w: Wire, request: dict | str) -> dict:
        await w.send(request)
        line = await w.recv_line()
        lines.append(line)
        return json.loads(line)

    def req(cmd: str, **args) -> dict:
        return {"cmd": cmd, "args": args}

    a, b = await Wire.open(port), await Wire.open(port)
    try:
        lines += [a.greeting_line, b.greeting_line]
        assert failed(await send(a, req("auth", token=S_WRONG_TOKEN)), "auth_failed")
        assert failed(await send(a, f"auth token={S_WRONG_TOKEN}"), "auth_failed")
        assert failed(await send(a, req("auth", token="T" * 1025)), "invalid_args")
        assert (await send(a, req("auth", token=S_TOKEN)))["ok"] is True
        assert (await send(b, f"auth token={S_TOKEN}"))["ok"] is True

        assert (await send(a, req("add_vm", **vm_args("vm-s", "disk-s"), password=S_PW)))["ok"] is True
        assert (await send(b, req("connect_vm", vm_id="vm-s", password=S_WRONG[0])))["error"]["code"] == "auth_failed"
        assert (await send(b, f"connect_vm vm_id=vm-s password={S_WRONG[1]}"))["error"]["code"] == "auth_failed"
        assert (await send(b, req("connect_vm", vm_id="vm-s", password=S_PW)))["ok"] is True
        assert (await send(b, req("authorize_vm", vm_id="vm-s", password=S_WRONG[2])))["error"]["code"] == "auth_failed"
        assert (await send(b, f"authorize_vm vm_id=vm-s password={S_WRONG[4]}"))["error"]["code"] == "auth_failed"
        assert (await send(b, req("authorize_vm", vm_id="vm-s", password=S_PW)))["ok"] is True
        # registering by connect_vm with a password, and a wrong one from another session
        assert (await send(a, req("connect_vm", **vm_args("vm-t", "disk-t"), password=S_PW2)))["ok"] is True
        await send(a, req("disconnect_vm", vm_id="vm-t"))
        assert (await send(b, req("connect_vm", vm_id="vm-t", password=S_WRONG[3])))["error"]["code"] == "auth_failed"

        # malformed passwords: too long, and of the wrong type
        for cmd, extra in (("add_vm", vm_args("vm-u", "disk-u")), ("connect_vm", {"vm_id": "vm-s"}),
                           ("authorize_vm", {"vm_id": "vm-s"})):
            assert failed(await send(b, req(cmd, **extra, password=S_LONG)), "invalid_args")
            assert failed(await send(b, req(cmd, **extra, password=[S_TYPED[0]])), "invalid_args")
            assert failed(await send(b, req(cmd, **extra, password={"p": S_TYPED[1]})), "invalid_args")
        # a password of the wrong type in inline form (a JSON array)
        assert failed(await send(b, f'authorize_vm vm_id=vm-s password=["{S_TYPED[0]}"]'), "invalid_args")
        # too long in inline form
        assert failed(await send(b, f"connect_vm vm_id=vm-s password={S_LONG}"), "invalid_args")
        # and nothing the lists show carries a hash
        for cmd in ("get_all_vms", "get_connected_vms", "get_authorized_vms", "get_all_disks"):
            assert (await send(a, req(cmd)))["ok"] is True
    finally:
        await a.close()
        await b.close()
    assert p.stop() == 0

    replies = b"".join(lines)
    assert b"scrypt$" not in replies
    assert b"scrypt" not in p.log
    for secret in SECRETS:
        assert secret.encode() not in replies, secret
        assert secret.encode() not in p.log, (secret, p.log.decode(errors="replace"))
    assert b"x" * 200 not in p.log and b"T" * 200 not in p.log
    # the attempts were logged (so the checks above were not vacuous), with the VM
    assert b"wrong token" in p.log
    assert b"wrong password" in p.log and b"vm-s" in p.log and b"vm-t" in p.log
    assert b"DEBUG" in p.log
    assert_no_traceback(p.log)
