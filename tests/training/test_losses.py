import os

import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec.training.losses import full_softmax_loss, sampled_softmax_loss


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("ignore_padding", [False, True])
def test_chunked_loss_and_gradients_equal_masked_cross_entropy(chunk, ignore_padding):
    """With ``ignore_padding`` the padding targets (fillers of a padded batch) carry no loss, as
    ``F.cross_entropy(ignore_index=0)`` does."""
    torch.manual_seed(chunk)
    hidden = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    catalog = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 9, (13,))
    fillers = [0, 5, 6, 12]
    if ignore_padding:
        targets[fillers] = 0
    loss = full_softmax_loss(hidden, targets, catalog, chunk=chunk, ignore_padding=ignore_padding)
    grads = torch.autograd.grad(loss, (hidden, catalog))
    logits = hidden @ catalog.T
    logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
    expected = F.cross_entropy(logits, targets, ignore_index=0 if ignore_padding else -100)
    expected_grads = torch.autograd.grad(expected, (hidden, catalog))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if not ignore_padding:
        return
    assert grads[0][fillers].abs().max() == 0  # fillers get no gradient
    empty = full_softmax_loss(hidden, torch.zeros_like(targets), catalog, chunk=chunk, ignore_padding=True)
    assert empty.item() == 0.0 and not torch.autograd.grad(empty, hidden)[0].any()
    with pytest.raises(ValueError, match=r"targets must be item ids in \[0, 9\)"):
        full_softmax_loss(hidden, torch.full_like(targets, -1), catalog, ignore_padding=True)


@pytest.mark.parametrize("chunk", [1, 5, 100])
@pytest.mark.parametrize("ignore_padding", [False, True])
@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_label_smoothing_spreads_its_mass_over_the_real_items_only(chunk, ignore_padding, epsilon):
    """The smoothed loss and its gradients equal PyTorch's over the catalog without its padding
    column (whose logit is -inf here, where PyTorch's own smoothing would give inf)."""
    torch.manual_seed(chunk)
    hidden = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    catalog = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 7, (11,))
    if ignore_padding:
        targets[[2, 3, 10]] = 0
    loss = full_softmax_loss(
        hidden, targets, catalog, chunk=chunk, ignore_padding=ignore_padding, label_smoothing=epsilon
    )
    grads = torch.autograd.grad(loss, (hidden, catalog))
    expected = F.cross_entropy((hidden @ catalog.T)[:, 1:], targets - 1, ignore_index=-1, label_smoothing=epsilon)
    expected_grads = torch.autograd.grad(expected, (hidden, catalog))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert grads[1][0].abs().max() == 0  # the padding row is never a candidate
    plain = full_softmax_loss(hidden, targets, catalog, ignore_padding=ignore_padding)
    assert loss.item() != pytest.approx(plain.item())
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        full_softmax_loss(hidden, targets, catalog, ignore_padding=ignore_padding, label_smoothing=1.0)


def test_label_smoothing_of_bf16_inputs_sums_in_fp32():
    torch.manual_seed(3)
    hidden = torch.randn(9, 8).bfloat16().requires_grad_()
    catalog = torch.randn(6, 8).bfloat16().requires_grad_()
    targets = torch.tensor([1, 2, 3, 4, 5, 1, 2, 0, 0])
    loss = full_softmax_loss(hidden, targets, catalog, chunk=4, ignore_padding=True, label_smoothing=0.3)
    grads = torch.autograd.grad(loss, (hidden, catalog))
    exact = [t.detach().double().requires_grad_() for t in (hidden, catalog)]
    logits = (exact[0] @ exact[1].T)[:, 1:]
    expected = F.cross_entropy(logits, targets - 1, ignore_index=-1, label_smoothing=0.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=5e-3, atol=0)  # bf16 logits, fp32 sums
    for got, want in zip(grads, torch.autograd.grad(expected, exact)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("bad", [0, 4])
def test_targets_outside_the_catalog_are_refused_unless_the_check_is_skipped(bad):
    hidden, catalog = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"targets must be item ids in \[1, 4\)"):
        full_softmax_loss(hidden, torch.tensor([bad, 1]), catalog)
    targets = torch.tensor([3, 1])
    checked = full_softmax_loss(hidden, targets, catalog)
    torch.testing.assert_close(full_softmax_loss(hidden, targets, catalog, check_targets=False), checked)


