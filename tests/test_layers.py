"""The layers import downward only, and no module imports itself back: mel_core < tasks < flows < mel_app; inside
mel_core, the wings import downward only too: the root leaves < problems < algorithm < model < store < step < run
< study.

Every import statement counts, also one inside a function (a deferred import is still a dependency). mel_core
is plain Python and torch: no Prefect, no Ray. The check reads the source with `ast`; it runs in milliseconds.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("mel_core", "tasks", "flows", "mel_app")  # lowest first
ORCHESTRATION = ("prefect", "prefect_ray", "ray")
# mel_core's sub-packages, lowest first; "" is the root's leaves (config, vocabulary, errors, ids, ...).
WINGS = ("", "problems", "algorithm", "model", "store", "step", "run", "study")


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module name an import statement of the file names (absolute; relative ones resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_import_goes_downward():
    against = [(m, d) for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert against == [], f"imports against the layers (importer, imported): {against}"


def _wing(module: str) -> str:
    """mel_core.store.writer and mel_core.store (the package) -> store; mel_core.config (a root leaf) -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (REPO / "mel_core" / parts[1]).is_dir() else ""


def test_every_wing_of_mel_core_imports_downward():
    modules = {m for m in _modules() if m.startswith("mel_core.")}
    assert {_wing(m) for m in modules} == set(WINGS), "a wing of mel_core is not in WINGS (or one is gone)"
    against = [(m, d) for m, deps in _graph().items() if m in modules for d in deps
               if d in modules and WINGS.index(_wing(d)) > WINGS.index(_wing(m))]
    assert against == [], f"imports against mel_core's wings (importer, imported): {against}"


def test_mel_core_imports_no_orchestrator():
    offending = [(name, m) for name, path in _modules().items() if name.startswith("mel_core")
                 for m in _imports(name, path) if m.split(".")[0] in ORCHESTRATION]
    assert offending == [], offending


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_check_sees_what_it_checks():
    """The graph is not empty: imports inside functions are read, and a known downward edge is there."""
    graph = _graph()
    assert "mel_core.step.stages" in graph["tasks.stage_tasks"]
    assert "flows.deploy" in graph["mel_app.server_commands"]  # imported inside cmd_deploy, counted all the same
    assert "mel_core.store.writer" in graph["mel_core.step.runtime"]  # a downward edge between wings
