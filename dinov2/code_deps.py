"""Which files of the project a stage command runs: the code dependencies of each DVC stage, by construction.

A stage's command is ``dinov2 <command> ...``. Running it imports ``dinov2.cli`` and what that imports at
module level (every command module registers its commands), then, inside the command's function, the
modules that function imports, and everything those import, at any depth (a library module's functions
may run). Following the ``import`` statements (read, not executed) gives the set of project files a stage
can run, so ``dvc.yaml`` can list them as the stage's deps: an edit to any of them marks the stage
changed, an edit elsewhere does not.

``python -m dinov2.code_deps`` rewrites the code deps of every stage in dvc.yaml (the entries under
``dinov2/``; data deps and other files are kept as written); ``--check`` only says whether they are up to
date (exit code 1 when not). A folder stands for a package whose every module is a dependency.
"""

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = "dinov2"
ENTRY_MODULE = "dinov2.cli"


def module_file(module: str, root: Path = REPOSITORY) -> Path | None:
    """The file of a project module (``dinov2.curation.dedup`` -> dinov2/curation/dedup.py), if it exists."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parents(module: str, root: Path = REPOSITORY) -> list[str]:
    """``a.b.c`` -> [``a``, ``a.b``]: the packages whose ``__init__`` runs before the module (namespace
    packages have none)."""
    parts = module.split(".")
    names = [".".join(parts[:n]) for n in range(1, len(parts))]
    return [name for name in names if module_file(name, root) is not None]


def _imported(node: ast.AST, importer: str, root: Path) -> set[str]:
    """Project modules named by one import statement (``from X import Y`` names X.Y when Y is a module)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = importer.split(".")
            is_package = module_file(importer, root) is not None and module_file(importer, root).name == "__init__.py"
            package = package if is_package else package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, node.module] if node.module else package)
        else:
            base = node.module or ""
        names = {base}
        names |= {f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}", root)}
    found = set()
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        while name and module_file(name, root) is None:  # `import a.b.func`-style names: the module part
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _statements(tree: ast.Module, top_level_only: bool) -> Iterable[ast.AST]:
    """The statements that run: every one (or the module level's), except under ``if TYPE_CHECKING:``."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            pending += node.orelse
            continue
        yield node
        if not top_level_only:
            pending += list(ast.iter_child_nodes(node))


def imports_of(module: str, root: Path = REPOSITORY, top_level_only: bool = False) -> set[str]:
    """Project modules one module imports when it runs: all its import statements, or only those at module
    level (imports for type checkers alone are not run)."""
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"no module {module} under {root}")
    found: set[str] = set()
    for node in _statements(_tree(path), top_level_only):
        found |= _imported(node, module, root)
    return found - {module}


def closure(modules: Iterable[str], root: Path = REPOSITORY) -> set[str]:
    """The modules given, their packages, and everything they import, at any depth."""
    pending = [name for module in modules for name in (module, *_parents(module, root))]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in imports_of(module, root):
            pending += [imported, *_parents(imported, root)]
    return seen


def _command_function(module: str, name: str, root: Path) -> ast.FunctionDef:
    """The function (at any depth of ``module``) that implements command ``name``."""
    for node in ast.walk(_tree(module_file(module, root))):
        if isinstance(node, ast.FunctionDef) and node.name == name.replace("-", "_"):
            return node
    raise ValueError(f"no function for command {name!r} in {module}")


def commands(root: Path = REPOSITORY) -> dict[str, str]:
    """Command name -> the module that defines it, for every command of the ``dinov2`` CLI."""
    from dinov2.cli import app

    found = {}
    for command in app.registered_commands:
        callback = command.callback
        found[command.name or callback.__name__.replace("_", "-")] = callback.__module__
    return found


def command_modules(command: str, root: Path = REPOSITORY) -> set[str]:
    """The project modules ``dinov2 <command>`` can run."""
    defined_in = commands(root)
    if command not in defined_in:
        raise ValueError(f"unknown dinov2 command {command!r}; known: {', '.join(sorted(defined_in))}")
    loaded = {ENTRY_MODULE, *_parents(ENTRY_MODULE, root)}
    pending = list(loaded)
    while pending:  # what importing the CLI runs: module-level imports only
        for imported in imports_of(pending.pop(), root, top_level_only=True):
            for name in (imported, *_parents(imported, root)):
                if name not in loaded:
                    loaded.add(name)
                    pending.append(name)
    module = defined_in[command]
    function = _command_function(module, command, root)
    called = set()
    for node in ast.walk(function):
        called |= _imported(node, module, root)
    return loaded | closure(called, root)


def as_paths(modules: Iterable[str], root: Path = REPOSITORY) -> list[str]:
    """Repository-relative paths of the modules' files; a package folder whose every module is listed
    stands for them all."""
    files = {module_file(module, root).relative_to(root) for module in modules}

    def covered(folder: Path) -> bool:
        return all(path.relative_to(root) in files for path in (root / folder).rglob("*.py"))

    kept: set[Path] = set()
    for path in files:
        folder = path.parent
        best = None
        while folder != Path(".") and covered(folder):
            best, folder = folder, folder.parent
        kept.add(best if best is not None else path)
    return sorted({path.as_posix() for path in kept if not any(parent in kept for parent in path.parents)})


@dataclass
class StageDeps:
    stage: str
    command: str
    code: list[str]


def stage_command(cmd: str) -> str | None:
    """The ``dinov2`` sub-command a stage's cmd runs, or None when it runs something else."""
    words = cmd.split()
    if len(words) < 2 or words[0] != "dinov2":
        return None
    return words[1]


