"""train.cuda_graphs and train.precision: auto resolved where the run executes, padded batches (CPU)
and whole steps replayed from CUDA graphs (GPU only)."""

import copy
import os

import numpy as np
import pytest
import torch

from recblr_torchrec.config import load_config
from recblr_torchrec.data.loader import CANDIDATE_QUANTUM
from recblr_torchrec.data.padding import filler_lengths
from recblr_torchrec.training import NextItemTask, Trainer
from recblr_torchrec.training.graphs import GraphedStep, batch_signature, batch_tensors, copy_batch
from recblr_torchrec.training.optimizers import set_lr
from recblr_torchrec.training.placement import LocalPlacement, resolve_execution

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PREFIXES = ["data.max_users=150", "model.recblr.embedding_dim=16", "train.batch_size=64", "train.protocol=prefixes"]
PREFIXES += ["train.precision=fp32", "train.cuda_graphs=false"]  # what a test turns on, it names
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the H200)")


def trainer(tmp_path, name, data_dir, *overrides):
    config = load_config(TINY, PREFIXES + [f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return Trainer(config, str(tmp_path / name), data_dir)


def test_fillers_round_up_to_the_quantum_with_a_fixed_count_of_short_sequences():
    for quantum, longest in ((64, 50), (2048, 50), (8192, 50), (8192, 200), (7, 200), (1, 3), (5, 2), (9, 2)):
        counts = set()
        for n in list(range(0, 3 * quantum + 5)) if quantum < 100 else range(0, 5 * quantum, 97):
            extra = filler_lengths(n, quantum, longest)
            counts.add(len(extra))
            assert (n + extra.sum()) % quantum == 0 and extra.sum() < quantum + len(extra)
            assert extra.min() >= 1 and extra.max() <= longest, (n, quantum, longest, extra)
        assert len(counts) == 1, counts  # every batch gets as many fillers
    with pytest.raises(ValueError, match="longest=1"):
        filler_lengths(10, 8, 1)


@pytest.mark.parametrize(
    "protocol, loss, context",
    [
        ("prefixes", "full", 0),
        ("all_positions", "full", 0),
        ("prefixes", "sampled", 0),
        ("all_positions", "sampled", 0),
        ("all_positions", "full", 20),  # windows with context positions: no target there
    ],
)
def test_padded_batches_give_the_unpadded_loss_and_gradients(tmp_path, data_dir, protocol, loss, context):
    extra = [f"train.protocol={protocol}", f"train.loss={loss}", "train.num_negatives=300"]
    extra += [f"train.window_context={context}"]
    plain = trainer(tmp_path, "a", data_dir, "model.recblr.dropout=0.0", *extra)
    plain.train_batches.set_epoch(1)
    batch = plain.train_batches[0]
    padded_batches = copy.copy(plain.train_batches)
    padded_batches.pad = (512, int(plain.train_batches.samples.lengths.max()))
    padded = padded_batches[0]
    fillers = padded_batches.fillers_per_batch
    positions = batch.targets.numel()
    assert len(padded) == len(batch) + fillers and padded.targets.numel() % 512 == 0
    assert torch.equal(padded.user_ids[len(batch) :], torch.full((fillers,), -1))
    assert not padded.targets[positions:].any() and padded.num_targets == batch.num_targets
    if protocol == "prefixes":
        assert torch.equal(padded.target_rows, batch.target_rows)  # fillers come after, without targets
    else:  # every position, fillers too: as many rows as the padded shape has positions
        assert torch.equal(padded.target_rows, torch.arange(padded.targets.numel()))
        targets = positions if not context else int(batch.targets.count_nonzero())
        assert context == 0 or targets < positions  # context positions read, not predicted
        assert batch.num_targets == targets == int(padded.targets.count_nonzero())
        assert padded.to(plain.device).num_targets == targets  # counted on the host, moved or not
    if loss == "sampled":  # the candidate set padded with ids 0 in front, to a multiple of the quantum
        ids, padded_ids = batch.candidates(), padded.candidates()
        assert padded_ids.numel() % CANDIDATE_QUANTUM == 0 and padded_ids.numel() > ids.numel()
        assert torch.equal(padded_ids[-ids.numel() :], ids) and not padded_ids[: -ids.numel()].any()
        assert torch.isinf(padded.candidate_log_q[: -ids.numel()]).all()
    losses, grads = [], []
    for b in (batch.to(plain.device), padded.to(plain.device)):
        plain.model.zero_grad(set_to_none=True)
        loss = NextItemTask(plain.model, check_targets=False)(b)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in plain.model.parameters()])
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_padded_epoch_has_few_shapes_and_copies_refill_in_order(tmp_path, data_dir):
    run = trainer(tmp_path, "a", data_dir)
    run.train_batches.pad = (1024, int(run.train_batches.samples.lengths.max()))
    run.train_batches.set_epoch(1)
    batches = [run.train_batches[i] for i in range(len(run.train_batches))]
    shapes = {batch_signature(b) for b in batches}
    full = [b for b in batches if len(b) == len(batches[0])]
    assert len(shapes) <= 4 < len(batches), (len(shapes), len(batches))  # ~64 x 40 positions, 1,024 a step
    assert len({b.targets.numel() for b in full}) < len(full)
    copy = copy_batch(batches[0])
    assert batch_signature(copy) == batch_signature(batches[0])
    for mine, theirs in zip(batch_tensors(copy), batch_tensors(batches[0])):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.micro_batch_size=8", "train.micro_batch_size=8"),
        ("train.optimizer=adagrad", "train.optimizer=adagrad"),
        ("train.graph_quantum=0", "train.graph_quantum=0"),
    ],
)
def test_steps_that_cannot_be_captured_are_refused_by_name(override, message):
    base = ["train.cuda_graphs=true", "train.protocol=prefixes"]
    with pytest.raises(ValueError, match=message):
        load_config(TINY, base + [override])
    for allowed in ("model.encoder=sasrec", "train.optimizer=adamw", "train.loss=sampled"):  # padded to bounds
        load_config(TINY, base + [allowed])


