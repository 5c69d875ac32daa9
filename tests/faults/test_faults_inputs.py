"""Bad input and hostile files, for every script: the matrix (empty folder, truncated PNG, a text file named
.png, 16-bit and RGBA PNGs and mixed sizes that must be accepted, a class folder without images, unmatched
masks, an unknown class name, another model's or another size's checkpoint, a file that is not a
checkpoint), pickles that would run code, and a source scan for eval/exec and unsafe torch.load.

Each folder's cases run in one driver process (tests/faults/fault_driver.py) as `python script.py ...`.
"""
import ast
from pathlib import Path

import pytest
import torch

import fault_lib as fl
from fault_specs import ALL_CASES, FOLDERS
from repo_helpers import REPO

pytestmark = pytest.mark.bad_input


@pytest.mark.parametrize("case", ALL_CASES, ids=[c["id"] for c in ALL_CASES])
def test_bad_input(faults, case):
    run = faults.get(f"{case['folder']}.inputs")
    c, r = run["cases"][case["id"]], run["results"].get(case["id"])
    assert r is not None, f"the driver did not get to this case\n{run['driver']}"
    shown = f"exit {r['code']}\n--- stderr ---\n{r['stderr'][-3000:]}\n--- stdout ---\n{r['stdout'][-1500:]}"
    assert not r["marker"], "the pickle ran code while loading (marker file created)"
    if c["expect"] == "ok":
        assert r["code"] == 0, f"should be accepted and converted: {shown}"
        return
    assert r["code"] not in (0, None), f"accepted, but should be refused: {shown}"
    assert "Traceback" not in r["stderr"], shown
    lines = fl.error_lines(r["stderr"])
    assert len(lines) == 1, f"expected one `error:` line: {shown}"
    if c["expect"] == "pickle":
        assert "--trust_checkpoint" in lines[0] or "--trust-checkpoint" in lines[0], shown
    else:
        assert any(n in lines[0] for n in c["names"]), f"the message names none of {c['names']}: {shown}"
    assert fl.tree_state(c["out"]) == c["before"], f"the output folder {c['out']} was written to"


def test_pickle_bomb_would_run_code(tmp_path):
    """The payload the security cases use does run code when a pickle is trusted (so its absence means refused)."""
    marker = tmp_path / "marker"
    fl.write_pickle_bomb(tmp_path / "bomb.pt", marker)
    with pytest.raises(Exception):
        torch.load(tmp_path / "bomb.pt", weights_only=True)
    assert not marker.exists()
    torch.load(tmp_path / "bomb.pt", weights_only=False)
    assert marker.exists()


def _src(node, text):
    return ast.get_source_segment(text, node) or ""


def unsafe_calls(path):
    """eval/exec calls, pickle loads, torch.load without weights_only=True outside a trust branch.

    weights_only=False is accepted only on the explicit trusted path: inside `if <...trust...>:`, or after
    an `if <...trust...>: raise ...` earlier in the same function."""
    text = Path(path).read_text()
    tree = ast.parse(text)
    found = []

    def trust_raises(fn):
        return [n.lineno for n in ast.walk(fn) if isinstance(n, ast.If) and "trust" in _src(n.test, text)
                and any(isinstance(b, ast.Raise) for b in ast.walk(n))]

    def visit(node, guards, raises):
        if isinstance(node, ast.If):
            guards = guards + [_src(node.test, text)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raises = trust_raises(node)
        if isinstance(node, ast.Call):
            f, name = node.func, _src(node.func, text)
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{name}(...) at line {node.lineno}")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
                found.append(f"{name} at line {node.lineno}")
            elif name.endswith("np.load") and "allow_pickle" in kw and _src(kw["allow_pickle"], text) != "False":
                found.append(f"np.load(allow_pickle=...) at line {node.lineno}")
            elif name in ("torch.load", "torch.hub.load_state_dict_from_url"):
                w = kw.get("weights_only")
                ws = _src(w, text) if w is not None else ""
                trusted = "trust" in ws or any("trust" in g for g in guards) or any(r < node.lineno for r in raises)
                if ws != "True" and not (trusted and ws):
                    found.append(f"{name}(weights_only={ws or 'missing'}) at line {node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, guards, raises)

    visit(tree, [], [])
    return found


def test_no_eval_exec_or_unsafe_load_in_any_script():
    bad = {}
    for folder in FOLDERS:
        for py in sorted((REPO / folder).rglob("*.py")):
            hits = unsafe_calls(py)
            if hits:
                bad[str(py.relative_to(REPO))] = hits
    assert not bad, f"unsafe calls: {bad}"


def test_scanner_catches_unsafe_code(tmp_path):
    """The scanner itself flags what it should (so an empty result above means something)."""
    p = tmp_path / "x.py"
    p.write_text("import torch, pickle\neval('1')\nexec('x=1')\ntorch.load('a')\ntorch.load('a', weights_only=False)\n"
                 "pickle.loads(b'')\nm.eval()\nif trust:\n    torch.load('a', weights_only=False)\n"
                 "torch.load('a', weights_only=not trust)\ntorch.load('a', weights_only=True)\n"
                 "def f(trust):\n    if not trust:\n        raise ValueError\n    torch.load('a', weights_only=False)\n"
                 "def g(trust):\n    torch.load('a', weights_only=False)\n")
    hits = unsafe_calls(p)
    assert len(hits) == 6 and "eval(...) at line 2" in hits[0] and "line 17" in hits[-1], hits
