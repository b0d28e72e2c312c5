"""The shape of the code: no import cycle between modules, each room imports only what it should, benchmarks
build on the library alone."""

import ast
from pathlib import Path

from dinov2.code_deps import imports_of

REPOSITORY = Path(__file__).resolve().parents[1]


def project_modules() -> list[str]:
    names = []
    for path in sorted((REPOSITORY / "dinov2").rglob("*.py")):
        parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (one per back edge), as the modules along it."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_a_cycle_is_found_in_a_graph_drawn_by_hand():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_of_the_project_imports_itself_through_others():
    graph = {module: imports_of(module) for module in project_modules()}
    assert cycles(graph) == []


def test_each_room_imports_only_the_rooms_below_it():
    """The paper's curation knows nothing of the demo data or of the training engine; copy detection nothing of
    curation; the schemas nothing of the algorithms they configure."""
    forbidden = {
        "dinov2.curation": ("dinov2.demo_data", "dinov2.train", "dinov2.distill", "dinov2.report"),
        "dinov2.copydetect": ("dinov2.curation", "dinov2.demo_data", "dinov2.train", "dinov2.report"),
        "dinov2.configuration": ("dinov2.curation.dedup", "dinov2.train", "dinov2.copydetect"),
    }
    wrong = []
    for module in project_modules():
        imported = imports_of(module)
        for room, rooms_above in forbidden.items():
            if module == room or module.startswith(f"{room}."):
                wrong += [f"{module} -> {name}" for name in imported if name.startswith(rooms_above)]
    assert wrong == []


def test_benchmarks_import_the_library_never_the_tests():
    offenders = []
    for path in sorted((REPOSITORY / "benchmarks").rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if any(name == "tests" or name.startswith("tests.") or name == "conftest" for name in imported) or (
            '"tests"' in text and "sys.path" in text
        ):
            offenders.append(str(path.relative_to(REPOSITORY)))
    assert offenders == []
