"""The summary a run that evaluates ends with: the comparison's compact table and where to look."""

from __future__ import annotations

import math

import pandas as pd
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from weighted_lowrank.analysis.run_summary import RunSummary, comparison_summary


def _comparison() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "namespace": ["dense", "fwsvd", "kfwsvd"],
            "accuracy": [0.817, 0.77, 0.80812],
            "params_ratio_model": [1.0, 0.76568, 0.76568],
            "latency_ratio": [1.0, 0.6012, 0.6049],
            "vs_fwsvd_p": [4.9e-05, math.nan, 0.0123],
        }
    )


def test_the_summary_has_one_line_per_row_with_metric_size_speed_and_the_paired_p():
    summary = comparison_summary(_comparison())
    assert summary.columns.tolist() == [
        "row",
        "accuracy",
        "params kept",
        "latency × dense",
        "p vs fwsvd",
    ]
    assert summary["row"].tolist() == ["dense", "fwsvd", "kfwsvd"]
    assert summary["accuracy"].tolist() == [0.817, 0.77, 0.8081]
    assert summary["params kept"].tolist() == [1.0, 0.766, 0.766]
    assert summary["latency × dense"].tolist() == [1.0, 0.6, 0.6]
    # The reference's own row has no test; p below 0.001 is not shown as 0.
    assert summary["p vs fwsvd"].tolist() == ["< 0.001", "—", "0.012"]


def test_without_the_reference_row_the_next_one_is_used_and_without_any_no_p_column():
    table = _comparison().rename(columns={"vs_fwsvd_p": "vs_svd_p"})
    assert "p vs svd" in comparison_summary(table)
    assert not any(c.startswith("p vs") for c in comparison_summary(table.drop(columns="vs_svd_p")))


def test_the_hook_prints_the_table_and_where_to_look_only_when_the_run_made_it(capsys):
    hook = RunSummary()
    hook.after_catalog_created(
        {"comparison_markdown": {"dataset": {"filepath": "data/08_reporting/comparison.md"}}}
    )
    catalog = DataCatalog({"comparison_table": MemoryDataset(_comparison())})
    made = Pipeline([Node(lambda: None, None, "comparison_table", name="comparison")])
    hook.after_pipeline_run(pipeline=made, catalog=catalog)
    printed = capsys.readouterr().out
    assert "| kfwsvd | 0.8081 | 0.766 | 0.6 | 0.012 |" in printed
    assert "Full report: data/08_reporting/comparison.md" in printed
    assert "mlflow ui --backend-store-uri " in printed

    other = Pipeline([Node(lambda: None, None, "fine_tuned_model", name="fine_tune")])
    hook.after_pipeline_run(pipeline=other, catalog=catalog)
    assert capsys.readouterr().out == ""