def test_sampled_loss_over_the_whole_catalog_without_correction_is_the_full_loss():
    torch.manual_seed(0)
    hidden = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 2, 7, 3, 3, 3, 5, 6, 1, 4])  # repeated targets: accidental hits
    ids = torch.arange(1, 8)
    sampled = sampled_softmax_loss(hidden, targets, ids, table[1:], torch.zeros(7, dtype=torch.float64))
    full = full_softmax_loss(hidden, targets, table)
    torch.testing.assert_close(sampled, full.to(sampled.dtype), rtol=0, atol=1e-6)
    got = torch.autograd.grad(sampled, (hidden, table))
    want = torch.autograd.grad(full_softmax_loss(hidden, targets, table), (hidden, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_padding_candidates_and_padding_rows_take_no_part_in_the_sampled_loss():
    torch.manual_seed(0)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    ids, log_q = torch.tensor([2, 3, 5, 8, 9]), torch.rand(5, dtype=torch.float64)
    targets = torch.tensor([3, 9, 0, 2, 0, 3])  # rows 2 and 4: fillers' padding targets
    real = targets > 0
    want = sampled_softmax_loss(hidden[real], targets[real], ids, candidates, log_q)
    padded_ids = torch.cat([torch.zeros(3, dtype=torch.int64), ids])  # a fixed candidate count for CUDA graphs
    padded_rows = torch.cat([torch.zeros(3, 4, dtype=torch.float64), candidates])
    padded_log_q = torch.cat([torch.full((3,), float("inf"), dtype=torch.float64), log_q])
    got = sampled_softmax_loss(hidden, targets, padded_ids, padded_rows, padded_log_q, ignore_padding=True)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (hidden, candidates)), torch.autograd.grad(want, (hidden, candidates))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert (
        float(
            sampled_softmax_loss(hidden, torch.zeros(6, dtype=torch.int64), ids, candidates, log_q, ignore_padding=True)
        )
        == 0.0
    )


def test_log_q_correction_lowers_the_logits_of_frequently_sampled_candidates():
    hidden = torch.ones(1, 2)
    candidates = torch.ones(3, 2)  # equal raw logits
    ids, targets = torch.tensor([1, 2, 3]), torch.tensor([1])
    plain = sampled_softmax_loss(hidden, targets, ids, candidates, torch.zeros(3))
    # The target sampled often (log q high): its logit drops, so the loss rises.
    corrected = sampled_softmax_loss(hidden, targets, ids, candidates, torch.tensor([2.0, 0.0, 0.0]))
    assert plain == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-6)
    assert corrected > plain


def test_a_target_outside_the_candidate_set_is_refused_unless_the_check_is_skipped():
    hidden, ids, candidates = torch.randn(2, 2), torch.tensor([1, 2]), torch.randn(2, 2)
    with pytest.raises(ValueError, match="candidate set"):
        sampled_softmax_loss(hidden, torch.tensor([4, 1]), ids, candidates, torch.zeros(2))
    targets = torch.tensor([2, 1])
    checked = sampled_softmax_loss(hidden, targets, ids, candidates, torch.zeros(2))
    unchecked = sampled_softmax_loss(hidden, targets, ids, candidates, torch.zeros(2), check_targets=False)
    torch.testing.assert_close(unchecked, checked)


@pytest.mark.parametrize("smoothing, temperature", [(0.0, 0.0), (0.2, 0.0), (0.0, 0.1)])
def test_full_catalog_carried_by_the_batch_gives_the_local_loss_and_gradients(
    data_dir, tmp_path, smoothing, temperature
):
    """The distributed path (candidates 1..V-1 looked up with the histories) == the local path,
    with and without label smoothing, with dot-product and cosine scores."""
    from recblr_torchrec.config import load_config
    from recblr_torchrec.data import SampleBatches, training_samples
    from recblr_torchrec.data.negatives import FullCatalog
    from recblr_torchrec.modules import SequenceRecommender
    from recblr_torchrec.training.task import NextItemTask
    from recblr_torchrec.training.trainer import load_data

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = [
        "data.max_users=40",
        "model.recblr.embedding_dim=16",
        "model.recblr.dropout=0.0",
        f"model.score_temperature={temperature}",
        f"data.cache_dir={tmp_path}",
    ]
    config = load_config(os.path.join(root, "configs", "tiny.yaml"), overrides)
    data = load_data(config, data_dir)
    samples = training_samples(data, 20, "all_positions")
    plain = SampleBatches(data, samples, 8, True, seed=1)
    carried = SampleBatches(data, samples, 8, True, seed=1, candidates=FullCatalog(data.num_items + 1))
    plain.set_epoch(1)
    carried.set_epoch(1)
    torch.manual_seed(0)
    model = SequenceRecommender(data.num_items + 1, config.model, candidate_feature=True)
    local_model = SequenceRecommender(data.num_items + 1, config.model)
    local_model.load_state_dict(model.state_dict())
    local = NextItemTask(local_model, label_smoothing=smoothing)(plain[0])[0]
    local_grads = torch.autograd.grad(local, list(local_model.parameters()))
    distributed = NextItemTask(model, label_smoothing=smoothing)(carried[0])[0]
    grads = torch.autograd.grad(distributed, list(model.parameters()))
    torch.testing.assert_close(distributed, local, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, local_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if smoothing:  # it reached the loss (the logits of a fresh model are small: so is the change)
        assert abs(local.item() - NextItemTask(local_model)(plain[0])[0].item()) > 1e-5
    if temperature:  # the logits are the cosines of user vector and item over the temperature
        hidden = local_model(plain[0].item_history)
        logits = F.cosine_similarity(hidden[:, None], local_model.item_table()[None], dim=-1) / temperature
        logits[:, 0] = float("-inf")
        expected = F.cross_entropy(logits, plain[0].targets, ignore_index=0)
        torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-6)
    # the task that DistributedModelParallel wraps (world size 1) passes the smoothing on too
    task_loss = NextItemTask(model, 1, label_smoothing=smoothing)(carried[0])[0]
    torch.testing.assert_close(task_loss, distributed, rtol=1e-6, atol=1e-7)
