import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_spaces_give_configs_the_trainer_accepts(script):
    import random

    from recblr_torchrec.config import dotted, load_config

    tune = script("tune")
    rng = random.Random(0)
    for encoder, base in (
        ("recblr", "configs/beauty/recblr-all-positions.yaml"),
        ("sasrec", "configs/beauty/sasrec-paper.yaml"),
    ):
        flat = dotted(load_config(os.path.join(ROOT, base)).to_dict())
        for _ in range(20):
            overrides = tune.sample(tune.SPACES[encoder], flat, rng)
            config = load_config(os.path.join(ROOT, base), overrides)
            assert config.model.encoder == encoder
            assert config.data.max_len in (25, 50, 100)  # scale of the base's 50


def test_halving_selects_on_validation_resumes_from_its_log_and_refuses_another_search(
    tmp_path, data_dir, monkeypatch, script
):
    tune = script("tune")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    space = tmp_path / "space.yaml"
    space.write_text("model.recblr.num_layers: [1, 2]\ntrain.lr: {log_uniform: [1.0e-3, 3.0e-3]}\n")
    out = str(tmp_path / "search")
    args = ["--config", "configs/tiny.yaml", "--data-dir", data_dir, "--out", out, "--space", str(space)]
    args += ["--trials", "3", "--budgets", "0.01", "0.02", "--eta", "2", "--parallel", "2"]
    args += ["--set", "data.max_users=80", "model.recblr.embedding_dim=8", "train.max_epochs=2", "train.device=cpu"]
    args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert tune.main(args) == 0
    with open(os.path.join(out, "tune.json")) as f:
        log = json.load(f)
    assert [len(t["rungs"]) for t in log["trials"]].count(2) == 2  # ceil(3 / 2) went on
    first = {t["id"]: t["rungs"]["0"]["best"] for t in log["trials"]}
    promoted = [t["id"] for t in log["trials"] if "1" in t["rungs"]]
    assert sorted(promoted) == sorted(sorted(first, key=first.get, reverse=True)[:2])
    for trial in log["trials"]:
        rung = trial["rungs"]["0"]
        assert rung["curve"] and rung["best"] == max(point["value"] for point in rung["curve"])
        with open(os.path.join(out, "trials", trial["id"], "metrics.json")) as f:
            assert "test" not in json.load(f)  # never evaluated
    best = max((t for t in log["trials"] if "1" in t["rungs"]), key=lambda t: t["rungs"]["1"]["best"])
    with open(os.path.join(out, "best.txt")) as f:
        assert f.read().split() == best["overrides"]
    logs = {t["id"]: os.path.getsize(os.path.join(out, "trials", t["id"], "train.log")) for t in log["trials"]}
    assert tune.main(args) == 0  # everything recorded: nothing trains again
    assert logs == {t["id"]: os.path.getsize(os.path.join(out, "trials", t["id"], "train.log")) for t in log["trials"]}
    with pytest.raises(SystemExit, match="holds another search: config="):
        tune.main(["--config", "configs/ml-1m/recblr-cpu.yaml"] + args[2:])


def test_a_failed_trial_is_left_out_with_the_end_of_its_log(tmp_path, data_dir, monkeypatch, script):
    tune = script("tune")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    space = tmp_path / "space.yaml"
    space.write_text("train.device: [cuda]\n")  # valid as a setting, refused when the run starts on this CPU
    out = str(tmp_path / "search")
    args = ["--config", "configs/tiny.yaml", "--data-dir", data_dir, "--out", out, "--space", str(space)]
    args += ["--trials", "2", "--budgets", "0.01", "--parallel", "2", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    assert tune.main(args) == 0
    with open(os.path.join(out, "tune.json")) as f:
        trials = json.load(f)["trials"]
    for trial in trials:
        failed = trial["rungs"]["0"]
        assert failed["failed"] == 2 and failed["attempts"] == 2  # run once more, then left out
        assert "CUDA is not available" in "\n".join(failed["log_tail"])
    assert not os.path.exists(os.path.join(out, "best.txt"))


def test_rank_scores_trials_across_searches_relative_to_each_searchs_median(tmp_path, script):
    tune = script("tune")

    def search(name, seed, bests, key="train.lr"):
        trials = [
            {
                "id": trial,
                "overrides": [f"{key}={i}"],
                "rungs": {} if best is None else {"0": {"curve": [1], "best": best}},
            }
            for i, (trial, best) in enumerate(bests.items())
        ]
        log = {"config": f"{name}.yaml", "seed": seed, "metric": "NDCG@10", "budgets_s": [60.0, 180.0]}
        log.update(space={key: [0, 1, 2]}, trials=trials)
        os.makedirs(tmp_path / name)
        (tmp_path / name / "tune.json").write_text(json.dumps(log))
        return str(tmp_path / name)

    a = search("a", 0, {"t000": 0.10, "t001": 0.20, "t002": 0.15})
    b = search("b", 0, {"t000": 0.03, "t001": 0.01, "t002": None})  # t002 not run in b: out of the ranking
    assert tune.main(["--rank", a, b, "--out", str(tmp_path / "recipe")]) == 0
    result = json.loads((tmp_path / "recipe" / "ranking.json").read_text())
    assert [s["median"] for s in result["searches"]] == pytest.approx([0.15, 0.02])  # over t000 and t001
    # t001 is best in a, but t000 is better relative to each search's median trial on average
    assert [entry["id"] for entry in result["ranking"]] == ["t000", "t001"]
    assert result["ranking"][0]["score"] == pytest.approx((0.10 / 0.15 + 0.03 / 0.02) / 2)
    assert (tmp_path / "recipe" / "best.txt").read_text() == "a.yaml: train.lr=0\nb.yaml: train.lr=0\n"
    with pytest.raises(SystemExit, match="drew other trials than .*: sampler seed 1 against 0"):
        tune.main(["--rank", a, search("c", 1, {"t000": 0.1}), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="drew other trials than .*: another search space"):
        tune.main(["--rank", a, search("d", 0, {"t000": 0.1}, key="train.dropout"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="e has no trial with a result in rung 0 yet"):
        tune.main(["--rank", a, search("e", 0, {"t000": None}), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="a has no trial with a result in rung 1 yet"):
        tune.main([f"--rank={a}", "--rung", "1", "--out", str(tmp_path / "x")])
