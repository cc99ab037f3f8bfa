import glob
import json
import os

import pytest

from recblr_torchrec.config import dotted, load_config
from recblr_torchrec.errors import ConfigError
from recblr_torchrec.training.history import epochs_to, run_summary


def test_variants_train_in_one_pool_and_compare_with_the_recipes_runs_of_the_same_seeds(
    tmp_path, data_dir, monkeypatch, script
):
    variants = script("recipe_variants")
    monkeypatch.setattr(variants, "RECIPE_CONFIG", "recblr-ties.yaml")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "datasets: [ml-100k]\nseeds: [0, 1]\nvariants:\n  the recipe again: {}\n"
        "  cosine, temperature 0.1:\n    seeds: [0]\n    set: {model.score_temperature: 0.1}\n"
    )
    reference, out, runs = tmp_path / "recipe.json", tmp_path / "variants.json", tmp_path / "runs"
    reference.write_text(json.dumps({"rows": []}))
    args = ["--spec", str(spec), "--data-dir", data_dir, "--runs-dir", str(runs), "--reference", str(reference)]
    args += ["--parallel", "3", "--out", str(out), "--set", "data.max_users=200"]
    args += ["--set", "model.recblr.embedding_dim=16", "train.max_epochs=3", "train.device=cpu"]
    args += ["--set", f"data.cache_dir={tmp_path / 'c'}"]
    assert variants.main(args) == 0
    first = json.loads(out.read_text())
    assert first["finished"] and [v["seeds"] for v in first["variants"]] == [[0, 1], [0]]
    assert sorted(p.name for p in (runs / "ml-100k").iterdir()) == ["cosine-temperature-0.1", "the-recipe-again"]
    cosine = first["variants"][1]
    assert cosine["settings"] == {"model.score_temperature": 0.1}
    assert "epochs_to_paper_valid_best" not in cosine["runs"]["0"]
    assert "valid_over_recipe" not in cosine and first["verdicts"][1]["mean_valid_over_recipe"] is None

    # the recipe table's rows made of the first variant's own runs: it is level with the recipe, not above
    recipe_runs = {
        str(seed): run_summary(str(runs / "ml-100k" / "the-recipe-again" / f"seed{seed}"), "NDCG@10") for seed in (0, 1)
    }
    paper_runs = {"0": {"valid_best": 0.0}, "1": {"valid_best": 1.0}}  # a mark of 0.5: never reached
    paper_ndcg = sum(run["test"]["NDCG@10"] for run in recipe_runs.values()) / 2
    rows = [
        {
            "dataset": "ml-100k",
            "row": "paper config",
            "config": "configs/ml-100k/recblr-paper.yaml",
            "metrics": {"NDCG@10": {"mean": paper_ndcg}},
            "runs": paper_runs,
        },
        {
            "dataset": "ml-100k",
            "row": "tuned RecBLR",
            "config": "configs/ml-100k/recblr-ties.yaml",
            "runs": recipe_runs,
        },
    ]
    reference.write_text(json.dumps({"rows": rows}))
    assert variants.main(args) == 0  # finished runs are not trained again
    again = json.loads(out.read_text())
    same = again["variants"][0]
    assert same["valid_over_recipe"] == 1.0 and same["ndcg10_over_paper_config"] == 1.0
    assert same["recipe_valid_best"] == same["valid_best"]["mean"]
    assert again["verdicts"][0] == {
        "variant": "the recipe again",
        "datasets": ["ml-100k"],
        "mean_valid_over_recipe": 1.0,
        "higher_on_every_dataset": False,
    }
    assert again["variants"][1]["valid_over_recipe"] > 0 and again["unfinished"] == []
    assert same["paper_valid_best"] == 0.5 and same["seeds_reaching_paper_valid_best"] == 0
    assert "mean_epochs_to_paper_valid_best" not in same
    rerun = again["variants"][1]["runs"]["0"]
    assert rerun.pop("epochs_to_paper_valid_best") is None and rerun == cosine["runs"]["0"]
    seed0 = str(runs / "ml-100k" / "cosine-temperature-0.1" / "seed0")
    assert epochs_to(seed0, "NDCG@10", 0.0) == 1 and epochs_to(seed0, "NDCG@10", 1.0) is None


def test_a_spec_without_variants_or_datasets_is_refused_with_the_fix(tmp_path, script):
    variants = script("recipe_variants")
    spec = tmp_path / "spec.yaml"
    spec.write_text("seeds: [0]\n")
    with pytest.raises(ConfigError, match="a spec has datasets, seeds and variants"):
        variants.read_spec(str(spec))
    spec.write_text("variants:\n  wider: {model.recblr.embedding_dim: 256}\n")
    with pytest.raises(ConfigError, match="names no dataset; add datasets"):
        variants.read_spec(str(spec))


def test_every_shipped_spec_names_configs_that_load_with_its_settings(script):
    variants = script("recipe_variants")
    paths = sorted(glob.glob(os.path.join(variants.ROOT, "scripts", "variants", "*.yaml")))
    assert paths
    for path in paths:
        for variant in variants.read_spec(path):
            overrides = [f"{key}={value}" for key, value in variant["settings"].items()]
            for dataset in variant["datasets"]:
                config = load_config(os.path.join(variants.ROOT, "configs", dataset, variant["config"]), overrides)
                settings = dotted(config.to_dict())
                for key, value in variant["settings"].items():
                    assert settings[key] == value, (path, variant["variant"], key)
