"""The Markdown of a results file and the generated block of the docs page (between the
quality markers), with the run that made every row.

Why a module of its own: ``--from-json`` re-renders from a file without running anything, so
everything shown is a function of the results dict alone, kept apart from the code that runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import DATASETS, KNN, STMAE, _fmt, entry_provenance
from .targets import METRIC_NAMES, _half, evaluate_targets

#: Where the generated block of each mode goes in the docs page.
MARKERS = ("<!-- quality:start -->", "<!-- quality:end -->")
QUICK_MARKERS = ("<!-- quality-quick:start -->", "<!-- quality-quick:end -->")

HALVES_NOTE = (
    "The same Magnetic Tile rows on the two seeded halves of the test split "
    "(`stmae_research.protocols.real_defect_indices`, stratified by defect type): the package's settings were "
    "chosen on `mt_val`; `mt_test` is held back for reporting."
)

TABLE_COLUMNS = [
    "dataset / row", "method", "image AUROC", "pixel AUROC", "AUPRO", "image F1-max",
    "fit s", "device", "settings", "target",
]


class PageMarkerError(ValueError):
    """The docs page lacks the quality markers (or has them out of order)."""


def halves_table(results: dict[str, Any]) -> str:
    """Magnetic Tile rows on the two halves of the test split: mt_val (settings chosen there) and mt_test."""
    from stmae.report import markdown_table

    rows = []
    for entry in results.get("datasets", {}).values():
        if entry.get("status") != "ok":
            continue
        for row in entry["rows"]:
            if not row.get("subsets"):
                continue
            cells = {"dataset / row": row["row"], "method": row["method"]}
            for half in ("mt_val", "mt_test"):
                for metric, name in METRIC_NAMES.items():
                    cells[f"{half} {name}"] = _half(row, half, metric)
            rows.append(cells)
    if not rows:
        return ""
    return markdown_table(rows, list(rows[0]))


def _target_cell(targets: list[dict[str, Any]], key: str, method: str) -> str:
    """Compact met/missed summary for one table row ('' when no target applies)."""
    if method != STMAE:
        return ""
    mine = [t for t in targets if t["row"] == key]
    if not mine:
        return ""
    parts = []
    for ref, label in (("anomalib PatchCore (reference)", "PatchCore"), ("kNN baseline, same run", "kNN"),
                       ("memory only, same model, mt_test", "mt_test vs memory"),
                       ("kNN baseline, same run, mt_test", "mt_test vs kNN"), ("issue target", None)):
        group = [t for t in mine if t["reference"] == ref]
        if not group:
            continue
        if label is None:
            label = f">= {group[0]['required']:.2f}"
        if any(t["status"] == "not run" for t in group):
            parts.append(f"{label}: not run")
            continue
        missed = [METRIC_NAMES.get(t["metric"], t["metric"]) for t in group if t["status"] == "missed"]
        parts.append(f"{label}: " + ("met" if not missed else f"missed ({', '.join(missed)})"))
    text = "; ".join(parts)
    if mine[0].get("indicative_only"):
        text += " [reduced settings: indicative]"
    return text


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for :data:`TABLE_COLUMNS`: two per dataset row (ST-MAE, kNN), or one per skipped/failed dataset."""
    targets = results.get("targets") or evaluate_targets(results)
    out = []
    for key, entry in results.get("datasets", {}).items():
        status = entry.get("status")
        if status != "ok":
            title = DATASETS.get(key, {}).get("title", key)
            out.append({"dataset / row": title, "method": "—", "device": "—",
                        "settings": f"{status}: {entry.get('reason', '')}", "target": ""})
            continue
        for row in entry["rows"]:
            fit = row.get("fit_seconds")
            out.append({
                "dataset / row": row["row"],
                "method": row["method"],
                "image AUROC": row.get("image_auroc"),
                "pixel AUROC": row.get("pixel_auroc"),
                "AUPRO": row.get("aupro"),
                "image F1-max": row.get("image_f1max"),
                "fit s": None if fit is None else f"{fit:.0f}",
                "device": row.get("device"),
                "settings": row.get("settings", ""),
                "target": _target_cell(targets, row["key"], row["method"]),
            })
    return out


def results_table(results: dict[str, Any]) -> str:
    from stmae.report import markdown_table

    return markdown_table(table_rows(results), TABLE_COLUMNS)


