"""The package layout is the architecture: each folder one job, imports only downwards.

Every ``import`` in the source — lazy ones inside functions included — is read with ``ast`` and
checked against the layer order below; the kernels see the cache only through its tensor-only
view; modules stay readable in one sitting."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own layer and the layers before it
LAYERS = ["utilities", "attention", "hf", "tracking", "serving", "rollout", "pipeline", "bench", "cli"]
UTILITIES = {"turbo_core", "turbo_core.fileio", "turbo_core.http", "turbo_core.stats",
             "turbo_core.testing"}
MAX_LINES = 400


def _layer(module: str) -> str:
    if module in UTILITIES:
        return "utilities"
    if module.startswith("turbo_kernels"):
        return "attention"  # the kernels sit beside the method they implement
    parts = module.split(".")
    assert parts[0] == "turbo_core" and parts[1] in LAYERS, f"{module} is in no layer"
    return parts[1]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.split(".")[0] in ("turbo_core", "turbo_kernels")]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "kernels" if "turbo_kernels" in path.parts else ROOT)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[Path]:
    return sorted([*(ROOT / "turbo_core").rglob("*.py"), *(ROOT / "kernels/turbo_kernels").rglob("*.py")])


def _known(module: str) -> str:
    """The importable module a dotted name refers to (``a.b.Name`` -> ``a.b``)."""
    while module:
        base = ROOT / "kernels" if module.startswith("turbo_kernels") else ROOT
        p = base / module.replace(".", "/")
        if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
            return module
        module = module.rpartition(".")[0]
    raise AssertionError("unreachable")


def test_imports_only_go_down():
    wrong = []
    for path in _sources():
        me = _module_name(path)
        mine = LAYERS.index(_layer(me))
        for target in {_known(m) for m in _imports(path)}:
            if LAYERS.index(_layer(target)) > mine:
                wrong.append(f"{me} ({_layer(me)}) imports {target} ({_layer(target)})")
    assert not wrong, "imports going up the layers:\n" + "\n".join(sorted(wrong))


def test_kernels_read_only_the_packed_view():
    allowed = {"turbo_core.attention.config", "turbo_core.attention.packed",
               "turbo_core.attention.quant", "turbo_core.attention.sas",
               "turbo_core.fileio"}  # a utility (atomic writes): the C++ ops' build stamp
    for path in (ROOT / "kernels/turbo_kernels").glob("*.py"):
        used = {_known(m) for m in _imports(path) if m.startswith("turbo_core")}
        assert used <= allowed, f"{path.name} imports {sorted(used - allowed)}"


def test_the_dag_file_only_declares():
    used = {_known(m) for m in _imports(ROOT / "dags/turbo_nightly.py")}
    assert used and all(m.startswith("turbo_core.pipeline") for m in used), sorted(used)
    # no decision while the scheduler parses: no `if` outside the task functions (their
    # branches run at task time), e.g. no choice of operators by configuration
    tree = ast.parse((ROOT / "dags/turbo_nightly.py").read_text())
    dag_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "turbo_nightly")
    todo, parse_time = list(dag_fn.body), []
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            continue  # a task: runs later, in a worker
        parse_time.append(node)
        todo += list(ast.iter_child_nodes(node))
    branches = [n.lineno for n in parse_time if isinstance(n, ast.If | ast.IfExp)]
    assert not branches, f"the DAG file decides at parse time at lines {branches}"


def test_modules_stay_small_and_top_level_holds_only_utilities():
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = {f"turbo_core.{p.stem}" for p in (ROOT / "turbo_core").glob("*.py") if p.stem != "__init__"}
    assert top <= UTILITIES, f"top-level modules beyond the shared utilities: {sorted(top - UTILITIES)}"


def test_the_cpu_kernel_runs_without_triton():
    """The serving image has no Triton (CPU or CUDA torch alone): the CPU path must import
    none of it, directly or through another kernel module."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; import turbo_kernels.cpu_ops, "
            "turbo_core.attention.functional, turbo_core.hf.cache; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
