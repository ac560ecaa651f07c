"""protocol.md is the contract: the server and the document must agree.

- every command in the registry has a section, and every section a command;
- each section's argument table names exactly the command's arguments;
- the error-code table lists exactly the server's error codes;
- every example session replays against a real server with exactly the documented replies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmserver.commands import COMMANDS
from vmserver.errors import ErrorCode

from conftest import Wire

DOC = Path(__file__).resolve().parent.parent / "protocol.md"
REPLY_PREFIX = "# <- "  # the reply to the request line above it (or the greeting, first in a session)
EVENT_PREFIX = "# <~ "  # a line that arrives on its own (an event), without a request
_TIMESTAMP = re.compile(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
_VERSION = re.compile(r'"version":"[^"]*"')
_PEER = re.compile(r'"peer":"127\.0\.0\.1:\d+"')


@dataclass
class Step:
    request: str | None  # None: a line that arrives unasked (the greeting, or an event)
    expected: str


@dataclass
class Block:
    session: str
    steps: list[Step] = field(default_factory=list)
    line: int = 0  # where it starts in protocol.md, for failure messages


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """Body of each '### name' section of '## Commands', up to the next heading of level 2 or 3."""
    commands = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^(#{2,3}) (.+)$", commands, flags=re.M)
    out = {}
    for i in range(1, len(parts) - 2, 3):
        if parts[i] == "###":
            out[parts[i + 1].strip()] = parts[i + 2]
    return out


def parse_blocks(text: str) -> list[Block]:
    """The ```session [NAME] blocks: request lines, each followed by its '# <- ' reply line."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.fullmatch(r"```session(?: (\S+))?", lines[i])
        i += 1
        if not match:
            continue
        block = Block(match.group(1) or "A", line=i)
        pending: str | None = None
        have_pending = False
        while lines[i] != "```":
            line = lines[i]
            i += 1
            if line.startswith(REPLY_PREFIX):
                block.steps.append(Step(pending, line[len(REPLY_PREFIX):]))
                pending, have_pending = None, False
            elif line.startswith(EVENT_PREFIX):
                assert not have_pending, f"protocol.md:{i}: request without a documented reply"
                block.steps.append(Step(None, line[len(EVENT_PREFIX):]))
            elif line.strip() and not line.lstrip().startswith("#"):
                assert not have_pending, f"protocol.md:{i}: request without a documented reply"
                pending, have_pending = line, True
        assert not have_pending, f"protocol.md:{i}: request without a documented reply"
        blocks.append(block)
        i += 1
    return blocks


_SERVER = re.compile(r'"(server_id|host)":"[^"]*"|"pid":\d+')
_LIMIT = re.compile(r'"connections":\{"open":(\d+),"limit":\d+\}')  # the cap follows this machine's open-file limit


def normalize(line: str) -> str:
    line = _SERVER.sub(lambda m: f'"{m.group(1) or "pid"}":"<{m.group(1) or "pid"}>"', line.strip())
    line = _TIMESTAMP.sub('"<timestamp>"', line)
    line = _LIMIT.sub(lambda m: f'"connections":{{"open":{m.group(1)},"limit":"<limit>"}}', line)
    return _PEER.sub('"peer":"127.0.0.1:<port>"', _VERSION.sub('"version":"*"', line))


def test_every_command_is_documented_and_nothing_else() -> None:
    documented = set(sections(doc_text()))
    assert documented == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_argument_tables_match_the_registry(name: str) -> None:
    body = sections(doc_text())[name]
    documented = re.findall(r"^\| `([a-z_]+)` \|", body, flags=re.M)
    assert documented == COMMANDS[name].schema.names(), f"argument table of {name}"
    required = [p.name for p in COMMANDS[name].schema.params if p.required]
    documented_required = re.findall(r"^\| `([a-z_]+)` \|[^|]*\| yes \|", body, flags=re.M)
    assert documented_required == required, f"required arguments of {name}"


def test_error_code_table_matches_the_server() -> None:
    text = doc_text()
    table = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert documented == [code.value for code in ErrorCode]


def test_every_example_has_a_reply_and_every_command_an_example() -> None:
    blocks = parse_blocks(doc_text())
    requests = [s.request for b in blocks for s in b.steps if s.request]
    assert all("?" != s.expected for b in blocks for s in b.steps), "unfilled example reply"
    for name in COMMANDS:
        assert any(r.startswith(name) or f'"cmd":"{name}"' in r for r in requests), name


async def test_examples_replay_exactly(server) -> None:
    sessions: dict[str, Wire] = {}
    try:
        for block in parse_blocks(doc_text()):
            wire = sessions.get(block.session)
            greeting_due = wire is None
            if wire is None:
                wire = sessions[block.session] = await Wire.open(server.address[1])
            for step in block.steps:
                where = f"protocol.md:{block.line} (session {block.session}): {step.request}"
                if step.request is None and greeting_due:
                    reply = wire.greeting_line.decode()
                elif step.request is None:
                    reply = (await wire.recv_line()).decode()  # an event, arriving by itself
                else:
                    await wire.send(step.request)
                    reply = (await wire.recv_line()).decode()
                greeting_due = False
                assert normalize(reply) == normalize(step.expected), where
    finally:
        for wire in sessions.values():
            await wire.close()
