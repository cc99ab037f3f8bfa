import os

import pytest
import torch

from recblr_torchrec.fields import plain
from recblr_torchrec.modules import ModelConfig, RecBLRConfig, SequenceRecommender
from recblr_torchrec.serving import export

NUM_EMBEDDINGS = 41  # 40 items + the padding row


def random_model(
    seed: int = 0, score_temperature: float = 0.0, learn_temperature: bool = False, **overrides
) -> SequenceRecommender:
    """A small RecBLR recommender with random (not initial) weights, so every parameter matters
    (a learned temperature too: it moves off ``score_temperature``)."""
    torch.manual_seed(seed)
    config = RecBLRConfig(**{"embedding_dim": 8, "num_layers": 2, "dropout": 0.0, **overrides})
    scores = {"score_temperature": score_temperature, "learn_temperature": learn_temperature}
    model = SequenceRecommender(NUM_EMBEDDINGS, ModelConfig(recblr=config, **scores))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(model: SequenceRecommender, path: str, max_len: int = 20) -> None:
    """The trainer's best.pt layout: model state, run config, table rows, epoch."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    config = {"name": "serving-test", "data": {"max_len": max_len}, "model": plain(model.config)}
    torch.save(
        {"model": model.state_dict(), "config": config, "num_embeddings": model.num_embeddings, "epoch": 3}, path
    )


def random_histories(batch: int, steps: int, lengths, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    ids = torch.randint(1, NUM_EMBEDDINGS, (batch, steps), generator=generator)
    ids[torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids, lengths


@pytest.fixture(scope="session")
def model() -> SequenceRecommender:
    return random_model()


@pytest.fixture(scope="session")
def exported(model, tmp_path_factory):
    """(output dir, manifest) of the model exported through a run folder, as the launcher does."""
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(model, str(run / "checkpoints" / "best.pt"))
    out = tmp_path_factory.mktemp("serving")
    return str(out), export(str(run), str(out))


@pytest.fixture(scope="session")
def scorer(exported):
    return torch.jit.load(os.path.join(exported[0], "scorer.pt"))


@pytest.fixture(scope="session")
def step(exported):
    return torch.jit.load(os.path.join(exported[0], "step.pt"))


def pytest_collection_modifyitems(items):
    # Every torch.jit call warns that TorchScript is deprecated; these tests are about TorchScript.
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"))
