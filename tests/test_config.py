import os

import pytest

from recblr_torchrec.config import Protocol, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHIPPED = sorted(
    os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "configs"))
    for folder, _, names in os.walk(os.path.join(ROOT, "configs"))
    for name in names
    if name.endswith(".yaml")
)


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_loads(path):
    config = load_config(os.path.join(ROOT, "configs", path))
    expected = path[: -len(".yaml")].replace(os.sep, "-")  # the run's name says where its config lives
    assert config.name == expected


def test_the_paper_configs_are_shipped():
    assert {"ml-1m/recblr-paper.yaml", "ml-1m/sasrec-paper.yaml", "beauty/recblr-paper.yaml"} <= set(SHIPPED)


def test_paper_hyper_parameters_in_the_ml1m_config():
    c = load_config(os.path.join(ROOT, "configs", "ml-1m", "recblr-paper.yaml"))
    m = c.model.recblr
    assert (c.model.encoder, m.embedding_dim, m.num_layers, m.expand, m.conv_width) == ("recblr", 64, 2, 2, 4)
    assert (m.dropout, c.data.max_len, c.train.batch_size, c.train.lr) == (0.2, 200, 2048, 1e-3)


def test_compile_reads_yaml_booleans():
    # YAML reads off/false/no as False: they mean off; true means the GPU default, inductor.
    assert load_config(None, ["train.compile=off"]).train.compile == "off"
    assert load_config(None, ["train.compile=true"]).train.compile == "inductor"
    assert load_config(None, ["train.compile=aot_eager"]).train.compile == "aot_eager"


def test_overrides_are_typed_and_nested():
    c = load_config(None, ["train.lr=3e-4", "model.recblr.dropout=0.5", "eval.ks=[5, 10]", "eval.valid_metric=HR@5"])
    assert c.train.lr == 3e-4 and c.model.recblr.dropout == 0.5 and c.eval.ks == [5, 10]
    assert c.train.protocol == "all_positions" and isinstance(c.train.protocol, Protocol)  # a typed choice


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key train.lrr; known keys of train: batch_size"),
        ("train.batch_size=abc", "train.batch_size='abc' must be a int"),
        ("train.protocol=random", "choose all_positions or prefixes"),
        ("model.recblr.kernels=cuda", "model.recblr.kernels='cuda'; choose one of pytorch, triton, auto"),
        ("train.lr", "must look like section.key=value"),
        ("model.recblr.dropout=1.5", r"must be in \[0, 1\)"),
        ("train.compile=fast", "train.compile='fast'; choose off or a torch.compile backend: .*inductor"),
        ("train.weight_decay=-0.1", r"train.weight_decay=-0.1 must be >= 0"),
        ("train.optimizer=lamb", "train.optimizer='lamb'; choose one of adam, adamw, adagrad, sgd"),
        ("train.label_smoothing=1.0", r"train.label_smoothing=1.0 must be in \[0, 1\)"),
        ("train.label_smoothing=0.1 train.loss=sampled", "train.label_smoothing=0.1 needs train.loss=full"),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override.split(" "))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="configs/ for examples"):
        load_config("nope.yaml")


def test_a_config_inherits_its_base_and_overrides_it():
    cpu = load_config(os.path.join(ROOT, "configs", "ml-1m", "recblr-cpu.yaml"))
    paper = load_config(os.path.join(ROOT, "configs", "ml-1m", "recblr-paper.yaml"))
    assert cpu.model == paper.model and cpu.data == paper.data
    assert (cpu.train.protocol, paper.train.protocol) == ("all_positions", "prefixes")
    assert cpu.train.lr == paper.train.lr and cpu.train.batch_size == 128


def test_adamw_decays_the_weights_apart_from_the_gradient():
    import torch

    from recblr_torchrec.training.optimizers import optimizer_factory

    decay = ["train.weight_decay=0.01", "train.lr=0.1"]
    steps = {}
    for name in ("adamw", "adam"):
        config = load_config(None, [f"train.optimizer={name}", *decay])
        weight = torch.nn.Parameter(torch.full((3,), 2.0))
        optimizer = optimizer_factory(config.train)([weight])
        weight.grad = torch.zeros(3)
        optimizer.step()
        steps[name] = (type(optimizer), float(weight[0]))
    # AdamW: a zero gradient moves nothing but the decay, w * (1 - lr * decay) = 1.998; Adam adds the
    # decay to the gradient and normalises it: a full lr step, 1.9
    assert steps["adamw"][0] is torch.optim.AdamW and abs(steps["adamw"][1] - 2.0 * (1 - 0.1 * 0.01)) < 1e-6
    assert steps["adam"][0] is torch.optim.Adam and abs(steps["adam"][1] - 1.9) < 1e-6


def test_keys_of_the_flat_model_section_are_refused_naming_their_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  embedding_dim: 32\n  scan_backend: triton\n")
    with pytest.raises(ValueError) as error:
        load_config(str(path))
    message = str(error.value)
    assert "model.embedding_dim is now model.recblr.embedding_dim" in message
    assert "model.scan_backend is now model.recblr.kernels" in message and str(path) in message
    with pytest.raises(ValueError, match="model.architecture is now model.encoder"):
        load_config(None, ["model.architecture=sasrec"])


def test_saved_configs_of_the_flat_layout_are_upgraded():
    from recblr_torchrec.config import RunConfig, config_from_dict

    flat = {"embedding_dim": 16, "num_layers": 1, "expand": 2, "conv_width": 4, "dropout": 0.1}
    flat.update(layer_norm_eps=1e-12, scan_backend="pytorch", recompute_mix=False, recompute_recurrence=False)
    flat.update(fused_norms=True, architecture="recblr", num_heads=2, max_positions=512)
    recblr = config_from_dict({"name": "old", "model": flat, "train": {"protocol": "prefixes"}})
    assert recblr.model.encoder == "recblr" and recblr.model.recblr.kernels == "pytorch"
    assert (recblr.model.recblr.embedding_dim, recblr.model.recblr.dropout) == (16, 0.1)
    assert recblr.model.sasrec == RunConfig().model.sasrec  # the unused section keeps its defaults
    sasrec = config_from_dict({"model": {**flat, "architecture": "sasrec", "max_positions": 200}})
    assert sasrec.model.encoder == "sasrec" and sasrec.model.embedding_dim == 16
    assert sasrec.model.sasrec.max_positions == 200 and sasrec.model.recblr.embedding_dim == 64  # default
    assert config_from_dict(recblr.to_dict()) == recblr  # the current layout round-trips


def test_configs_are_typed_whether_built_from_yaml_or_from_python():
    from recblr_torchrec.config import Optimizer, TrainConfig

    config = load_config(None, ["train.optimizer=AdamW"])
    assert config.train.optimizer is Optimizer.ADAMW and config.to_dict()["train"]["optimizer"] == "adamw"
    assert TrainConfig(optimizer="sgd", lr="3e-4").optimizer is Optimizer.SGD  # checked in __post_init__ too
    with pytest.raises(ValueError, match="train.lr=nan must be a finite number > 0"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="distributed.sharding_types.item='diagonal'; choose one of data_parallel"):
        load_config(None, ["distributed.sharding_types={item: diagonal}"])
