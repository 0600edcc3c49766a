"""The code a stage runs: the source files it can reach, found by following imports from its function.

A stage's key covers its code so that a change to what computes its outputs makes it stale. Keying on whole
packages made any edit stale everything: a fix to the console or the training loop re-downloaded and re-scored the
whole pool. Here a stage's code is its function's own source (and the module-level helpers and constants it uses,
in the module that defines it) plus every project module reachable from the names it uses, through imports
anywhere in those files (lazy imports inside functions included), read statically: nothing is imported. A module
outside the project (torch, img2dataset) is not followed; its version is not part of the key.

Each file is recorded with its own digest (`StageCode.files`), so a stage that is computed again can say which of
its files changed.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = frozenset({"curation", "evaluation", "flows", "infra", "training"})


@dataclass(frozen=True)
class StageCode:
    # Repository-relative path of each module file -> sha256 (16 hex digits); a function given at function level
    # is recorded as "<path>::<name>" with the digest of its source (and of the module-level helpers it uses).
    files: dict[str, str]

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}:{self.files[name]}\n".encode())
        return h.hexdigest()[:16]


def changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The files whose digest differs, that were added or that went, in name order."""
    return sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))


def named(files: list[str], most: int = 3) -> str:
    """`a.py, b.py, c.py and 2 more`."""
    return ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@cache
def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of a project module (a package's `__init__.py`), or None outside the project (looked up once per
    process: a module added while it runs is not seen)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _resolve(node: ast.Import | ast.ImportFrom, package: str) -> Iterable[str]:
    """Every dotted name an import statement may bind, absolute (from X import Y: X and X.Y; which is a module is
    decided by :func:`module_file`)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    yield base
    for alias in node.names:
        yield f"{base}.{alias.name}"


@cache
def _with_parents(name: str, root: Path) -> frozenset[str]:
    """The project modules a dotted name loads: it and the packages above it (their `__init__` runs too)."""
    parts = name.split(".")
    return frozenset({m for i in range(1, len(parts) + 1) if module_file(m := ".".join(parts[:i]), root) is not None})


def _parsed(path: Path) -> tuple[bytes, ast.Module]:
    """The file's bytes and syntax tree (parsed again only when the file changed: tests edit files)."""
    st = path.stat()
    return _parse(path, st.st_mtime_ns, st.st_size)


@cache
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[bytes, ast.Module]:
    data = path.read_bytes()
    return data, ast.parse(data, filename=str(path))


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, root: Path) -> frozenset[str]:
    """The project modules a module's file imports, anywhere in it."""
    path = module_file(module, root)
    assert path is not None
    return _imports_of_file(_parsed(path)[1], _package_of(module, path), root)


def module_closure(modules: Iterable[str], root: Path = REPO_ROOT) -> set[str]:
    """The project modules reachable from ``modules`` through imports (themselves included)."""
    seen: set[str] = set()
    todo = [m for m in modules if module_file(m, root) is not None]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module, root) - seen)
    return seen


