"""stmae.provenance: what a results file records, and when two parts count as the same code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stmae import provenance

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_collect_records_command_commit_device_versions_and_seconds(monkeypatch):
    import time

    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)

    prov = provenance.collect("cpu", command="python benchmarks/x.py --flag", started=time.time() - 2.0)
    assert prov["command"] == "python benchmarks/x.py --flag"
    assert prov["commit"] == _git("rev-parse", "HEAD")  # the checkout's commit, in full
    modified = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    assert prov["dirty"] is bool(modified)
    assert prov["code_revision"] == provenance.code_revision() and len(prov["code_revision"]) == 16
    assert prov["device"]["device"] == "cpu" and prov["device"]["cpu_count"] >= 1
    import stmae
    import torch

    assert prov["versions"]["stmae"] == stmae.__version__ and prov["versions"]["torch"] == torch.__version__
    assert 2.0 <= prov["seconds"] < 60.0


def test_command_line_is_what_a_user_types_again():
    assert provenance.command_line(["benchmarks/quality.py", "--quick", "--out", "a b.json"]) == (
        "python benchmarks/quality.py --quick --out 'a b.json'")
    assert provenance.command_line(["/usr/bin/stmae", "fit", "x"]) == "stmae fit x"


def test_same_code_needs_one_commit_and_clean_trees():
    a = {"commit": "c1", "dirty": False, "code_revision": "r1"}
    assert provenance.same_code(a, dict(a))
    assert not provenance.same_code(a, {**a, "commit": "c2"})
    assert not provenance.same_code(a, {**a, "dirty": True})
    assert not provenance.same_code(None, a) and not provenance.same_code(a, {})
    # without git the package's code revisions decide
    assert provenance.same_code({"commit": None, "code_revision": "r1"}, {"commit": None, "code_revision": "r1"})
    assert not provenance.same_code({"commit": None, "code_revision": "r1"}, {"commit": None, "code_revision": "r2"})


def test_require_same_code_says_which_code_made_each_side():
    here = {"commit": "b" * 40, "dirty": False}
    provenance.require_same_code(dict(here), here, "x")  # same: no error
    with pytest.raises(provenance.ProvenanceError, match=r"^f\.json: part 'a' was made at commit aaaaaaaaaa; "
                                                         r"this run is at commit bbbbbbbbbb\. .*commit your changes"):
        provenance.require_same_code({"commit": "a" * 40}, here, "f.json: part 'a'")
    with pytest.raises(provenance.ProvenanceError, match="records no provenance"):
        provenance.require_same_code(None, here, "f.json: part 'a'")
    with pytest.raises(provenance.ProvenanceError, match=r"this run has uncommitted changes \(src/stmae/x.py\)"):
        provenance.require_same_code(dict(here), {**here, "dirty": True, "modified": ["src/stmae/x.py"]}, "p")
    assert issubclass(provenance.ProvenanceError, ValueError)


def test_describe_is_one_line():
    prov = {"command": "python q.py", "commit": "0123456789abcdef", "dirty": True, "created": "2026-11-30T01:02:03",
            "device": {"cpu": "Some CPU", "torch_threads": 2}, "versions": {"stmae": "0.1.0"}, "seconds": 61.4}
    assert provenance.describe(prov) == (
        "`python q.py` at commit 0123456789 (dirty), 2026-11-30, on Some CPU, 2 thread(s); stmae 0.1.0; 61 s")


def test_commit_comes_from_the_environment_when_given(tmp_path, monkeypatch):
    # A copy of the tree on another machine: no git, or a stale .git. The variable's commit wins, marked.
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc123")
    expected = {"commit": "abc123", "commit_source": provenance.COMMIT_VARIABLE, "dirty": None, "modified": []}
    assert provenance.git_state(tmp_path) == expected
    assert provenance.git_state(REPO) == expected
    monkeypatch.delenv(provenance.COMMIT_VARIABLE)
    assert provenance.git_state(tmp_path)["commit"] is None
    assert provenance.git_state(REPO)["commit"] == _git("rev-parse", "HEAD")
