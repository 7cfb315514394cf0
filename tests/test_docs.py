"""The docs check: README.md, CONTRIBUTING.md and docs/ say only what the CLI and the API accept.

Every `ptqflow ...` command in a fenced block or an inline code span is parsed by the real
parser (flows/cli.py, built from flows/options.py); every `--option` named alone in inline code
must be one of ptqflow's, unless it belongs to another tool (OTHER_TOOLS); every
`model_free_ptq(...)` call's keywords are in its signature, and every `prefect deployment run
FLOW/NAME -p key=value` names a parameter of that flow. Fenced blocks that follow a
`<!-- runnable -->` line run for real, in the slow tier, after the README's first command has
built the tiny example they use.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import build_parser
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
SEPARATORS = {"&&", "||", ";", "|", "&"}
# options of other tools that the docs name in inline code
OTHER_TOOLS = {
    "--speculative-config",  # vllm serve
    "--watch",  # prefect deployment run
    "--pool",  # prefect worker start
    "--nworkers",  # dask worker
    "--nthreads",
    "--durations",  # pytest
    "--repeat",  # benchmarks/*.py
    "--flow",
    "--out",
    "--shard-gb",
}
FLOWS = {
    "quantize-checkpoint": "quantize_checkpoint",
    "reindex-fused-weights": "reindex_fused_weights",
    "verify-checkpoint": "verify_checkpoint",
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str
    runnable: bool

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, m.start()) + 1
        found.append(Block(page, line, m.group(1), m.group(2), before.strip() == RUNNABLE))
    return found


def prose(page: Path) -> str:
    return FENCE.sub("", page.read_text())


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: continuations joined, comments dropped, split
    at `&&`, `;`, `|`."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        argv: list[str] = []
        for token in lex:
            if token in SEPARATORS:
                found.append(argv)
                argv = []
            else:
                argv.append(token)
        found.append(argv)
    return [argv for argv in found if argv]


def shell_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.lang in ("bash", "sh", "")]


def ptqflow_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `ptqflow`) of every documented ptqflow command."""
    found = [
        (b.where(), argv[1:])
        for b in shell_blocks()
        for argv in commands(b.text)
        if argv[0] == "ptqflow"
    ]
    for page in PAGES:
        for span in INLINE.findall(prose(page)):
            if span.startswith("ptqflow ") and "…" not in span:
                found.append((str(page.relative_to(ROOT)), shlex.split(span)[1:]))
    return found


def parser_options() -> tuple[set[str], dict[str, set[str]]]:
    """ptqflow's own options, and each command's."""
    parser = build_parser()
    own = {c: set(p._option_string_actions) for c, p in sub_parsers(parser).items()}
    return set(parser._option_string_actions), own


def sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def options() -> set[str]:
    """Every option string of ptqflow and of each of its commands."""
    top, own = parser_options()
    return top.union(*own.values())


def parse(argv: list[str]) -> str | None:
    """Why the real parser refuses `argv`, or None. A mention (`ptqflow plan`, `ptqflow
    --debug`, `ptqflow plan --scheme`) has no arguments: its command and options must exist."""
    top, own = parser_options()
    if len([a for a in argv if not a.startswith("-")]) <= 1:
        command = next((a for a in argv if not a.startswith("-")), None)
        if command is not None and command not in own:
            return f"no command {command}"
        unknown = [a for a in argv if a.startswith("-") and a not in top | own.get(command, top)]
        return f"unknown options {unknown}" if unknown else None
    parser = build_parser()
    for p in [parser, *sub_parsers(parser).values()]:
        p.allow_abbrev = False  # the docs spell options out: `--report` is not `--report-dir`
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1]
    return None


def test_every_documented_ptqflow_command_parses():
    found = ptqflow_commands()
    assert len(found) >= 20, found  # the extraction itself works
    refused = [
        f"{where}: ptqflow {shlex.join(argv)}: {why}"
        for where, argv in found
        if (why := parse(argv))
    ]
    assert refused == []


def test_every_option_named_in_the_docs_exists():
    known = options()
    named = {}
    for page in PAGES:
        for span in INLINE.findall(prose(page)):
            m = re.match(r"(--[a-z][a-z0-9-]*)", span)
            if m:
                named.setdefault(m.group(1), str(page.relative_to(ROOT)))
    assert len(named) >= 10, named
    unknown = {o: where for o, where in named.items() if o not in known | OTHER_TOOLS}
    assert unknown == {}, "options the docs name that flows/options.py does not define"


def python_calls(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for page in PAGES:
        for b in blocks(page):
            if b.lang == "python":
                for node in ast.walk(ast.parse(b.text)):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
                        found.append((b.where(), node))
    return found


def test_model_free_ptq_calls_use_its_signature():
    from flows import model_free_ptq

    accepted = set(inspect.signature(model_free_ptq).parameters)
    calls = python_calls("model_free_ptq")
    assert calls
    for where, call in calls:
        assert {k.arg for k in call.keywords} <= accepted, where


def test_deployment_parameters_are_the_flows():
    import flows

    runs = [
        (b.where(), argv)
        for b in shell_blocks()
        for argv in commands(b.text)
        if argv[:3] == ["prefect", "deployment", "run"]
    ]
    assert runs
    for where, argv in runs:
        flow = getattr(flows, FLOWS[argv[3].split("/")[0]])
        accepted = set(inspect.signature(flow.fn).parameters)
        given = {argv[i + 1].split("=")[0] for i, a in enumerate(argv) if a == "-p"}
        assert given and given <= accepted, (where, given - accepted)


def test_the_readme_test_command_is_ci_s():
    first, second = blocks(ROOT / "README.md")[:2]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert second.text.strip().endswith(ci), (second.text, ci)
    assert "ptqflow quantize examples/" in first.text


def run_script(script: str, cwd: Path, env: dict) -> str:
    """Run a documented command as a user would: `ptqflow` is this checkout's CLI."""
    out = []
    for argv in commands(script):
        if argv[0] == "ptqflow":
            argv = [sys.executable, "-m", "flows.cli", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}{proc.stderr}"
        out.append(proc.stdout)
    return "".join(out)


@pytest.mark.slow
def test_the_readme_example_and_runnable_blocks_run(tmp_path):
    """The README's first command less its set-up (make the example, quantize it), in a copy
    of the checkout's paths; then every block marked runnable, in the same folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    first = blocks(ROOT / "README.md")[0].text
    example = [argv for argv in commands(first) if argv[0] in ("python", "ptqflow")]
    assert [argv[0] for argv in example] == ["python", "ptqflow"], example
    out = run_script("\n".join(shlex.join(argv) for argv in example), tmp_path, env)
    dest = tmp_path / example[1][3]
    assert out.strip().splitlines()[-1] == f"serve it with: vllm serve {dest}", out
    assert (dest / "config.json").exists() and (dest / "README.md").exists()
    runnable = [b for p in PAGES for b in blocks(p) if b.runnable]
    assert runnable
    for b in runnable:
        run_script(b.text, tmp_path, env)
