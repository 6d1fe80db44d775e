"""The package's layers: core ← toyworld ← experiment ← apps, imports one way, no cycles, imports at
module top; the package's ``__init__`` counts as core, and ``import antidistill`` stays light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "antidistill"
LAYERS = {"core": 0, "toyworld": 1, "experiment": 2, "apps": 3}
# the optional heavy extras a module may import inside a function (the server, vLLM), openai (a
# test-only dependency that the LiveServer test helper hands out) and rich (drawn only when a
# progress bar is shown, so the core's optional bars cost nothing to import)
LAZY_OK = ("antidistill.serve", "antidistill.engines", "vllm", "uvicorn", "uvloop", "openai", "rich")
# what `import antidistill` must not load: the experiment's and the CLI's libraries
HEAVY = ("datasets", "accelerate", "rich", "pandas", "trl", "peft", "statsmodels", "math_verify", "matplotlib",
         "typer", "fastapi")


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package's __init__
    if parts[1] in ("cli", "serve", "engines"):
        return "apps"
    if parts[1] in ("experiment", "toyworld"):
        return parts[1]
    return "core"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ["antidistill", *p.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported antidistill module, inside a function?) for every import statement of ``module``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [f"{target}.{a.name}" for a in child.names]
                found.extend((n if n in mods else target, in_function) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            visit(child, nested)

    mods = modules()
    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t, _ in imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def test_imports_run_one_way():
    bad = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in graph().items() for t in ts
           if LAYERS[layer(t)] > LAYERS[layer(m)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def dfs(m, stack):
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                dfs(t, stack + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_the_package_init():
    """The ``__init__`` re-exports the core; a submodule importing it would load all of it."""
    bad = [m for m, ts in graph().items() if m != "antidistill" and "antidistill" in ts]
    assert not bad, bad


def _loaded(code: str, names) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return sorted({n for n in out for h in names if n == h or n.startswith(h + ".")} & set(names))


def test_import_antidistill_is_light():
    assert _loaded("import antidistill", HEAVY) == []


def test_the_server_loads_no_training_or_statistics_library():
    assert _loaded("import antidistill.serve.app, antidistill.serve.live", ("trl", "peft", "statsmodels", "datasets")) == []


@pytest.mark.parametrize("reader", ["antidistill.experiment.report", "antidistill.serve.app"])
def test_report_and_server_never_import_the_sweep(reader):
    seen, todo = set(), [reader]
    g = graph()
    while todo:
        m = todo.pop()
        if m in seen or m not in g:
            continue
        seen.add(m)
        todo.extend(g[m])
    assert "antidistill.experiment.sweep" not in seen


def test_imports_sit_at_module_top():
    """Function-level imports hide the dependency graph; only the optional heavy extras may be lazy."""
    late = [f"{m}: {t}" for m, p in modules().items() for t, in_function in imports(m, p)
            if in_function and not t.startswith(LAZY_OK)]
    assert not late, "\n".join(late)


def test_no_module_over_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _wait_policy(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, antidistill; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_openmp_threads_sleep_while_waiting_unless_the_user_chose():
    """Spinning OpenMP waiters made a 2-thread run 26x slower beside one busy process (docs/benchmarks.md)."""
    assert _wait_policy(None) == "PASSIVE"
    assert _wait_policy("ACTIVE") == "ACTIVE"
