"""examples/torchrec_encoder.py: the encoder in a user's TorchRec model trains a step and scripts the TorchRec way."""

import importlib.util
import io
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_example():
    path = os.path.join(ROOT, "examples", "torchrec_encoder.py")
    spec = importlib.util.spec_from_file_location("torchrec_encoder_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encoder_after_a_users_embedding_collection_trains_and_scripts():
    example = load_example()
    torch.manual_seed(1)
    model = example.ClickSequenceModel(num_items=20, embedding_dim=8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    features = example.click_batch([[3, 7, 1], [12], [5, 9, 20, 2, 8, 4, 4]])
    loss = example.train_step(model, features, targets=torch.tensor([4, 11, 6]))
    assert torch.isfinite(torch.tensor(loss))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(n.startswith("encoder.") for n in changed) and any(n.startswith("embeddings.") for n in changed)
    scripted = example.script_for_inference(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    other = example.click_batch([[2], [19, 18, 17, 16, 15], [1, 1, 1]])  # a batch the tracer never saw
    with torch.no_grad():
        for batch in (features, other):
            assert torch.equal(loaded(batch), model(batch))


def test_example_main_runs():
    result = load_example().main()
    assert torch.equal(result["eager"], result["served"])
