import gzip
import os

import numpy as np
import pytest
import torch

from recblr_torchrec.data import (
    DataFormatError,
    SampleBatches,
    build_sequences,
    evaluation_samples,
    load_sequences,
    make_batch,
    make_loader,
    read_interactions,
    training_samples,
)
from recblr_torchrec.data.negatives import SampledCandidates, item_frequencies
from recblr_torchrec.data.sequences import k_core
from recblr_torchrec.training.task import target_rows


def write(path, text, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt") as f:
        f.write(text)
    return str(path)


SEQ = "1 5 6 7 8 9\n2 6 7 8 9 5\n3 7 8 9 5 6\n"


def test_seq_inter_and_ratings_readers_agree(tmp_path):
    seq = write(tmp_path / "a.txt.gz", SEQ, compress=True)
    rows = []
    for line in SEQ.splitlines():
        user, *items = line.split()
        rows += [(user, item, t) for t, item in enumerate(items)]
    order = [4, 0, 9, 2, 13, 1, 7, 3, 12, 5, 8, 10, 6, 11, 14]  # unsorted rows, as in ml-100k
    inter = write(
        tmp_path / "b.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{rows[i][0]}\t{rows[i][1]}\t3\t{100 + rows[i][2]}\n" for i in order),
    )
    ratings = write(tmp_path / "ratings.dat", "".join(f"{rows[i][0]}::{rows[i][1]}::3::{rows[i][2]}\n" for i in order))
    built = [build_sequences(read_interactions(p), 1, 1) for p in (seq, inter, ratings)]
    for data in built:
        np.testing.assert_array_equal(data.offsets, [0, 5, 10, 15])
        np.testing.assert_array_equal(data.items[:5], [1, 2, 3, 4, 5])  # 5..9 remapped densely from 1
        assert data.num_items == 5
        assert list(data.item_tokens[1:]) == ["5", "6", "7", "8", "9"]
    for data in built[1:]:
        np.testing.assert_array_equal(data.items, built[0].items)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.txt", "1 2 3\n2 4 x\n", "'x' in line 2"),
        ("short.txt", "1 2 3\n2\n", "line 2 of"),
        ("zero.txt", "1 2 0\n", "item id 0 in line 1"),
        ("negative.txt", "1 2 -4\n", "'-4' in line 1"),
        ("repeat.txt", "1 2 3\n1 4 5\n", "user 1 appears again in line 2"),
        ("cols.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\n", "line 2 of"),
        ("time.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n", "'soon' in line 2"),
        ("nohead.inter", "user\titem\ttime\n1\t2\t3\n", "no user_id column"),
        ("ratings.dat", "1::2::3\n", "line 1 of"),
        ("data.csv", "1,2\n", "cannot tell the format"),
    ],
)
def test_bad_input_names_file_line_and_fix(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError, match=message):
        read_interactions(path)


def test_unknown_format_and_missing_file_are_clear(tmp_path):
    path = write(tmp_path / "a.txt", SEQ)
    with pytest.raises(DataFormatError, match="unknown data format 'csv'"):
        read_interactions(path, "csv")
    with pytest.raises(FileNotFoundError, match="RECBLR_DATA_DIR"):
        load_sequences(str(tmp_path / "missing.txt"), cache_dir=str(tmp_path))


def test_empty_after_filtering_names_the_thresholds(tmp_path):
    path = write(tmp_path / "a.txt", SEQ)
    with pytest.raises(DataFormatError, match="empty after 10-core"):
        load_sequences(path, min_user=10, min_item=1, cache_dir=str(tmp_path / "cache"))


def test_k_core_is_iterative_and_matches_brute_force():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 600), rng.integers(0, 60, 600)
    keep = k_core(users, items, 5, 5)
    alive = np.ones(600, dtype=bool)
    changed = True
    while changed:  # brute force: drop one offending user or item at a time
        changed = False
        for codes, k in ((users, 5), (items, 5)):
            for code in np.unique(codes[alive]):
                rows = alive & (codes == code)
                if 0 < rows.sum() < k:
                    alive &= ~rows
                    changed = True
    np.testing.assert_array_equal(keep, alive)
    kept_users = np.bincount(users[keep])
    assert (kept_users[kept_users > 0] >= 5).all()


def test_real_datasets_match_published_statistics(data_dir, tmp_path):
    ml100k = load_sequences(os.path.join(data_dir, "ml-100k/ml-100k.inter.gz"), cache_dir=str(tmp_path))
    assert (ml100k.num_users, ml100k.num_items, len(ml100k.items)) == (943, 1349, 99287)
    ml1m = load_sequences(os.path.join(data_dir, "ml-1m/ml-1m.txt.gz"), cache_dir=str(tmp_path))
    assert (ml1m.num_users, ml1m.num_items, len(ml1m.items)) == (6040, 3416, 999611)


