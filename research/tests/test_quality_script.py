"""benchmarks/quality.py without training: tables, targets, the docs page, merging, the command line.

The script (its command line: ``parse_args``, ``main``) is loaded from its file; the rest is
imported from ``benchmarks/_quality`` (benchmarks/ is on pytest's ``pythonpath``). Results are
a small hand-made dict in the script's JSON layout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _quality import common, magnetic_tile, merge, render, settings, targets
from tests.conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


quality = load_benchmark("quality")


def _row(key: str, dataset: str, name: str, method: str, image: float, pixel: float | None, aupro: float | None,
         f1: float, **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "key": key, "dataset": dataset, "row": name, "method": method, "image_auroc": image,
        "pixel_auroc": pixel, "aupro": aupro, "image_f1max": f1, "fit_seconds": 12.4,
        "device": "cpu (1 thread)", "settings": f"settings of {method}", **extra,
    }  # fmt: skip


def _half(image: float, pixel: float, aupro: float) -> dict[str, float]:
    return {"image_auroc": image, "pixel_auroc": pixel, "aupro": aupro}


def fake_results() -> dict[str, Any]:
    """MT 200: ST-MAE beats PatchCore on image/pixel AUROC, misses AUPRO (0.700 < 0.703) and
    the kNN's AUPRO; on mt_test it misses the memory's pixel AUROC and the kNN's AUPRO;
    Fashion-MNIST mean 0.91 (< 0.95); MNIST skipped; demo run."""
    mt = "Magnetic Tile, 200-image protocol"
    fm = "Fashion-MNIST one-class, mean"
    per_class = [{"class": "T-shirt_top", "image_auroc": 0.90, "image_f1max": 0.5, "n_train": 180, "fit_seconds": 3.0},
                 {"class": "Bag", "image_auroc": 0.92, "image_f1max": 0.6, "n_train": 180, "fit_seconds": 5.0}]  # fmt: skip
    knn_class = [{"class": "T-shirt_top", "image_auroc": 0.95, "image_f1max": 0.7, "n_train": 200, "fit_seconds": 1.0},
                 {"class": "Bag", "image_auroc": 0.97, "image_f1max": 0.8, "n_train": 200, "fit_seconds": 1.0}]  # fmt: skip
    return {
        "command": "python benchmarks/quality.py --quick",
        "mode": "quick",
        "created": "2025-01-02T03:04:05+00:00",
        "stmae_version": "0.1.0",
        "commit": "abc1234",
        "device_label": "cpu (1 thread)",
        "platform": {"torch": "2.13.0"},
        "total_seconds": 600.0,
        "json_name": "benchmarks/results/quality_quick.json",
        "reduced_settings": {"fashion_mnist": "Fashion-MNIST one-class: ST-MAE 15 epochs instead of 30"},
        "datasets": {
            "magnetic_tile": {
                "status": "ok", "data": "/data/mt", "seconds": 300.0, "settings": {"preset": "accurate"},
                "rows": [
                    _row("mt200", "magnetic_tile", mt, common.STMAE, 0.950, 0.850, 0.700, 0.900,
                         subsets={"mt_test": _half(0.92, 0.81, 0.73)}),
                    _row("mt200", "magnetic_tile", mt, common.STMAE_MEMORY, 0.930, 0.860, 0.690, 0.880,
                         subsets={"mt_test": _half(0.91, 0.815, 0.72)}),
                    _row("mt200", "magnetic_tile", mt, common.KNN, 0.800, 0.790, 0.760, 0.850,
                         subsets={"mt_test": _half(0.90, 0.80, 0.74)}),
                ],
            },
            "fashion_mnist": {
                "status": "ok", "data": "/data/fm", "seconds": 100.0, "settings": {"classes": "0,8"},
                "rows": [
                    _row("fashion_mnist", "fashion_mnist", fm, common.STMAE, 0.91, None, None, 0.55,
                         per_class=per_class),
                    _row("fashion_mnist", "fashion_mnist", fm, common.KNN, 0.96, None, None, 0.75,
                         per_class=knn_class),
                ],
            },
            "mnist": {"status": "skipped", "reason": "data not found: /nowhere/mnist_5k.csv.gz"},
        },
    }  # fmt: skip


def _targets_by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in targets.evaluate_targets(results)}


def test_targets_met_missed_and_not_run() -> None:
    t = _targets_by_name(fake_results())
    status = {name: v["status"] for name, v in t.items()}
    assert status == {
        "Magnetic Tile 200: ST-MAE image AUROC >= PatchCore": "met",
        "Magnetic Tile 200: ST-MAE pixel AUROC >= PatchCore": "met",
        "Magnetic Tile 200: ST-MAE AUPRO >= PatchCore": "missed",
        "Magnetic Tile 200: ST-MAE image AUROC >= same-run kNN": "met",
        "Magnetic Tile 200: ST-MAE pixel AUROC >= same-run kNN": "met",
        "Magnetic Tile 200: ST-MAE AUPRO >= same-run kNN": "missed",
        "Magnetic Tile 200, mt_test: ST-MAE image AUROC >= memory only, same model": "met",
        "Magnetic Tile 200, mt_test: ST-MAE pixel AUROC >= memory only, same model": "missed",
        "Magnetic Tile 200, mt_test: ST-MAE AUPRO >= memory only, same model": "met",
        "Magnetic Tile 200, mt_test: ST-MAE image AUROC >= kNN baseline, same run": "met",
        "Magnetic Tile 200, mt_test: ST-MAE pixel AUROC >= kNN baseline, same run": "met",
        "Magnetic Tile 200, mt_test: ST-MAE AUPRO >= kNN baseline, same run": "missed",
        "Fashion-MNIST: ST-MAE mean image AUROC >= 0.95": "missed",
        "MNIST: ST-MAE mean image AUROC >= 0.99": "not run",
    }
    # The kNN targets compare against the same run's kNN figures.
    assert t["Magnetic Tile 200: ST-MAE AUPRO >= same-run kNN"]["required"] == 0.760
    assert t["Magnetic Tile 200: ST-MAE AUPRO >= PatchCore"]["required"] == 0.703
    assert t["Magnetic Tile 200, mt_test: ST-MAE pixel AUROC >= memory only, same model"]["required"] == 0.815
    assert t["Magnetic Tile 200, mt_test: ST-MAE pixel AUROC >= memory only, same model"]["measured"] == 0.81
    # Only the dataset run with reduced settings is flagged as indicative.
    assert t["Fashion-MNIST: ST-MAE mean image AUROC >= 0.95"]["indicative_only"] is True
    assert t["Magnetic Tile 200: ST-MAE AUPRO >= PatchCore"]["indicative_only"] is False


def test_mt_targets_are_exact_when_only_the_full_train_protocol_is_missing() -> None:
    """The targets sit on the 200-image rows: leaving out the full-train rows does not make
    them indicative, but a shorter schedule does."""
    results = fake_results()
    full = dict(settings.MODES["full"]["magnetic_tile"])
    for protocols, epochs, indicative in ((["200"], None, False), (["200"], 20, True), (["200", "full"], None, False)):
        results["settings"] = {"magnetic_tile": {**full, "protocols": protocols, "epochs": epochs}}
        results["reduced_settings"] = settings.describe_reductions(results["settings"], ["magnetic_tile"])
        assert bool(results["reduced_settings"]) == (protocols != ["200", "full"] or epochs is not None)
        flags = {t["indicative_only"] for t in targets.evaluate_targets(results) if t["row"] == "mt200"}
        assert flags == {indicative}


def test_results_table_rows_and_flags() -> None:
    table = render.results_table(fake_results())
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:8] == [
        "dataset / row", "method", "image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "fit s", "device",
    ]  # fmt: skip
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(cells) == 6  # 3 MT rows, 2 Fashion-MNIST rows, 1 skipped MNIST row
    st_mt, mem_mt, knn_mt, st_fm, knn_fm, mnist = cells
    assert st_mt[:8] == ["Magnetic Tile, 200-image protocol", "ST-MAE", "0.950", "0.850", "0.700", "0.900", "12",
                         "cpu (1 thread)"]  # fmt: skip
    assert st_mt[8] == "settings of ST-MAE"
    assert st_mt[9] == ("PatchCore: missed (AUPRO); kNN: missed (AUPRO); mt_test vs memory: missed (pixel AUROC); "
                        "mt_test vs kNN: missed (AUPRO)")
    assert mem_mt[1] == "ST-MAE, memory only" and mem_mt[9] == ""
    assert knn_mt[1] == "kNN baseline" and knn_mt[9] == ""
    assert st_fm[:5] == ["Fashion-MNIST one-class, mean", "ST-MAE", "0.910", "n/a", "n/a"]
    assert st_fm[9] == ">= 0.95: missed (image AUROC) [reduced settings: indicative]"
    assert knn_fm[9] == ""
    assert mnist[0] == "MNIST one-class (5k CSV)" and "skipped: data not found" in mnist[8]


def test_provenance_marks_uncommitted_changes() -> None:
    results = fake_results()
    assert "commit abc1234," in render.provenance(results)
    results["modified"] = ["src/stmae/train.py", "README.md"]
    line = render.provenance(results)
    assert "commit abc1234 + uncommitted changes to 2 file(s)" in line and "\n" not in line


def test_target_cell_met() -> None:
    results = fake_results()
    st = results["datasets"]["magnetic_tile"]["rows"][0]
    st["aupro"] = 0.80
    st["subsets"]["mt_test"] = _half(0.92, 0.82, 0.75)
    row = next(r for r in render.table_rows(results) if r["method"] == common.STMAE)
    assert row["target"] == "PatchCore: met; kNN: met; mt_test vs memory: met; mt_test vs kNN: met"


def test_render_markdown_sections() -> None:
    md = render.render_markdown(fake_results())
    assert md.startswith("# stmae quality benchmark (quick)")
    assert "python benchmarks/quality.py --quick" in md and "commit abc1234" in md
    assert "- Fashion-MNIST one-class: ST-MAE 15 epochs instead of 30" in md
    assert "| Magnetic Tile 200: ST-MAE AUPRO >= PatchCore | 0.703 | 0.700 | missed |" in md
    assert "| Fashion-MNIST: ST-MAE mean image AUROC >= 0.95 | 0.950 | 0.910 | missed (indicative) |" in md
    assert "| MNIST: ST-MAE mean image AUROC >= 0.99 | 0.990 | n/a | not run |" in md
    assert "## Fashion-MNIST one-class: per class" in md
    assert "| Bag | 0.920 | 0.970 |" in md
    assert "## Magnetic Tile: the real-defect halves" in md
    assert "| Magnetic Tile, 200-image protocol | ST-MAE, memory only | n/a | n/a | n/a | 0.910 | 0.815 | 0.720 |" in md
    assert "\n\n\n" not in md


def test_docs_page_block_replaced(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    start, end = render.QUICK_MARKERS
    page.write_text(f"# Title\n\nbefore\n\n{start}\nold table\n{end}\n\nafter\n")
    results = fake_results()  # quick mode: the quick markers
    render.update_page(page, render.page_block(results), render.page_markers(results))
    text = page.read_text()
    assert "old table" not in text and text.endswith(end + "\n\nafter\n")
    inside = text[text.index(start) + len(start) : text.index(end)]
    assert inside.startswith("\nGenerated by `benchmarks/quality.py` from `benchmarks/results/quality_quick.json`")
    # every row names its run, and the run its command and commit
    assert "| Magnetic Tile, 200-image protocol | ST-MAE | 0.950 | 0.850 | 0.700 | 0.900 | 12 | cpu (1 thread) |" in inside
    assert "| settings of ST-MAE | 1 | PatchCore: missed (AUPRO); kNN: missed (AUPRO); mt_test vs memory" in inside
    assert "| Magnetic Tile, 200-image protocol | kNN baseline | n/a | n/a | n/a | 0.900 | 0.800 | 0.740 |" in inside
    assert "1. `python benchmarks/quality.py --quick` at commit abc1234, 2025-01-02, cpu (1 thread)" in inside
    assert "**Reduced settings** (not the full protocol): " + results["reduced_settings"]["fashion_mnist"] + "." in inside
    assert "| Magnetic Tile 200: ST-MAE AUPRO >= PatchCore | 0.703 | 0.700 | missed |" in inside
    render.update_page(page, render.page_block(results), render.page_markers(results))  # idempotent
    assert page.read_text() == text


def test_docs_page_withholds_figures_no_single_commit_made() -> None:
    """A row from a --resume call recorded before code revisions were (its fit may have begun
    at another commit), or from a tree with uncommitted changes, shows no figures."""
    results = fake_results()
    results["datasets"]["magnetic_tile"]["provenance"] = {
        "command": "python benchmarks/quality.py --only a --work-dir w --resume", "commit": "9e3c660",
        "created": "2026-11-30", "device_label": "cpu (2 threads)", "modified": []}
    results["datasets"]["fashion_mnist"]["provenance"] = {**common.entry_provenance(results), "modified": ["src/x.py"]}
    block = render.page_block(results)
    rows = [line for line in block.splitlines() if line.startswith(("| Magnetic Tile, 200", "| Fashion-MNIST one"))]
    assert len(rows) == 5 and all("| withheld | withheld | withheld | withheld | withheld |" in r for r in rows)
    assert "mt_test AUPRO" not in block  # nor the halves of withheld rows
    assert "at commit 9e3c660, 2026-11-30, cpu (2 threads) (figures withheld: a fit resumed across calls" in block
    assert "(figures withheld: made with uncommitted changes)" in block
    assert "| Fashion-MNIST: ST-MAE mean image AUROC >= 0.95 | 0.950 | withheld | withheld |" in block
    assert "| Magnetic Tile 200: ST-MAE AUPRO >= PatchCore | 0.703 | withheld | withheld |" in block
    # the same --resume command recorded with its code revision (other code refused) is one commit's
    results["datasets"]["magnetic_tile"]["provenance"]["code_revision"] = "0123456789abcdef"
    st = next(line for line in render.page_block(results).splitlines() if line.startswith("| Magnetic Tile, 200"))
    assert "| ST-MAE | 0.950 | 0.850 | 0.700 |" in st


@pytest.mark.parametrize("body", ["no markers at all\n", "<!-- quality:end -->\nx\n<!-- quality:start -->\n"])
def test_docs_page_without_markers_is_an_error(tmp_path: Path, body: str) -> None:
    page = tmp_path / "results.md"
    page.write_text(body)
    with pytest.raises(render.PageMarkerError) as info:
        render.update_page(page, "table")
    message = str(info.value)
    assert str(page) in message and render.MARKERS[0] in message and render.MARKERS[1] in message
    assert page.read_text() == body


def test_main_from_json_updates_the_docs_page_and_rejects_missing_markers(tmp_path: Path, capsys) -> None:
    results_file = tmp_path / "quality.json"
    results_file.write_text(json.dumps(fake_results()))
    page = tmp_path / "results.md"
    page.write_text("nothing here\n")
    assert quality.main(["--from-json", str(results_file), "--docs", str(page)]) == 2
    err = capsys.readouterr().err
    assert "results.md" in err and render.QUICK_MARKERS[0] in err
    assert not results_file.with_suffix(".md").exists()  # failed before writing anything

    page.write_text(f"{render.QUICK_MARKERS[0]}\n{render.QUICK_MARKERS[1]}\n")
    assert quality.main(["--from-json", str(results_file), "--docs", str(page)]) == 0
    assert "| Magnetic Tile, 200-image protocol | ST-MAE |" in page.read_text()
    assert "## Targets" in results_file.with_suffix(".md").read_text()
    # with --out and no --docs nothing but the results files is written; the default page is docs/results.md
    assert quality.parse_args(["--out", "x.json"]).docs is None
    assert quality.parse_args([]).docs == common.DOCS_PATH and quality.parse_args(["--no-docs"]).docs is None


def test_only_and_settings() -> None:
    assert quality.parse_only("d,a") == ["magnetic_tile", "demo"]
    assert quality.parse_only("mnist, fmnist") == ["fashion_mnist", "mnist"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dataset"):
        quality.parse_only("a,x")
    quick = settings.resolve_settings(quality.parse_args(["--quick"]))
    assert settings.describe_reductions(quick, list(common.DATASETS)).keys() == set(common.DATASETS)
    full = settings.resolve_settings(quality.parse_args([]))
    assert full["magnetic_tile"]["protocols"] == ["200", "full"]
    assert settings.describe_reductions(full, list(common.DATASETS)) == {}
    custom = settings.resolve_settings(quality.parse_args(["--epochs", "3", "--train-limit", "0", "--classes", "1"]))
    assert custom["mnist"]["epochs"] == 3 and custom["mnist"]["train_limit"] is None
    mt = settings.resolve_settings(quality.parse_args(["--mt-protocols", "full,200"]))["magnetic_tile"]
    assert mt["protocols"] == ["200", "full"]
    only200 = settings.resolve_settings(quality.parse_args(["--mt-protocols", "200"]))
    assert "200-image protocol only" in settings.describe_reductions(only200, ["magnetic_tile"])["magnetic_tile"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--mt-protocols", "300"])
    assert "ST-MAE 3 epochs instead of 60" in settings.describe_reductions(custom, ["mnist"])["mnist"]
    assert common.default_out(True).name == "quality_quick.json" and common.default_out(False).name == "quality.json"


def test_merge_keeps_other_datasets_and_their_provenance(tmp_path: Path, capsys) -> None:
    previous = fake_results()
    for key, entry in previous["datasets"].items():
        entry["provenance"] = {"command": "python benchmarks/quality.py --quick --only a,b", "commit": "abc1234",
                               "device_label": "cuda:0 (H100)", "dirty": False}
    previous["settings"] = {"magnetic_tile": {"preset": "accurate"}, "fashion_mnist": {"classes": "0,8"}}
    new_mnist = {"status": "ok", "seconds": 60.0, "settings": {"classes": "all"}, "rows": [],
                 "provenance": {"command": "python benchmarks/quality.py --quick --only c --merge",
                                "commit": "abc1234", "device_label": "cpu (1 thread)"}}
    results = {"mode": "quick", "command": "python benchmarks/quality.py --quick --only c --merge",
               "commit": "abc1234", "modified": [], "device_label": "cpu (1 thread)",
               "settings": {"mnist": {"classes": "all"}}, "reduced_settings": {}, "datasets": {"mnist": new_mnist}}
    merge.merge_previous(results, previous, ["mnist"], tmp_path / "q.json")
    assert list(results["datasets"]) == ["magnetic_tile", "fashion_mnist", "mnist"]  # run order, not merge order
    assert results["datasets"]["mnist"] is new_mnist  # the re-run replaces the old (skipped) entry
    assert results["settings"]["magnetic_tile"] == {"preset": "accurate"}
    assert results["reduced_settings"] == previous["reduced_settings"]
    assert results["merged_runs"] == ["python benchmarks/quality.py --quick", results["command"]]
    note = render.provenance(results)
    assert "Merged from `python benchmarks/quality.py --quick --only a,b` (commit abc1234, cuda:0 (H100)): a, b" in note
    assert "(commit abc1234, cpu (1 thread)): c" in note and "merged over 2 runs" in note and " min" not in note

    # parts made by other code are refused: another commit, uncommitted changes on either side
    other = {**results, "commit": "def5678", "datasets": {"mnist": new_mnist}}
    with pytest.raises(ValueError, match=r"q\.json: dataset 'magnetic_tile' was made at commit abc1234; "
                                         r"this run is at commit def5678"):
        merge.merge_previous(other, previous, ["mnist"], tmp_path / "q.json")
    dirty = {**results, "modified": ["src/stmae/infer.py"], "datasets": {"mnist": new_mnist}}
    with pytest.raises(ValueError, match=r"this run has uncommitted changes \(src/stmae/infer.py\)"):
        merge.merge_previous(dirty, previous, ["mnist"], tmp_path / "q.json")
    previous["datasets"]["fashion_mnist"]["provenance"]["modified"] = ["README.md"]
    with pytest.raises(ValueError, match=r"dataset 'fashion_mnist' was made at commit abc1234 with uncommitted"):
        merge.merge_previous({**results, "datasets": {"mnist": new_mnist}}, previous, ["mnist"], tmp_path / "q.json")

    with pytest.raises(ValueError, match="q.json.*'quick' run.*'full' run"):
        merge.merge_previous({**results, "mode": "full"}, previous, ["mnist"], tmp_path / "q.json")
    out = tmp_path / "quality.json"
    out.write_text(json.dumps(previous))
    assert quality.main(["--only", "d", "--merge", "--out", str(out), "--device", "cpu"]) == 2
    assert "--merge" in capsys.readouterr().err and json.loads(out.read_text()) == previous  # untouched


def test_merge_fills_provenance_and_keeps_other_mt_protocol_rows() -> None:
    """An old file without per-entry provenance is credited to its own run, and a Magnetic
    Tile call that runs only the full-train protocol keeps the 200-image rows of the file."""
    previous = fake_results()  # its entries carry no provenance of their own
    mt_prev = previous["datasets"]["magnetic_tile"]
    mt_prev["settings"] = {"protocols": ["200"], "preset": "default", "epochs": None, "coreset": 0.1}
    mt_prev["protocol"] = {"train": {"200": "seeded 200"}, "test": "full test split (582 images)"}
    cmd = "python benchmarks/quality.py --quick --only a --mt-protocols full --merge"
    results = {"mode": "quick", "command": cmd, "commit": "abc1234", "device_label": "cuda:0 (H100)",
               "settings": {"magnetic_tile": {"protocols": ["full"], "preset": "default", "epochs": None,
                                              "coreset": 0.1}},
               "reduced_settings": {}, "datasets": {}}
    merge.merge_previous(results, previous, ["magnetic_tile"], Path("q.json"))
    assert results["datasets"]["fashion_mnist"]["provenance"]["commit"] == "abc1234"
    assert "provenance" not in previous["datasets"]["fashion_mnist"]  # the previous file is not modified

    full = "Magnetic Tile, full train (762)"
    new_mt = {"status": "ok", "settings": results["settings"]["magnetic_tile"],
              "protocol": {"train": {"full": "all of train/good"}, "test": "full test split (582 images)"},
              "rows": [_row("mt_full", "magnetic_tile", full, common.STMAE, 0.9, 0.8, 0.7, 0.8),
                       _row("mt_full", "magnetic_tile", full, common.KNN, 0.9, 0.8, 0.7, 0.8)],
              "provenance": common.entry_provenance(results)}
    merged = merge.merge_protocol_rows(new_mt, mt_prev, previous)
    assert [r["key"] for r in merged["rows"]] == ["mt200", "mt200", "mt200", "mt_full", "mt_full"]  # table order
    assert merged["settings"]["protocols"] == ["200", "full"]
    assert merged["protocol"]["train"] == {"200": "seeded 200", "full": "all of train/good"}
    assert merged["rows"][0]["provenance"]["commit"] == "abc1234" and "provenance" not in merged["rows"][3]
    assert settings.describe_reductions({"magnetic_tile": merged["settings"]}, ["magnetic_tile"]) == {}

    results["datasets"] = merge.in_run_order({**results["datasets"], "magnetic_tile": merged})
    note = render.provenance(results)
    assert "(commit abc1234, cpu (1 thread)): a (Magnetic Tile, 200-image protocol), b, c" in note
    assert f"(commit abc1234, cuda:0 (H100)): a ({full})" in note
    # The dataset's seconds say what they leave out: carried rows, and earlier calls of a resumed fit.
    merged["seconds"] = 12.0
    assert render._seconds_note(merged, results) == "12 s for the rows of the call that wrote it"
    merged["provenance"] = {**merged["provenance"], "command": cmd + " --work-dir w --resume"}
    assert render._seconds_note(merged, results).endswith(
        ", which ran with --resume: where it continued earlier work, the fit s column includes the training done in"
        " earlier calls")
    assert render._seconds_note({"seconds": 5, "rows": []}, {"command": "q.py --resume"}) == (
        "5 s in a call that ran with --resume: where it continued earlier work, the fit s column includes the training"
        " done in earlier calls")
    assert render._seconds_note({"seconds": 5, "rows": []}, {"command": "q.py --resumed-x"}) == "5 s"
    # Re-running the protocol the file holds replaces its rows instead of duplicating them.
    again = merge.merge_protocol_rows({**new_mt, "settings": mt_prev["settings"]}, mt_prev, previous)
    assert again["rows"] == new_mt["rows"]


def test_main_merge_of_one_mt_protocol_keeps_the_other(tmp_path: Path, monkeypatch) -> None:
    """``--only a --mt-protocols full --merge`` through main(): the file then holds both
    protocols' rows, the full protocol counts as run, and the 200 rows keep their run."""
    (tmp_path / "data" / "magnetic_tile" / "magnetic_tile").mkdir(parents=True)
    mt_200 = "Magnetic Tile, 200-image protocol"
    previous = {**fake_results(), "mode": "full", "command": "python benchmarks/quality.py --only a --mt-protocols 200"}
    previous["settings"] = {"magnetic_tile": {**settings.MODES["full"]["magnetic_tile"], "protocols": ["200"]}}
    previous["reduced_settings"] = settings.describe_reductions(previous["settings"], ["magnetic_tile"])
    previous["datasets"] = {"magnetic_tile": {**previous["datasets"]["magnetic_tile"],
                                              "settings": previous["settings"]["magnetic_tile"],
                                              "protocol": {"train": {"200": "seeded"}, "test": "all"}}}
    out = tmp_path / "quality.json"
    out.write_text(json.dumps(previous))
    full = "Magnetic Tile, full train (762)"

    def fake_runner(settings, ctx):
        assert settings["protocols"] == ["full"]
        return {"data": "x", "protocol": {"train": {"full": "all of train/good"}, "test": "all"},
                "rows": [_row("mt_full", "magnetic_tile", full, m, 0.9, 0.8, 0.7, 0.8) for m in (common.STMAE,
                                                                                                common.KNN)]}

    from stmae import provenance

    monkeypatch.setitem(quality.RUNNERS, "magnetic_tile", fake_runner)
    state = {"commit": "abc1234" + "0" * 33, "dirty": False, "modified": []}  # the file's commit, clean
    monkeypatch.setattr(provenance, "git_state", lambda repo=None: dict(state))
    argv = ["--only", "a", "--mt-protocols", "full", "--merge", "--out", str(out), "--device", "cpu",
            "--data", str(tmp_path / "data")]
    assert quality.main(argv) == 0
    merged = json.loads(out.read_text())
    mt = merged["datasets"]["magnetic_tile"]
    assert [(r["row"], r["method"]) for r in mt["rows"]] == [
        (mt_200, common.STMAE), (mt_200, common.STMAE_MEMORY), (mt_200, common.KNN), (full, common.STMAE),
        (full, common.KNN)]
    assert mt["settings"]["protocols"] == ["200", "full"] and merged["reduced_settings"] == {}
    assert mt["rows"][0]["provenance"]["command"] == previous["command"]
    assert f"): a ({full})" in out.with_suffix(".md").read_text()
    assert merged["provenance"]["commit"] == state["commit"] and merged["provenance"]["seconds"] >= 0
    assert mt["provenance"]["code_revision"] == provenance.code_revision()
    # at another commit the carried 200-image rows are refused, and the file is left alone
    before = out.read_text()
    state["commit"] = "fed9876" + "0" * 33
    assert quality.main(argv) == 2
    assert out.read_text() == before


