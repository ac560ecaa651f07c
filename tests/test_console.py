"""The ``vmclient`` console as a user meets it: one-shot, script and interactive (through a pty).

The console runs its own event loop, so it always runs as a subprocess (``python -m vmclient``)
against a real server subprocess on an ephemeral loopback port. Nothing of ours is mocked.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import sys
from typing import Any

import pytest

import vmserver.commands as server_commands
from vmclient import render
from vmclient.commands import COMMANDS

from console_pty import ROOT, RUN_TIMEOUT, PtyConsole, clean, client_env, spans

VM1_DISKS = '[{"disk_id":"disk-1","size":500}]'
ADD_VM1 = ["add_vm", "vm_id=vm-1", "ram=2048", "cpu=2", f"disks={VM1_DISKS}"]
HEADERS = ["VM_ID", "RAM_MIB", "CPU", "DISKS", "CONNECTED", "AUTHORIZED"]


# --- helpers ------------------------------------------------------------------------------


def run_client(port: int, *words: str, input: str | None = None, options: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vmclient --port PORT [options] WORDS`` with pipes (so stdout is not a tty)."""
    return subprocess.run(
        [sys.executable, "-m", "vmclient", "--host", "127.0.0.1", "--port", str(port), *options, *words],
        input=input if input is not None else "", capture_output=True, text=True, cwd=ROOT,
        env=env or client_env(), timeout=RUN_TIMEOUT)  # run() kills the child on timeout


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


@pytest.fixture
def port(spawn, tmp_path) -> int:
    """A vmserver subprocess on an ephemeral port, with an empty database."""
    return spawn("--port", "0", "--db", str(tmp_path / "console.db")).wait_listening()


def assert_aligned(lines: list[str], rows: list[list[str]], right: list[bool]) -> None:
    """Left columns start, and right (numeric) columns end, at the same offset on every line."""
    located = [spans(line, cells) for line, cells in zip(lines, rows, strict=True)]
    for col, is_right in enumerate(right):
        edges = {(end if is_right else start) for start, end in (spans_[col] for spans_ in located)}
        assert len(edges) == 1, (col, "\n".join(lines))
    for a, b in zip(located[0], located[0][1:]):  # columns do not run into each other
        assert b[0] >= a[1] + 2, lines[0]


# --- one-shot mode ------------------------------------------------------------------------


def test_one_shot_add_vm_then_duplicate(port):
    first = run_client(port, *ADD_VM1)
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)
    assert first.stdout.count("\n") == 1
    assert record["vm_id"] == "vm-1" and record["ram"] == 2048 and record["cpu"] == 2
    assert [(d["disk_id"], d["size"]) for d in record["disks"]] == [("disk-1", 500)]
    assert record["connected"] is False and record["authorized"] is False

    again = run_client(port, *ADD_VM1)
    assert again.returncode == 1, again
    error = json.loads(again.stdout)
    assert set(error) == {"error"} and error["error"]["code"] == "already_exists"
    assert "vm-1" in error["error"]["message"]
    assert_no_traceback(again.stderr)


def test_one_shot_cannot_connect_exits_2_with_one_line():
    result = run_client(closed_port(), "health")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect"), result.stderr
    assert "127.0.0.1" in lines[0]
    assert_no_traceback(result.stderr)