def test_cache_returns_the_same_arrays(tmp_path):
    path = write(tmp_path / "a.txt", SEQ)
    first = load_sequences(path, min_user=3, min_item=1, cache_dir=str(tmp_path / "c"))
    assert len(os.listdir(tmp_path / "c")) == 1
    second = load_sequences(path, min_user=3, min_item=1, cache_dir=str(tmp_path / "c"))
    for name in ("offsets", "items", "item_tokens", "user_tokens"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def small_data(tmp_path, lines):
    path = write(tmp_path / "s.txt", "".join(f"{u} " + " ".join(map(str, seq)) + "\n" for u, seq in lines))
    return load_sequences(path, min_user=3, min_item=1, cache_dir=str(tmp_path / "cache"))


def test_leave_one_out_splits_and_truncation(tmp_path):
    data = small_data(tmp_path, [(1, [1, 2, 3, 4, 5, 6, 7]), (2, [3, 4, 5])])
    valid = make_batch(data.items, evaluation_samples(data, 3, "valid"), np.arange(2))
    test = make_batch(data.items, evaluation_samples(data, 3, "test"), np.arange(2))
    assert valid.item_history.values().tolist() == [3, 4, 5, 3]
    assert valid.last_targets().tolist() == [6, 4]
    assert test.item_history.values().tolist() == [4, 5, 6, 3, 4]
    assert test.last_targets().tolist() == [7, 5]


def test_training_protocols_cover_every_training_target_once(tmp_path):
    data = small_data(tmp_path, [(1, [1, 2, 3, 4, 5, 6, 7, 8, 9]), (2, [3, 4, 5, 6])])
    # training parts: [1..7] and [3, 4]; all_positions windows of T=3 from the end
    windows = training_samples(data, 3, "all_positions")
    batch = make_batch(data.items, windows, np.arange(len(windows)))
    assert batch.item_history.lengths().tolist() == [3, 3, 1]
    assert batch.item_history.values().tolist() == [4, 5, 6, 1, 2, 3, 3]
    assert batch.targets.tolist() == [5, 6, 7, 2, 3, 4, 4]
    prefixes = training_samples(data, 3, "prefixes")
    batch = make_batch(data.items, prefixes, np.arange(len(prefixes)))
    assert batch.item_history.lengths().tolist() == [1, 2, 3, 3, 3, 3, 1]
    assert batch.last_targets().tolist() == [2, 3, 4, 5, 6, 7, 4]
    assert int(torch.count_nonzero(batch.targets)) == len(prefixes)


@pytest.mark.parametrize("max_len, context", [(3, 1), (4, 2), (5, 4), (4, 0)])
def test_windows_with_context_use_every_target_once_each_after_its_history(tmp_path, max_len, context):
    lines = [(1, list(range(1, 12))), (2, [3, 4, 5, 6]), (3, list(range(20, 27))), (4, list(range(30, 36)))]
    data = small_data(tmp_path, lines)
    samples = training_samples(data, max_len, "all_positions", window_context=context)
    index = np.arange(len(samples))
    batch = make_batch(data.items, samples, index)
    padded = make_batch(data.items, samples, index, pad=(8, max_len))  # CUDA-graph shapes: the same targets
    assert torch.equal(padded.targets[: batch.targets.numel()], batch.targets)
    assert samples.target_count(index) == int(torch.count_nonzero(batch.targets)) == batch.num_targets
    seen = {}
    values, targets = batch.item_history.values().tolist(), batch.targets.tolist()
    start = 0
    for length, user in zip(batch.item_history.lengths().tolist(), batch.user_ids.tolist()):
        assert length <= max_len
        for k in range(start, start + length):
            if targets[k]:
                assert (user, values[k]) not in seen
                seen[(user, values[k])] = (targets[k], k - start)  # the target and how many inputs precede it
        start += length
    for user in range(data.num_users):
        train = data.items[data.offsets[user] : data.offsets[user + 1]][:-2].tolist()
        for p in range(len(train) - 1):  # every training target once, after at least min(p, C) of its history
            target, before = seen.pop((user, train[p]))
            assert target == train[p + 1] and before >= min(p, context)
    assert not seen
    windows = np.bincount(samples.users, minlength=data.num_users)
    inputs = data.lengths - 3
    assert (windows[inputs <= max_len] == 1).all()  # a history that fits in T is read once
    assert (samples.lengths[samples.starts != data.offsets[samples.users]] == max_len).all()  # others: full windows
    if context == 0:  # disjoint windows, every position a target
        assert samples.context is None and int(torch.count_nonzero(batch.targets)) == batch.targets.numel()


def test_window_context_is_refused_where_it_cannot_apply():
    from recblr_torchrec.config import load_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "tiny.yaml")
    with pytest.raises(ValueError, match=r"train.window_context=50 must be < data.max_len=50.*data.max_len / 2"):
        load_config(tiny, ["data.max_len=50", "train.window_context=50"])
    with pytest.raises(ValueError, match=r"train.window_context=5 applies to train.protocol=all_positions"):
        load_config(tiny, ["train.protocol=prefixes", "train.window_context=5"])