def test_precision_and_cuda_graphs_default_to_auto_resolved_where_the_run_executes(tmp_path, data_dir, monkeypatch):
    config = load_config(TINY)
    assert (config.train.precision, config.train.cuda_graphs) == ("auto", "auto")
    on_cpu = trainer(tmp_path, "cpu", data_dir, "train.device=cpu", "train.precision=auto", "train.cuda_graphs=auto")
    assert (on_cpu.config.train.precision, on_cpu.config.train.cuda_graphs) == ("fp32", "off")
    assert on_cpu.graphed is None and on_cpu.train_batches.pad[1] == 0
    cuda = LocalPlacement(torch.device("cuda"))  # resolution only: nothing is placed on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    resolved = resolve_execution(config, cuda).train
    assert (resolved.precision, resolved.cuda_graphs) == ("bf16", "on")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert resolve_execution(config, cuda).train.precision == "fp32"
    for blocker in ("train.micro_batch_size=8", "train.optimizer=adagrad"):
        assert resolve_execution(load_config(TINY, [blocker]), cuda).train.cuda_graphs == "off", blocker
    pinned = resolve_execution(load_config(TINY, ["train.precision=fp32", "train.cuda_graphs=false"]), cuda).train
    assert (pinned.precision, pinned.cuda_graphs) == ("fp32", "off")  # the fp32 eager measurement
    assert load_config(TINY, ["train.cuda_graphs=true"]).train.cuda_graphs == "on"  # YAML booleans still read


