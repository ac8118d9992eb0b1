"""Every reference to the code in prose resolves: ``python tools/check_refs.py`` (``make lint``;
``tests/test_refs.py`` runs it in the suite, so CI does too).

What is checked, in the repository's Python files (docstrings and comments) and its Markdown
(README.md, docs/, bench/README.md, examples/README.md):

- a dotted ``merger.x.y`` names a module of the package, or a name defined in one (a function,
  class, constant, a re-export, a method or field of a class);
- a file named in backticks (```kernel.py```, ```merger/fold/_fold.c```, ```docs/design.md```),
  a script in a command in Markdown backticks, and in Python comments and docstrings any plain
  ``name.py``, is a file of the repository: a path from the root or from the naming file's folder, or the tail of
  one (``engine/ranks.py``, a basename);
- a Markdown link ``[text](path)`` to a local file points at one.

Nothing may point outside the repository: a name that exists only elsewhere (a peer's script)
is written without the ``.py``, or listed in ``OUTSIDE`` with where it lives. Exit 1 with one
line per broken reference (``file:line: what``), 0 when all resolve.
"""

from __future__ import annotations

import ast
import io
import os
import re
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "out", "demo",
             "merged", "nanogpt-lawa", ".whl"}
# names that look like references but are not: the manifest merger writes, and files of other projects
NOT_CODE = {"merger.json", "merger.egg-info"}
OUTSIDE = {
    "lawa.py": "the LAWA paper's training script (github.com/JeanKaddour/LAWA)",
    "average_checkpoints.py": "fairseq's scripts/average_checkpoints.py",
    "train.py": "nanoGPT's training script",
    "model.py": "nanoGPT's model (GPT, GPTConfig)",
    "convert_checkpoint.py": "a framework's own checkpoint converter",
    "zero_to_fp32.py": "DeepSpeed's script, saved beside every checkpoint (deepspeed/utils/zero_to_fp32.py)",
}

EXAMPLES = {"tools/check_refs.py", "tests/test_refs.py"}  # they name broken references on purpose
DOTTED = re.compile(r"(?<![\w./-])merger(?:\.[A-Za-z_]\w*)+(?![\w-])")
# code files, and the Markdown of the repository (README.md, docs/...): a ticked results.json or
# table.md is a file merger writes, not one it has
TICKED = re.compile(r"``?([\w./-]+\.(?:py|c|sh)|[A-Z]+\.md|docs/[\w./-]+\.md|[\w./-]*README\.md)``?")
PLAIN_PY = re.compile(r"(?<![\w./-])([\w/-]+\.py)\b")
PLAIN_MD = re.compile(r"(?<![\w./-])([A-Z]+\.md)\b")  # DESIGN.md, STYLE.md: a clone has only what is committed
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@lru_cache(maxsize=None)
def walk() -> tuple[Path, ...]:
    """Every file of the repository, the skipped folders (.venv, build outputs) pruned as the walk
    goes: a virtual environment holds a hundred thousand files."""
    out = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        out += [Path(folder) / n for n in sorted(names)]
    return tuple(out)


def files() -> list[Path]:
    return [p for p in walk() if p.suffix in (".py", ".md")]


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py", base.with_suffix(".c")):  # .c: a native extension
        if f.is_file():
            return f
    return None


