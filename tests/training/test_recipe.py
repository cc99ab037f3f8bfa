import os

import pytest

from recblr_torchrec.config import dotted, load_config
from recblr_torchrec.errors import DataError
from recblr_torchrec.training.recipe import batch_size, dataset_statistics, recipe_settings
from recblr_torchrec.training.trainer import load_data

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


@pytest.mark.parametrize(
    "windows, batch",
    [(6764, 128), (22381, 512), (24370, 512), (512 * 31 + 1, 512), (512 * 31, 256), (8192, 256), (40, 1), (1, 1)],
)
def test_the_batch_is_the_largest_power_of_two_up_to_512_with_32_updates_an_epoch(windows, batch):
    assert batch_size(windows) == batch  # updates: batches of the epoch, the last one partial


def test_a_dataset_without_training_windows_is_refused():
    with pytest.raises(DataError, match="0 training windows"):
        batch_size(0)


def test_the_tuned_configs_are_the_recipe_of_their_data(data_dir):
    """docs/training.md#the-tuned-recipe: each recblr-tuned.yaml is its paper config with exactly the
    recipe's settings for its data, and the SASRec-style baseline follows the same length rule."""
    # (max_len, dropout, label smoothing, item dropout, batch): the rules' values, written out
    expected = {
        "ml-1m": (400, 0.3, 0.2, 0.0, 128),
        "beauty": (100, 0.5, 0.3, 0.2, 512),
        "video_games": (100, 0.5, 0.3, 0.2, 512),
    }
    for dataset in ("ml-1m", "beauty", "video_games"):
        tuned = load_config(os.path.join(CONFIGS, dataset, "recblr-tuned.yaml"), [])
        paper = load_config(os.path.join(CONFIGS, dataset, "recblr-all-positions.yaml"), [])
        statistics = dataset_statistics(load_data(paper, data_dir), paper.data.max_len)
        rules = recipe_settings(statistics)
        settings, paper_settings = dotted(tuned.to_dict()), dotted(paper.to_dict())
        assert {key: settings[key] for key in rules} == rules, dataset
        changed = {key for key in settings if settings[key] != paper_settings[key]}
        assert changed - {"name"} <= set(rules), dataset
        keys = (
            "data.max_len",
            "model.recblr.dropout",
            "train.label_smoothing",
            "model.item_dropout",
            "train.batch_size",
        )
        assert tuple(settings[key] for key in keys) == expected[dataset]
        shared = ("model.recblr.embedding_dim", "model.recblr.num_layers", "train.lr", "train.weight_decay")
        assert tuple(settings[key] for key in shared) == (128, 4, 0.00277, 0.01)
        sasrec = load_config(os.path.join(CONFIGS, dataset, "sasrec-tuned.yaml"), [])
        if statistics["mean_length"] < 50:  # the baseline gets the same regularisation rule
            regularisation = (sasrec.model.sasrec.dropout, sasrec.train.label_smoothing, sasrec.model.item_dropout)
            assert regularisation == (0.5, 0.3, 0.2), dataset
        else:
            assert sasrec.model.item_dropout == 0.0, dataset


def test_recipe_config_writes_a_config_that_loads_to_the_recipe(tmp_path, data_dir, script, capsys):
    paper_path = os.path.join(CONFIGS, "ml-100k", "recblr-ties.yaml")
    out = tmp_path / "ml-100k" / "recblr-tuned.yaml"
    writer = script("recipe_config")
    args = ["--paper-config", paper_path, "--data-dir", data_dir, "--out", str(out)]
    assert writer.main(args) == 0
    assert out.read_text().startswith("# The tuned recipe (docs/training.md#the-tuned-recipe)")
    tuned, paper = load_config(str(out), []), load_config(paper_path, [])
    rules = recipe_settings(dataset_statistics(load_data(paper, data_dir), paper.data.max_len))
    assert rules["data.max_len"] == 400 and rules["model.item_dropout"] == 0.0  # ML-100K: mean length 106
    settings = dotted(tuned.to_dict())
    assert {key: settings[key] for key in rules} == rules
    assert tuned.name == "ml-100k-recblr-tuned" and tuned.data.path == paper.data.path
    with pytest.raises(SystemExit):  # an existing file is not overwritten
        writer.main(args)
    assert writer.main(["--paper-config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x.yaml")]) == 2
    sasrec = os.path.join(CONFIGS, "ml-1m", "sasrec-paper.yaml")  # the recipe tunes RecBLR only
    assert writer.main(["--paper-config", sasrec, "--out", str(tmp_path / "y.yaml")]) == 2
    assert "model.encoder=sasrec; the recipe tunes RecBLR" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.yaml") and not os.path.exists(tmp_path / "y.yaml")