def expected_deps(pipeline: dict, root: Path = REPOSITORY) -> list[StageDeps]:
    found = []
    for name, stage in pipeline.get("stages", {}).items():
        definition = stage.get("do", stage)
        command = stage_command(" ".join(str(definition.get("cmd", "")).split()))
        if command is not None:
            found.append(StageDeps(name, command, as_paths(command_modules(command, root), root)))
    return found


def _is_code(entry: str) -> bool:
    return entry == PACKAGE or entry.startswith(f"{PACKAGE}/")


def _rewrite_deps(lines: list[str], stage: str, code: list[str]) -> list[str]:
    """The lines of dvc.yaml with the code entries of ``stage``'s deps replaced by ``code`` (in place of the
    first code entry, or after the data deps); every other line is kept as written."""
    start = next(n for n, line in enumerate(lines) if line.rstrip() == f"  {stage}:")
    deps = next(n for n in range(start + 1, len(lines)) if lines[n].strip() == "deps:")
    end = deps + 1
    while end < len(lines) and lines[end].lstrip().startswith("- "):
        end += 1
    items = lines[deps + 1 : end]
    indent = items[0][: len(items[0]) - len(items[0].lstrip())] if items else " " * 8
    kept = [line for line in items if not _is_code(line.strip()[2:])]
    return [*lines[: deps + 1], *kept, *(f"{indent}- {path}" for path in code), *lines[end:]]


def update(dvc_yaml: Path, check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) the code deps of every stage; returns the stages that differ."""
    import yaml

    text = dvc_yaml.read_text()
    pipeline = yaml.safe_load(text)
    lines = text.splitlines()
    stale = []
    for deps in expected_deps(pipeline, dvc_yaml.parent):
        definition = pipeline["stages"][deps.stage]
        current = [str(entry) for entry in definition.get("do", definition).get("deps", [])]
        if [entry for entry in current if _is_code(entry)] != deps.code:
            stale.append(deps.stage)
            lines = _rewrite_deps(lines, deps.stage, deps.code)
    if stale and not check:
        dvc_yaml.write_text("\n".join(lines) + "\n")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.code_deps", description=__doc__.splitlines()[0])
    parser.add_argument("--dvc-yaml", type=Path, default=REPOSITORY / "dvc.yaml")
    parser.add_argument("--check", action="store_true", help="only compare; exit code 1 when a stage differs")
    arguments = parser.parse_args(argv)
    stale = update(arguments.dvc_yaml, arguments.check)
    if stale:
        verb = "out of date" if arguments.check else "rewritten"
        print(f"code deps {verb} for: {', '.join(stale)}")
        if arguments.check:
            print("run `python -m dinov2.code_deps` to rewrite them")
    return 1 if stale and arguments.check else 0


if __name__ == "__main__":
    sys.exit(main())
