import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recblr_torchrec import KernelBackend
from recblr_torchrec.modules import (
    GatedRecurrent,
    ModelConfig,
    RecBLRConfig,
    RecBLREncoder,
    RecBLRLayer,
    SequenceRecommender,
    set_kernels,
)

LENGTHS = [1, 2, 3, 7, 5]  # odd lengths, unsorted
GPU = torch.cuda.is_available()


def device_of(backend):
    """Where a backend's test runs: Triton on the GPU when there is one (the interpreter, on CPU
    tensors, only where there is none: tests/conftest.py), the reference on the CPU."""
    return torch.device("cuda" if backend == "triton" and GPU else "cpu")


def close_grads(got, want, device):
    """Gradients of two runs of the same math: bitwise-near on the CPU, within the float32 sums'
    reordering on the GPU (the Triton backward kernels accumulate with atomics)."""
    tol = dict(rtol=1e-5, atol=1e-6) if device.type == "cuda" else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def make_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    config = RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0, **overrides)
    encoder = RecBLREncoder(config).double()
    # random (not initial) weights, so every parameter matters
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return encoder


def padded_from_jagged(values, lengths, steps, fill):
    out = torch.full((len(lengths), steps, values.shape[-1]), fill, dtype=values.dtype)
    start = 0
    for row, length in enumerate(lengths):
        out[row, :length] = values[start : start + length]
        start += length
    return out


def test_jagged_equals_padded_at_every_real_position():
    encoder = make_encoder()
    values = torch.randn(sum(LENGTHS), 8, dtype=torch.float64)
    offsets = torch.tensor([0] + LENGTHS).cumsum(0)
    jagged = encoder(values, offsets=offsets)
    padded = encoder(padded_from_jagged(values, LENGTHS, 9, 0.0), lengths=torch.tensor(LENGTHS))
    start = 0
    for row, length in enumerate(LENGTHS):
        torch.testing.assert_close(jagged[start : start + length], padded[row, :length], rtol=0, atol=1e-10)
        assert torch.all(padded[row, length:] == 0)
        start += length


def test_padding_never_changes_real_outputs():
    encoder = make_encoder(1)
    values = torch.randn(sum(LENGTHS), 8, dtype=torch.float64)
    short = encoder(padded_from_jagged(values, LENGTHS, 7, 0.0))
    long_garbage = encoder(padded_from_jagged(values, LENGTHS, 13, 1e3))
    for row, length in enumerate(LENGTHS):
        torch.testing.assert_close(short[row, :length], long_garbage[row, :length], rtol=0, atol=1e-10)


def test_encoder_is_causal():
    encoder = make_encoder(2)
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    base = encoder(x)
    for t in (0, 4, 10):
        changed = x.clone()
        changed[:, t] += torch.randn(3, 8, dtype=torch.float64)
        out = encoder(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t], base[:, t])


def test_zero_length_sequences_in_a_jagged_batch():
    encoder = make_encoder(3)
    lengths = [0, 3, 0, 2]
    values = torch.randn(5, 8, dtype=torch.float64)
    out = encoder(values, offsets=torch.tensor([0] + lengths).cumsum(0))
    alone = encoder(values[:3], offsets=torch.tensor([0, 3]))
    torch.testing.assert_close(out[:3], alone, rtol=0, atol=1e-10)


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = SequenceRecommender(2001, ModelConfig(recblr=RecBLRConfig(embedding_dim=64)))
    block = model.encoder.layers[0].recurrent
    decay = torch.exp(-torch.nn.functional.softplus(block.decay_param))
    assert math.isclose(decay[0].item(), 0.9, rel_tol=1e-6) and math.isclose(decay[-1].item(), 0.999, rel_tol=1e-6)
    assert abs(block.decay_param[0].item() + 2.197) < 1e-3 and abs(block.decay_param[-1].item() + 6.907) < 1e-3
    table = model.item_embeddings.embeddings["item"].weight
    assert abs(table.std().item() - 0.02) < 1e-3
    assert abs(block.input_proj.weight.std().item() - 0.02) < 2e-3
    assert torch.all(block.gate_proj.bias == 0) and torch.all(model.encoder.layers[0].ffn_in.bias == 0)
    per_layer = sum(p.numel() for p in model.encoder.layers[0].parameters())
    assert abs(per_layer - 91_700) < 1_000, per_layer  # the paper's model: about 91.7k per layer


