"""The architecture holds: packages import only downward (model <- myutils <- pipelines <- training;
toy_world beside the scripts, used by the demo, tests and benchmarks only), counting imports inside
functions, and no two modules of one package import each other, directly or round a longer circle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"model": 0, "myutils": 1, "pipelines": 2, "training": 3, "toy_world": 3}
MAX_LINES = 350


def _modules():
    for package in LAYER:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                yield package, name[:-3], os.path.join(ROOT, package, name)


def _imports(package, path):
    """(package, module) of every import of a project module in the file, at any depth."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package
                if node.module:
                    yield package, node.module.split(".")[0]
                else:
                    yield from ((package, a.name) for a in node.names)
            elif node.module and node.module.split(".")[0] in LAYER:
                parts = node.module.split(".")
                if len(parts) > 1:
                    yield parts[0], parts[1]
                else:
                    yield from ((parts[0], a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] in LAYER:
                    yield parts[0], parts[1] if len(parts) > 1 else "__init__"


def test_packages_import_only_downward():
    upward = [f"{package}/{module}.py imports {other}.{name}" for package, module, path in _modules()
              for other, name in _imports(package, path) if LAYER[other] > LAYER[package] or
              (other == "toy_world" and package != "toy_world")]
    assert not upward, upward


def test_no_import_circles():
    graph = {(p, m): {(o, n) for o, n in _imports(p, path) if (o, n) != (p, m)} for p, m, path in _modules()}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(f"{p}/{m}" for p, m in trail + [node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt in graph:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_shared_modules_stay_small():
    """A module of the shared layer that grows past about 350 lines holds more than one thing."""
    long = {f"{p}/{m}.py": n for p, m, path in _modules() if p in ("myutils", "training")
            and (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert not long, long


def test_the_readme_map_names_every_module():
    """The README's map of the code (after the script table) names each module of the shared layers."""
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("Shared code lives once")
    section = text[start:text.index("\n## ", start)]
    missing = [f"{p}/{m}.py" for p, m, _ in _modules() if m != "__init__" and f"`{m}.py`" not in section]
    assert not missing, missing