def test_help_runs() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--out", "--device", "--only", "--docs", "--data", "--threads"):
        assert flag in proc.stdout


def test_mvtec_pair_with_memory_adds_residual_and_memory_rows_of_the_same_model_and_halves(tiny_mvtec, tmp_path: Path) -> None:
    import torch

    from stmae.data import load_mvtec
    from stmae_research.protocols import real_defect_indices

    from tests.conftest import tiny_config

    ctx = common.Context(tmp_path, tmp_path / "work", "cpu", torch.device("cpu"), "cpu (test)", True, lambda m: None)
    cfg = tiny_config(**{"infer.distance_weight": 0.8})
    ds = load_mvtec(tiny_mvtec)
    halves = real_defect_indices(ds.test, seed=0)
    rows = magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", ds, tmp_path / "run", cfg,
                                     "accurate", 0.1, ctx, "", subsets=halves)
    assert [r["method"] for r in rows] == [common.STMAE, common.STMAE_RESIDUAL, common.STMAE_MEMORY, common.KNN]
    st, residual, memory, knn = rows
    assert "memory 0.8 (greedy coreset 10 %" in st["settings"]
    assert st["config"]["infer"]["distance_weight"] == 0.8
    assert residual["fit_seconds"] <= st["fit_seconds"] == memory["fit_seconds"]
    scores = {r["method"]: r["per_type"]["good"]["mean_score"] for r in rows[:3]}
    assert len({round(v, 6) for v in scores.values()}) == 3  # three different maps of one model
    for row in rows:  # every row has both halves, with the halves' image counts
        assert row["subsets"]["mt_val"]["n_images"] == len(halves["mt_val"])
        assert row["subsets"]["mt_test"]["n_images"] == len(halves["mt_test"])
    table = render.halves_table({"datasets": {"magnetic_tile": {"status": "ok", "rows": rows}}})
    assert table.count("| tiny |") == 4 and "mt_test AUPRO" in table
    # Without the memory there are no extra rows.
    rows = magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", ds, tmp_path / "run0",
                                     tiny_config(**{"infer.distance_weight": 0.0}), "accurate", 0.1, ctx, "")
    assert [r["method"] for r in rows] == [common.STMAE, common.KNN]


