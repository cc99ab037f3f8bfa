import json
import os


def test_paper_table_runs_seeds_in_parallel_and_tabulates_them(tmp_path, data_dir, monkeypatch, script):
    table = script("paper_table")
    small = [
        "data.max_users=60",
        "model.recblr.embedding_dim=8",
        "train.max_epochs=1",
        f"data.cache_dir={tmp_path / 'c'}",
    ]
    monkeypatch.setattr(table, "PLAN", [("Tiny RecBLR", "configs/tiny.yaml", small)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runs = str(tmp_path / "runs")
    args = ["--data-dir", data_dir, "--runs-dir", runs, "--parallel", "2", "--seeds", "0", "1"]
    args += ["--set", "train.log_every=7", "eval.batch_size=256", "--set", "model.recblr.num_layers=1"]
    assert table.main(args) == 0
    for seed in (0, 1):
        with open(os.path.join(table.run_dir(runs, "Tiny RecBLR", seed), "metrics.json")) as f:
            config = json.load(f)["config"]
        assert (
            config["train"]["log_every"],
            config["eval"]["batch_size"],
            config["model"]["recblr"]["num_layers"],
        ) == (
            7,
            256,
            1,
        )
        assert config["train"]["seed"] == seed
    with open(os.path.join(runs, "table.md")) as f:
        text = f.read()
    assert "| Tiny RecBLR | 2 |" in text and "ML-1M RecBLR (paper)" in text
    assert table.pending_runs(table.argparse.Namespace(seeds=[0, 1], runs_dir=runs), table.PLAN) == []
