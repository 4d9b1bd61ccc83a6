"""Docs that run: every `indistill ...` command shown in README.md and docs/ runs (with tiny overrides),
the README's Python examples run, and docs/config.md is what the schema generates."""

import re
import shlex
from pathlib import Path

import pytest

from indistill.cli import main
from indistill.config import config_reference

from .conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Tiny overrides: every key exists in every config; budgets stay >= the longest warmup (imagenet: 14 epochs).
TINY = ["progress=false", "device=cpu", "data.train_subset=120", "data.test_subset=60", "teacher.train.epochs=1",
        "auxiliary.ce.epochs=1", "auxiliary.pkt.epochs=1", "student.train.epochs=15", "train.epochs=1",
        "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]", "data.batch_size=64"]
LISTING = {"methods", "models", "datasets", "layers"}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shown_commands() -> list[tuple[str, str]]:
    """(file, command line) for every line starting with `indistill ` in a bash block of the docs."""
    out = []
    for doc in DOCS:
        for block in _blocks(doc.read_text(), "bash"):
            for line in block.splitlines():
                line = line.split(" #")[0].split("|")[0].strip()
                if line.startswith("indistill "):
                    out.append((str(doc.relative_to(ROOT)), line))
    return out


def test_the_docs_show_commands():
    cmds = [c for _, c in shown_commands()]
    assert len(cmds) >= 10 and any(c.startswith("indistill grid") for c in cmds)


def _argv(line: str, tmp: Path) -> list[str]:
    argv = shlex.split(line)[1:]
    if not argv or argv[0].startswith("-") or argv[0] in LISTING:
        return argv
    if argv[0] == "evaluate":  # the run it reads was made by an earlier command of the same docs (cwd = tmp)
        return [*argv, "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]"]
    if argv[0] == "export":  # likewise; it takes no config overrides
        return argv
    argv = [a for a in argv if not a.startswith("out_dir=")]
    extra = [f"out_dir={tmp / 'runs'}", *TINY]
    if argv[0] == "grid":
        i = argv.index("--seeds")
        argv[i + 1] = "2"  # two seeds show the pairing; five would only take longer
        extra += ["--workers", "2", "--threads", "1"]
    if any("fashion_mnist" in a for a in argv):
        require_fashion_mnist()
    return [*argv, *extra]


@pytest.mark.parametrize("doc", [str(d.relative_to(ROOT)) for d in DOCS if "indistill " in d.read_text()])
def test_every_shown_command_runs(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for d, line in shown_commands():
        if d != doc:
            continue
        argv = _argv(line, tmp_path)
        try:
            code = main(argv)
        except SystemExit as e:  # --version and --help exit through argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 0, f"{doc}: `{line}` exited {code}: {err[-500:]}"


@pytest.mark.parametrize("i", range(len(_blocks((ROOT / "README.md").read_text(), "python"))))
def test_readme_python_examples_run(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks((ROOT / "README.md").read_text(), "python")[i]
    exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "readme_example"})


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: regenerate it with `indistill schema > docs/config.md`"