def test_kernels_are_explicit_and_set_recursively():
    model = SequenceRecommender(11, ModelConfig(recblr=RecBLRConfig(embedding_dim=8, kernels="pytorch")))
    blocks = [m for m in model.modules() if isinstance(m, GatedRecurrent)]
    assert all(b.kernels is KernelBackend.PYTORCH for b in blocks)
    model.set_kernels("triton")
    assert all(b.kernels is KernelBackend.TRITON for b in blocks)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        set_kernels(model, "cuda")


def test_model_on_a_keyed_jagged_tensor_matches_the_padded_path():
    torch.manual_seed(0)
    model = SequenceRecommender(21, ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0))).eval()
    lengths = torch.tensor([3, 1, 4])
    values = torch.randint(1, 21, (8,))
    kjt = KeyedJaggedTensor(keys=["item_history"], values=values, lengths=lengths)
    padded = torch.zeros(3, 5, dtype=torch.long)
    for row, seq in enumerate(torch.split(values, lengths.tolist())):
        padded[row, : len(seq)] = seq
    torch.testing.assert_close(model.score_last(kjt), model.score(padded, lengths), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="item id 21 is outside the table"):
        model.score(torch.where(padded == padded[0, 0], 21, padded), lengths)
    with pytest.raises(ValueError, match="lengths must be in"):
        model.score(padded, torch.tensor([3, 0, 4]))


