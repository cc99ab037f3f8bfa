"""Functions run on each of 2 gloo ranks by the distributed tests (module level, so spawn can pickle them)."""

import contextlib
import copy
import dataclasses
import math
import os
from typing import Any, Dict

import torch

from recblr_torchrec.config import DistributedConfig, load_config
from recblr_torchrec.data import SampleBatches, evaluation_samples, training_samples
from recblr_torchrec.data.negatives import FullCatalog, SampledCandidates, item_frequencies, no_candidates
from recblr_torchrec.distributed.env import DistEnv
from recblr_torchrec.evaluation import evaluate
from recblr_torchrec.modules import ContextConfig, SequenceRecommender
from recblr_torchrec.training.optimizers import RateSchedule, optimizer_factory
from recblr_torchrec.training.task import NextItemTask
from recblr_torchrec.training.trainer import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# 61 users: the last evaluation batch of 30 holds one user, so rank 1 gets a filler row.
SMALL = ["data.max_users=61", "data.max_len=20", "model.recblr.embedding_dim=16", "model.recblr.num_layers=1"]
SMALL += ["train.batch_size=16", "eval.batch_size=15", "train.num_workers=0", "eval.item_chunk_size=500"]


# Sharded tables under FBGEMM's fused row-wise Adagrad at Adam's learning rate: the runs these
# tests check were recorded with it (TorchRec has no fused Adam on CPU).
ROW_WISE_ADAGRAD = ["distributed.sparse_optimizer=rowwise_adagrad", "distributed.sparse_lr=0.001"]
ITEM_WEIGHT = "model.item_embeddings.embeddings.item.weight"
CONTEXT_WEIGHT = "model.context_embeddings.embedding_bags.context_user.weight"
CONTEXT = ContextConfig(user_buckets=13, join="input")


def _table(model, key: str = ITEM_WEIGHT) -> Dict[str, Any]:
    """This rank's shards of a table: {(row, col): tensor}."""
    weight = model.state_dict()[key]
    if not hasattr(weight, "local_shards"):  # data-parallel: replicated
        return {(0, 0): weight.detach().clone()}
    return {tuple(s.metadata.shard_offsets): s.tensor.detach().clone() for s in weight.local_shards()}


def _assert_table(shards: Dict[Any, torch.Tensor], full: torch.Tensor, what: str) -> None:
    for (row, col), tensor in shards.items():
        expected = full[row : row + tensor.shape[0], col : col + tensor.shape[1]]
        torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-6, msg=what)