def test_batches_split_and_move_without_changing_content(tmp_path):
    data = small_data(tmp_path, [(u, list(range(1, 4 + u))) for u in range(1, 8)])
    samples = training_samples(data, 4, "all_positions")
    batch = make_batch(data.items, samples, np.arange(len(samples)))
    parts = batch.split(3)
    assert [len(p) for p in parts] == [3, 3, 3, 1] and len(batch) == 10
    assert torch.equal(torch.cat([p.item_history.values() for p in parts]), batch.item_history.values())
    assert torch.equal(torch.cat([p.targets for p in parts]), batch.targets)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(moved.item_history.offsets(), batch.item_history.offsets())


@pytest.mark.parametrize("protocol", ["all_positions", "prefixes"])
def test_batches_carry_their_target_rows_so_the_step_needs_no_nonzero(tmp_path, protocol):
    data = small_data(tmp_path, [(u, list(range(1, 4 + u))) for u in range(1, 8)])
    samples = training_samples(data, 4, protocol)
    index = np.arange(len(samples))
    for fillers in (0, 2):
        batch = make_batch(data.items, samples, index, fillers=fillers)
        expected = torch.nonzero(batch.targets, as_tuple=True)[0]
        assert torch.equal(batch.target_rows, expected) and batch.num_targets == expected.numel()
        moved = batch.pin_memory() if torch.cuda.is_available() else batch
        assert torch.equal(moved.to(torch.device("cpu")).target_rows, expected)
    offset = 0
    for part in batch.split(3):  # micro-batches find theirs from their targets
        assert torch.equal(
            target_rows(part), expected[(expected >= offset) & (expected < offset + part.targets.numel())] - offset
        )
        offset += part.targets.numel()


def test_batches_carry_their_value_counts_through_split_move_and_workers(tmp_path):
    """TorchRec reads length_per_key instead of summing the lengths on the device (a host sync)."""
    data = small_data(tmp_path, [(u, list(range(1, 4 + u))) for u in range(1, 8)])
    samples = training_samples(data, 4, "prefixes")
    batch = make_batch(data.items, samples, np.arange(len(samples)), user_buckets=5)
    counts = [batch.item_history.values().numel()]
    assert batch.item_history.length_per_key_or_none() == counts
    assert batch.context.length_per_key_or_none() == [len(samples)]
    for part in batch.split(4):
        assert part.item_history.length_per_key_or_none() == [part.item_history.values().numel()]
        assert part.context.length_per_key_or_none() == [len(part)]
    moved = batch.pin_memory() if torch.cuda.is_available() else batch
    assert moved.to(torch.device("cpu")).item_history.length_per_key_or_none() == counts
    batches = SampleBatches(data, samples, 5, shuffle=True, seed=1)
    batches.set_epoch(1)
    for served in make_loader(batches, 1):
        assert served.item_history.length_per_key_or_none() == [served.item_history.values().numel()]


def test_loader_with_workers_serves_the_same_batches_every_resume(tmp_path):
    data = small_data(tmp_path, [(u, list(range(1, 4 + u % 5))) for u in range(1, 30)])
    batches = SampleBatches(data, training_samples(data, 4, "all_positions"), 5, shuffle=True, seed=3)
    batches.set_epoch(2)
    in_process = [b.item_history.values().tolist() for b in make_loader(batches, 0)]
    with_workers = [b.item_history.values().tolist() for b in make_loader(batches, 2)]
    assert in_process == with_workers
    batches.set_epoch(2, start_batch=2)
    assert [b.item_history.values().tolist() for b in make_loader(batches, 0)] == in_process[2:]
    batches.set_epoch(3)
    assert [b.item_history.values().tolist() for b in make_loader(batches, 0)] != in_process


