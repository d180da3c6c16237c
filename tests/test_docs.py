"""The documentation is true: every relative link in README.md and docs/ resolves, every `ccfs-fast`
sub-command and flag they name exists in the CLI, docs/library.md's snippets run as written, and the
top-level API exports what it says, each name with a docstring."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ccfs_fast.cli import make_parser
from ccfs_fast.cli.commands import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scores" / "README.md"]
# flags of other programs the docs show (torchrun, tensorboard)
OTHER_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--logdir"}


def test_every_docs_page_opens_with_what_it_is_for():
    for page in sorted((ROOT / "docs").glob("*.md")):
        head = page.read_text().split("\n\n", 2)[1]
        assert "this page" in head.lower() or "this is the reference" in head.lower(), page.name


def test_every_relative_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            assert ROOT in path.parents or path == ROOT, f"{page.name} links outside the repository: {target}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _bench_flags() -> set[str]:
    """Every flag of the benchmarks and of the device check (their own parsers, read from --help)."""
    flags = set()
    for module in [m for m, _ in BENCHMARKS.values()] + ["benchmarks.gpu_check"]:
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        flags |= set(re.findall(r"(--[a-z][a-z0-9-]*)", done.stdout))
    return flags


def _commands(text: str) -> list[list[str]]:
    """Every `ccfs-fast ...` command in the page's code (blocks and inline spans), continuations joined."""
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    blocks = [body for language, body in fenced if language in ("", "bash")]
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)  # fenced blocks out before inline spans
    code = "\n".join(blocks + re.findall(r"`([^`\n]+)`", prose))
    code = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in code.splitlines():
        at = line.find("ccfs-fast ")
        if at < 0 or "pip install" in line:
            continue
        try:
            words = shlex.split(line[at:], comments=True)
        except ValueError:
            words = line[at:].split()
        out.append(words)
    return out


def test_every_command_and_flag_the_docs_name_exists():
    parser = make_parser()
    commands = _subparsers(parser)
    known = _flags(parser) | {f for sub in commands.values() for f in _flags(sub)} | \
        {f for sub in commands.values() for k in _subparsers(sub).values() for f in _flags(k)} | \
        _bench_flags() | OTHER_FLAGS
    for page in PAGES:
        text = page.read_text()
        for words in _commands(text):
            if len(words) < 2 or words[1].startswith("-") or words[1] in ("COMMAND", "NAME"):
                continue
            assert words[1] in commands, f"{page.name}: no command `ccfs-fast {words[1]}`"
            sub = commands[words[1]]
            kinds = _subparsers(sub)
            if kinds and len(words) > 2 and not words[2].startswith("-") and words[2] != "KIND":
                assert words[2] in kinds, f"{page.name}: no `ccfs-fast {words[1]} {words[2]}`"
                sub = kinds[words[2]]
            if words[1] == "bench":
                continue  # a benchmark's own flags: checked against `known` below
            for word in words[2:]:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and flag != "--":
                    assert flag in _flags(sub) | _flags(parser), f"{page.name}: `{' '.join(words[:3])}` has no {flag}"
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", text):
            assert flag in known or flag.removeprefix("--no-") in {k.removeprefix("--") for k in known}, \
                f"{page.name} names {flag}, which no command takes"


def _snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "library.md").read_text(), re.S | re.M)


def test_library_snippets_run_as_written(engine_data, tmp_path):
    """docs/library.md's snippets in order, in one Python process, in a folder holding the files they
    name (a CIFAR-10-format pool, its test split, a distilled set and a teacher made by the CLI)."""
    (tmp_path / "data").mkdir()
    for name, target in (("pool", "data/cifar10_train.beton"), ("test", "data/cifar10_test.beton"),
                         ("distilled", "data/distilled.beton"), ("teacher", "teacher.pt"),
                         ("scores", "forgetting.npy")):
        for suffix in ("", ".json", ".rows.npz"):
            source = Path(f"{engine_data[name]}{suffix}")
            if source.is_file():
                shutil.copy(source, tmp_path / f"{target}{suffix}")
    snippets = _snippets()
    assert len(snippets) == 4
    script = "\n".join(snippets)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("note: --smoke: the distilled set's smallest class") == 1  # the notes, once
    settings = json.loads((tmp_path / "runs" / "from-python" / "state.json").read_text())["settings"]
    assert settings["score"] == "forgetting" and settings["score_path"].endswith("forgetting.npy")
    assert (tmp_path / "runs" / "from-python" / "eval-hard.json").is_file() and "convnet_tiny" in done.stdout
    assert "torch.Size([8, 3, 32, 32])" in done.stdout


def test_top_level_api():
    import ccfs_fast

    done = subprocess.run([sys.executable, "-c", "from ccfs_fast import run_curriculum, RunConfig, run, "
                           "make_run_config, select_per_class, BetonFile; import sys; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    lazy = subprocess.run([sys.executable, "-c", "import ccfs_fast, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert lazy.stdout.strip() == "False"  # `import ccfs_fast` imports nothing heavy
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(ccfs_fast.__path__):  # importing a submodule sets a package attribute:
        importlib.import_module(f"ccfs_fast.{module.name}")  # none may shadow an exported name
    for name in ccfs_fast.__all__:
        value = getattr(ccfs_fast, name)
        assert callable(value) and value.__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ccfs_fast.nope  # noqa: B018