def sharded_equals_local(rank: int, world: int, data_dir: str, cache: str) -> Dict[str, Any]:
    """Forward (TW/RW/CW), one step (SGD; Adagrad row-wise) and evaluation against local mode.

    The model has both collections: the item table (EmbeddingCollection) and a user-bucket
    context table (EmbeddingBagCollection, joined at the encoder's input), sharded alike."""
    from recblr_torchrec.distributed.sharding import build_optimizer, copy_into_sharded, shard_model

    config = load_config(TINY, SMALL + [f"data.cache_dir={cache}", "model.recblr.dropout=0.0", "train.lr=0.05"])
    data = load_data(config, data_dir)
    num_embeddings = data.num_items + 1
    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    samples = training_samples(data, config.data.max_len, config.train.protocol)
    catalog = FullCatalog(num_embeddings)
    whole = SampleBatches(data, samples, 16, True, seed=7, candidates=catalog, user_buckets=13)
    mine = SampleBatches(data, samples, 16, True, 7, rank, world, candidates=catalog, user_buckets=13)
    whole.set_epoch(1)
    mine.set_epoch(1)
    global_batch, my_batch = whole[0], mine[0]
    torch.manual_seed(0)
    reference = SequenceRecommender(num_embeddings, config.model, candidate_feature=True, context=CONTEXT)
    checked, evaluations = [], []
    e = config.eval
    split = evaluation_samples(data, config.data.max_len, "valid")
    ranked = SampleBatches(data, split, 30, False, 0, rank, world, candidates=no_candidates, user_buckets=13)
    single = SampleBatches(data, split, 30, False, candidates=no_candidates, user_buckets=13)
    # (item table, context table, optimizer, score temperature: 0 dot products, else cosines, and
    # whether it is learned); TorchRec has no row-wise EmbeddingBagCollection on CPU.
    cases = [
        ("table_wise", "table_wise", "sgd", 0.0, False),
        ("row_wise", "column_wise", "sgd", 0.1, True),
        ("column_wise", "column_wise", "sgd", 0.1, False),
        ("row_wise", "data_parallel", "adagrad", 0.0, False),
    ]
    for sharding, context_sharding, optimizer, temperature, learned in cases:
        config.train.optimizer = optimizer
        config.model.score_temperature = temperature
        config.model.learn_temperature = learned
        state = dict(reference.state_dict())
        if learned:  # the learned temperature, moved off its start (0.1) so that its value matters
            state["score_scale"] = torch.tensor(math.log(1 / 0.07))
        types = {"item": sharding, "context_user": context_sharding}
        dc = DistributedConfig(sharding_types=types, sparse_optimizer=optimizer, timeout_s=60)
        meta = SequenceRecommender(
            num_embeddings, config.model, torch.device("meta"), candidate_feature=True, context=CONTEXT
        )
        dmp = shard_model(NextItemTask(meta, world), dc, config.train, env)
        copy_into_sharded(dmp, {f"model.{k}": v for k, v in state.items()})
        plan = str(dmp.plan)
        assert sharding in plan and context_sharding in plan, plan
        # Forward: sharded lookup + encoder on this rank's slice == the unsharded model's.
        with torch.no_grad():
            hidden, candidates = dmp.module.model.embed(my_batch.item_history, my_batch.context)
            ref_hidden, ref_candidates = reference.embed(my_batch.item_history, my_batch.context)
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(candidates, ref_candidates, rtol=1e-5, atol=1e-6)
        # One step on 2 ranks == one local step on the global batch, same optimizer.
        local = SequenceRecommender(num_embeddings, config.model, candidate_feature=True, context=CONTEXT)
        local.load_state_dict(state)
        local_opt = optimizer_factory(config.train)(local.parameters())
        local_loss = NextItemTask(local)(global_batch)[0]
        local_loss.backward()
        local_opt.step()
        opt = build_optimizer(dmp, config.train)
        share, _ = dmp(my_batch)
        share.backward()
        opt.step()
        total = share.detach() / world
        torch.distributed.all_reduce(total)
        torch.testing.assert_close(total, local_loss.detach(), rtol=1e-5, atol=1e-6)
        local_context = local.context_embeddings.embedding_bags["context_user"].weight.detach()
        _assert_table(_table(dmp, CONTEXT_WEIGHT), local_context, f"{sharding} context table")
        sharded_dense = dmp.module.model.state_dict()
        sharded_params = dict(dmp.module.model.named_parameters())
        for name, value in local.state_dict().items():
            if name.endswith(".weight") and ("item_embeddings" in name or "context_embeddings" in name):
                continue
            grad = dict(local.named_parameters())[name].grad
            sharded_grad = sharded_params[name].grad
            torch.testing.assert_close(sharded_grad, grad, rtol=1e-4, atol=1e-7, msg=f"{sharding} {name} grad")
            # Adagrad's first step moves a weight by lr * g / |g|: where |g| is at the level of the
            # float sums' rounding (which differs between one process and two), its sign is noise
            # and the step is +-lr either way; compare the weights where g is clearly nonzero.
            steady = ... if optimizer == "sgd" else grad.abs() > 1e-4 * grad.abs().max()
            sharded = sharded_dense[name]
            torch.testing.assert_close(sharded[steady], value[steady], rtol=1e-4, atol=1e-6, msg=f"{sharding} {name}")
        _assert_table(_table(dmp), local.item_embeddings.embeddings["item"].weight.detach(), f"{sharding} table")
        checked.append(f"{sharding}/{context_sharding}/{optimizer}")
        # Evaluation over ranks (with a filler row on rank 1) == single-process evaluation; row-wise and
        # table-wise tables rank against local rows, column-wise ones look the catalog up.
        merged = evaluate(dmp.module.model, ranked, env.device, e.ks, 500, torch.distributed.group.WORLD)
        evaluations.append((merged, evaluate(local, single, env.device, e.ks, 500)))
    fillers = sum(int((b.user_ids < 0).sum()) for b in ranked)
    return {"checked": checked, "evaluations": evaluations, "fillers": fillers}


