"""The house's rules, checked on the source: no import cycles, decisions apart from mechanics,
every private torch name in one module (docs/design.md has the picture)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "adaptive_loader"
SHIPPED = [PACKAGE, PACKAGE.parent / "stress"]

#: The decide layer: pure rules, no processes, no I/O. It may import only itself and these.
DECIDE = {"controller", "routing", "device_budget"}
DECIDE_MAY_IMPORT = DECIDE | {"kinds"}
#: Torch's private attributes the package reads; only _torch.py may name them.
TORCH_PRIVATE_ATTRIBUTES = ("_workers", "_shutdown_workers", "_iterator", "_pin_memory", "_worker_info",
                            "_share_fd", "_new_shared", "_new_using_fd", "_worker_pids_set", "_set_worker_pids",
                            "_remove_worker_pids", "_num_samples", "_utils")


def modules():
    return {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def imported_modules(path: pathlib.Path):
    """The package's modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks (lazy imports count)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 and not base:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 1:
                found.add(base.split(".")[0])
            elif base.startswith("adaptive_loader."):
                found.add(base.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("adaptive_loader."):
                    found.add(alias.name.split(".")[1])
    return found & set(modules())


def test_there_are_no_import_cycles():
    graph = {name: imported_modules(path) for name, path in modules().items()}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycle = trail[trail.index(node):] + [node]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        state[node] = "open"
        for child in sorted(graph[node]):
            visit(child, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_decide_layer_imports_no_mechanics_and_no_io():
    present = DECIDE & set(modules())
    assert "controller" in present
    for name in sorted(present):
        path = modules()[name]
        wrong = imported_modules(path) - DECIDE_MAY_IMPORT
        assert not wrong, f"{name}.py (decide) imports {sorted(wrong)}"
        source = path.read_text()
        for io_module in ("os", "psutil", "subprocess", "multiprocessing", "torch"):
            assert not re.search(rf"^\s*(import|from) {io_module}\b", source, re.M), f"{name}.py imports {io_module}"


def test_the_move_layer_does_not_import_the_decider():
    for name in ("transport", "arena", "region", "codec", "spill"):
        if name in modules():
            wrong = imported_modules(modules()[name]) & DECIDE
            assert not wrong, f"{name}.py (move) imports {sorted(wrong)}: it gets its rules handed in"


def test_telemetry_does_not_import_the_dashboard():
    assert "dashboard" not in imported_modules(modules()["telemetry"])


def shipped_sources():
    for root in SHIPPED:
        for path in sorted(root.rglob("*.py")):
            if path.name != "_torch.py":
                yield path


def test_no_file_but_the_torch_module_names_a_private_torch_name():
    private_import = re.compile(r"^\s*(from\s+torch[\w.]*\s+import\s+.*\b_\w+|from\s+torch[\w.]*\._\w+|"
                                r"import\s+torch[\w.]*\._\w+)", re.M)
    private_use = re.compile(r"\btorch(\.\w+)*\._[a-z]\w*")
    attribute = re.compile(r"\.(" + "|".join(TORCH_PRIVATE_ATTRIBUTES) + r")\b")
    offenders = []
    for path in shipped_sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if private_import.search(code) or private_use.search(code) or attribute.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private torch names outside adaptive_loader/_torch.py:\n" + "\n".join(offenders)


def test_the_check_itself_catches_a_private_name(tmp_path):
    """The grep is not vacuous: the patterns match the lines they are meant to."""
    assert re.search(r"\btorch(\.\w+)*\._[a-z]\w*", "torch.UntypedStorage._new_shared(4)")
    assert re.search(r"\.(_workers|_iterator)\b", "iterator._workers")
    sample = tmp_path / "m.py"
    sample.write_text("from . import loader\nfrom .kinds import Road\nimport adaptive_loader.arena\n")
    assert imported_modules(sample) == {"loader", "kinds", "arena"}