def test_sharded_runs_capture_the_dense_part_of_pipelined_gpu_steps_and_refuse_graphs_elsewhere():
    from recblr_torchrec.distributed.env import DistEnv
    from recblr_torchrec.distributed.placement import ShardedPlacement

    def placement(device: str, *overrides: str):
        config = load_config(TINY, ["train.precision=fp32", *overrides])
        return ShardedPlacement(DistEnv(0, 1, 0, 1, torch.device(device), "gloo"), config), config

    gpu, config = placement("cuda")  # fused Adam shards the tables; the pipeline runs on GPU by default
    assert gpu.captures_steps and resolve_execution(config, gpu).train.cuda_graphs == "on"  # auto: captured
    gpu.check(load_config(TINY, ["train.cuda_graphs=true"]))
    for device, overrides, reason in [("cpu", [], "no GPU"), ("cuda", ["distributed.pipeline=none"], "no pipeline")]:
        other, config = placement(device, *overrides)
        assert not other.captures_steps and resolve_execution(config, other).train.cuda_graphs == "off"
        with pytest.raises(ValueError, match=reason):
            other.check(load_config(TINY, ["train.cuda_graphs=true", *overrides]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graphs_on_a_cpu_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        trainer(tmp_path, "a", data_dir, "train.cuda_graphs=true")


def paired_trainers(tmp_path, data_dir, *extra):
    """An eager and a graphed trainer with the same weights (no dropout), and epoch 1's batches on
    the GPU grouped by shape, the commonest shape first."""
    overrides = ("model.recblr.dropout=0.0", "train.cuda_graphs=true", "train.graph_quantum=1024", *extra)
    eager = trainer(tmp_path, "a", data_dir, *overrides)
    graphed = trainer(tmp_path, "b", data_dir, *overrides)
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.train_batches.set_epoch(1)
    by_shape = {}
    for i in range(len(graphed.train_batches)):
        batch = graphed.train_batches[i].to(graphed.device)
        by_shape.setdefault(batch_signature(batch), []).append(batch)
    return eager, graphed, sorted(by_shape.values(), key=len, reverse=True)


def assert_same_updates(eager, graphed, batches, stats):
    for batch in batches:  # stale inputs in a replay would differ by far more than these tolerances
        torch.testing.assert_close(graphed.train_step(batch), eager.update(batch), rtol=1e-4, atol=1e-6)
    assert graphed.graphed.stats() == {**stats, "failure": None}
    for (name, want), got in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=name)  # CUDA atomics: not bitwise


@GPU
@pytest.mark.parametrize(
    "protocol, architecture",
    [
        ("prefixes", "recblr"),
        ("all_positions", "recblr"),
        ("prefixes", "sasrec"),
        ("all_positions", "sasrec"),
        ("windows_with_context", "recblr"),
    ],
)
def test_graphed_steps_update_the_model_as_eager_steps_do(tmp_path, data_dir, protocol, architecture):
    # all_positions: 16 windows (~600 positions) a batch, so the 1,024-position shape repeats
    extra = ["train.protocol=all_positions", "train.batch_size=16"] if protocol != "prefixes" else []
    extra += ["train.window_context=20"] if protocol == "windows_with_context" else []
    if architecture == "sasrec":  # padded to data.max_len (50), not the batch's longest: no host read
        extra += ["model.encoder=sasrec", "model.sasrec.max_positions=64", "model.sasrec.embedding_dim=16"]
        extra += ["model.sasrec.dropout=0.0"]
    eager, graphed, shapes = paired_trainers(tmp_path, data_dir, *extra)
    assert type(graphed.model.encoder).__name__ == ("SASRecEncoder" if architecture == "sasrec" else "RecBLREncoder")
    if architecture == "sasrec":
        assert graphed.model.encoder.static_length == 50  # the trainer fixed the padding at data.max_len
    assert len(shapes[0]) >= 6  # one shape: 2 eager steps, a capture, replays
    if protocol != "prefixes":  # the target count varies inside the captured shape
        assert len({int(b.targets.count_nonzero()) for b in shapes[0][:6]}) > 1
    assert_same_updates(eager, graphed, shapes[0][:6], {"graphs": 1, "captures": 1, "replays": 4, "eager_steps": 2})


@GPU
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_replays_draw_new_dropout_masks(tmp_path, data_dir, dropout):
    run = trainer(tmp_path, "a", data_dir, f"model.recblr.dropout={dropout}")
    run.model.train()
    run.train_batches.set_epoch(1)
    batch = run.train_batches[0].to(run.device)
    forward = GraphedStep(lambda b: NextItemTask(run.model, check_targets=False)(b)[0].detach(), warmup=1)
    losses = [float(forward(batch)) for _ in range(4)]  # eager, capture + replay, replay, replay
    assert forward.stats()["replays"] == 3 and forward.failure is None
    if dropout:
        assert len(set(losses[1:])) == 3, losses  # a frozen seed would repeat the first replay's loss
    else:
        assert max(losses) - min(losses) < 1e-5, losses


@GPU
def test_a_graphed_run_trains_evaluates_and_resumes(tmp_path, data_dir):
    run = trainer(tmp_path, "a", data_dir, "train.cuda_graphs=true", "train.graph_quantum=1024", "train.max_epochs=2")
    run.fit()
    stats = run.graphed.stats()
    assert stats["failure"] is None and stats["replays"] > stats["eager_steps"], stats
    assert run.state["epoch"] == 2 and np.isfinite(run.history[-1]["train_loss"])
    resumed = trainer(
        tmp_path, "a", data_dir, "train.cuda_graphs=true", "train.graph_quantum=1024", "train.max_epochs=3"
    )
    resumed.fit()  # Adam's capturable state and the CUDA generator come back from the checkpoint
    assert resumed.state["epoch"] == 3 and resumed.graphed.stats()["failure"] is None


def test_a_resumed_run_takes_its_optimizer_capturable_flag_from_its_config(tmp_path, data_dir):
    first = trainer(tmp_path, "a", data_dir, "train.max_epochs=1")
    first.fit()
    path = tmp_path / "a" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:
        group["capturable"] = True  # as a train.cuda_graphs=true run on a GPU saves it
    torch.save(ckpt, path)
    resumed = trainer(tmp_path, "a", data_dir, "train.max_epochs=2")
    resumed.fit()  # a capturable Adam would refuse CPU parameters in its step
    assert [g["capturable"] for g in resumed.optimizer.param_groups] == [False]
    assert resumed.state["epoch"] == 2


@GPU
def test_a_learning_rate_set_between_replays_reaches_the_graphs(tmp_path, data_dir):
    eager, graphed, shapes = paired_trainers(tmp_path, data_dir)
    assert all(isinstance(group["lr"], torch.Tensor) for group in graphed.optimizer.param_groups)
    batches = shapes[0][:6]
    assert_same_updates(eager, graphed, batches[:4], {"graphs": 1, "captures": 1, "replays": 2, "eager_steps": 2})
    for trainer_ in (eager, graphed):  # a schedule's next value
        set_lr(trainer_.optimizer, 3e-2)
    assert_same_updates(eager, graphed, batches[4:], {"graphs": 1, "captures": 1, "replays": 4, "eager_steps": 2})


@GPU
def test_graphs_of_two_shapes_sharing_a_pool_update_as_eager_steps_do(tmp_path, data_dir):
    # 64 prefixes of at most 50 items a batch (~2,460 positions): 1,024 gives them all one shape, 256 several
    eager, graphed, shapes = paired_trainers(tmp_path, data_dir, "train.graph_quantum=256")
    assert len(shapes) >= 2 and len(shapes[1]) >= 4
    alternating = [batch for pair in zip(shapes[0][:4], shapes[1][:4]) for batch in pair]  # A, B, A, B, ...
    assert_same_updates(eager, graphed, alternating, {"graphs": 2, "captures": 2, "replays": 4, "eager_steps": 4})


@GPU
@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_the_sharded_steps_dense_part_replays_as_it_runs_eagerly(tmp_path, data_dir, monkeypatch, loss):
    import itertools
    import socket

    import torch.distributed as dist

    from recblr_torchrec.distributed.env import init_distributed
    from recblr_torchrec.distributed.placement import ShardedPlacement

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_PORT=port).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    env = init_distributed("nccl", 60, "cuda")  # DMP on one GPU, its pipeline and fused Adam
    losses, weights = {}, {}
    try:
        for graphs in ("false", "true"):  # 64 prefixes of <= 50 items padded to one shape of 8,192 positions
            extra = [f"train.cuda_graphs={graphs}", "train.graph_quantum=8192", "model.recblr.dropout=0.0"]
            extra += [f"train.loss={loss}", "train.num_negatives=300"]  # sampled: padded to 8,192 candidates
            config = load_config(TINY, PREFIXES + [f"data.cache_dir={tmp_path / 'cache'}", *extra])
            placement = ShardedPlacement(env, config)
            run = Trainer(config, str(tmp_path / graphs), data_dir, placement)
            run.module.train()
            run.train_batches.set_epoch(1)
            steps = placement.steps(run.loader(run.train_batches), run)
            losses[graphs] = torch.stack([loss.float() for loss in itertools.islice(steps, 6)])
            steps.close()
            weights[graphs] = {k: v.detach().clone() for k, v in run.model.encoder.state_dict().items()}
        stats = placement.dense_step.stats()
    finally:
        dist.destroy_process_group()
    assert stats == {"graphs": 1, "captures": 1, "replays": 4, "eager_steps": 2, "failure": None}
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-4, atol=1e-6)
    for name, want in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], want, rtol=1e-3, atol=1e-4, msg=name)