def sampled_softmax_step(rank: int, world: int, data_dir: str, cache: str) -> Dict[str, Any]:
    """Sampled softmax through the row-wise sharded lookup: finite loss, rows updated, equal to local."""
    from recblr_torchrec.distributed.sharding import build_optimizer, copy_into_sharded, shard_model

    config = load_config(TINY, SMALL + [f"data.cache_dir={cache}", "model.recblr.dropout=0.0", "train.optimizer=sgd"])
    data = load_data(config, data_dir)
    num_embeddings = data.num_items + 1
    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    samples = training_samples(data, config.data.max_len, config.train.protocol)
    sampler = SampledCandidates(item_frequencies(data), 64, "popularity", seed=3)
    mine = SampleBatches(data, samples, 16, True, seed=7, rank=rank, world_size=world, candidates=sampler)
    mine.set_epoch(1)
    batch = mine[0]
    torch.manual_seed(0)
    reference = SequenceRecommender(num_embeddings, config.model, candidate_feature=True)
    dc = DistributedConfig(sharding_types={"item": "row_wise"}, sparse_optimizer="sgd")
    meta = SequenceRecommender(num_embeddings, config.model, device=torch.device("meta"), candidate_feature=True)
    dmp = shard_model(NextItemTask(meta, world), dc, config.train, env)
    copy_into_sharded(dmp, {f"model.{k}": v for k, v in reference.state_dict().items()})
    before = _table(dmp)
    opt = build_optimizer(dmp, config.train)
    share, stats = dmp(batch)
    share.backward()
    opt.step()
    local_share, local_count = NextItemTask(reference, world)(batch)
    schedule = RateSchedule(opt, dataclasses.replace(config.train, warmup_steps=4), steps_per_epoch=10)
    schedule.apply(0)  # the first warm-up step: a quarter of each group's rate, the fused tables' too
    return {
        "share": float(share),
        "local_share": float(local_share),
        "count": int(stats[1]),
        "changed": sum(int((before[k] != v).any(dim=1).sum()) for k, v in _table(dmp).items()),
        "rates": [float(group["lr"]) for group in opt.param_groups],
        "base_rates": schedule.base,
    }


def kill_and_resume(rank: int, world: int, data_dir: str, cache: str, out: str) -> Dict[str, Any]:
    """A run stopped mid-epoch and resumed from its DCP checkpoint ends where a straight run ends."""
    from recblr_torchrec.distributed.placement import ShardedPlacement
    from recblr_torchrec.training.trainer import Interrupted, Trainer

    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    overrides = SMALL + [f"data.cache_dir={cache}", "train.max_epochs=2", "train.checkpoint_every=2"]
    overrides += ["distributed.sharding_types={item: row_wise}", "distributed.timeout_s=60"] + ROW_WISE_ADAGRAD
    config = load_config(TINY, overrides)
    straight = Trainer(config, os.path.join(out, "straight"), data_dir, ShardedPlacement(env, config))
    straight.fit()
    steps_per_epoch = straight.train_batches.batches_per_epoch
    straight_metrics = straight.finish()
    interrupted = Trainer(config, os.path.join(out, "resumed"), data_dir, ShardedPlacement(env, config))
    interrupted.stop_at_step = steps_per_epoch + 3  # mid-epoch 2, one step after the checkpoint at batch 2
    try:
        interrupted.fit()
        raise AssertionError("the run was not interrupted")
    except Interrupted:
        pass
    del interrupted
    resumed = Trainer(config, os.path.join(out, "resumed"), data_dir, ShardedPlacement(env, config))
    assert resumed.resume()
    resumed_at = (resumed.state["step"], resumed.state["batch"])
    resumed.fit()
    resumed_metrics = resumed.finish()
    a, b = _table(straight.module), _table(resumed.module)
    same_table = all(torch.equal(a[k], b[k]) for k in a)
    dense_a, dense_b = straight.model.encoder.state_dict(), resumed.model.encoder.state_dict()
    same_dense = all(torch.equal(dense_a[k], dense_b[k]) for k in dense_a)
    return {
        "steps_per_epoch": steps_per_epoch,
        "resumed_at": resumed_at,
        "losses": ([r["train_loss"] for r in straight.history], [r["train_loss"] for r in resumed.history]),
        "metrics": (straight_metrics["test"], resumed_metrics["test"]),
        "same_table": same_table,
        "same_dense": same_dense,
    }