def _module_level(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """The statements that run when the module is imported: its body, and the blocks of its `if`, `try`, `with`
    and loops (not function or class bodies)."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.For | ast.While | ast.With | ast.Try):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    """Name -> the module-level statement that binds it (def, class, assignment)."""
    out: dict[str, ast.stmt] = {}
    for node in _module_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
    return out


def _imported_names(tree: ast.Module, package: str, root: Path) -> dict[str, set[str]]:
    """Name bound by a module-level import -> the project modules it loads."""
    out: dict[str, set[str]] = {}
    for node in _module_level(tree.body):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for alias, name in zip(node.names, _bound(node, package), strict=True):
            bound = alias.asname or alias.name.split(".")[0]
            out[bound] = _with_parents(name, root)
            if isinstance(node, ast.ImportFrom):  # `from X import Y`: X runs, whether or not Y is a module
                out[bound] |= _with_parents(next(iter(_resolve(node, package))), root)
    return out


def _bound(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    names = list(_resolve(node, package))
    return names if isinstance(node, ast.Import) else names[1:]


def function_code(fn: Callable, root: Path = REPO_ROOT) -> StageCode:
    """The code ``fn`` runs: its source and the module-level helpers and constants of its module that it uses, and
    the project modules reachable from the names those use. A function the module's top level does not define (a
    closure, a lambda) counts as its whole module. Under another ``root`` (a copy of the project), the function's
    module is read from there."""
    module, qualname = fn.__module__, fn.__qualname__
    path = module_file(module, root) or Path(inspect.getsourcefile(fn) or "")
    rel = _relative(path, root)
    own = _own_source(module, qualname, path, root)
    if own is None:
        return _code({rel: file_digest(path)}, _imports_of_file(_parsed(path)[1], _package_of(module, path), root), root)
    digest, roots = own
    return _code({f"{rel}::{qualname}": digest}, (roots | _with_parents(module, root)) - {module}, root)


def _own_source(module: str, qualname: str, path: Path, root: Path) -> tuple[str, set[str]] | None:
    """A module-level function's own code: the digest of its source with the module-level helpers and constants it
    uses, and the project modules the names in them load; None for a function the module's top level does not
    define."""
    data, tree = _parsed(path)
    top = _top_level(tree)
    if qualname not in top or not isinstance(top[qualname], ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    imported = _imported_names(tree, _package_of(module, path), root)
    local: set[str] = set()
    roots: set[str] = set()
    todo = [qualname]
    while todo:
        name = todo.pop()
        if name in local:
            continue
        local.add(name)
        for node in ast.walk(top[name]):
            if isinstance(node, ast.Name) and node.id in top and node.id not in local:
                todo.append(node.id)
            elif isinstance(node, ast.Name) and node.id in imported:
                roots |= imported[node.id]
            elif isinstance(node, ast.Import | ast.ImportFrom):
                roots |= _loads(node, _package_of(module, path), root)
    lines = data.decode().splitlines()
    segments = sorted({"\n".join(lines[top[n].lineno - 1: top[n].end_lineno]) for n in local})
    return _digest("\n".join(segments).encode()), roots


def changed_since(files: dict[str, str], root: Path = REPO_ROOT) -> list[str]:
    """Of the code files an attempt recorded (`StageCode.files`), those whose source differs now or that are gone:
    a complete stage whose code changed since, found without importing anything or following imports (`lvd
    status`; an edit that makes a stage reach a new module edits a file it already reached)."""
    out = []
    for name, digest in files.items():
        rel, _, qualname = name.partition("::")
        path = root / rel
        if not path.is_file():
            out.append(name)
        elif qualname:
            own = _own_source(rel.removesuffix(".py").replace("/", "."), qualname, path, root)
            out += [name] if own is None or own[0] != digest else []
        elif file_digest(path) != digest:
            out.append(name)
    return sorted(out)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits), read once per version of the file (its mtime and size)."""
    st = path.stat()
    return _digest_of(path, st.st_mtime_ns, st.st_size)


@cache
def _digest_of(path: Path, mtime_ns: int, size: int) -> str:
    return _digest(path.read_bytes())


@cache  # a tree is parsed once per version of its file (:func:`_parse`), so it identifies that version
def _imports_of_file(tree: ast.Module, package: str, root: Path) -> frozenset[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _loads(node, package, root)
    return frozenset(found)


def _loads(node: ast.Import | ast.ImportFrom, package: str, root: Path) -> set[str]:
    """The project modules an import statement loads."""
    return set().union(*(_with_parents(name, root) for name in _resolve(node, package)))


def _code(own: dict[str, str], roots: Iterable[str], root: Path) -> StageCode:
    files = dict(own)
    for module in module_closure(roots, root):
        path = module_file(module, root)
        assert path is not None
        files[_relative(path, root)] = file_digest(path)
    return StageCode(files)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
