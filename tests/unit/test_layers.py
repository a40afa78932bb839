"""The layers of CONTRIBUTING.md: what may import what.

The operator image has no torch, and ``opd validate`` / the operator parse run files in milliseconds, so
the light layers (``opd_runtime.contract``, ``opd_runtime.spec``, ``opd_runtime.plan`` and the operator)
must never reach torch, transformers or vLLM, not even lazily inside a function. Two checks:

- statically, every import statement in those files (module level or inside a function) is read with
  ``ast``: each names a module its layer may use, and never a heavy one;
- at run time, a fresh interpreter imports every module of the light layers one by one and looks at
  ``sys.modules`` after each: no heavy package may have been loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "transformers",
    "vllm",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "numpy",
    "datasets",
    "math_verify",
    "matplotlib",
    "tqdm",
)

# Each light layer: its files (relative to the repository root) and the packages of ours it may import.
# Lower layers first; a layer may import the ones above it in this table, never one below.
LAYERS: dict[str, tuple[list[str], set[str]]] = {
    "contract": (["opd_runtime/contract.py"], set()),
    "spec": (["opd_runtime/spec/*.py"], {"opd_runtime.contract", "opd_runtime.spec"}),
    "plan": (
        ["opd_runtime/plan.py", "opd_runtime/memory_plan.py", "opd_runtime/positions.py"],
        {"opd_runtime.contract", "opd_runtime.spec"},
    ),
    "operator": (
        ["operator/*.py"],
        {
            "opd_runtime.contract",
            "opd_runtime.spec",
            "opd_runtime.plan",
            "opd_runtime.memory_plan",
            "opd_runtime.positions",
            "opd_operator",
        },
    ),
}
# What the light modules may import from outside: the standard library and these.
THIRD_PARTY = {"pydantic", "pydantic_core", "yaml", "kopf", "kubernetes", "urllib3", "prometheus_client"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "operator":
        parts[0] = "opd_operator"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, relative ones resolved."""
    name = module_name(path)
    return imports_in(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """``imports`` of the source of a module in ``package``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import names` imports submodules
                out += [(node.lineno, f"{target}.{a.name}" if node.module is None else target) for a in node.names]
            else:
                out.append((node.lineno, node.module or ""))
    return out


def allowed(module: str, ours: set[str]) -> bool:
    top = module.split(".")[0]
    if top in ("opd_runtime", "opd_operator"):
        return any(module == p or module.startswith(p + ".") for p in ours)
    return top in sys.stdlib_module_names or top in THIRD_PARTY


def layer_files(globs: list[str]) -> list[Path]:
    files = sorted(p for g in globs for p in ROOT.glob(g))
    assert files, globs
    return files


def light_modules() -> list[str]:
    return [module_name(p) for files, _ in LAYERS.values() for p in layer_files(files)]


@pytest.mark.parametrize("layer", list(LAYERS))
def test_light_layers_import_only_what_their_layer_allows(layer: str):
    globs, ours = LAYERS[layer]
    bad = [
        f"{p.relative_to(ROOT)}:{line}: imports {mod}"
        for p in layer_files(globs)
        for line, mod in imports(p)
        if mod.split(".")[0] in HEAVY or not allowed(mod, ours)
    ]
    assert not bad, "\n".join(bad) + "\n(see CONTRIBUTING.md: the layers and what may import what)"


def test_nothing_in_the_runtime_imports_the_operator():
    bad = [
        f"{p.relative_to(ROOT)}:{line}: imports {mod}"
        for p in sorted((ROOT / "opd_runtime").rglob("*.py"))
        for line, mod in imports(p)
        if mod.split(".")[0] == "opd_operator"
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_or_heavy_import():
    """The static check itself, on a module of opd_runtime.spec: an upward import and a lazy torch import
    are both caught; its own layer's imports pass."""
    source = "from ..plan import planned_stages\nfrom .base import SpecModel\n\ndef f():\n    import torch.nn\n"
    found = imports_in(source, "opd_runtime.spec")
    assert found == [(1, "opd_runtime.plan"), (2, "opd_runtime.spec.base"), (5, "torch.nn")]
    assert [allowed(m, LAYERS["spec"][1]) for _, m in found] == [False, True, False]


def test_importing_the_light_layers_loads_no_heavy_package():
    code = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "culprits = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(h for h in heavy if h in sys.modules)\n"
        "    if loaded:\n"
        "        culprits[name] = loaded\n"
        "        break\n"
        "print(json.dumps(culprits))\n"
    )
    modules = light_modules()
    assert "opd_operator.handlers" in modules and "opd_runtime.spec.run" in modules
    # -I: no user site, no PYTHONPATH; the checkout stays off sys.path (its operator/ would shadow the stdlib)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "tests",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}, f"importing these loaded heavy packages: {proc.stdout}"


# The tests' own layer: a test module shares nothing with another test module; what two share lives in
# tests/support (functions) or a conftest.py (fixtures), so moving or deleting one test file breaks no other.
def imports_of_tests(sources: dict[str, str]) -> dict[str, list[str]]:
    """File -> the test modules and conftests it imports (any import statement, at any depth)."""
    found: dict[str, list[str]] = {}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            bad = [m for m in modules if m.split(".")[-1].startswith("test_") or m.split(".")[-1] == "conftest"]
            if bad:
                found.setdefault(name, []).extend(bad)
    return found


def test_no_test_module_imports_another_test_module_or_a_conftest():
    tests = ROOT / "tests"
    sources = {str(p.relative_to(tests)): p.read_text() for p in sorted(tests.rglob("*.py"))}
    assert imports_of_tests(sources) == {}


def test_the_test_import_checker_sees_a_test_module_and_a_conftest():
    sources = {
        "k8s/test_a.py": "import pytest\nfrom test_operator_k8s import Run\n",
        "vllm/test_b.py": "def f():\n    import conftest\n",
        "unit/test_c.py": "from support.runs import run_doc\nimport test_x as base\n",
        "unit/test_d.py": "from support import opd_fake_cluster\n",
    }
    assert imports_of_tests(sources) == {
        "k8s/test_a.py": ["test_operator_k8s"],
        "vllm/test_b.py": ["conftest"],
        "unit/test_c.py": ["test_x"],
    }
