"""Real item ids end to end: a trained run keeps its id maps, export writes ids.pt and item_ids.tsv,
ids.pt serves scorer.pt and step.pt in the data file's ids, and launchers/recommend.py answers
"top k after this history" (torch alone), for a dataset user, and through an external id map."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from recblr_torchrec.config import load_config
from recblr_torchrec.serving import export
from recblr_torchrec.training import train
from recblr_torchrec.training.trainer import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
RECOMMEND = os.path.join(ROOT, "launchers", "recommend.py")
# the artifacts path of the command must run with torch alone: the project cannot be imported
TORCH_ONLY = "import sys, runpy; sys.modules['recblr_torchrec'] = None; sys.argv = sys.argv[1:]; "
TORCH_ONLY += "runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
    """(run folder, artifacts folder, manifest, config) of two epochs of a small ML-100K run."""
    root = tmp_path_factory.mktemp("served")
    overrides = ["data.max_users=120", "data.min_item_interactions=3", "model.recblr.embedding_dim=16"]
    overrides += ["train.batch_size=64", "train.max_epochs=2", "train.device=cpu", f"data.cache_dir={root / 'c'}"]
    config = load_config(TINY, overrides)
    train(config, str(root / "run"), data_dir)
    manifest = export(str(root / "run"), str(root / "artifacts"))
    return str(root / "run"), str(root / "artifacts"), manifest, config


def item_map(folder):
    with open(os.path.join(folder, "item_ids.tsv")) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["dense_id", "item_id"]
    return {int(dense): name for dense, name in rows[1:]}


def recommend(*args, torch_only=True):
    prefix = ["-c", TORCH_ONLY] if torch_only else []
    command = [sys.executable, *prefix, RECOMMEND, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def ranked(stdout):
    """[(item id, score)] of recommend.py's table."""
    lines = stdout.strip().splitlines()
    return [(line.split("\t")[1], float(line.split("\t")[2])) for line in lines[2:]]


def test_the_run_folder_keeps_the_maps_between_file_ids_and_dense_ids(served, data_dir):
    run, _, _, config = served
    data = load_data(config, data_dir)
    items = item_map(run)
    assert len(items) == data.num_items and sorted(items) == list(range(1, data.num_items + 1))
    assert [items[d] for d in range(1, 6)] == [str(t) for t in data.item_tokens[1:6]]
    assert len(set(items.values())) < int(max(items.values(), key=int))  # filtering left gaps: not the identity
    with open(os.path.join(run, "user_ids.tsv")) as f:
        users = list(csv.reader(f, delimiter="\t"))
    assert users[0] == ["row", "user_id"] and [row[1] for row in users[1:]] == [str(t) for t in data.user_tokens]


def test_export_writes_the_id_map_and_names_it_in_the_manifest_with_the_real_epoch(served):
    run, artifacts, manifest, _ = served
    assert manifest["files"]["ids"] == "ids.pt" and manifest["files"]["item_ids"] == "item_ids.tsv"
    assert item_map(artifacts) == item_map(run)
    assert manifest["checkpoint"]["epoch"] == json.load(open(os.path.join(run, "metrics.json")))["best_epoch"]
    last = export(os.path.join(run, "checkpoints", "last.pt"), os.path.join(run, "from_last"))
    assert last["checkpoint"]["epoch"] == 2 and last["files"]["ids"] == "ids.pt"


