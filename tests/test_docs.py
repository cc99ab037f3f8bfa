"""The text a user reads: README.md at most 300 lines, its tables and those of docs/ equal to what
scripts/results_tables.py renders from benchmarks/results/*.json, and every repo path it names
(README, docs/, the commands' --help texts, config headers, docstrings) existing."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = (
    "recblr_torchrec",
    "kernels",
    "launchers",
    "configs",
    "tests",
    "benchmarks",
    "scripts",
    "docs",
    "packaging",
    "examples",
)
PATH = re.compile(r"(?<![\w./-])(?:\.\./)*(?:(?:" + "|".join(TOP) + r")/[\w./*-]*|[\w./-]*\.md)(?:#[\w-]*)?")


def tracked() -> list:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [path for path in out.splitlines() if os.path.exists(os.path.join(ROOT, path))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        found = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "runs", "__pycache__")]
            found += [os.path.relpath(os.path.join(folder, name), ROOT) for name in files]
        return found


FILES = tracked()
NAMES = {os.path.basename(path) for path in FILES}


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _exists(target: str) -> bool:
    path = os.path.join(ROOT, target)
    return bool(glob.glob(path)) if "*" in target else os.path.exists(path)


def missing_paths(text: str, where: str) -> list:
    """The repo paths and markdown file names in ``text`` (written in ``where``, a repo-relative file) that do
    not exist: markdown link targets resolve from ``where``'s folder, other paths from the repo root,
    and a bare markdown file name must be the name of some file of the repo."""
    missing = []
    for link in LINK.findall(text):
        if "://" in link or link.startswith("mailto:"):
            continue
        target = os.path.normpath(os.path.join(os.path.dirname(where), link))
        if not target.startswith("..") and not _exists(target):
            missing.append(link)
    for match in PATH.finditer(LINK.sub("]()", text)):
        token = match.group(0).split("#")[0].rstrip(".,:;")
        if not token or token.startswith("../") or any(c in token for c in "<>{}$"):
            continue  # outside the repo (the data directory, a sibling checkout), or a placeholder
        if token.split("/")[0] in TOP:
            if not _exists(token.rstrip("/")):
                missing.append(token)
        elif "/" not in token and token not in NAMES:  # a data-relative path is not a repo path
            missing.append(token)
    return missing


def pages() -> list:
    return ["README.md"] + sorted(path for path in FILES if path.startswith("docs/") and path.endswith(".md"))


def python_texts():
    """(file, text) of every docstring and every argparse help/description string in the repo's Python."""
    for path in FILES:
        if not path.endswith(".py"):
            continue
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield path, doc
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("add_argument", "ArgumentParser"):
                for keyword in node.keywords:
                    if keyword.arg in ("help", "description", "epilog") and isinstance(keyword.value, ast.Constant):
                        yield path, str(keyword.value.value)


def test_the_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 300


def test_the_tables_equal_what_their_json_renders():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import results_tables
    finally:
        sys.path.pop(0)
    assert results_tables.main(["--check"]) == 0


@pytest.mark.parametrize("kind", ["pages", "python", "configs"])
def test_every_repo_path_named_in_the_text_exists(kind):
    if kind == "pages":
        texts = [(path, open(os.path.join(ROOT, path)).read()) for path in pages()]
    elif kind == "python":
        texts = list(python_texts())
    else:
        texts = []
        for path in (p for p in FILES if p.startswith("configs/") and p.endswith(".yaml")):
            with open(os.path.join(ROOT, path)) as f:
                texts.append((path, "\n".join(line for line in f if line.lstrip().startswith("#"))))
    broken = [f"{path}: {token}" for path, text in texts for token in missing_paths(text, path)]
    assert not broken, "paths that do not exist in the repo:\n" + "\n".join(sorted(set(broken)))


def test_the_path_check_catches_what_it_should():
    assert missing_paths("see SPEC.md and configs/nope.yaml, docs/absent.md#x", "README.md") == [
        "SPEC.md",
        "configs/nope.yaml",
        "docs/absent.md",
    ]
    assert missing_paths("configs/tiny.yaml, `benchmarks/results/*.json`, ml-1m/ORIGIN.md", "README.md") == []
    assert missing_paths("[up](../README.md), [other](nope.md)", "docs/x.md") == ["nope.md"]
