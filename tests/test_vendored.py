"""The vendored shared modules: every folder's copy is byte-identical to its source in scripts/vendored/."""
import subprocess
import sys

from repo_helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import sync_vendored  # noqa: E402


def test_every_copy_equals_its_source():
    bad = sync_vendored.drifted()
    assert not bad, "drifted copies (run python scripts/sync_vendored.py): " + ", ".join(
        str(d.relative_to(REPO)) for _, d in bad)


def test_check_names_a_drifted_copy(tmp_path, monkeypatch):
    """--check fails and names the copy when one differs; the sync restores it."""
    repo = tmp_path / "repo"
    (repo / "scripts" / "vendored").mkdir(parents=True)
    (repo / "scripts" / "vendored" / "runtime.py").write_text("x = 1\n")
    (repo / "ddpm").mkdir()
    (repo / "ddpm" / "runtime.py").write_text("x = 2\n")
    monkeypatch.setattr(sync_vendored, "REPO", repo)
    monkeypatch.setattr(sync_vendored, "SOURCE", repo / "scripts" / "vendored")
    monkeypatch.setattr(sync_vendored, "COPIES", {"runtime.py": ["ddpm"]})
    assert sync_vendored.main(["--check"]) == 1
    assert sync_vendored.main([]) == 0
    assert (repo / "ddpm" / "runtime.py").read_text() == "x = 1\n"
    assert sync_vendored.main(["--check"]) == 0


def test_no_folder_imports_a_sibling():
    """Folders stay standalone: no file of a model folder imports another folder's modules by path."""
    folders = ("ddpm", "ldm", "controlnet", "dit", "evaluation")
    for folder in folders:
        for f in (REPO / folder).rglob("*.py"):
            text = f.read_text()
            for other in folders:
                if other != folder:
                    assert f"sys.path.insert(0, str(Path(__file__).resolve().parents[1] / \"{other}\"" not in text
                    assert f"from {other}." not in text and f"import {other}." not in text, (f, other)


def test_check_passes_from_the_command_line():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sync_vendored.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