def test_resume_reuses_a_finished_fit_and_needs_a_work_dir(tiny_mvtec, tmp_path: Path, monkeypatch) -> None:
    import torch

    import stmae
    from stmae.data import load_mvtec

    from tests.conftest import tiny_config

    logs: list[str] = []
    ctx = common.Context(tmp_path, tmp_path / "work", "cpu", torch.device("cpu"), "cpu (test)", True, logs.append,
                         resume=True)
    cfg = tiny_config()
    dataset = load_mvtec(tiny_mvtec)
    with pytest.warns(UserWarning, match="no saved training state; training from the start"):  # first call
        first = magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", dataset, tmp_path / "run", cfg, "accurate",
                                          0.1, ctx, "")
    assert not any("reusing" in line for line in logs)
    calls: list[Any] = []
    monkeypatch.setattr(stmae, "fit", lambda *a, **k: calls.append(a))
    again = magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", dataset, tmp_path / "run", cfg, "accurate", 0.1,
                                      ctx, "")
    assert calls == [] and any("reusing the finished fit" in line for line in logs)
    assert again[0]["image_auroc"] == first[0]["image_auroc"]
    assert again[0]["fit_seconds"] == first[0]["fit_seconds"]
    # Another config is not reused: it is fitted (here: the stub records the call and returns None).
    with pytest.raises(AttributeError):
        magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", dataset, tmp_path / "run",
                                  tiny_config(**{"train.lr": 1e-2}), "accurate", 0.1, ctx, "")
    assert len(calls) == 1
    with pytest.raises(SystemExit):
        quality.parse_args(["--resume"])
    # A finished fit made by other code is refused, naming the folder (not silently reused).
    from stmae_research.provenance import ProvenanceError

    meta_path = tmp_path / "run" / "meta.json"
    meta_path.write_text(meta_path.read_text().replace(json.loads(meta_path.read_text())["code_revision"], "0" * 16))
    with pytest.raises(ProvenanceError, match=str(tmp_path / "run") + ": a finished fit made by other code"):
        magnetic_tile._mvtec_pair("mt200", "magnetic_tile", "tiny", dataset, tmp_path / "run", cfg, "accurate", 0.1,
                                  ctx, "")