def targets_table(results: dict[str, Any]) -> str:
    from stmae.report import markdown_table

    rows = [
        {"target": t["target"], "required": t["required"], "measured": t["measured"],
         "status": t["status"] + (" (indicative)" if t.get("indicative_only") and t["status"] != "not run" else "")}
        for t in results.get("targets") or evaluate_targets(results)
    ]
    return markdown_table(rows, ["target", "required", "measured", "status"])


def provenance(results: dict[str, Any]) -> str:
    """One line: command, mode, date, device, versions, wall time."""
    mode = "quick mode: reduced settings" if results.get("mode") == "quick" else "full settings"
    wall = results.get("total_seconds")
    wall_text = f", wall {wall / 60:.1f} min" if isinstance(wall, (int, float)) else ""
    if len(results.get("merged_runs") or []) > 1:
        # Dataset times cover only the call that wrote each entry (a resumed fit's earlier
        # calls and carried rows are not in them), so no total is claimed for a merged file.
        wall_text = f", merged over {len(results['merged_runs'])} runs (seconds per call under Settings)"
    commit = results.get("commit")
    if commit and results.get("modified"):
        commit += f" + uncommitted changes to {len(results['modified'])} file(s)"
    return (
        f"Generated by `{results.get('command', 'benchmarks/quality.py')}` ({mode}) on "
        f"{str(results.get('created', '?'))[:10]}: stmae {results.get('stmae_version', '?')}"
        f"{f', commit {commit}' if commit else ''}, torch {results.get('platform', {}).get('torch', '?')}, "
        f"{results.get('device_label', '?')}{wall_text}; settings and per-class figures in "
        f"`{results.get('json_name', 'benchmarks/results/quality.json')}`.{_runs_note(results)}"
    )


def _seconds_note(entry: dict[str, Any], results: dict[str, Any]) -> str:
    """A dataset's wall time, and what it leaves out: rows carried from other runs, and the
    earlier calls of a fit continued with ``--resume`` (the rows' fit s includes their training)."""
    text = f"{entry.get('seconds', 0):.0f} s"
    carried = any("provenance" in r for r in entry.get("rows", []))
    if carried:
        text += " for the rows of the call that wrote it"
    command = (entry.get("provenance") or {}).get("command") or results.get("command", "")
    if "--resume" in command.split():
        text += ", which" if carried else " in a call that"
        text += (" ran with --resume: where it continued earlier work, the fit s column includes the"
                 " training done in earlier calls")
    return text


def _per_class_table(entry: dict[str, Any]) -> str:
    from stmae.report import markdown_table

    st = next(r for r in entry["rows"] if r["method"] == STMAE)
    knn = next(r for r in entry["rows"] if r["method"] == KNN)
    knn_by = {r["class"]: r for r in knn["per_class"]}
    rows = []
    for r in st["per_class"]:
        k = knn_by.get(r["class"], {})
        rows.append({
            "class": r["class"], "ST-MAE image AUROC": r.get("image_auroc"), "kNN image AUROC": k.get("image_auroc"),
            "ST-MAE image F1-max": r.get("image_f1max"), "kNN image F1-max": k.get("image_f1max"),
            "n train (ST-MAE fit / kNN)": f"{r.get('n_train')} / {k.get('n_train')}",
            "ST-MAE fit s": f"{r['fit_seconds']:.0f}", "kNN fit s": f"{k['fit_seconds']:.0f}" if k else "n/a",
        })
    rows.append({"class": "mean", "ST-MAE image AUROC": st["image_auroc"], "kNN image AUROC": knn["image_auroc"],
                 "ST-MAE image F1-max": st["image_f1max"], "kNN image F1-max": knn["image_f1max"]})
    return markdown_table(rows, list(rows[0]))


