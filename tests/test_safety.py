"""Safe loading and atomic writing, checked two ways: the package's source is audited (a new writer or loader
that skips the rules fails here), and the behaviour is exercised (a refused pickle, a write killed mid-way)."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenclean.artifacts import ArtifactError, TokenTable, atomic_dir, atomic_file, load_array, save_array

PACKAGE = Path(__file__).resolve().parents[1] / "tokenclean"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Calls that put bytes on disk. A call is fine inside `with atomic_file(...)` / `with atomic_dir(...)`, or in one
# of the functions below, each of which writes only into a directory its caller made atomic or private.
WRITERS = {"np.save", "np.savez", "np.savez_compressed", "torch.save", "json.dump", "shutil.copy", "shutil.copyfile",
           "shutil.copytree", "save_file"}  # module.function, or a bare name
WRITER_METHODS = {"save_pretrained", "write_text", "write_bytes", "to_csv", "to_json"}  # any object's method
WRITES_INTO_CALLERS_DIR = {
    "write_model_dir": "callers pass the temporary directory of atomic_dir (save_model, train_file, pretrain)",
    "build_tokenizer": "writes into a TemporaryDirectory of pretrain_base (or a test's directory)",
    "_write": "sources.prepare_data calls it inside atomic_dir",
    "train_model": "its training log lives in <out>.resume/ (not an output) or in the atomic_dir of the model",
    "start": "warm.start: the warm server's log, in Snakemake's private .snakemake/ (not an output)",
}


def _opens_for_writing(call: ast.Call) -> bool:
    if not (isinstance(call.func, ast.Name) and call.func.id == "open"):
        return False
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return False
    return not isinstance(mode, ast.Constant) or any(c in str(mode.value) for c in "wax+")


def _is_writer(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr in WRITER_METHODS or f"{getattr(func.value, 'id', '')}.{func.attr}" in WRITERS
    return getattr(func, "id", "") in WRITERS or _opens_for_writing(call)


def _unprotected_writes(tree: ast.AST, path: Path) -> list[str]:
    found = []

    def visit(node: ast.AST, function: str, atomic: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function, atomic = node.name, False
        if isinstance(node, ast.With):
            names = {getattr(getattr(i.context_expr, "func", None), "id", None) for i in node.items}
            atomic = atomic or bool(names & {"atomic_file", "atomic_dir"})
        if isinstance(node, ast.Call) and _is_writer(node) and not atomic and function not in WRITES_INTO_CALLERS_DIR:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {function}()")
        for child in ast.iter_child_nodes(node):
            visit(child, function, atomic)

    visit(tree, "<module>", False)
    return found


def test_every_writer_in_the_package_is_atomic():
    unprotected = []
    for path in SOURCES:
        if path.name == "artifacts.py":  # the atomic helpers themselves
            continue
        unprotected += _unprotected_writes(ast.parse(path.read_text()), path)
    assert not unprotected, "writes outside atomic_file/atomic_dir: " + "; ".join(unprotected)


def test_the_audit_catches_a_plain_write():
    tree = ast.parse("def f(p, a):\n    np.save(p, a)\n    with atomic_file(p) as t:\n        np.save(t, a)\n"
                     "    open(p, 'w').write('x')\n")
    assert len(_unprotected_writes(tree, PACKAGE / "x.py")) == 2


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = f"{getattr(func.value, 'id', '')}.{func.attr}" if isinstance(func, ast.Attribute) else \
                    getattr(func, "id", "")
                if called == name:
                    out.append((path, node))
    return out


def _keyword(call: ast.Call, key: str):
    kw = next((k for k in call.keywords if k.arg == key), None)
    return None if kw is None else getattr(kw.value, "value", kw.value)


def test_no_loader_of_the_package_can_unpickle():
    for path in SOURCES:
        text = path.read_text()
        assert "import pickle" not in text and "import dill" not in text, path
        assert "allow_pickle=True" not in text, path
    loads = _calls("np.load")
    assert loads and all(_keyword(c, "allow_pickle") is False for _, c in loads), \
        [f"{p.name}:{c.lineno}" for p, c in loads if _keyword(c, "allow_pickle") is not False]
    for p, c in _calls("torch.load"):
        assert _keyword(c, "weights_only") is True, f"{p.name}:{c.lineno}: torch.load without weights_only=True"


def test_trust_remote_code_is_never_switched_on_in_the_package():
    checked = 0
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":  # never passed as a literal True
                literal_true = isinstance(node.value, ast.Constant) and node.value.value is True
                assert not literal_true, f"{path.name}:{node.lineno}"
            if isinstance(node, ast.FunctionDef):  # and every parameter of that name defaults to False
                positional = [a.arg for a in node.args.args]
                args = node.args
                defaults = dict(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
                if "trust_remote_code" in positional + [a.arg for a in args.kwonlyargs]:
                    default = getattr(defaults.get("trust_remote_code"), "value", None)
                    assert default is False, f"{path.name}:{node.name}"
                    checked += 1
    assert checked >= 5  # load_model, load_tokenizer, tokenize_file, loss_file, train_file, evaluate_benchmarks


# ---------------------------------------------------------------------------------------------------------
# behaviour: what pickle would need is refused
# ---------------------------------------------------------------------------------------------------------
def test_a_token_table_with_an_object_member_is_refused(tmp_path):
    table = TokenTable(np.arange(4), np.array([0, 4]), np.array([False, True, True, True]))
    path = tmp_path / "x.tokens.npz"
    table.save(path, {})
    np.savez(path, input_ids=table.input_ids, offsets=table.offsets, loss_mask=table.loss_mask,
             evil=np.array([{"a": 1}], dtype=object))  # what a hostile npz would hold
    with pytest.raises(ArtifactError, match=r"x\.tokens\.npz: not a token table"):
        TokenTable.load(path)


def test_an_object_array_is_neither_saved_nor_loaded(tmp_path):
    with pytest.raises(ArtifactError, match="object array"):
        save_array(tmp_path / "a.loss.npy", np.array([1, "x"], dtype=object), {})
    assert not (tmp_path / "a.loss.npy").exists()
    save_array(tmp_path / "b.loss.npy", np.ones(3, np.float32), {})
    np.save(tmp_path / "b.loss.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match=r"b\.loss\.npy: not a plain numpy array"):
        load_array(tmp_path / "b.loss.npy")


def test_a_model_directory_with_only_pickled_weights_is_refused(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    from tokenclean.models import load_model

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")  # a pickle: loading it would run whatever it references
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        load_model(str(d), "cpu")


# ---------------------------------------------------------------------------------------------------------
# behaviour: an interrupted write leaves nothing at the final path
# ---------------------------------------------------------------------------------------------------------
def test_atomic_file_and_dir_keep_the_old_output_when_the_write_fails(tmp_path):
    f = tmp_path / "table.csv"
    f.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert f.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    d = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed")
    assert not d.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "x").write_text("1")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_process_killed_mid_write_leaves_no_final_file(tmp_path):
    script = ("import os, signal, sys, numpy as np\n"
              "from tokenclean.artifacts import save_array\n"
              "real = np.save\n"
              "def dying(f, a, **kw):\n"
              "    f.write(b'\\x93NUMPY half written')\n"
              "    f.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "np.save = dying\n"
              "save_array(sys.argv[1], np.ones(1000, np.float32), {'kind': 'loss'})\n")
    out = tmp_path / "x.loss.npy"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # only hidden temporaries are left (the sidecar's too), which no rule names
    assert all(p.name.startswith(".") for p in tmp_path.iterdir())
    assert any(p.name.startswith(".x.loss.npy.") for p in tmp_path.iterdir())
    other = tmp_path / ".x.loss.npy.more.abcdefgh.tmp"  # another target's temporary (x.loss.npy.more)
    other.write_text("")
    save_array(out, np.ones(3, np.float32), {"kind": "loss"})  # the re-run clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "x.loss.json", "x.loss.npy"]


def test_a_failing_model_save_leaves_no_model_directory(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenclean.models import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def failing(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", failing)  # weights written, tokenizer fails
    with pytest.raises(OSError):
        save_model(model, tok, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_rewrite_keeps_the_old_array_and_its_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "m.mask.npy"
    save_array(path, np.array([False, True, True]), {"kind": "mask", "ratio": 0.6})

    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dying)
    with pytest.raises(KeyboardInterrupt):  # the new sidecar is complete, the new array is not: neither appears
        save_array(path, np.array([False, True, False]), {"kind": "mask", "ratio": 0.3})
    monkeypatch.undo()
    mask, meta = load_array(path)
    assert mask.tolist() == [False, True, True] and meta["ratio"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mask.json", "m.mask.npy"]
    # a sidecar that does not describe the array beside it (copied by hand) is still refused
    save_array(tmp_path / "o.mask.npy", np.array([False, True, False]), {"kind": "mask", "ratio": 0.3})
    (tmp_path / "m.mask.json").write_text((tmp_path / "o.mask.json").read_text())
    with pytest.raises(ArtifactError, match=r"m\.mask\.npy: damaged \(its contents do not match the fingerprint"):
        load_array(path)


@pytest.mark.slow  # starts Snakemake (two dry runs)
def test_the_workflow_passes_trust_remote_code_only_when_the_config_asks(tmp_path):
    from tests.snakemake_plan import plan

    def commands(override: str) -> list[str]:
        (tmp_path / "o.yaml").write_text(override or "{}\n")
        jobs = plan(tmp_path, PACKAGE.parent / "configs" / "smoke.yaml", tmp_path / "o.yaml")["jobs"]
        return [j["shell"] for j in jobs
                if any(f"tokenclean.cli {c} " in j["shell"] for c in ("tokenize", "loss", "train"))]

    default = commands("")
    assert len(default) > 10 and not any("--trust-remote-code" in line for line in default)
    asked = commands("base_model: {trust_remote_code: true}\n")
    assert len(asked) == len(default) and all("--trust-remote-code" in line for line in asked)
