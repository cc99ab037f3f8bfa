import torch

from recblr_torchrec.modules.sasrec import SASRecConfig, SASRecEncoder


def make(seed=0):
    torch.manual_seed(seed)
    return SASRecEncoder(
        SASRecConfig(embedding_dim=8, num_heads=2, dropout=0.0, attention_dropout=0.0, max_positions=9)
    )


def test_sasrec_jagged_equals_padded_and_is_causal():
    encoder = make().double()
    lengths = [1, 4, 3]
    values = torch.randn(8, 8, dtype=torch.float64)
    jagged = encoder(values, offsets=torch.tensor([0, 1, 5, 8]))
    padded = torch.full((3, 6, 8), 7.0, dtype=torch.float64)  # garbage in the padding
    for row, seq in enumerate(torch.split(values, lengths)):
        padded[row, : len(seq)] = seq
    dense = encoder(padded, lengths=torch.tensor(lengths))
    for row, (start, length) in enumerate(zip([0, 1, 5], lengths)):
        torch.testing.assert_close(jagged[start : start + length], dense[row, :length], rtol=0, atol=1e-10)
    changed = padded.clone()
    changed[:, 2] += 1.0
    torch.testing.assert_close(encoder(changed)[:, :2], encoder(padded)[:, :2], rtol=0, atol=1e-12)


def test_the_model_trains_the_sasrec_baseline_on_the_same_table_and_loss():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recblr_torchrec.modules import ModelConfig, SequenceRecommender

    torch.manual_seed(0)
    model = SequenceRecommender(
        13, ModelConfig(encoder="sasrec", sasrec=SASRecConfig(embedding_dim=8, num_layers=1, max_positions=6))
    )
    assert isinstance(model.encoder, SASRecEncoder)
    history = KeyedJaggedTensor(
        keys=["item_history"], values=torch.tensor([3, 1, 4, 1, 5, 9]), lengths=torch.tensor([2, 4])
    )
    scores = model.score_last(history)
    assert scores.shape == (2, 13)
    scores.logsumexp(-1).sum().backward()
    assert model.encoder.positions.weight.grad is not None


def test_sasrec_config_errors_name_the_fix():
    import pytest

    from recblr_torchrec.config import load_config

    with pytest.raises(ValueError, match="model.sasrec.max_positions=100 must be >= data.max_len=200"):
        load_config(None, ["model.encoder=sasrec", "model.sasrec.max_positions=100"])
    with pytest.raises(ValueError, match="model.encoder='mamba'; choose recblr or sasrec"):
        load_config(None, ["model.encoder=mamba"])
    with pytest.raises(ValueError, match="model.sasrec.embedding_dim=10 must be divisible by model.sasrec.num_heads=4"):
        load_config(None, ["model.encoder=sasrec", "model.sasrec.embedding_dim=10", "model.sasrec.num_heads=4"])


def test_sasrec_rows_compute_the_last_block_at_those_rows_only():
    encoder = make(1).double()
    lengths = [1, 4, 3]
    offsets = torch.tensor([0, 1, 5, 8])
    values = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    for rows in (offsets[1:] - 1, torch.tensor([0, 2, 6]), torch.arange(8)):  # last, arbitrary, more than S
        full = encoder(values, offsets=offsets)[rows]
        part = encoder(values, offsets=offsets, rows=rows)
        torch.testing.assert_close(part, full, rtol=0, atol=1e-10)
        want = torch.autograd.grad(full.sum(), [values, *encoder.parameters()], allow_unused=True)
        got = torch.autograd.grad(part.sum(), [values, *encoder.parameters()], allow_unused=True)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    empty = encoder(values, offsets=offsets, rows=torch.tensor([], dtype=torch.long))  # a filler batch
    assert empty.shape == (0, 8)
    assert len(lengths) == 3


def test_static_padding_gives_the_same_outputs_and_gradients_and_a_fixed_shape(monkeypatch):
    import pytest

    from recblr_torchrec.modules import sasrec

    widths = []

    def recording_pad(*args):
        padded = pad_packed(*args)
        widths.append(padded.shape[1])
        return padded

    pad_packed = sasrec.pad_packed
    monkeypatch.setattr(sasrec, "pad_packed", recording_pad)
    encoder = make(2).double()
    offsets = torch.tensor([0, 1, 5, 8])
    values = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    for rows in (None, offsets[1:] - 1, torch.arange(8)):
        encoder.static_padding(0)
        want = encoder(values, offsets=offsets, rows=rows)
        want_grads = torch.autograd.grad(want.square().sum(), [values, *encoder.parameters()])
        encoder.static_padding(9)  # max_len: longer than every sequence (the longest has 4)
        got = encoder(values, offsets=offsets, rows=rows)
        got_grads = torch.autograd.grad(got.square().sum(), [values, *encoder.parameters()])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert widths == [4, 9] * 3  # the longest sequence, then the fixed length
    with pytest.raises(ValueError, match=r"length=10 must be in \[0, max_positions=9\].*model.sasrec.max_positions"):
        encoder.static_padding(10)


def test_pad_packed_takes_a_fixed_length_without_reading_the_offsets(monkeypatch):
    from recblr_torchrec.kernels.linear_scan.pytorch import packed_positions, pad_packed

    offsets = torch.tensor([0, 2, 3])
    values = torch.arange(6.0).view(3, 2)
    seq, pos = packed_positions(offsets, 3)
    assert pad_packed(values, offsets, seq, pos).shape == (2, 2, 2)

    def no_read(*args, **kwargs):
        raise AssertionError("the longest length was read")

    monkeypatch.setattr(torch.Tensor, "max", no_read)  # the longest length is read with .max()
    fixed = pad_packed(values, offsets, seq, pos, 5)
    assert fixed.shape == (2, 5, 2) and not fixed[:, 2:].any() and not fixed[1, 1:].any()
    monkeypatch.undo()
    torch.testing.assert_close(fixed[0, :2], values[:2])
    torch.testing.assert_close(fixed[1, 0], values[2])


def test_the_model_fixes_only_the_sasrec_encoders_padding():
    from recblr_torchrec.modules import ModelConfig, RecBLRConfig, SequenceRecommender

    sasrec_model = SequenceRecommender(
        13, ModelConfig(encoder="sasrec", sasrec=SASRecConfig(embedding_dim=8, num_layers=1, max_positions=6))
    )
    sasrec_model.static_padding(5)
    assert sasrec_model.encoder.static_length == 5
    recblr_model = SequenceRecommender(13, ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=1)))
    recblr_model.static_padding(5)  # its scan runs on the jagged rows: nothing to fix
    assert not hasattr(recblr_model.encoder, "static_length")