def render_markdown(results: dict[str, Any]) -> str:
    """The whole ``quality*.md``: provenance, reduced settings, results, targets, settings, per-class detail."""
    quick = results.get("mode") == "quick"
    lines = [f"# stmae quality benchmark ({'quick' if quick else 'full'})", "", provenance(results), ""]
    reduced = results.get("reduced_settings") or {}
    if reduced:
        lines += ["**Reduced settings** (differences from the full protocol):", ""]
        lines += [f"- {n}" for n in reduced.values()] + [""]
    note = (
        "ST-MAE calibrates its decision threshold on good images it does not train on (10 % held out of the "
        "training images, or separate validation images where the settings say so); the threshold does not "
        "enter these threshold-free metrics. The kNN baseline banks all training images; ST-MAE's memory "
        "(where the settings name one) banks the images it trains on and, after calibration, the held-out ones "
        "(`fit.bank_held_out`, the default; the patch counts in the settings say which). One-class rows are means over the classes "
        "run (per class below). `fit s` = feature extraction + training (ST-MAE; + the memory's coreset where "
        "used, not in the residual-only row) or + coreset selection (kNN)."
    )
    lines += ["## Results", "", results_table(results).rstrip("\n"), "", note, ""]
    halves = halves_table(results)
    if halves:
        lines += ["## Magnetic Tile: the real-defect halves", "", HALVES_NOTE, "", halves.rstrip("\n"), ""]
    lines += ["## Targets", ""]
    if any(t.get("indicative_only") for t in results.get("targets") or evaluate_targets(results)):
        lines += [
            (
                "The targets refer to the full protocol: a flag marked *indicative* was measured with reduced "
                "settings (see above) and says little about the full run."
            ),
            "",
        ]
    lines += [targets_table(results).rstrip("\n"), ""]
    lines += ["## Settings", ""]
    for key, entry in results.get("datasets", {}).items():
        title = DATASETS.get(key, {}).get("title", key)
        if entry.get("status") != "ok":
            lines.append(f"- **{title}**: {entry.get('status')}: {entry.get('reason', '')}")
            continue
        s = entry.get("settings", {})
        bits = ", ".join(f"{k}={v}" for k, v in s.items())
        lines.append(f"- **{title}** ({_seconds_note(entry, results)}): data `{entry.get('data')}`; {bits}")
    lines.append("")
    for key, entry in results.get("datasets", {}).items():
        if entry.get("status") == "ok" and any("per_class" in r for r in entry["rows"]):
            lines += [f"## {DATASETS[key]['title']}: per class", "", _per_class_table(entry).rstrip("\n"), ""]
    return "\n".join(lines).rstrip() + "\n"