def resume_on_fewer_ranks(rank: int, world: int, data_dir: str, cache: str, out: str) -> Dict[str, Any]:
    """The 2-rank run's checkpoint resumed by 1 rank (a job restarted on fewer nodes): DCP
    reshards the tables and optimizer states, the global batches continue where they stopped."""
    from recblr_torchrec.distributed.placement import ShardedPlacement
    from recblr_torchrec.training.trainer import Trainer

    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    overrides = SMALL + [f"data.cache_dir={cache}", "train.max_epochs=3", "train.checkpoint_every=2"]
    overrides += ["distributed.sharding_types={item: row_wise}", "distributed.timeout_s=60"] + ROW_WISE_ADAGRAD
    config = load_config(TINY, overrides)
    trainer = Trainer(config, os.path.join(out, "straight"), data_dir, ShardedPlacement(env, config))
    assert trainer.resume()
    before = trainer.state["epoch"]
    trainer.fit()
    return {"resumed_after_epoch": before, "epochs": [row["epoch"] for row in trainer.history]}


def tiny_run_and_fallback(rank: int, world: int, data_dir: str, cache: str, out: str) -> Dict[str, Any]:
    """configs/tiny.yaml as shipped on 2 ranks (the launcher's sharded path), then its newest DCP
    checkpoint made unreadable and the run started again: it resumes from the one before."""
    import glob

    import torch.distributed as dist

    from recblr_torchrec.distributed.placement import ShardedPlacement
    from recblr_torchrec.training.trainer import Trainer

    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    config = load_config(TINY, [f"data.cache_dir={cache}", "distributed.timeout_s=60", *ROW_WISE_ADAGRAD])
    folder = os.path.join(out, "tiny")
    straight = Trainer(config, folder, data_dir, ShardedPlacement(env, config))
    straight.fit()
    summary = straight.finish()
    newest, older = sorted(glob.glob(os.path.join(folder, "checkpoints", "dcp", "step-*")), reverse=True)
    dist.barrier()
    if rank == 0:
        os.remove(sorted(glob.glob(os.path.join(newest, "*.distcp")))[-1])  # a shard file lost
    dist.barrier()
    again = Trainer(config, folder, data_dir, ShardedPlacement(env, config))
    again.fit()  # resumes after epoch 2 and trains epoch 3 again
    return {
        "summary": {split: summary[split] for split in ("valid", "test")},
        "losses": [row["train_loss"] for row in straight.history],
        "again": [row["train_loss"] for row in again.history],
        "resumed_from": again.resumed_from,
        "older": older,
    }


def tiny_parity(rank: int, world: int, data_dir: str, cache: str, out: str, epochs: int) -> Dict[str, Any]:
    """configs/tiny.yaml through DMP with the shipped defaults (the tables trained as in one process),
    for ``epochs``; and one step of a fresh run against one local step on the same global batch."""
    from recblr_torchrec.distributed.placement import ShardedPlacement
    from recblr_torchrec.training import Trainer

    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    overrides = [f"data.cache_dir={cache}", "distributed.timeout_s=60", f"train.max_epochs={epochs}"]
    config = load_config(TINY, overrides)
    still = load_config(TINY, overrides + ["model.recblr.dropout=0.0"])  # one step each, the same masks (none)
    first = Trainer(still, os.path.join(out, "step"), data_dir, ShardedPlacement(env, still))
    local = Trainer(
        load_config(TINY, overrides + ["model.recblr.dropout=0.0", "train.device=cpu"]),
        os.path.join(out, f"local{rank}"),
        data_dir,
    )
    for trainer in (first, local):
        trainer.train_batches.set_epoch(1)
        trainer.train_step(trainer.train_batches[0])  # rank r's slice / the whole global batch
    differences = {}
    gradients = dict(local.model.named_parameters())
    for name, value in first.model.state_dict().items():
        # Adam's first step moves a weight by lr * g / |g|: where |g| is at the level of the float sums'
        # rounding (which differs between one process and two), its sign is noise; compare elsewhere.
        grad = gradients[name].grad
        steady = grad.abs() > 1e-4 * grad.abs().max()
        differences[name] = float((value - local.model.state_dict()[name])[steady].abs().max())
    run = Trainer(config, os.path.join(out, "run"), data_dir, ShardedPlacement(env, config))
    run.fit()
    summary = run.finish()
    return {
        "placement": run.placement.notice,
        "step_differences": differences,
        "losses": [row["train_loss"] for row in run.history],
        "valid": [row["valid_NDCG@10"] for row in run.history],
        "test": summary["test"]["NDCG@10"],
    }


