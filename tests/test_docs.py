"""The shell commands in README.md and docs/*.md are checked, as written.

- ``python main.py ...``: the flags parse with main.py's parser; the ``-b`` configs load with the overrides,
  every override names a key the configs already have (a typo would otherwise add a new, unused key), and
  the resulting data block has only parameters its target accepts.
- ``klvae-*`` tools, ``python -m klvae...`` and the repo's scripts: every ``--flag`` used exists (``--help``).
- ``make X``: the Makefile has target X.

Commands that need data, GPUs or weights are not executed here; the end-to-end tests (test_cli, test_demo,
tests/data) run the same entry points on tiny data.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from klvae.training.cli import build_parser
from klvae.util import _check_arguments, get_obj_from_str, load_config, to_container
from tests.cli_helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)


def shell_commands(path: Path) -> list[list[str]]:
    """Each command of the file's bash blocks as tokens (continuation lines joined, comments dropped)."""
    commands = []
    for block in _BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


ALL = [(path.name, tokens) for path in DOCS for tokens in shell_commands(path)]


def _console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.split(":")[0].strip() for name, target in (ln.split("=") for ln in lines)}


@functools.cache
def _help(*program: str) -> str:
    """``program --help`` in this process (argparse prints and exits before any work; no interpreter start)."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [program[-1], "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            if program[0] == "-m":
                runpy.run_module(program[1], run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(REPO / program[0]), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def _flags(tokens: list[str]) -> list[str]:
    return [t.split("=")[0] for t in tokens if t.startswith("--")]


def _check_main(tokens: list[str]) -> None:
    overrides = [t for t in tokens if "=" in t and not t.startswith("-")]
    args = build_parser().parse_args([t for t in tokens if t not in overrides])
    if not args.base:
        return  # resume of a run directory: the run's saved config
    bases = [REPO / b for b in args.base]
    before = OmegaConf.to_container(load_config(bases), resolve=False)
    for item in overrides:
        node = before
        for part in item.split("=", 1)[0].split("."):
            exists = part in node if isinstance(node, dict) else part.isdigit() and int(part) < len(node)
            assert exists, f"override {item!r}: {part!r} is not a key of {[str(b.name) for b in bases]}"
            node = node[part] if isinstance(node, dict) else node[int(part)]
    config = load_config(bases, overrides)
    data = to_container(OmegaConf.to_container(config.data, resolve=False))
    _check_arguments(data["target"], get_obj_from_str(data["target"]), data.get("params") or {})


@pytest.mark.parametrize(("doc", "tokens"), ALL, ids=[f"{d}:{' '.join(t)[:60]}" for d, t in ALL])
def test_documented_command(doc, tokens):
    scripts = _console_scripts()
    if tokens[:2] == ["python", "main.py"]:
        _check_main(tokens[2:])
    elif (
        tokens[0] in scripts
        or tokens[:2] == ["python", "-m"]
        or (tokens[0] == "python" and tokens[1].endswith(".py"))
    ):
        if tokens[0] in scripts:
            program = ("-m", scripts[tokens[0]])
        elif tokens[1] == "-m":
            program = ("-m", tokens[2])
        else:
            program = (tokens[1],)
        text = _help(*program)
        for flag in _flags(tokens):
            assert flag in text, f"{' '.join(tokens)}: {flag} is not an option of {' '.join(program)}"
    elif tokens[0] == "make":
        phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
        assert all(t in phony for t in tokens[1:]), tokens
    # Anything else (wandb sync, conda, pip, shell builtins) is another tool's business.


def test_docs_have_commands():
    assert len(ALL) > 20 and any(t[:2] == ["python", "main.py"] for _, t in ALL)