def test_one_loader_serves_every_epoch_and_resume_from_workers_it_starts_once(tmp_path):
    """The trainer iterates one loader all run: its persistent workers build each epoch's batches
    (and their negatives) from the key the loader hands them, not from the epoch they were forked in."""
    data = small_data(tmp_path, [(u, list(range(1, 4 + u % 5))) for u in range(1, 30)])
    candidates = SampledCandidates(item_frequencies(data), 4, "uniform", seed=0)
    batches = SampleBatches(data, training_samples(data, 4, "all_positions"), 5, True, seed=3, candidates=candidates)

    def epoch(loader, number, start_batch=0, stop=None):
        batches.set_epoch(number, start_batch)
        served = []
        for batch in loader:
            served.append((batch.item_history.values().tolist(), batch.candidates().tolist()))
            if len(served) == stop:  # an epoch cut short (max_steps_per_epoch, a stop)
                break
        return served

    expected = {n: epoch(make_loader(batches, 0), n) for n in (2, 3)}
    assert expected[2] != expected[3]
    kept = make_loader(batches, 2)
    assert epoch(kept, 2) == expected[2]
    workers = [w.pid for w in kept._iterator._workers]
    assert epoch(kept, 3, stop=2) == expected[3][:2]
    assert epoch(kept, 2, start_batch=3) == expected[2][3:]
    assert epoch(kept, 3) == expected[3]
    assert [w.pid for w in kept._iterator._workers] == workers and len(set(workers)) == 2


def test_same_timestamp_ties_follow_the_file_or_the_item_id(tmp_path):
    inter = tmp_path / "ties.inter"
    rows = [("u1", "30", 5), ("u1", "4", 1), ("u1", "12", 5), ("u1", "7", 2), ("u1", "2", 5)]
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    with open(inter, "a") as f:
        f.writelines(f"{u}\t{i}\t1\t{t}\n" for u, i, t in rows)
    by_file = build_sequences(read_interactions(str(inter)), 1, 1, "file")
    by_item = build_sequences(read_interactions(str(inter)), 1, 1, "item")
    assert list(by_file.item_tokens[by_file.items]) == ["4", "7", "30", "12", "2"]  # RecBole: stable in time
    assert list(by_item.item_tokens[by_item.items]) == ["4", "7", "2", "12", "30"]  # numeric item order
    with pytest.raises(ValueError, match="data.tie_order='time'; choose one of file, item, shuffled_runs"):
        build_sequences(read_interactions(str(inter)), 1, 1, "time")
    cached = load_sequences(str(inter), "auto", 3, 1, str(tmp_path / "cache"), "item")
    assert np.array_equal(cached.items, by_item.items)
    assert np.array_equal(load_sequences(str(inter), "auto", 3, 1, str(tmp_path / "cache")).items, by_file.items)


def test_shuffled_runs_permute_only_within_ascending_runs(tmp_path):
    runs = [[3, 9, 14, 20], [2, 8], [5, 6, 7, 11, 12], [1]]  # each strictly ascending, each next one starts lower
    other = [[4, 10], [6]]
    path = tmp_path / "seq.txt"
    path.write_text(
        "1 " + " ".join(str(i) for r in runs for i in r) + "\n2 " + " ".join(str(i) for r in other for i in r) + "\n"
    )
    kept = build_sequences(read_interactions(str(path)), 1, 1, "file")
    shuffled = build_sequences(read_interactions(str(path)), 1, 1, "shuffled_runs")
    again = build_sequences(read_interactions(str(path)), 1, 1, "shuffled_runs")
    assert np.array_equal(shuffled.items, again.items)  # seeded: same file, same sequences
    first = [int(t) for t in shuffled.item_tokens[shuffled.items[: shuffled.offsets[1]]]]
    second = [int(t) for t in shuffled.item_tokens[shuffled.items[shuffled.offsets[1] :]]]
    at = 0
    for run in runs:  # every run keeps its place and its items
        assert sorted(first[at : at + len(run)]) == run
        at += len(run)
    assert sorted(second[:2]) == [4, 10] and second[2:] == [6]  # runs never cross users
    assert first != [i for r in runs for i in r]  # something moved
    assert [int(t) for t in kept.item_tokens[kept.items]] == [i for r in runs + other for i in r]
    timestamped = tmp_path / "ties.inter"  # same-time groups are sorted by item before the shuffle
    timestamped.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"u\t{i}\t1\t{t}\n" for i, t in [(9, 1), (3, 1), (5, 1), (1, 2)])
    )
    order = build_sequences(read_interactions(str(timestamped)), 1, 1, "shuffled_runs")
    tokens = [int(t) for t in order.item_tokens[order.items]]
    assert sorted(tokens[:3]) == [3, 5, 9] and tokens[3] == 1