def test_combine_joins_disjoint_runs_of_one_commit_and_refuses_others(tmp_path: Path) -> None:
    """Two calls that ran different datasets at one commit become one file; each dataset keeps
    its own command; overlapping datasets, another commit or uncommitted changes are refused."""
    a, b = fake_results(), fake_results()
    a["command"], b["command"] = "python benchmarks/quality.py --only a", "python benchmarks/quality.py --only b,c"
    a["modified"] = b["modified"] = []
    del a["datasets"]["fashion_mnist"], a["datasets"]["mnist"], b["datasets"]["magnetic_tile"]
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    out = tmp_path / "quality.json"
    assert quality.main(["--combine", str(fa), str(fb), "--out", str(out), "--no-docs"]) == 0
    combined = json.loads(out.read_text())
    assert list(combined["datasets"]) == ["magnetic_tile", "fashion_mnist", "mnist"]
    assert combined["datasets"]["magnetic_tile"]["provenance"]["command"] == a["command"]
    assert combined["datasets"]["fashion_mnist"]["provenance"]["command"] == b["command"]
    assert combined["reduced_settings"] == b["reduced_settings"]
    assert {t["target"] for t in combined["targets"]} >= {"Magnetic Tile 200: ST-MAE AUPRO >= PatchCore"}
    assert quality.main(["--combine", str(fa), str(fa), "--out", str(out), "--no-docs"]) == 2  # overlap
    # Magnetic Tile's full-train rows from a third call join the 200-image rows of the first.
    c = fake_results()
    c["command"], c["modified"] = "python benchmarks/quality.py --only a --mt-protocols full", []
    del c["datasets"]["fashion_mnist"], c["datasets"]["mnist"]
    a["datasets"]["magnetic_tile"]["settings"] = {**settings.MODES["full"]["magnetic_tile"], "protocols": ["200"]}
    a["datasets"]["magnetic_tile"]["protocol"] = {"train": {"200": "200 seeded train/good images"}}
    a["reduced_settings"] = {"magnetic_tile": "200-image protocol only"}
    full = c["datasets"]["magnetic_tile"]
    full["settings"] = {**settings.MODES["full"]["magnetic_tile"], "protocols": ["full"]}
    full["protocol"] = {"train": {"full": "all train/good images"}}
    full["rows"] = [{**r, "key": "mt_full", "row": "Magnetic Tile, full train", "image_auroc": 0.97} for r in full["rows"]]
    fa.write_text(json.dumps(a))
    fc = tmp_path / "c.json"
    fc.write_text(json.dumps(c))
    assert quality.main(["--combine", str(fa), str(fb), str(fc), "--out", str(out), "--no-docs"]) == 0
    joined = json.loads(out.read_text())["datasets"]["magnetic_tile"]
    assert [r["key"] for r in joined["rows"]] == ["mt200"] * 3 + ["mt_full"] * 3
    assert joined["settings"]["protocols"] == ["200", "full"]
    assert list(joined["protocol"]["train"]) == ["200", "full"]
    assert {r["provenance"]["command"] for r in joined["rows"] if r["key"] == "mt200"} == {a["command"]}
    assert joined["provenance"]["command"] == c["command"]
    assert "magnetic_tile" not in json.loads(out.read_text())["reduced_settings"]
    assert quality.main(["--combine", str(fa), str(fc), str(fc), "--out", str(out), "--no-docs"]) == 2  # full twice
    b["commit"] = "def5678"
    fb.write_text(json.dumps(b))
    assert quality.main(["--combine", str(fa), str(fb), "--out", str(out), "--no-docs"]) == 2  # other commit
