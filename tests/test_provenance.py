"""stmae.provenance: what a results file records."""

from __future__ import annotations

import subprocess
from pathlib import Path


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


def test_commit_comes_from_the_environment_when_given(tmp_path, monkeypatch):
    # A copy of the tree on another machine: no git, or a stale .git. The variable's commit wins, marked.
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc123")
    expected = {"commit": "abc123", "commit_source": provenance.COMMIT_VARIABLE, "dirty": None, "modified": []}
    assert provenance.git_state(tmp_path) == expected
    assert provenance.git_state(REPO) == expected
    monkeypatch.delenv(provenance.COMMIT_VARIABLE)
    assert provenance.git_state(tmp_path)["commit"] is None
    assert provenance.git_state(REPO)["commit"] == _git("rev-parse", "HEAD")