def pipelined_dense_step(rank: int, world: int, data_dir: str, cache: str) -> Dict[str, Any]:
    """Two steps through TrainPipelineSparseDist with the dense part as one DenseStep (called past
    DDP, its gradients averaged by the step), on each rank's share padded as for CUDA graphs,
    against two plain DMP steps on the unpadded shares from the same weights; and a replicated
    table, which the dense step refuses."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recblr_torchrec.distributed.dense_step import DenseStep, TablesOnly
    from recblr_torchrec.distributed.sharding import build_optimizer, copy_into_sharded, shard_model

    config = load_config(TINY, SMALL + [f"data.cache_dir={cache}", "model.recblr.dropout=0.0", "train.lr=0.05"])
    data = load_data(config, data_dir)
    num_embeddings = data.num_items + 1
    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    samples = training_samples(data, config.data.max_len, config.train.protocol)
    mine = SampleBatches(
        data, samples, 16, True, 7, rank, world, candidates=FullCatalog(num_embeddings), user_buckets=13
    )
    mine.set_epoch(1)
    batches = [mine[0], mine[1]]
    padded = copy.copy(mine)
    padded.pad = (64, int(samples.lengths.max()))  # fillers up to a multiple of 64 positions
    padded_batches = [padded[0], padded[1]]
    assert padded_batches[0].target_total is not None and padded_batches[0].targets.numel() % 64 == 0
    torch.manual_seed(0)
    reference = SequenceRecommender(num_embeddings, config.model, candidate_feature=True, context=CONTEXT)
    full_state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    config.train.optimizer = "sgd"  # exact: padding reorders float sums, which Adagrad's first step would amplify
    dc = DistributedConfig(sharding_types={"item": "row_wise", "context_user": "table_wise"}, sparse_optimizer="sgd")
    models, losses = [], []
    for pipelined in (False, True):
        meta = SequenceRecommender(num_embeddings, config.model, torch.device("meta"), True, CONTEXT)
        dmp = shard_model(NextItemTask(meta, world), dc, config.train, env)
        copy_into_sharded(dmp, full_state)
        optimizer = build_optimizer(dmp, config.train)
        if not pipelined:
            for batch in batches:
                optimizer.zero_grad()
                share, stats = dmp(batch)
                share.backward()
                optimizer.step()
                losses.append(float(stats[0]))
        else:
            task = dmp.module
            task.dense_step = DenseStep(task, optimizer, world, contextlib.nullcontext, False)
            pipeline = TrainPipelineSparseDist(dmp, TablesOnly(optimizer), env.device, custom_model_fwd=task)
            stream = iter(padded_batches)
            losses += [float(pipeline.progress(stream)[0]) for _ in batches]
            pipeline.detach()
        models.append(dmp)
    replicated = DistributedConfig(sharding_types={"item": "row_wise", "context_user": "data_parallel"})
    replicated.sparse_optimizer = "sgd"
    meta = SequenceRecommender(num_embeddings, config.model, torch.device("meta"), True, CONTEXT)
    dmp = shard_model(NextItemTask(meta, world), replicated, config.train, env)
    try:
        DenseStep(dmp.module, build_optimizer(dmp, config.train), world, contextlib.nullcontext, False)
        refused = ""
    except ValueError as error:
        refused = str(error)
    plain, piped = models
    dense = {
        name: float((value - piped.module.model.state_dict()[name]).abs().max())
        for name, value in plain.module.model.state_dict().items()
        if "embeddings" not in name
    }
    moved = {
        name: float((value - reference.state_dict()[name]).abs().max())
        for name, value in plain.module.model.state_dict().items()
        if "embeddings" not in name
    }
    tables = {}
    for key in (ITEM_WEIGHT, CONTEXT_WEIGHT):
        a, b = _table(plain, key), _table(piped, key)
        tables[key] = max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)  # table-wise: one rank
    return {"losses": losses, "dense": dense, "moved": moved, "tables": tables, "refused": refused}
