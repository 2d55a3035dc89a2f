"""The README cannot drift (issue 21, item 9): every ``resunetpp ...`` command it shows -- synopses,
examples and inline code -- names only flags its command has, every flag of every command appears
in it, its engine-option table is each engine's ``option_names``, every Python block compiles, and
the Python API example runs on the shipped model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import typer

import resunetpp.defaults as defaults
from resunetpp.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
CLICK = typer.main.get_command(app)
COMMANDS = dict(CLICK.commands)
FLAG = re.compile(r"(?<![\w/.-])(--[a-z][a-z0-9-]*|-[A-Za-z])(?![\w-])")


def code_blocks() -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", TEXT, re.S | re.M)]


def readme_commands() -> list[tuple[str, str]]:
    """``(command, rest of the line)`` of every ``resunetpp COMMAND ...`` in a shell block, a synopsis
    (continuation lines: a trailing backslash, or indented lines after it) or inline code."""
    found = []
    for lang, body in code_blocks():
        if lang == "python":
            continue
        logical: list[str] = []
        for line in body.splitlines():
            if logical and (logical[-1].rstrip().endswith("\\") or (line[:1].isspace() and line.strip()
                                                                     and not COMMAND_START.match(line))):
                logical[-1] = logical[-1].rstrip().rstrip("\\") + " " + line.strip()
            else:
                logical.append(line)
        found += [c for line in logical for c in _commands_in(line)]
    prose = re.sub(r"^```.*?^```", "", TEXT, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        found += _commands_in(span)
    return found


COMMAND_START = re.compile(r"\s*(?:\$ )?resunetpp\s+(?:--version|[a-z]+)\b")


def _commands_in(line: str) -> list[tuple[str, str]]:
    """``resunetpp COMMAND ...`` where a line (or ``-- resunetpp ...`` of a job submission) starts."""
    out = []
    for m in re.finditer(r"(?:^\s*|^\s*\$ |-- )resunetpp\s+(--version|[a-z]+)\b(.*)", line):
        rest = m.group(2).split(" resunetpp ")[0].split("#")[0]
        out.append((m.group(1), rest))
    return out


def flags_of(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


def test_the_readme_shows_every_command():
    shown = {c for c, _ in readme_commands()}
    assert set(COMMANDS) | {"--version"} <= shown, set(COMMANDS) - shown


@pytest.mark.parametrize("command,rest", readme_commands(), ids=lambda v: v if len(v) < 40 else v[:40])
def test_each_readme_command_names_only_flags_it_has(command, rest):
    if command == "--version":
        assert "--version" in flags_of(CLICK)
        return
    assert command in COMMANDS, f"README shows `resunetpp {command}`, which does not exist"
    unknown = sorted(set(FLAG.findall(rest)) - flags_of(COMMANDS[command]))
    assert not unknown, f"`resunetpp {command}` in the README names {unknown}, which it does not have"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_in_the_readme(name):
    shown = {f for c, rest in readme_commands() if c == name for f in FLAG.findall(rest)}
    missing = sorted(p.opts[0] for p in COMMANDS[name].params if p.opts[0].startswith("-")
                     and not shown & {*p.opts, *p.secondary_opts})  # either form of an on/off pair
    assert not missing, f"the README never shows `resunetpp {name}` with {missing}"


def test_engine_option_table_is_each_engines_option_names():
    from resunetpp.engines import registry

    table = TEXT.split("<!-- engine-options:start -->")[1].split("<!-- engine-options:end -->")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", table, re.M)}
    assert set(rows) == set(registry.names())
    for backend in registry.backends():
        keys = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", rows[backend.name]))  # not the values
        assert keys == list(backend.engine.option_names), (backend.name, keys)


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(code_blocks()) if lang == "python"])
def test_python_blocks_compile(index):
    compile(code_blocks()[index][1], f"README.md python block {index}", "exec")


def test_python_api_example_runs_on_the_shipped_model(tmp_path, monkeypatch):
    from PIL import Image

    if defaults.default_model_path() is None or defaults.default_data_path() is None:
        pytest.skip("this install ships no default model or sample data")
    block = next(body for lang, body in code_blocks() if lang == "python" and "resunetpp.load(" in body)
    images = sorted((defaults.default_data_path() / "images").iterdir())[:2]
    shutil.copy(images[0], tmp_path / "polyp.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {"pil_image": Image.open(images[1]), "paths": images}
    exec(compile(block, "README.md Python API", "exec"), scope)
    mask, probs = scope["mask"], scope["probs"]
    width, height = Image.open(images[-1]).size  # the loop's last mask
    assert mask.shape == (height, width) and set(map(int, mask.ravel())) <= {0, 1}
    assert probs.shape == (1, *Image.open(images[1]).size[::-1])
