"""Merging results files made in parts: the parts must come from one clean commit.

Why here and not in ``stmae.provenance``: only the benchmark and research scripts merge
earlier results into a new file, or write results pages; the package only records where
its results come from (:func:`stmae.provenance.collect`).
"""

from __future__ import annotations

from typing import Any, Mapping


def same_code(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """True when two provenance blocks come from the same code: same commit, neither dirty.

    Without a commit (no git), the package's code revisions must match.
    """
    if not a or not b:
        return False
    if a.get("dirty") or b.get("dirty"):
        return False
    if a.get("commit") and b.get("commit"):
        return a["commit"] == b["commit"]
    return bool(a.get("code_revision")) and a.get("code_revision") == b.get("code_revision")


class ProvenanceError(ValueError):
    """A part of a results file (or a saved state) was made by other code than this run."""


def _code_of(prov: Mapping[str, Any]) -> str:
    commit = prov.get("commit")
    where = f"commit {commit[:10]}" if commit else f"code revision {prov.get('code_revision', '?')} (no git)"
    return where + (" with uncommitted changes" if prov.get("dirty") else "")


def require_same_code(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], what: str) -> None:
    """Raise :class:`ProvenanceError` unless ``recorded`` and ``current`` pass :func:`same_code`.

    ``what`` names the part (``"benchmarks/results/quality.json: dataset a"``); the message
    says which code made each side and what to do.
    """
    if same_code(recorded, current):
        return
    if not recorded:
        made = "records no provenance (written before results recorded their commit)"
    else:
        made = f"was made at {_code_of(recorded)}"
    if current.get("dirty"):
        now = f"this run has uncommitted changes ({', '.join(current.get('modified', [])[:5]) or 'tracked files'})"
    else:
        now = f"this run is at {_code_of(current)}"
    raise ProvenanceError(
        f"{what} {made}; {now}. Parts of one results file must come from one clean commit: "
        "commit your changes and re-run those parts, or write to another output file"
    )


__all__ = ["ProvenanceError", "require_same_code", "same_code"]