def test_triton_backend_runs_the_fused_layer_and_matches_the_reference():
    torch.manual_seed(5)
    device = device_of("triton")
    encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0)).to(device)
    lengths = [3, 1, 6]
    values = torch.randn(sum(lengths), 8, device=device, requires_grad=True)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    outputs, grads = [], []
    for backend in ("pytorch", "triton"):
        set_kernels(encoder, backend)
        out = encoder(values, offsets=offsets)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [values, *encoder.parameters()]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_triton_backend_on_cpu_tensors_without_the_interpreter_says_what_to_do(monkeypatch):
    encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=1, kernels="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine, given CPU tensors
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu.*model.recblr.kernels: auto or pytorch"):
        encoder(torch.randn(4, 8), offsets=torch.tensor([0, 4]))


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_requested_rows_equal_the_full_output_at_those_rows(backend):
    device = device_of(backend)
    encoder = set_kernels(make_encoder(3).float().to(device), backend)
    lengths = [3, 1, 6, 2]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    values = torch.randn(sum(lengths), 8, device=device, requires_grad=True)
    rows = offsets[1:] - 1  # the paper's protocol: each sequence's last position
    full = encoder(values, offsets=offsets)[rows]
    part = encoder(values, offsets=offsets, rows=rows)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(full)
    want = torch.autograd.grad((full * weights).sum(), [values, *encoder.parameters()])
    got = torch.autograd.grad((part * weights).sum(), [values, *encoder.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="rows select packed positions"):
        encoder(values[None], rows=rows)


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
@pytest.mark.parametrize("option", ["recompute_recurrence", "recompute_mix"])
def test_recomputing_in_backward_gives_the_same_training_gradients_from_fewer_saved_tensors(backend, option):
    device = device_of(backend)
    lengths = [3, 1, 6]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    values = torch.randn(sum(lengths), 8, device=device)
    rows = offsets[1:] - 1 if option == "recompute_recurrence" else None  # the mix is recomputed at all positions
    results, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(7)
        config = RecBLRConfig(embedding_dim=8, dropout=0.3, kernels=backend, **{option: recompute})
        encoder = RecBLREncoder(config).to(device).train()
        torch.manual_seed(8)  # the same dropout masks in both runs; recompute must replay them
        storages = {}

        def keep(tensor, storages=storages):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = encoder(values, offsets=offsets, rows=rows)
        saved.append(sum(storages.values()))
        results.append((out, torch.autograd.grad(out.square().sum(), list(encoder.parameters()))))
    assert saved[1] < saved[0]  # the recomputed activations are no longer kept
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    close_grads(results[1][1], results[0][1], device)


def test_fused_residual_norms_run_every_norm_and_replay_their_masks():
    """The triton backend runs every residual LayerNorm (and the embedding norm) in the fused
    kernel; its dropout masks replay from torch's seed (without dropout it equals the torch ops:
    test_triton_backend_runs_the_fused_layer_and_matches_the_reference)."""
    from recblr_torchrec.kernels.residual_norm import triton as fused_norm

    calls = []
    original = fused_norm.dropout_add_layer_norm_triton
    device = device_of("triton")
    lengths = [3, 1, 6]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    values = torch.randn(sum(lengths), 8, device=device)
    torch.manual_seed(7)
    encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.3)).to(device).train()

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    set_kernels(encoder, "triton")
    try:
        fused_norm.dropout_add_layer_norm_triton = counting
        outs = []
        for _ in range(2):
            torch.manual_seed(8)
            outs.append(encoder(values, offsets=offsets))
    finally:
        fused_norm.dropout_add_layer_norm_triton = original
    assert len(calls) == 2 * (1 + 2 * 2)  # per forward: the embedding norm and two per layer
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(9)
    assert not torch.equal(encoder(values, offsets=offsets), outs[0])  # a new seed, new masks


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_residual_norm_drops_out_the_branch_not_the_residual(backend):
    device = device_of(backend)
    layer = RecBLRLayer(RecBLRConfig(embedding_dim=8, dropout=0.5, kernels=backend)).to(device).train()
    residual = torch.randn(12, 8, device=device)
    norm = layer.recurrent_norm
    out = layer.residual_norm(torch.zeros(12, 8, device=device), residual, norm.weight, norm.bias)
    want = torch.nn.functional.layer_norm(residual, (8,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("candidate_feature", [False, True])
def test_table_lookups_tell_torchrec_their_value_counts(candidate_feature):
    """lookup / item_table pass length_per_key, so TorchRec never sums lengths on the host (a CUDA sync)."""
    model = SequenceRecommender(
        9, ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=1)), candidate_feature=candidate_feature
    )
    seen = []
    model.item_embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0].length_per_key_or_none()))
    table = model.item_table()
    expected = [9, 0] if candidate_feature else [9]
    assert seen[-1] == expected  # as the collection received it, before it could compute them
    torch.testing.assert_close(table, model.item_embeddings.embeddings["item"].weight)
    ids = torch.tensor([3, 1, 3])
    torch.testing.assert_close(model.lookup(ids), table[ids])
    assert seen[-1] == ([3, 0] if candidate_feature else [3])


def test_item_dropout_hides_whole_history_items_in_training_only():
    from recblr_torchrec.config import load_config

    config = ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0), item_dropout=0.5)
    torch.manual_seed(0)
    model = SequenceRecommender(21, config).double()
    lengths = torch.tensor([3, 1, 4])
    kjt = KeyedJaggedTensor(keys=["item_history"], values=torch.randint(1, 21, (8,)), lengths=lengths)
    embedded = model.item_embeddings(kjt)["item_history"].values().double()
    offsets = torch.tensor([0, 3, 4, 8])

    torch.manual_seed(1)
    trained = model.train()(kjt)
    torch.manual_seed(1)
    hidden = torch.rand(8, 1) < 0.5
    assert 0 < hidden.sum() < 8  # some items hidden, some seen
    masked = torch.where(hidden, model.masked_item, embedded)
    torch.testing.assert_close(trained, model.encoder(masked, offsets=offsets), rtol=0, atol=1e-12)
    trained.sum().backward()
    assert model.masked_item.grad.abs().sum() > 0
    evaluated = model.eval()(kjt)  # no item hidden
    torch.testing.assert_close(evaluated, model.encoder(embedded, offsets=offsets), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"model.item_dropout=1.0 must be in \[0, 1\)"):
        load_config(None, ["model.item_dropout=1.0"])


