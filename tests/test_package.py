"""The package's structure: no import cycle, the core never imports the benchmark tooling, other packages'
private names only in `_compat`, nothing loaded with pickle, the OpenMP default, and a light `import`."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jumplora_hf")
# Attributes and modules of torch / transformers / peft / accelerate / DeepSpeed that are private or undocumented.
PRIVATE = (
    "ds_id",
    "ds_tensor",
    "_hp_mapping",
    "_register_custom_module",
    "_gen_kwargs",
    "_prepare_inputs",
    "current_gradient_accumulation_steps",
    "model_accepts_loss_kwargs",
    "_buffer_dict",
    "_getframe",
)


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[module] = path
    return out


def _imports(module: str, path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found.add(target)
                if node.module is None:
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module and node.module.startswith("jumplora_hf"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("jumplora_hf"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t in _imports(m, p) if t in modules and t != m} for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    graph["jumplora_hf"] = set()  # the lazy __init__ imports nothing at module level
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" → ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_core_never_imports_the_benchmark_tooling():
    for module, targets in _graph().items():
        if not module.startswith("jumplora_hf.bench"):
            assert not any(t.startswith("jumplora_hf.bench") for t in targets), module


def test_private_names_of_other_packages_only_in_compat():
    for module, path in _modules().items():
        if module == "jumplora_hf._compat":
            continue
        source = open(path, encoding="utf-8").read()
        for name in PRIVATE:
            assert name not in source, f"{module} uses {name}: go through jumplora_hf._compat"


def test_nothing_is_unpickled():
    for folder in ("jumplora_hf", "recipes", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py") and name != "test_package.py":
                    source = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    for call in ("weights_only=False", "torch.load(", "import pickle", "pickle.load", "np.load("):
                        assert call not in source, f"{name}: {call}"


def _fresh_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, "PYTHONPATH": ROOT, **extra}


def test_the_import_changes_no_environment_variable_and_stays_light():
    # the entry points (recipes, benchmarks, tests) set OMP_WAIT_POLICY themselves; the library leaves a user's
    # process alone, imports neither torch nor PEFT, and registers JumpLoRA with PEFT once PEFT is imported
    code = (
        "import os, sys; before = dict(os.environ); import jumplora_hf; "
        "print(dict(os.environ) == before, 'torch' in sys.modules, 'peft' in sys.modules); "
        "import peft; from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING; "
        "print(any(str(k).endswith('JUMPLORA') for k in PEFT_TYPE_TO_TUNER_MAPPING))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_fresh_env(), capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False", "False", "True"]


def test_every_entry_point_sets_the_openmp_default_before_torch():
    scripts = [
        os.path.join(ROOT, "recipes", n) for n in os.listdir(os.path.join(ROOT, "recipes")) if n.endswith(".py")
    ]
    scripts += [
        os.path.join(ROOT, "benchmarks", n) for n in os.listdir(os.path.join(ROOT, "benchmarks")) if n.endswith(".py")
    ]
    scripts.append(os.path.join(ROOT, "tests", "conftest.py"))  # pytest loads it before any test module
    for path in scripts:
        tree = ast.parse(open(path, encoding="utf-8").read())
        first_heavy = setdefault = None
        for index, node in enumerate(tree.body):
            text = ast.unparse(node)
            if setdefault is None and "OMP_WAIT_POLICY" in text and "setdefault" in text:
                setdefault = index
            if (
                first_heavy is None
                and isinstance(node, (ast.Import, ast.ImportFrom))
                and any(
                    heavy in text
                    for heavy in ("torch", "transformers", "peft", "datasets", "jumplora_hf", "deepspeed")
                )
            ):
                first_heavy = index
        assert setdefault is not None, f"{path} does not set OMP_WAIT_POLICY"
        if os.path.basename(path) in (
            "demo.py",
            "quickstart.py",
            "sc.py",
            "ls.py",
            "ledger_revert.py",
        ):  # the demo's kernels
            pins = [i for i, node in enumerate(tree.body) if "ATEN_CPU_CAPABILITY" in ast.unparse(node)]
            assert pins and (first_heavy is None or pins[0] < first_heavy), f"{path}: CPU kernels not pinned first"
        assert first_heavy is None or setdefault < first_heavy, (
            f"{path} imports a heavy package before OMP_WAIT_POLICY"
        )


def test_the_package_metadata_and_the_module_give_one_version():
    import re

    import jumplora_hf

    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:  # tomllib is Python 3.11+
        declared = re.search(r'^version = "([^"]+)"', f.read(), re.MULTILINE).group(1)
    assert declared == jumplora_hf.__version__
