"""The package's layering (ARCHITECTURE.md): imports point down, the math layer stands alone,
only the command line turns exceptions into exit codes, modules stay small and acyclic."""

import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = {"schedules", "diffusion", "losses", "spacing", "samplers", "sampler_grid", "guidance"}
MATH |= {"edm", "flow", "ve"}
MAX_LINES = 430  # "roughly 100-400 lines" per module (ARCHITECTURE.md)


def _modules(package: str) -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def _imports(path: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


PACKAGE = _modules("ddpm_jax")
IMPORTS = {m: _imports(p) for m, p in PACKAGE.items()}


def _internal(module: str) -> set[str]:
    """The ddpm_jax modules that ``module`` imports."""
    deps = set()
    for name in IMPORTS[module]:
        while name and name not in PACKAGE:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            deps.add(name)
    return deps


def test_math_layer_imports_only_jax_numpy_chex_and_itself():
    allowed = {"jax", "numpy", "chex", "ddpm_jax"} | set(sys.stdlib_module_names)
    for m in MATH:
        module = f"ddpm_jax.{m}"
        top = {name.split(".")[0] for name in IMPORTS[module]}
        assert top <= allowed, (module, top - allowed)
        assert _internal(module) <= {f"ddpm_jax.{n}" for n in MATH}, module


def test_nothing_in_the_package_imports_experiments_and_only_cli_is_an_entry():
    for module, names in IMPORTS.items():
        assert not any(n.split(".")[0] == "experiments" for n in names), module
        if module != "ddpm_jax.cli":
            assert "ddpm_jax.cli" not in _internal(module), module


def test_models_and_weights_never_reach_up():
    below = ("ddpm_jax.models", "ddpm_jax.weights", "ddpm_jax.errors")
    below += tuple(f"ddpm_jax.{m}" for m in MATH)  # a published pipeline's schedule
    for module in PACKAGE:
        if module.startswith(("ddpm_jax.models", "ddpm_jax.weights")):
            for dep in _internal(module):
                assert dep.startswith(below), (module, dep)
                if module.startswith("ddpm_jax.models"):
                    assert not dep.startswith("ddpm_jax.weights"), (module, dep)
                    assert dep not in below[3:], (module, dep)  # networks never do the math


def test_no_import_cycles():
    graph = {m: _internal(m) for m in PACKAGE}

    def reaches(start: str, target: str) -> bool:
        todo, seen = [start], {start}
        while todo:
            for dep in graph[todo.pop()]:
                if dep == target:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == []


@pytest.mark.parametrize("package", ["ddpm_jax", "experiments"])
def test_modules_stay_small(package):
    sizes = {m: sum(1 for _ in open(p)) for m, p in _modules(package).items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_training_imports_neither_runs_nor_latent_nor_weights():
    """The run loop sits below the loading of runs: ``import ddpm_jax.train`` loads none of
    ``ddpm_jax.runs``, ``ddpm_jax.latent`` or ``ddpm_jax.weights`` (run-level evaluation is
    ``evaluation.sweep``, imported by ``experiments.evaluate`` alone)."""
    import subprocess

    code = (
        "import ddpm_jax.train, sys; "
        "print(sorted(m for m in sys.modules if m.startswith('ddpm_jax')))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert "ddpm_jax.train" in loaded
    unwanted = ("ddpm_jax.runs", "ddpm_jax.latent", "ddpm_jax.weights")
    assert [m for m in loaded if m.startswith(unwanted)] == []
    assert "ddpm_jax.evaluation.sweep" not in loaded
