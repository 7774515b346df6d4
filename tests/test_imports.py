"""The package's imports run one way, and scripts use only the library."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_rnp")
SCRIPT_DIRS = ("examples", "benchmarks", "converters")


def _modules():
    """`{module name: path}` for every module of keras_rnp."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, ROOT)[: -len(".py")]
            module = relative.replace(os.sep, ".")
            modules[module.removesuffix(".__init__")] = path
    return modules


def _imported(path):
    """Every module a file imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _package_imports():
    modules = _modules()
    return {
        module: sorted(
            name
            for name in _imported(path)
            if name in modules and name != module
        )
        for module, path in modules.items()
        if not module.endswith("keras_rnp")  # The package's own index.
    }


def test_flops_imports_nothing_from_keras_rnp():
    assert _package_imports()["keras_rnp.flops"] == []
    # And run alone, in a fresh interpreter, it loads no keras_rnp module.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('flops', "
        f"{os.path.join(PACKAGE, 'flops.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.conv_flops((2, 2), (3, 3), 4, 8))\n"
        "print(sorted(m for m in sys.modules if m.startswith('keras_rnp')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == [str(2.0 * 4 * 9 * 4 * 8), "[]"]


def test_package_imports_form_no_cycle():
    graph = _package_imports()
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = active[active.index(module) :] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done or module not in graph:
            return
        active.append(module)
        for imported in graph[module]:
            visit(imported)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_model_module_holds_no_training_loop():
    source = open(os.path.join(PACKAGE, "rnp_model.py")).read()
    assert "GradientTape" not in source  # Training is in trainer.py.
    # A few hundred lines: configuration, state, forward pass, saving.
    assert len(source.splitlines()) < 600


def test_scripts_import_only_the_library():
    scripts = [
        os.path.join(ROOT, folder, name)
        for folder in SCRIPT_DIRS
        for name in os.listdir(os.path.join(ROOT, folder))
        if name.endswith(".py")
    ]
    local = {os.path.basename(path)[:-3] for path in scripts}
    for path in scripts:
        source = open(path).read()
        assert "sys.path" not in source, path
        folder = os.path.basename(os.path.dirname(path))
        own = {"common"} if folder == "converters" else set()
        assert not (_imported(path) & (local - own)), path
