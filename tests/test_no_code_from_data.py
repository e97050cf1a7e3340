"""No code execution from data: no module may unpickle, torch.load without weights_only=True, eval/exec,
or yaml.load without a safe loader. Checked on the syntax tree of every source file, so a new call fails here."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cdcca"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: torch.load, yaml.load, eval, ..."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unsafe_call(name: str, kwargs: dict) -> list[str]:
    if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        return [f"{name}(...)"]
    if name.endswith("torch.load") and not _is_const(kwargs.get("weights_only"), True):
        return ["torch.load without weights_only=True"]
    if name == "yaml.load" and "Safe" not in _name(kwargs.get("Loader", ast.Name(""))):
        return ["yaml.load without SafeLoader"]
    if name in ("yaml.unsafe_load", "yaml.full_load"):
        return [f"{name}(...)"]
    if name in ("numpy.load", "np.load") and not _is_const(kwargs.get("allow_pickle"), False):
        return [f"{name} without allow_pickle=False"]
    return []


def unsafe_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            found += _unsafe_call(_name(node.func), {k.arg: k.value for k in node.keywords})
    return found


def test_no_source_file_can_execute_code_from_data():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        uses = unsafe_uses(ast.parse(path.read_text(), filename=str(path)))
        if uses:
            offenders[str(path.relative_to(SRC))] = uses
    assert offenders == {}


def test_the_checker_catches_each_unsafe_pattern():
    bad = """
import pickle
from dill import loads
torch.load(f)
torch.load(f, weights_only=False)
yaml.load(s)
eval("1")
exec("x = 1")
np.load(f)
"""
    good = "torch.load(f, weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\nnp.load(f, allow_pickle=False)\nmodel.eval()\n"
    assert len(unsafe_uses(ast.parse(bad))) == 8
    assert unsafe_uses(ast.parse(good)) == []
