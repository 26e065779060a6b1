"""The package's shape: subpackages in layers, each importing only from its own layer and those below it; no import
cycles; short modules. A change that breaks these fails here, not in a reviewer's head."""
import ast
from pathlib import Path

import captioner

ROOT = Path(captioner.__file__).parent
# bottom to top; the commands (and their plumbing: cli, checks) sit on top of everything
LAYERS = ["base", "data", "features", "models", "evaluation", "training", "serving", "commands"]
BASE = {"utils": 0, "caches": 0, "checkpoint": 0, "cli": 0, "checks": 0}  # the cross-cutting helpers
MAX_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # captioner/__init__.py
    top = parts[1]
    if top in BASE:
        return BASE[top]
    if top in LAYERS:
        return LAYERS.index(top)
    return LAYERS.index("commands")  # run, caption, evaluate, serve, download, extract, cli, checks, conf


def imports() -> dict:
    """module -> the captioner modules it imports anywhere (lazy imports inside functions too)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "conf" in path.relative_to(ROOT).parts:
            continue
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captioner"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("captioner"))
        out[name] = found
    return out


def test_layers_import_only_downwards():
    wrong = [f"{m} imports {i}" for m, deps in imports().items() for i in deps if layer(i) > layer(m)]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in imports_cache} for m, deps in imports_cache.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                raise AssertionError(" -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_modules_are_short():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_subpackages_say_their_job():
    for sub in LAYERS[1:-1]:
        doc = ast.get_docstring(ast.parse((ROOT / sub / "__init__.py").read_text()))
        assert doc and len(doc) > 40, f"captioner/{sub}/__init__.py needs a docstring saying what the layer holds"


imports_cache = imports()