def row_provenance(results: dict[str, Any], entry: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The provenance of one table row: its own (carried rows), else its dataset's, else the file's."""
    return row.get("provenance") or entry.get("provenance") or entry_provenance(results)


def traceable(prov: dict[str, Any]) -> str | None:
    """None when ``prov`` names one command and one commit of a clean tree; else why not.

    A ``--resume`` call recorded before entries kept their code revision may have continued
    a fit made at another commit (nothing refused that then), so its figures are not one
    commit's.
    """
    if not prov.get("command") or not prov.get("commit"):
        return "no command or commit recorded"
    if prov.get("dirty") or prov.get("modified"):
        return "made with uncommitted changes"
    if "--resume" in str(prov["command"]).split() and not prov.get("code_revision"):
        return "a fit resumed across calls whose code was not recorded"
    return None


def page_block(results: dict[str, Any]) -> str:
    """The generated block of docs/results.md: the table with a ``run`` column naming the
    command and commit of every row, the runs, reduced settings and the targets.

    Rows whose run is not one command at one commit (:func:`traceable`) are listed with
    their figures withheld, so the page never shows a figure that no single call reproduces.
    """
    from stmae.report import markdown_table

    runs: dict[tuple, int] = {}
    run_list: list[str] = []
    rows = []
    withheld: set[str] = set()  # row keys (mt200, fashion_mnist, ...) whose figures are withheld
    plain = iter(table_rows(results))
    for key, entry in results.get("datasets", {}).items():
        if entry.get("status") != "ok":
            rows.append({**next(plain), "run": ""})
            continue
        for row in entry["rows"]:
            cells = next(plain)
            prov = row_provenance(results, entry, row)
            ident = (prov.get("command"), prov.get("commit"), prov.get("device_label"))
            if ident not in runs:
                runs[ident] = len(runs) + 1
                why = traceable(prov)
                run_list.append(
                    f"{runs[ident]}. `{prov.get('command')}` at commit {prov.get('commit') or '?'}, "
                    f"{str(prov.get('created', '?'))[:10]}, {prov.get('device_label', '?')}"
                    + (f" (figures withheld: {why})" if why else ""))
            cells["run"] = str(runs[ident])
            if traceable(prov):
                withheld.add(row["key"])
                for col in ("image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "fit s", "target"):
                    cells[col] = "withheld" if col != "target" else ""
            rows.append(cells)
    columns = [*TABLE_COLUMNS[:-1], "run", TABLE_COLUMNS[-1]]
    reduced = results.get("reduced_settings") or {}
    lines = [
        f"Generated by `benchmarks/quality.py` from `{results.get('json_name', 'benchmarks/results/quality.json')}` "
        f"({'quick mode: reduced settings' if results.get('mode') == 'quick' else 'full settings'}); "
        "settings, per-class and per-defect-type figures are in that file and its `.md`.",
        "",
        markdown_table(rows, columns).rstrip("\n"),
        "",
        "Runs (the `run` column):",
        "",
        *run_list,
    ]
    if reduced:
        lines += ["", f"**Reduced settings** (not the full protocol): {'; '.join(reduced.values())}."]
    targets = [
        {"target": t["target"], "required": t["required"],
         "measured": "withheld" if t["row"] in withheld else t["measured"],
         "status": "withheld" if t["row"] in withheld
         else t["status"] + (" (indicative)" if t.get("indicative_only") and t["status"] != "not run" else "")}
        for t in results.get("targets") or evaluate_targets(results)
    ]
    halves = halves_table(results)
    if halves and not withheld & {"mt200", "mt_full"}:
        lines += ["", HALVES_NOTE, "", halves.rstrip("\n")]
    lines += ["", markdown_table(targets, ["target", "required", "measured", "status"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def page_markers(results: dict[str, Any]) -> tuple[str, str]:
    return QUICK_MARKERS if results.get("mode") == "quick" else MARKERS


def check_page(page: Path, markers: tuple[str, str] = MARKERS) -> str:
    """The page's text, or :class:`PageMarkerError` naming the file and the markers."""
    try:
        text = page.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PageMarkerError(f"{page}: not found; cannot write the results block into it") from None
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < 0 or end < start:
        raise PageMarkerError(
            f"{page}: markers {markers[0]} and {markers[1]} not found (or out of order); "
            f"add both lines to {page.name} where the quality table should go"
        )
    return text


def update_page(page: Path, content: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replace the text between ``markers`` in ``page`` with ``content``."""
    from stmae.fileio import atomic_write_text

    text = check_page(page, markers)
    start = text.find(markers[0]) + len(markers[0])
    end = text.find(markers[1])
    atomic_write_text(page, text[:start] + "\n" + content.strip("\n") + "\n" + text[end:])


def print_summary(results: dict[str, Any]) -> None:
    print()
    print(results_table(results))
    print("Targets (full-protocol targets; 'indicative' = measured with reduced settings)")
    for t in results["targets"]:
        flag = " (indicative)" if t.get("indicative_only") and t["status"] != "not run" else ""
        print(f"  [{t['status'].upper():7}] {t['target']}: measured {_fmt(t['measured'])} vs {_fmt(t['required'])}{flag}")


def _runs_note(results: dict[str, Any]) -> str:
    """'' for a single run; for a merged file, which run produced which dataset."""
    runs: dict[tuple, list[str]] = {}

    def credit(p: dict[str, Any] | None, label: str) -> None:
        p = p or {}
        labels = runs.setdefault((p.get("command"), p.get("commit"), p.get("device_label")), [])
        if label not in labels:
            labels.append(label)

    for key, entry in results.get("datasets", {}).items():
        letter = DATASETS.get(key, {}).get("letter", key)
        carried = {r["row"]: r["provenance"] for r in entry.get("rows", []) if "provenance" in r}
        if not carried:
            credit(entry.get("provenance"), letter)
            continue
        for row in dict.fromkeys(r["row"] for r in entry["rows"]):  # table rows, in order, once
            credit(carried.get(row, entry.get("provenance")), f"{letter} ({row})")
    if len(runs) < 2:
        return ""
    return " Merged from " + "; ".join(
        f"`{cmd}` (commit {commit or '?'}, {device or '?'}): {', '.join(keys)}"
        for (cmd, commit, device), keys in runs.items()) + "."