def test_cosine_scores_are_the_cosines_over_the_temperature():
    from recblr_torchrec.config import load_config

    config = ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0), score_temperature=0.05)
    torch.manual_seed(0)
    model = SequenceRecommender(21, config).double().eval()
    ids = torch.tensor([[3, 1, 7, 0], [5, 2, 9, 4]])
    lengths = torch.tensor([3, 4])
    hidden = model.encode(ids, lengths)[torch.arange(2), lengths - 1]
    table = model.item_table()
    expected = F.cosine_similarity(hidden[:, None], table[None], dim=-1) / 0.05
    torch.testing.assert_close(model.score(ids, lengths), expected, rtol=1e-12, atol=1e-12)
    kjt = KeyedJaggedTensor(keys=["item_history"], values=ids[ids > 0], lengths=lengths)
    torch.testing.assert_close(model.score_last(kjt), expected, rtol=1e-12, atol=1e-12)
    dot = ModelConfig(recblr=config.recblr)  # the paper's scores, same weights: the plain products
    plain_model = SequenceRecommender(21, dot).double().eval()
    plain_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain_model.score(ids, lengths), hidden @ table.T, rtol=1e-12, atol=1e-12)
    for bad in ("-0.1", "inf", "nan"):
        with pytest.raises(ValueError, match=rf"model.score_temperature={bad} must be 0 .* or a positive temperature"):
            load_config(None, [f"model.score_temperature={bad}"])


def test_a_learned_temperature_scales_the_cosines_and_is_trained():
    from recblr_torchrec.config import load_config
    from recblr_torchrec.modules.recommender import MIN_TEMPERATURE

    encoder = RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0)
    torch.manual_seed(0)
    learned = SequenceRecommender(21, ModelConfig(recblr=encoder, score_temperature=0.1, learn_temperature=True))
    learned = learned.double()
    ids, lengths = torch.tensor([[3, 1, 7, 0], [5, 2, 9, 4]]), torch.tensor([3, 4])
    with torch.no_grad():
        hidden = learned.encode(ids, lengths)[torch.arange(2), lengths - 1]
        cosines = F.cosine_similarity(hidden[:, None], learned.item_table()[None], dim=-1)
    assert learned.temperature() == pytest.approx(0.1, rel=1e-6)  # started in float32
    torch.testing.assert_close(learned.score(ids, lengths), cosines / 0.1, rtol=1e-6, atol=1e-12)
    # its value is a parameter: the loss moves it, and the scores follow it
    learned.score(ids, lengths)[:, 1:].logsumexp(dim=1).sum().backward()
    assert learned.score_scale.grad is not None and float(learned.score_scale.grad) != 0.0
    with torch.no_grad():
        learned.score_scale.fill_(math.log(1 / 0.05))
        torch.testing.assert_close(learned.score(ids, lengths), cosines / 0.05, rtol=1e-12, atol=1e-12)
        learned.score_scale.fill_(math.log(1 / 0.001))  # below the floor: held at MIN_TEMPERATURE
        torch.testing.assert_close(learned.score(ids, lengths), cosines / MIN_TEMPERATURE, rtol=1e-12, atol=1e-12)
    assert learned.temperature() == MIN_TEMPERATURE
    fixed = SequenceRecommender(21, ModelConfig(recblr=encoder, score_temperature=0.1)).double()
    assert fixed.score_scale is None and fixed.temperature() == 0.1
    with pytest.raises(ValueError, match=r"model.learn_temperature=true .* which is 0.0: set model.score_temperature"):
        load_config(None, ["model.learn_temperature=true"])