def run_plain(*words: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vmclient WORDS`` with only ``env`` added to a VMSERVER_*-free environment."""
    return subprocess.run([sys.executable, "-m", "vmclient", *words], input="", capture_output=True, text=True,
                          cwd=ROOT, env=client_env(**(env or {})), timeout=RUN_TIMEOUT)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr
    assert "cannot connect" not in lines[0]  # refused before connecting: no server is needed to see it
    assert_no_traceback(result.stderr)


BAD_SETTINGS = {  # name: (flags, environment, what the one line must name)
    "VMSERVER_PORT not a number": ((), {"VMSERVER_PORT": "abc"}, ["VMSERVER_PORT", "'abc'"]),
    "VMSERVER_PORT out of range": ((), {"VMSERVER_PORT": "70000"}, ["VMSERVER_PORT", "70000"]),
    "VMSERVER_PORT zero": ((), {"VMSERVER_PORT": "0"}, ["VMSERVER_PORT"]),
    "--port not a number": (("--port", "abc"), {}, ["--port", "'abc'"]),
    "--port out of range": (("--port", "70000"), {}, ["--port", "70000"]),
    "--port negative": (("--port=-1",), {}, ["--port", "-1"]),
    "--host empty": (("--host", ""), {}, ["--host", "empty"]),
    "--host not a port": (("--host", "127.0.0.1:notaport"), {}, ["--host", "not a port number", "'notaport'"]),
    "--host port out of range": (("--host", "127.0.0.1:70000"), {}, ["--host", "65535", "70000"]),
    "--host empty entry": (("--host", "127.0.0.1,,b"), {}, ["--host", "empty address", "'127.0.0.1,,b'"]),
    "--host second bad": (("--host", "127.0.0.1", "--host", "[::1"), {}, ["--host", "'[::1'", "no closing ']'"]),
    "VMSERVER_HOST not a port": ((), {"VMSERVER_HOST": "127.0.0.1:x"}, ["VMSERVER_HOST", "not a port number", "'x'"]),
    "VMSERVER_HOST empty entry": ((), {"VMSERVER_HOST": "127.0.0.1,"}, ["VMSERVER_HOST", "empty address"]),
    "VMSERVER_HOST no host": ((), {"VMSERVER_HOST": "127.0.0.1,:8888"}, ["VMSERVER_HOST", "':8888' has no host"]),
    "--timeout not a number": (("--timeout", "abc"), {}, ["--timeout", "'abc'"]),
    "--timeout zero": (("--timeout", "0"), {}, ["--timeout"]),
    "--timeout negative": (("--timeout=-1",), {}, ["--timeout"]),
    "--timeout nan": (("--timeout", "nan"), {}, ["--timeout", "nan"]),
    "--timeout inf": (("--timeout", "inf"), {}, ["--timeout", "inf"]),
    "--token-file missing": (("--token-file", "{tmp}/none"), {}, ["{tmp}/none", "cannot read"]),
    "--token-file a directory": (("--token-file", "{tmp}"), {}, ["cannot read token file {tmp}"]),
    "--token-file empty": (("--token-file", "{tmp}/empty"), {}, ["token file {tmp}/empty is empty"]),
    "--token-file blank": (("--token-file", "{tmp}/blank"), {}, ["token file {tmp}/blank is empty"]),
    "--token-file not UTF-8": (("--token-file", "{tmp}/binary"), {}, ["cannot read token file {tmp}/binary"]),
    "VMSERVER_TOKEN_FILE empty": ((), {"VMSERVER_TOKEN_FILE": "{tmp}/empty"}, ["token file {tmp}/empty is empty"]),
    "VMSERVER_TOKEN blank": ((), {"VMSERVER_TOKEN": "   "}, ["VMSERVER_TOKEN", "empty"]),
    "--cafile missing": (("--cafile", "{tmp}/none.pem"), {}, ["{tmp}/none.pem"]),
    "--cafile not PEM": (("--cafile", "{tmp}/binary"), {}, ["{tmp}/binary"]),
    "--cafile with --tls not PEM": (("--tls", "--cafile", "{tmp}/blank"), {}, ["{tmp}/blank"]),
    "unknown flag": (("--frob",), {}, ["--frob"]),
}


@pytest.mark.parametrize("flags,env,named", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_setting_is_one_line_and_exit_2(tmp_path, flags, env, named):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "blank").write_bytes(b"  \n\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00token\n")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    where = () if "VMSERVER_PORT" in env or any(f.startswith("--port") for f in flags) else (
        "--port", str(closed_port()))  # a setting let through would end in "cannot connect" instead
    result = run_plain(*where, *map(fill, flags), "health", env={k: fill(v) for k, v in env.items()})
    assert_one_line_exit_2(result, *map(fill, named))


def test_empty_token_file_is_refused_as_the_server_refuses_it(spawn, tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    server = spawn("--port", "0", "--db", str(tmp_path / "t.db"), "--token-file", str(empty))
    assert server.run_to_exit() == 2
    assert f"token file {empty} is empty".encode() in server.log
    assert_one_line_exit_2(run_plain("--port", str(closed_port()), "--token-file", str(empty), "health"),
                           f"token file {empty} is empty")


def test_settings_from_the_environment(port):
    result = run_plain("health", env={"VMSERVER_HOST": "127.0.0.1", "VMSERVER_PORT": str(port)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "OK"
    result = run_plain("health", env={"VMSERVER_HOST": "", "VMSERVER_PORT": str(port)})  # empty: the default
    assert result.returncode == 0, result.stderr
    result = run_plain("--port", str(port), "health", env={"VMSERVER_PORT": "abc"})  # the flag wins, unchecked env
    assert result.returncode == 0, result.stderr


def test_host_given_twice_reaches_the_second_when_the_first_is_dead(port):
    dead = closed_port()
    result = run_plain("--host", f"127.0.0.1:{dead}", "--host", f"127.0.0.1:{port}", "health")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "OK"
    assert_no_traceback(result.stderr)
    # comma-separated in one flag, and an entry without a port takes --port
    result = run_plain("--host", f"127.0.0.1:{dead},127.0.0.1", "--port", str(port), "health")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "OK"


def test_comma_separated_environment_host_reaches_the_second(port):
    dead = closed_port()
    result = run_plain("health", env={"VMSERVER_HOST": f"127.0.0.1:{dead}, 127.0.0.1:{port}"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "OK"
    result = run_plain("health", env={"VMSERVER_HOST": f"127.0.0.1:{dead},127.0.0.1", "VMSERVER_PORT": str(port)})
    assert result.returncode == 0, result.stderr
    result = run_plain("--host", f"127.0.0.1:{port}", "health",  # the flag wins over the environment
                       env={"VMSERVER_HOST": f"127.0.0.1:{dead}"})
    assert result.returncode == 0, result.stderr


def test_every_host_dead_is_one_line_naming_each():
    first, second = closed_port(), closed_port()
    result = run_plain("--host", f"127.0.0.1:{first}", "--host", f"127.0.0.1:{second}", "health")
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to any of 2 servers"), result.stderr
    assert f"127.0.0.1:{first}: " in lines[0] and f"127.0.0.1:{second}: " in lines[0], result.stderr
    assert_no_traceback(result.stderr)


def test_demo_unusable_port_is_one_line_and_exit_2():
    result = run_plain("demo", "--port", "99999", "--vms", "1")
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "99999" in lines[0], result.stderr
    assert_no_traceback(result.stderr)


def test_one_shot_json_flag(port):
    result = run_client(port, "health", options=("--json",))
    assert result.returncode == 0 and json.loads(result.stdout) == "OK"
    result = run_client(port, "get_all_vms", options=("--json",))
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_one_shot_help_needs_no_server():
    nowhere = closed_port()
    listing = run_client(nowhere, "help")
    assert listing.returncode == 0, listing.stderr
    for name in COMMANDS:
        assert name in listing.stdout
    one = run_client(nowhere, "help", "add_vm")
    assert one.returncode == 0, one.stderr
    assert "add_vm vm_id=STR ram=INT cpu=INT disks=JSON [password=STR]" in one.stdout
    assert "example: add_vm" in one.stdout
    assert_no_traceback(listing.stderr + one.stderr)


def test_one_shot_word_that_is_not_key_value(port):
    result = run_client(port, "add_vm", "vm_id=x", "oops")
    assert result.returncode == 1
    assert "key=value" in result.stderr and "oops" in result.stderr
    assert_no_traceback(result.stderr)
    assert json.loads(run_client(port, "get_all_vms").stdout) == []  # nothing was sent


def test_one_shot_arguments_as_one_json_object(port):
    words = json.dumps({"vm_id": "j-1", "ram": 512, "cpu": 1, "disks": [{"disk_id": "j-d", "size": 3}]})
    result = run_client(port, "add_vm", words)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["vm_id"] == "j-1" and record["disks"][0]["disk_id"] == "j-d"


def test_one_shot_value_with_a_space_is_one_value(port):
    result = run_client(port, "add_vm", "vm_id=a b", "ram=1", "cpu=1", "disks=[]")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid_args"
    assert "vm_id" in error["message"] and "'a b'" in error["message"]


def test_one_shot_timeout_is_an_ordinary_argument(port):
    # "timeout" is not an argument of health: the server must reject it as it does for the
    # inline form (the script-mode line here), instead of the client taking it as its call timeout.
    inline = run_client(port, input="health timeout=1\n")
    assert inline.returncode == 1 and json.loads(inline.stdout)["error"]["code"] == "invalid_args"
    for value in ("abc", "1"):
        result = run_client(port, "health", f"timeout={value}")
        assert_no_traceback(result.stderr)
        assert result.returncode == 1, (value, result)
        assert json.loads(result.stdout)["error"]["code"] == "invalid_args", (value, result.stdout)


def test_one_shot_values_follow_the_inline_rule(port):
    # protocol.md: a value is JSON when it parses, text otherwise; NaN/Infinity are not JSON,
    # so vm_id=NaN is the string "NaN" (as the same line typed inline shows).
    inline = run_client(port, input="add_vm vm_id=Infinity ram=1 cpu=1 disks=[]\n")
    assert inline.returncode == 0 and json.loads(inline.stdout)["vm_id"] == "Infinity"
    result = run_client(port, "add_vm", "vm_id=NaN", "ram=1", "cpu=1", "disks=[]", options=("--timeout", "3"))
    assert_no_traceback(result.stderr)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["vm_id"] == "NaN"


def test_one_shot_key_given_twice_is_refused(port):
    # The inline form answers a key given twice with bad_request; one-shot must not silently
    # keep the last value.
    inline = run_client(port, input="add_vm vm_id=d1 vm_id=d2 ram=1 cpu=1 disks=[]\n")
    assert inline.returncode == 1
    result = run_client(port, "add_vm", "vm_id=d1", "vm_id=d2", "ram=1", "cpu=1", "disks=[]")
    assert result.returncode == 1, result.stdout
    assert json.loads(run_client(port, "get_all_vms").stdout) == []


# --- script mode --------------------------------------------------------------------------


def test_script_all_ok(port):
    script = "\n".join([
        "# a comment line",
        "health",
        "",
        "   ",
        " ".join(ADD_VM1),
        "  # indented comment",
        "get_all_vms",
        "quit",
        "health",  # after quit: not run
    ]) + "\n"
    result = run_client(port, input=script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert json.loads(lines[0]) == "OK"
    assert json.loads(lines[1])["vm_id"] == "vm-1"
    assert [v["vm_id"] for v in json.loads(lines[2])] == ["vm-1"]
    assert_no_traceback(result.stderr)


def test_script_failure_exits_1_and_goes_on(port):
    script = "\n".join([" ".join(ADD_VM1), " ".join(ADD_VM1), "helth", "get_all_disks"]) + "\n"
    result = run_client(port, input=script)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4, result.stdout
    assert lines[0]["vm_id"] == "vm-1"
    assert lines[1] == {"error": {"code": "already_exists", "message": lines[1]["error"]["message"]}}
    assert lines[2]["error"]["code"] == "unknown_command"
    assert [(d["disk_id"], d["vm"]) for d in lines[3]] == [("disk-1", "vm-1")]  # ran after the failures


def test_script_server_unreachable_exits_2():
    result = run_client(closed_port(), input="health\nget_all_vms\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "error: cannot connect" in result.stderr
    assert_no_traceback(result.stderr)


# --- interactive mode (pty) ---------------------------------------------------------------


def test_interactive_prompt_tables_block_and_error(port, tmp_path):
    prompt = f"127.0.0.1:{port}> "
    con = PtyConsole(port, tmp_path)
    try:
        banner = con.expect(prompt)
        assert f"connected to 127.0.0.1:{port}" in banner
        assert banner.index("connected to") < banner.index(prompt)

        block = con.command(" ".join(ADD_VM1), prompt)
        lines = block.splitlines()
        assert any(re.fullmatch(r"vm_id:\s+vm-1", line) for line in lines), block
        assert any(re.fullmatch(r"connected:\s+no", line) for line in lines), block
        assert any(re.fullmatch(r"ram:\s+2048 MiB", line) for line in lines), block

        con.command("add_vm vm_id=wide-vm-name-2 ram=65536 cpu=16 disks=[]", prompt)
        out = con.command("get_all_vms", prompt)
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("VM_ID"))
        assert lines[header].split() == HEADERS, out
        table = lines[header:header + 3]
        rows = [HEADERS,
                ["vm-1", "2048", "2", "disk-1:500G", "no", "no"],
                ["wide-vm-name-2", "65536", "16", "-", "no", "no"]]
        for line, cells in zip(table, rows):
            assert line.split() == cells, out
        assert_aligned(table, rows, [False, True, True, False, False, False])
        assert lines[header + 3] == "(2 VMs)", out

        out = con.command("get_all_disks", prompt)
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("DISK_ID"))
        assert re.fullmatch(r"DISK_ID  SIZE_GIB  VM", lines[header]), out
        assert lines[header + 1].split() == ["disk-1", "500", "vm-1"], out
        assert_aligned(lines[header:header + 2], [["DISK_ID", "SIZE_GIB", "VM"], ["disk-1", "500", "vm-1"]],
                       [False, True, False])
        assert lines[header + 2] == "(1 disk)"

        out = con.command(" ".join(ADD_VM1), prompt)
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert errors == ["error already_exists: VM 'vm-1' already exists"], out

        out = con.command("helth", prompt)
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith("error unknown_command: "), out
        assert "health" in errors[0]
        assert_no_traceback(clean(con.raw))
    finally:
        con.close()


def test_interactive_json_flag_and_one_shot_on_a_tty(port, tmp_path):
    human = PtyConsole(port, tmp_path, "get_all_vms")  # one-shot on a terminal: human output
    try:
        assert "(no VMs)" in human.expect("(no VMs)")
        assert human.wait() == 0
    finally:
        human.close()
    raw = PtyConsole(port, tmp_path, "--json", "get_all_vms")
    try:
        assert raw.wait() == 0
        assert clean(raw.raw).strip() == "[]"
    finally:
        raw.close()


def test_interactive_completion(port, tmp_path):
    prompt = f"127.0.0.1:{port}> "
    con = PtyConsole(port, tmp_path)
    try:
        con.expect(prompt)
        con.send("get_conn")
        con.expect("get_conn")
        con.send("\t")
        con.expect("ected_vms")  # the rest of the name, completed
        out = con.command("", prompt)
        assert "(no VMs)" in out, out
        assert "unknown_command" not in out and "error" not in out, out

        con.send("connect_vm vm_")
        con.expect("connect_vm vm_")
        con.send("\t")
        con.expect("id=")
        out = con.command('c-1 ram=1 cpu=1 disks=[]', prompt)  # the completed line is what runs
        assert re.search(r"^vm_id:\s+c-1$", out, re.M), out
        assert re.search(r"^connected:\s+yes$", out, re.M), out
    finally:
        con.close()


def test_interactive_history_has_no_passwords(port, tmp_path):
    prompt = f"127.0.0.1:{port}> "
    con = PtyConsole(port, tmp_path)
    try:
        con.expect(prompt)
        out = con.command("add_vm vm_id=pw-1 ram=1 cpu=1 disks=[] password=topsecret", prompt)
        assert re.search(r"^vm_id:\s+pw-1$", out, re.M), out
        con.command("connect_vm vm_id=pw-1 password=topsecret", prompt)
        out = con.command("authorize_vm vm_id=pw-1 password=topsecret", prompt)
        assert re.search(r"^authorized:\s+yes$", out, re.M), out
        out = con.command('authorize_vm {"vm_id":"pw-1","password":"topsecret"}', prompt)
        assert re.search(r"^authorized:\s+yes$", out, re.M), out
        con.send("quit\r")
        assert con.wait() == 0
    finally:
        con.close()
    history = con.history
    assert history.is_file()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    text = history.read_text()
    assert "topsecret" not in text
    assert "add_vm vm_id=pw-1 ram=1 cpu=1 disks=[] password=***" in text
    assert "authorize_vm vm_id=pw-1 password=***" in text
    assert '"password":"***"' in text
    assert "connect_vm vm_id=pw-1 password=***" in text


def test_interactive_ctrl_d_exits_0(port, tmp_path):
    con = PtyConsole(port, tmp_path)
    try:
        con.expect(f"127.0.0.1:{port}> ")
        con.send("\x04")
        assert con.wait() == 0
        assert_no_traceback(clean(con.raw))
    finally:
        con.close()


def test_interactive_reconnects_after_server_restart(spawn, tmp_path):
    first = spawn("--port", "0", "--db", str(tmp_path / "one.db"))
    port = first.wait_listening()
    prompt = f"127.0.0.1:{port}> "
    con = PtyConsole(port, tmp_path)
    try:
        con.expect(prompt)
        out = con.command("connect_vm vm_id=held-1 ram=1 cpu=1 disks=[]", prompt)
        assert re.search(r"^connected:\s+yes$", out, re.M), out
        assert first.stop() == 0

        out = con.command("health", "not connected> ")
        assert f"connection to 127.0.0.1:{port} was lost" in out, out
        lost = next(line for line in out.splitlines() if "was lost" in line)
        assert "held-1" in lost and "disconnected" in lost, out
        assert "OK" not in out.splitlines()

        second = spawn("--port", str(port), "--db", str(tmp_path / "one.db"))
        assert second.wait_listening() == port
        out = con.command("health", prompt)
        assert "reconnected" in out, out
        assert "OK" in out.splitlines(), out
        out = con.command("get_connected_vms", prompt)  # a new session holds nothing
        assert "(no VMs)" in out, out
        assert_no_traceback(clean(con.raw))
    finally:
        con.close()


def test_interactive_starts_without_server_and_connects_later(spawn, tmp_path):
    port = closed_port()
    con = PtyConsole(port, tmp_path)
    try:
        out = con.expect("not connected> ")
        assert "cannot connect" in out and "will try again" in out, out
        server = spawn("--port", str(port), "--db", str(tmp_path / "late.db"))
        assert server.wait_listening() == port
        out = con.command("health", f"127.0.0.1:{port}> ")
        assert "OK" in out.splitlines(), out
    finally:
        con.close()


def test_interactive_prompt_shows_the_server_reached_and_follows_it(spawn, tmp_path):
    """Two servers: the first address is dead, so the prompt names the second; when that one
    stops and the first comes up, the next command says so and the prompt names the first."""
    port_a = closed_port()
    b = spawn("--port", "0", "--db", str(tmp_path / "b.db"))
    port_b = b.wait_listening()
    con = PtyConsole(port_a, tmp_path, "--host", f"127.0.0.1:{port_b}")  # --host 127.0.0.1 --port A, then B
    try:
        out = con.expect(f"127.0.0.1:{port_b}> ")
        assert f"connected to 127.0.0.1:{port_b} " in out, out
        out = con.command("connect_vm vm_id=on-b ram=1 cpu=1 disks=[]", f"127.0.0.1:{port_b}> ")
        assert re.search(r"^connected:\s+yes$", out, re.M), out

        a = spawn("--port", str(port_a), "--db", str(tmp_path / "a.db"))
        assert a.wait_listening() == port_a
        assert b.stop() == 0
        out = con.command("health", f"127.0.0.1:{port_a}> ")
        assert f"connection to 127.0.0.1:{port_b} was lost" in out and "on-b" in out, out
        assert f"reconnected to 127.0.0.1:{port_a} (a new session)" in out, out
        assert "OK" in out.splitlines(), out
        out = con.command("get_all_vms", f"127.0.0.1:{port_a}> ")  # a's database: b's VM is not there
        assert "(no VMs)" in out, out
        assert_no_traceback(clean(con.raw))
    finally:
        con.close()


# --- the console's command table agrees with the server's registry --------------------------


def test_commands_agree_with_server_registry():
    assert list(COMMANDS) == list(server_commands.COMMANDS)
    for name, info in COMMANDS.items():
        params = server_commands.COMMANDS[name].schema.params
        assert [a.name for a in info.args] == [p.name for p in params], name
        assert [a.required for a in info.args] == [p.required for p in params], name
        assert info.name == name
        if info.example:
            assert info.example.split()[0] == name


# --- rendering ----------------------------------------------------------------------------


def vm(vm_id: str, ram: int, cpu: int, disks: list[tuple[str, int]], connected: bool = False,
       authorized: bool = False, id: int = 1) -> dict[str, Any]:
    return {"id": id, "vm_id": vm_id, "ram": ram, "cpu": cpu,
            "disks": [{"id": i + 1, "disk_id": d, "size": s, "vm_id": id} for i, (d, s) in enumerate(disks)],
            "connected": connected, "authorized": authorized, "last_connected": None}


def test_vm_table_alignment():
    vms = [vm("a", 1, 1, []), vm("a-much-longer-vm-name", 16777216, 4096, [("d1", 10), ("d2", 2000)], True, True),
           vm("mid-vm", 2048, 16, [("disk-x", 1)], True)]
    text = render.vm_table(vms)
    lines = text.splitlines()
    assert lines[-1] == "(3 VMs)"
    rows = [HEADERS,
            ["a", "1", "1", "-", "no", "no"],
            ["a-much-longer-vm-name", "16777216", "4096", "d1:10G,d2:2000G", "yes", "yes"],
            ["mid-vm", "2048", "16", "disk-x:1G", "yes", "no"]]
    table = lines[:-1]
    assert [line.split() for line in table] == rows
    assert_aligned(table, rows, [False, True, True, False, False, False])
    # numeric columns are right-aligned: short numbers are padded on the left
    ram_end = spans(table[2], rows[2])[1][1]
    assert table[1][:ram_end].endswith(" 1") and table[3][:ram_end].endswith(" 2048")
    assert all(line == line.rstrip() for line in table)
    assert render.vm_table([vm("x", 1, 1, [])]).endswith("\n(1 VM)")


def disks_cell(vms: list[dict[str, Any]], row: int = 0) -> str:
    """The DISKS cell of one row of vm_table, cut out by the header's column offsets."""
    lines = render.vm_table(vms).splitlines()
    start, stop = lines[0].index("DISKS"), lines[0].index("CONNECTED")
    return lines[1 + row][start:stop].rstrip()


def test_vm_table_truncates_long_disk_lists():
    disks = [(f"disk-{i:02d}", 100 + i) for i in range(64)]
    cell = disks_cell([vm("many", 1, 1, disks)])
    match = re.fullmatch(r"(.*),\+(\d+) more", cell)
    assert match, cell
    shown = match.group(1).split(",")
    assert shown == [f"{d}:{s}G" for d, s in disks[:len(shown)]]  # a prefix, in order
    assert int(match.group(2)) == 64 - len(shown)
    assert len(cell) <= 48
    short = render.vm_table([vm("few", 1, 1, disks[:3])])
    assert "disk-00:100G,disk-01:101G,disk-02:102G" in short and "more" not in short


def test_disk_cell_with_a_long_first_disk():
    # A single disk whose "id:sizeG" is longer than the cell: the cell must not begin with a
    # stray comma and show no disk at all.
    cell = disks_cell([vm("v", 1, 1, [("x" * 64, 1)])])
    assert not cell.startswith(","), cell
    assert len(cell) <= 48


def test_disk_cell_never_wider_than_its_limit():
    # _DISKS_WIDTH = 48: "a VM's disk column is cut here". Two disks whose parts join to exactly
    # 40 characters followed by 12 more disks.
    disks = [("a" * 17, 1), ("b" * 16, 1)] + [(f"c{i}", 1) for i in range(12)]
    cell = disks_cell([vm("v", 1, 1, disks)])
    assert cell.endswith("more"), cell
    assert len(cell) <= 48, (len(cell), cell)


def test_human_rendering():
    assert render.human("health", "OK") == "OK"
    assert render.human("get_all_vms", []) == "(no VMs)"
    assert render.human("get_connected_vms", []) == "(no VMs)"
    assert render.human("get_all_disks", []) == "(no disks)"
    disks = [{"id": 1, "disk_id": "disk-1", "size": 500, "vm_id": 1, "vm": "vm-1"},
             {"id": 2, "disk_id": "d2", "size": 20, "vm_id": 2, "vm": "another-vm"}]
    lines = render.human("get_all_disks", disks).splitlines()
    rows = [["DISK_ID", "SIZE_GIB", "VM"], ["disk-1", "500", "vm-1"], ["d2", "20", "another-vm"]]
    assert [line.split() for line in lines[:-1]] == rows
    assert_aligned(lines[:-1], rows, [False, True, False])
    assert lines[-1] == "(2 disks)"
    table = render.human("get_all_vms", [vm("vm-1", 2048, 2, [("disk-1", 500)])]).splitlines()
    assert table[0].split() == HEADERS and table[-1] == "(1 VM)"
    block = render.human("add_vm", vm("vm-1", 2048, 2, [("disk-1", 500)], connected=True))
    assert re.search(r"^vm_id:\s+vm-1$", block, re.M) and re.search(r"^connected:\s+yes$", block, re.M)
    assert re.search(r"^disks:\s+disk-1 \(500 GiB\)$", block, re.M)
    assert re.search(r"^last_connected:\s+never$", block, re.M)
    assert render.as_json({"a": [1, "é"]}) == '{"a":[1,"é"]}'


ODD_RESULTS = [None, 1, [1], ["x", None], [{}, 1], [{"vm_id": "a", "disks": 5}], [{"vm_id": "a", "disks": [1, None]}],
               [{"vm_id": "a", "disks": "abc"}], [{"disk_id": "d"}, "x"], {}, {"vm_id": "a", "disks": 5},
               {"vm_id": "a", "disks": [1, {"disk_id": "d", "size": 1}]}, {"events": "abc"},
               [{"event": "vm_added", "ts": "t", "vm_id": "v", "ram": 1, "disks": 7}]]


@pytest.mark.parametrize("result", ODD_RESULTS, ids=[json.dumps(r)[:40] for r in ODD_RESULTS])
def test_human_rendering_of_shapes_it_does_not_know(result):
    """A result of an unexpected shape (another server, a newer one) is shown, never a traceback."""
    for name in [*COMMANDS, "unknown"]:
        text = render.human(name, result)
        assert isinstance(text, str) and text
    if not (isinstance(result, list) and all(isinstance(r, dict) for r in result)) and not isinstance(result, dict):
        assert render.human("get_all_vms", result) == json.dumps(result, indent=2)
    assert "5" in render.human("get_vm", {"vm_id": "a", "disks": 5})
    event = {"event": "vm_added", "data": {"vm_id": "v", "ram": 1, "disks": result}, "ts": "t"}
    assert render.event_line(event).split()[:3] == ["t", "vm_added", "v"]
