"""Results files across calls: ``--merge`` (keep what a call does not re-run), ``--combine``
(join calls that ran different datasets) and writing the JSON and its Markdown.

Why a module of its own: a full run outlasts one machine session, so its table is put
together from several calls; the checks that keep that table one commit's live with the code
that joins the parts.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Sequence

from .common import DATASETS, MT_PROTOCOLS, MT_ROW_PROTOCOL, entry_provenance
from .render import render_markdown
from .settings import describe_reductions
from .targets import evaluate_targets


def merge_previous(results: dict[str, Any], previous: dict[str, Any], rerun: Sequence[str], source: Path) -> None:
    """Carry the datasets of ``previous`` that this run does not re-run (``rerun``) into ``results``.

    Why: a full run is an hour or more, while a lent GPU takes one command of 10 minutes; with
    ``--merge`` each dataset runs in its own call and the results file grows. Each dataset
    entry keeps its own provenance (command, commit, device), which the Markdown lists.
    Mixing quick and full rows in one file would mislabel the table, so that is an error.
    """
    if previous.get("mode") != results["mode"]:
        raise ValueError(
            f"{source}: holds a {previous.get('mode')!r} run and this is a {results['mode']!r} run; "
            "--merge only combines runs of the same mode (use another --out)"
        )
    # Files written before entries kept their own provenance: the file's top level is theirs.
    kept = {k: {"provenance": entry_provenance(previous), **v}
            for k, v in previous.get("datasets", {}).items() if k not in rerun}
    for key, entry in kept.items():  # a table of one commit: parts made by other code are refused
        check_same_code(entry["provenance"], results, f"{source}: dataset {key!r}")
        for row in entry.get("rows", []):
            if "provenance" in row:
                check_same_code(row["provenance"], results, f"{source}: dataset {key!r}, row {row['row']!r}")
    if "magnetic_tile" in rerun and "magnetic_tile" in previous.get("datasets", {}):
        # rows of Magnetic Tile protocols this call does not re-run are carried over too
        ran = set(results["settings"].get("magnetic_tile", {}).get("protocols", []))
        old = previous["datasets"]["magnetic_tile"]
        fallback = old.get("provenance") or entry_provenance(previous)
        for row in old.get("rows", []):
            if MT_ROW_PROTOCOL.get(row.get("key")) not in ran:
                check_same_code(row.get("provenance", fallback), results,
                                f"{source}: dataset 'magnetic_tile', row {row['row']!r}")
    for key in kept:
        _carry_settings(results, previous, key)
    results["datasets"] = in_run_order({**kept, **results["datasets"]})
    results["merged_runs"] = [*previous.get("merged_runs", [previous.get("command")]), results["command"]]


def _carry_settings(results: dict[str, Any], source: dict[str, Any], key: str) -> None:
    """Dataset ``key``'s settings and reduction note from ``source`` (another results file),
    kept where ``results`` has its own settings for it (``--merge`` and ``--combine`` share this)."""
    results["settings"].setdefault(key, (source.get("settings") or {}).get(key))
    if key in (source.get("reduced_settings") or {}):
        results["reduced_settings"][key] = source["reduced_settings"][key]


def merge_protocol_rows(
    entry: dict[str, Any], previous: dict[str, Any] | None, previous_file: dict[str, Any]
) -> dict[str, Any]:
    """A new Magnetic Tile ``entry`` plus the rows of ``previous`` for protocols it did not run.

    Why: on a lent GPU one 10-minute call may not hold both protocols, so ``--only a
    --mt-protocols full --merge`` must keep the 200-image rows of an earlier call. Carried
    rows keep their provenance; the entry's protocol list and notes become the union.
    """
    if not previous or previous.get("status") != "ok" or entry.get("status") != "ok":
        return entry
    ran = entry["settings"]["protocols"]
    carried = [p for p in previous["settings"].get("protocols", []) if p not in ran]
    if not carried:
        return entry
    prov = previous.get("provenance") or entry_provenance(previous_file)
    rows_by_protocol = {p: [] for p in MT_PROTOCOLS}
    for row in entry["rows"]:
        rows_by_protocol[MT_ROW_PROTOCOL[row["key"]]].append(row)
    for row in previous["rows"]:
        if MT_ROW_PROTOCOL[row["key"]] in carried:
            rows_by_protocol[MT_ROW_PROTOCOL[row["key"]]].append({**row, "provenance": row.get("provenance", prov)})
    protocols = [p for p in MT_PROTOCOLS if p in ran or p in carried]
    notes = {**previous["protocol"]["train"], **entry["protocol"]["train"]}
    return {
        **entry,
        "settings": {**entry["settings"], "protocols": protocols},
        "protocol": {**entry["protocol"], "train": {p: notes[p] for p in protocols if p in notes}},
        "rows": [row for p in protocols for row in rows_by_protocol[p]],
    }


def in_run_order(datasets: dict[str, Any]) -> dict[str, Any]:
    """Dataset entries in :data:`DATASETS` order (unknown keys last), however they were added."""
    return {k: datasets[k] for k in [*DATASETS, *datasets] if k in datasets}


def check_same_code(recorded: dict[str, Any] | None, results: dict[str, Any], what: str) -> None:
    """Refuse (:class:`stmae_research.provenance.ProvenanceError`, a ValueError) a part made by other
    code than this run: another commit, or either side with uncommitted changes."""
    from stmae_research.provenance import require_same_code

    def code_changes(prov: dict[str, Any]) -> bool:
        # Results files written by earlier calls in the same checkout are outputs, not code.
        modified = [m for m in prov.get("modified") or [] if not m.startswith("benchmarks/results/")]
        return bool(modified) if prov.get("modified") is not None else bool(prov.get("dirty"))

    current = entry_provenance(results)
    current["dirty"] = code_changes(current)
    recorded = dict(recorded or {})
    if recorded:
        recorded["dirty"] = code_changes(recorded)
    require_same_code(recorded, current, what)


def combine(files: Sequence[Path]) -> dict[str, Any]:
    """One results dict from the files of calls that ran different datasets at the same commit.

    Why: on a 2-core CPU two calls with one thread each (one-class data in one, Magnetic Tile
    in the other) finish sooner than one call with two threads. Each dataset keeps the
    provenance of the call that made it; files from other commits, uncommitted changes, other
    modes or with a dataset in two files are refused.
    """
    import json

    parts = [(f, json.loads(Path(f).read_text(encoding="utf-8"))) for f in files]
    first_file, first = parts[0]
    results = {**first, "datasets": {}, "settings": {}, "reduced_settings": {},
               "merged_runs": [], "total_seconds": 0.0}
    for source, part in parts:
        if part.get("mode") != first.get("mode"):
            raise ValueError(f"{source}: a {part.get('mode')!r} run; {first_file} is a {first.get('mode')!r} run")
        prov = entry_provenance(part)
        check_same_code(prov, first, f"{source}")
        for key, entry in part.get("datasets", {}).items():
            entry = {"provenance": entry.get("provenance") or prov, **entry}
            if key in results["datasets"]:
                entry = _join_mt_protocols(key, entry, results["datasets"][key], source)
                results["datasets"][key] = entry
                results["settings"][key] = entry["settings"]
                results["reduced_settings"].pop(key, None)
                results["reduced_settings"].update(describe_reductions(results["settings"], [key]))
                continue
            results["datasets"][key] = entry
            _carry_settings(results, part, key)
        results["merged_runs"] += part.get("merged_runs") or [part.get("command")]
        results["total_seconds"] += float(part.get("total_seconds") or 0.0)
    results["datasets"] = in_run_order(results["datasets"])
    results["command"] = shlex.join(["python", "benchmarks/quality.py", "--combine", *map(str, files)])
    return results


def _join_mt_protocols(key: str, entry: dict[str, Any], earlier: dict[str, Any], source: Path) -> dict[str, Any]:
    """A dataset in two files: allowed only for Magnetic Tile rows of different protocols
    (the 200-image protocol in one call, the full train split in another), joined as
    ``--merge`` joins them; every row keeps the provenance of the call that made it."""
    ran = set((entry.get("settings") or {}).get("protocols", []))
    before = set((earlier.get("settings") or {}).get("protocols", []))
    ok = entry.get("status") == "ok" and earlier.get("status") == "ok"
    if key != "magnetic_tile" or not ok or not ran or not before or ran & before:
        raise ValueError(f"{source}: dataset {key!r} is also in another file; combine disjoint runs")
    joined = merge_protocol_rows(entry, earlier, {})
    joined["seconds"] = round(float(entry.get("seconds") or 0.0) + float(earlier.get("seconds") or 0.0), 1)
    return joined


def write_outputs(results: dict[str, Any], out: Path) -> None:
    from stmae.fileio import atomic_write_json, atomic_write_text

    results["targets"] = evaluate_targets(results)
    atomic_write_json(out, results)
    atomic_write_text(out.with_suffix(".md"), render_markdown(results))
