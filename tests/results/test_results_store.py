"""rfbench.results: the column registry, the store's one stale-table rule, the one summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rfbench import results as R
from rfbench.errors import DataError
from rfbench.results import schema, store
from rfbench.results.summary import mean_ci, summarise


def _rows(cell: str, values, status="ok", estimator="posrf-iid"):
    base = dict(suite="t", cell=cell, kind="estimator", estimator=estimator, feature_map="posrf",
                weight_matrix="iid", data="iso", seq_len=16, num_features=4, feature_dim=4, dim=8, batch=1,
                heads=1, causal=False, dtype="float32", device="cpu", status=status, target="softmax",
                eval_len=16)
    return [{**base, "seed": 100 + i, "seed_index": i, "kernel_rel_mse": v, "time_ms": 1.0 + i}
            for i, v in enumerate(values)]


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "run"
    store.write_cell(out, "a", _rows("a", [1.0, 2.0, 4.0]), {"status": "ok", "bias2": 0.5})
    store.write_cell(out, "b", _rows("b", [3.0, 3.5]), {"status": "ok", "bias2": 0.25})
    return out


# ------------------------------------------------------------------------------ schema
def test_schema_declares_every_column_once():
    assert list(R.COLUMNS) == [*R.KEY_COLUMNS, *R.METRICS, *(n for n, c in R.COLUMNS.items()
                                                         if c.role == "other")]
    assert all(R.COLUMNS[m].dtype == "float64" and R.COLUMNS[m].direction in ("lower", "higher")
               for m in R.METRICS)
    assert R.COLUMNS["tokens_per_s"].direction == "higher"
    assert R.TIMED_COLUMNS[0] == "time_ms" and "n_rep" in R.TIMED_COLUMNS
    assert {"num_features", "feature_dim"} <= set(R.KEY_COLUMNS)  # m and F both kept
    assert set(R.SUMMARY_KEYS) == set(R.KEY_COLUMNS) - {"seed", "seed_index"}
    with pytest.raises(KeyError, match="known"):
        schema.column("no_such_metric")


# ------------------------------------------------------------------------------ summary
@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_mean_ci_is_the_student_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, size=n)
    mean, std, lo, hi = mean_ci(x)
    assert mean == pytest.approx(x.mean())
    if n < 2:
        assert math.isnan(std) and math.isnan(lo) and math.isnan(hi)
        return
    want = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert std == pytest.approx(x.std(ddof=1)) and (lo, hi) == pytest.approx(want, rel=1e-12)


def test_summary_has_the_declared_columns_and_cell_stats(folder):
    results, cell_stats = store.collect(folder)
    summary = summarise(results, cell_stats)
    assert list(summary.columns) == schema.summary_columns()
    a = summary.set_index("cell").loc["a"]
    assert a["kernel_rel_mse_mean"] == pytest.approx(7 / 3) and a["n_seeds"] == 3 and a["bias2"] == 0.5
    assert math.isnan(summarise(results)["bias2"].iloc[0])  # without cell files: no cross-seed stats


# ------------------------------------------------------------------------------ store
def test_one_stale_table_rule_for_results_and_summary(folder):
    store.consolidate(folder)
    assert not store.load_tables(folder).notes
    store.write_cell(folder, "c", _rows("c", [9.0]), {"status": "ok"})  # finished after consolidating
    assert store.missing_cells(pd.read_parquet(folder / "results.parquet"), store.cell_files(folder)) == {"c"}
    tables = store.load_tables(folder)
    assert set(tables.results["cell"]) == set(tables.summary["cell"]) == {"a", "b", "c"}
    assert any("older than the finished cells" in n for n in tables.notes)
    assert set(R.load_results(folder)["cell"]) == set(R.load_summary(folder)["cell"]) == {"a", "b", "c"}


def test_a_killed_run_is_read_from_its_cells(folder):
    tables = store.load_tables(folder)
    assert len(tables.results) == 5 and tables.summary.set_index("cell").loc["b", "bias2"] == 0.25
    assert any("did not finish" in n for n in tables.notes)


def test_old_tables_get_the_later_columns(folder):
    store.consolidate(folder)
    old = pd.read_parquet(folder / "results.parquet").drop(columns=["eval_len", "target", "kind"])
    old.to_parquet(folder / "results.parquet")
    df = R.load_results(folder)
    assert list(df["eval_len"]) == list(df["seq_len"]) and set(df["target"]) == {""}
    assert set(df["kind"]) == {"estimator"}


def test_broken_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="no such results folder"):
        R.load_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no results.parquet"):
        R.load_results(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "bad" / "results.parquet")
    with pytest.raises(DataError, match="lacks column"):
        R.load_results(tmp_path / "bad")


def test_resume_keeps_ok_skipped_and_oom_cells_only(folder):
    store.write_cell(folder, "e", _rows("e", [1.0], status="error"), {"status": "error"})
    (store.cells_dir(folder) / "f.parquet").write_bytes(b"half a file")  # unreadable: run again
    assert store.finished_cells(folder) == {"a": "ok", "b": "ok"}
