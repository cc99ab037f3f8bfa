import argparse
import json
import os


def test_the_recipe_table_trains_each_row_over_seeds_and_times_the_tuned_rows(tmp_path, data_dir, monkeypatch, script):
    table = script("recipe_table")
    monkeypatch.setattr(table, "DATASETS", ("ml-100k",))
    monkeypatch.setattr(table, "ROWS", (("paper config", "recblr-ties.yaml"), ("tuned RecBLR", "recblr-ties.yaml")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "recipe.json"
    args = ["--data-dir", data_dir, "--runs-dir", str(tmp_path / "runs"), "--datasets", "ml-100k", "--seeds", "0", "1"]
    args += ["--parallel", "2", "--out", str(out), "--set", "data.max_users=60", "model.recblr.embedding_dim=8"]
    args += ["--set", "train.max_epochs=2", "train.device=cpu", f"data.cache_dir={tmp_path / 'c'}"]
    assert table.main(args) == 0
    result = json.loads(out.read_text())
    assert result["finished"] and set(result["provenance"]) == {"hardware", "versions", "commit", "date", "command"}
    paper, tuned = result["rows"]
    assert paper["seeds"] == tuned["seeds"] == [0, 1]
    runs = paper["runs"].values()
    ndcg = [run["test"]["NDCG@10"] for run in runs]
    assert paper["metrics"]["NDCG@10"]["mean"] == round(sum(ndcg) / 2, 4)
    for run in runs:
        assert len(run["valid_curve"]) == run["epochs"] == 2
        assert run["wall_to_best_s"] <= run["valid_curve"][-1][0] + 0.1
    # the same seeds of the same config: the tuned row reaches the paper row's mean best validation
    assert tuned["seeds_reaching_paper_valid_best"] >= 1 and tuned["ndcg10_over_paper_config"] == 1.0
    assert table.main(args) == 0  # finished runs are not trained again
    assert result["unfinished"] == []
    # --rows: the tuned row trained again elsewhere; the paper config's kept from the JSON, with its provenance
    again = [str(tmp_path / "again") if arg == str(tmp_path / "runs") else arg for arg in args]
    assert table.main(again + ["--rows", "tuned-recblr"]) == 0
    partial = json.loads(out.read_text())
    assert [row["row"] for row in partial["rows"]] == ["paper config", "tuned RecBLR"]
    assert partial["rows"][0] == {**paper, "provenance": result["provenance"]}
    assert "provenance" not in partial["rows"][1] and partial["rows"][1]["ndcg10_over_paper_config"] > 0
    assert partial["rows"][1]["paper_config_measured_apart"] and "paper_config_measured_apart" not in tuned
    assert os.listdir(tmp_path / "again" / "ml-100k") == ["tuned-recblr"]
    # a replacement with a seed still to train: the kept row stands, the seed is listed as unfinished
    os.remove(tmp_path / "again" / "ml-100k" / "tuned-recblr" / "seed1" / "metrics.json")
    rows = ["tuned-recblr"]
    again_ns = argparse.Namespace(datasets=["ml-100k"], seeds=[0, 1], runs_dir=str(tmp_path / "again"), rows=rows)
    summary = table.summarise(again_ns, kept=table.kept_rows(result))
    assert summary["rows"][1] == {**tuned, "provenance": result["provenance"]}
    assert [(r["row"], r["seed"]) for r in summary["unfinished"]] == [("tuned RecBLR", 1)]
    # a paper-config run not finished yet: listed with its progress, and no row stands in for the paper config
    for seed in (0, 1):
        os.remove(tmp_path / "runs" / "ml-100k" / "paper-config" / f"seed{seed}" / "metrics.json")
    rows = ["paper-config", "tuned-recblr"]
    namespace = argparse.Namespace(datasets=["ml-100k"], seeds=[0, 1], runs_dir=str(tmp_path / "runs"), rows=rows)
    summary = table.summarise(namespace)
    (tuned,) = summary["rows"]
    assert tuned["row"] == "tuned RecBLR" and "time_to_quality_ratio" not in tuned
    assert [(r["row"], r["seed"], r["epochs_done"]) for r in summary["unfinished"]] == [
        ("paper config", 0, 2),
        ("paper config", 1, 2),
    ]