@lru_cache(maxsize=None)
def names_in(path: Path) -> dict[str, ast.AST | str]:
    """Top-level names of a module: the node that defines each, or ``"module:name"`` for an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return _names(tree.body, path)


def _names(body: list[ast.stmt], path: Path) -> dict[str, ast.AST | str]:
    out: dict[str, ast.AST | str] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == "_API" for t in node.targets):  # lazy re-exports (merger/__init__)
            for k, v in zip(node.value.keys, node.value.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                    out[k.value] = f"{v.value}:{k.value}"
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}:{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = f"{a.name}:"
        elif isinstance(node, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, optional imports
            out.update(_names(node.body, path))
    return out


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        f = module_file(".".join(parts[:cut]))
        if f is not None:
            return _attr(f, parts[cut:], depth=0)
    return False


def _attr(module: Path, rest: list[str], depth: int) -> bool:
    if not rest:
        return True
    if depth > 8:
        return False
    found = names_in(module).get(rest[0])
    if found is None:  # a submodule not imported in __init__ is still a module
        sub = module_file(".".join([*module.relative_to(ROOT).with_suffix("").parts[:-1], module.stem, rest[0]])
                          if module.name != "__init__.py" else
                          ".".join([*module.relative_to(ROOT).parent.parts, rest[0]]))
        return sub is not None and _attr(sub, rest[1:], depth + 1)
    if isinstance(found, str):  # imported: follow it
        mod, _, name = found.partition(":")
        if not mod.startswith("merger"):
            return True  # a third-party name re-exported: not ours to check
        target = module_file(mod)
        if target is None:
            return False
        return _attr(target, ([name] if name else []) + rest[1:], depth + 1)
    if isinstance(found, ast.ClassDef) and len(rest) > 1:
        members = _names(found.body, module)
        return rest[1] in members and len(rest) == 2
    return len(rest) == 1


@lru_cache(maxsize=None)
def paths() -> frozenset[str]:
    """Every file and folder of the repository, relative to its root."""
    found = {p.relative_to(ROOT).as_posix() for p in walk()}
    return frozenset(found | {"/".join(f.split("/")[:i]) for f in found for i in range(1, f.count("/") + 1)})


@lru_cache(maxsize=None)
def tails() -> frozenset[str]:
    """Every tail of every repository path: ``merger/engine/ranks.py``, ``engine/ranks.py``, ``ranks.py``."""
    return frozenset("/".join(parts[i:]) for p in paths() for parts in [p.split("/")] for i in range(len(parts)))


def file_exists(name: str, where: Path) -> bool:
    """From the root, from the naming file's folder, or the tail of a repository path
    (``engine/ranks.py`` for merger/engine/ranks.py, a basename for any file of that name)."""
    name = name.strip("/")
    if (ROOT / name).exists() or (where.parent / name).exists():
        return True
    return name in tails()


def prose(path: Path, text: str) -> list[tuple[int, str]]:
    """The lines a reader reads: all of a Markdown file; a Python file's comments and docstrings
    (a file name in code, such as one a test writes, is data, not a reference)."""
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    lines = text.splitlines()
    out: dict[int, str] = {}
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            for n in range(body[0].lineno, body[0].end_lineno + 1):
                out[n] = lines[n - 1]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = out.get(tok.start[0], "") + " " + tok.string
    return sorted(out.items())


def problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    for lineno, line in prose(path, text):
        for m in DOTTED.finditer(line):
            ref = m.group(0)
            if ref not in NOT_CODE and not resolves(ref):
                out.append(f"{rel}:{lineno}: {ref} is no module or name in the package")
        names = set(TICKED.findall(line)) | set(PLAIN_MD.findall(line))
        if path.suffix == ".py":
            names |= set(PLAIN_PY.findall(line))
        else:  # a script inside a command in backticks: `python bench/run.py --shape 70m`
            names |= {n for span in re.findall(r"`([^`]+)`", line) for n in PLAIN_PY.findall(span)}
        for name in sorted(names):
            if name in NOT_CODE or name.rsplit("/", 1)[-1] in OUTSIDE or name.startswith(("merger.", "http")):
                continue
            if not file_exists(name, path):
                out.append(f"{rel}:{lineno}: {name} is no file in the repository")
        if path.suffix == ".md":
            for target in MD_LINK.findall(line):
                if "://" not in target and not file_exists(target, path):
                    out.append(f"{rel}:{lineno}: link to {target}, which is no file in the repository")
    return out


def main() -> int:
    checked = files()
    found = [p for f in checked if f.relative_to(ROOT).as_posix() not in EXAMPLES for p in problems(f)]
    for line in found:
        print(line)
    print(f"check_refs: {len(found)} broken reference(s) in {len(checked)} files", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