def test_ids_pt_serves_scorer_and_step_in_file_ids(served, data_dir):
    _, artifacts, _, config = served
    data = load_data(config, data_dir)
    ids, scorer, step = (torch.jit.load(os.path.join(artifacts, name)) for name in ("ids.pt", "scorer.pt", "step.pt"))
    items = item_map(artifacts)
    dense = [data.items[data.offsets[u] : data.offsets[u + 1]].tolist()[:12] for u in (0, 3)]
    histories = [[items[d] for d in row] for row in dense]
    item_ids, lengths = ids.histories(histories)
    assert lengths.tolist() == [len(row) for row in dense] and item_ids[0, : len(dense[0])].tolist() == dense[0]
    scores, top = scorer(item_ids, lengths, 7)
    assert ids.names(top) == [[items[d] for d in row] for row in top.tolist()]
    state = step.initial_state(1)
    for name in histories[1]:
        state, step_scores, step_top = step(state, ids.events([name]), 7)
    assert ids.names(step_top) == ids.names(top[1:])
    torch.testing.assert_close(step_scores, scores[1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(torch.jit.Error, match=r"item id 'no-such-item' \(history 0, position 1\) is not in this model"):
        ids.histories([[histories[0][0], "no-such-item"]])
    with pytest.raises(torch.jit.Error, match=r"item id 'x' \(event 0\) is not in this model's catalog"):
        ids.events(["x"])


def test_recommend_prints_the_top_k_unseen_items_with_torch_alone(served):
    _, artifacts, _, _ = served
    history = list(item_map(artifacts).values())[:5]
    result = recommend("--artifacts", artifacts, "--history", " ".join(history), "--k", "10")
    assert result.returncode == 0, result.stderr
    heading = ["top 10 after a history of 5 items (seen items left out):", "rank\titem_id\tscore"]
    assert result.stdout.splitlines()[:2] == heading
    unseen = ranked(result.stdout)
    assert len(unseen) == 10 and not set(name for name, _ in unseen) & set(history)
    assert [score for _, score in unseen] == sorted((score for _, score in unseen), reverse=True)
    kept = recommend("--artifacts", artifacts, "--history", ",".join(history), "--k", "40", "--keep-seen")
    everything = ranked(kept.stdout)
    assert len(everything) == 40 and [pair for pair in everything if pair[0] not in history][:10] == unseen


def test_recommend_for_a_dataset_user_and_through_an_external_id_map(served, data_dir, tmp_path):
    _, artifacts, _, config = served
    data = load_data(config, data_dir)
    user = str(data.user_tokens[2])
    history = [str(data.item_tokens[i]) for i in data.items[data.offsets[2] : data.offsets[3]]]
    by_user = recommend("--artifacts", artifacts, "--user", user, "--data-dir", data_dir, "--k", "5", torch_only=False)
    assert by_user.returncode == 0, by_user.stderr
    assert by_user.stdout.startswith(f"top 5 after user {user}'s {len(history)} items")
    by_history = recommend("--artifacts", artifacts, "--history", " ".join(history), "--k", "5")
    assert ranked(by_user.stdout) == ranked(by_history.stdout)
    external = tmp_path / "item_map.tsv"
    external.write_text("item_id\tmovie_id\n" + "".join(f"{name}\tm{name}\n" for name in item_map(artifacts).values()))
    mapped = recommend(
        "--artifacts", artifacts, "--history", " ".join(f"m{name}" for name in history), "--k", "5",
        "--item-map", str(external),
    )  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr
    assert mapped.stdout.splitlines()[1] == "rank\tmovie_id\tscore"
    assert ranked(mapped.stdout) == [(f"m{name}", score) for name, score in ranked(by_history.stdout)]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--history", "1 no-such-item"], "item id 'no-such-item' (history 0, position 1) is not in this model's"),
        (["--history", " "], "--history is empty: give at least one item id"),
        (["--history", "1", "--k", "0"], "--k 0 must be at least 1"),
        (["--history", "1", "--k", "100000"], "--k 100000 is more than the catalog's"),
        (["--user", "no-such-user", "--data-dir", "{data}"], "--user no-such-user is not among the 120 users of"),
        (["--history", "m1", "--item-map", "{tmp}/map.tsv"], "--item-map {tmp}/map.tsv does not exist"),
    ],
)
def test_recommend_errors_are_one_line_and_status_2(served, data_dir, tmp_path, arguments, expected):
    _, artifacts, _, _ = served
    arguments = [a.format(data=data_dir, tmp=tmp_path) for a in arguments]
    result = recommend("--artifacts", artifacts, *arguments, torch_only="--user" not in arguments)
    err = result.stderr.strip()
    assert result.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected.format(tmp=tmp_path) in err, err


def test_recommend_refuses_a_folder_without_artifacts(tmp_path):
    result = recommend("--artifacts", str(tmp_path), "--history", "1")
    assert result.returncode == 2
    assert "holds no manifest.json; pass the --output-dir of launchers/export.py" in result.stderr
