"""The package's layers: no import cycles, kernels that know tensors only, bench on the public API (issue 13)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_import_without_diffusers_or_peft():
    code = ("import sys, qwen_fused.kernels\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'peft', 'transformers'))\n"
            "assert not heavy, heavy[:5]\n"
            "import qwen_fused\n"
            "assert callable(qwen_fused.fuse_qkv) and 'diffusers' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------ the import graph
ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (setup.py's package_dir)
PACKAGES = {"qwen_fused": "qwen_fused", "kernels": "qwen_fused.kernels", "bench": "qwen_fused.bench"}


def _modules():
    """{module name: path} of every source file of the three installed packages."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((pkg, *parts))] = path
    return out


def _imports(path, module, is_package, top_level_only):
    """(absolute module name, imported names) of each import in a file; module-level statements only, or all."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not top_level_only else _top_level(tree.body)
    package = module if is_package else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = node.module or ""
            full = (f"{base}.{name}" if name else base) if node.level else name
            yield full, tuple(a.name for a in node.names)


def _top_level(body):
    """Statements that run at import: the module body, into if/try/with blocks, not into functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    yield from _top_level(child.body if isinstance(child, ast.ExceptHandler) else [child])


def _graph():
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        edges = set()
        for full, names in _imports(path, mod, path.name == "__init__.py", top_level_only=True):
            # `from pkg import sub` runs the package and the submodule
            targets = [full] + [f"{full}.{n}" for n in names if f"{full}.{n}" in mods]
            # a module's own packages run before it does: an import of them is no edge
            edges.update(t for t in targets if t in mods and t != mod and not mod.startswith(t + "."))
        graph[mod] = edges
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = _graph()
    assert {"qwen_fused", "qwen_fused.kernels.fused_qkv", "qwen_fused.bench.runner"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "__future__", *sys.stdlib_module_names}
    for mod, path in _modules().items():
        if not mod.startswith("qwen_fused.kernels"):
            continue
        for full, _ in _imports(path, mod, path.name == "__init__.py", top_level_only=False):
            root = full.split(".")[0]
            assert root in allowed or full.startswith("qwen_fused.kernels"), f"{path.name} imports {full}"


def test_bench_uses_only_public_names_of_the_package():
    for mod, path in _modules().items():
        if not mod.startswith("qwen_fused.bench"):
            continue
        for full, names in _imports(path, mod, path.name == "__init__.py", top_level_only=False):
            if full.startswith("qwen_fused.bench") or not full.startswith("qwen_fused"):
                continue
            private = [p for p in full.split(".") + list(names) if p.startswith("_")]
            assert not private, f"{path.name} imports private {full} {names}"


@pytest.mark.parametrize("hf_kernels", [True, False], ids=["hf-kernels-installed", "not-installed"])
def test_repo_root_on_sys_path_does_not_shadow_hugging_faces_kernels(tmp_path, hf_kernels):
    """`python -m pytest` (or any `python -m`) run in a checkout puts the repo root, and so our `kernels/` folder,
    first on sys.path; transformers >= 5.25 then imports Hugging Face's `kernels` and names from it. The folder
    must stand aside for that package, and otherwise hand back the installed `qwen_fused.kernels`."""
    site = tmp_path / "site"
    if hf_kernels:  # a stand-in for Hugging Face's package
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("from kernels.sub import CUDAProperties\n")
        (site / "kernels" / "sub.py").write_text("CUDAProperties = 'hf'\n")
    # without it: Hugging Face's package may be installed here (transformers >= 5.25 requires it), so the child
    # hides it from the one search that looks past the repo root, the folder's own
    hide = ("import importlib.machinery as m\nfind = m.PathFinder.find_spec\n"
            "m.PathFinder.find_spec = classmethod(lambda cls, name, path=None, target=None: None "
            "if name == 'kernels' and path is not None else find(name, path, target))\n")
    code = ("import sys; sys.path.insert(1, %r)\n%simport kernels\n"
            "print(getattr(kernels, 'CUDAProperties', None), kernels.__name__)"
            % (str(site), "" if hf_kernels else hide))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == (["hf", "kernels"] if hf_kernels else ["None", "qwen_fused.kernels"])
