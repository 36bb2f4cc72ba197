"""The house's rules, checked on the source: no import cycles (the stress harness included), the library
never imports its harness, decisions apart from mechanics, every private torch name in one module
(docs/design.md has the picture)."""

from __future__ import annotations

import ast
import pathlib
import re

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


def shipped_modules():
    """Every module of the library and the harness by dotted name (stress/__main__.py: stress.__main__)."""
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
            for root in SHIPPED for p in sorted(root.rglob("*.py"))}


def canonical(name: str) -> str:
    """The harness's repo name: installed, stress/ ships as adaptive_loader.stress."""
    return name[len("adaptive_loader."):] if name.split(".")[:2] == ["adaptive_loader", "stress"] else name


def imports(path: pathlib.Path, package: str, type_checking: bool = False):
    """Every module ``path`` (a module of ``package``) imports, as absolute dotted names; lazy imports
    count, those under ``if TYPE_CHECKING:`` only with ``type_checking``. ``from a import b`` gives both
    ``a`` and ``a.b`` (``b`` may be a module)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            base = ".".join(filter(None, (base, node.module)))
            found.add(canonical(base))
            found.update(canonical(f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(canonical(alias.name) for alias in node.names)
    return found


def imported_modules(path: pathlib.Path):
    """The package's modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks (lazy imports count)."""
    return {name.split(".")[1] for name in imports(path, "adaptive_loader")
            if name.startswith("adaptive_loader.")} & set(modules())


def find_cycle(graph):
    """One import cycle of ``graph`` (module -> the modules it imports) as a list of names, or None."""
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return None
        if state.get(node) == "open":
            return trail[trail.index(node):] + [node]
        state[node] = "open"
        for child in sorted(graph[node]):
            cycle = visit(child, trail + [node])
            if cycle:
                return cycle
        state[node] = "done"
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def test_there_are_no_import_cycles():
    cycle = find_cycle({name: imported_modules(path) for name, path in modules().items()})
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_there_are_no_import_cycles_across_the_library_and_the_harness():
    """The harness exercises the library, never the other way: one direction only."""
    shipped = {name: path for name, path in shipped_modules().items() if not name.endswith("__init__")}
    graph = {name: imports(path, name.rsplit(".", 1)[0]) & set(shipped) for name, path in shipped.items()}
    assert any(name.startswith("adaptive_loader.") for edges in graph.values() for name in edges) \
        and any(name.startswith("stress.") for edges in graph.values() for name in edges)  # not vacuous
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_library_does_not_import_the_stress_harness():
    offenders = []
    for name, path in shipped_modules().items():
        if name.startswith("adaptive_loader."):
            wrong = sorted(n for n in imports(path, name.rsplit(".", 1)[0], type_checking=True)
                           if n == "stress" or n.startswith("stress."))
            if wrong:
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {', '.join(wrong)}")
    assert not offenders, "the library imports its stress harness:\n" + "\n".join(offenders)


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


def test_the_cross_package_check_sees_both_spellings_of_the_harness(tmp_path):
    """Relative, absolute and installed names of the harness all resolve to stress.*; a lazy import counts."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from .stress.__main__ import main\n    import stress.harness\n"
                      "    from adaptive_loader.stress import scenarios\n")
    assert {"stress.__main__", "stress.harness", "stress.scenarios"} <= imports(sample, "adaptive_loader")
    sample.write_text("from .harness import run_case\nfrom adaptive_loader.cli import watch_file\n")
    assert {"stress.harness", "adaptive_loader.cli"} <= imports(sample, "stress")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
