"""Every shipped config composes and validates (torchtune's test_configs): each group option,
each algo that needs no teacher builds from its composed config, each offline dataset builds and
each hub dataset fails offline with one UserError."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.algos.base import AlgoBase
from mdlm_dmmd.cli import compose
from mdlm_dmmd.data import available_datasets, build_data
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.registry import config_dir, group_options
from mdlm_dmmd.training import vocab_info

CONFIGS = config_dir()
GROUPS = ("algo", "data", "model", "noise", "trainer", "experiment", "debug")
OFFLINE_DATA = {"digits", "shakespeare", "text_files"}
IMAGE_HUB_DATA = {"cifar10_pixels"}  # its offline error: tests/data/test_pixels.py
TEACHER_ALGOS = {"dmmd", "sdtt", "idlm"}  # distillation: built only with algo.teacher=PATH


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def group_overrides(group, name, tmp_path: Path) -> list[str]:
    """What composing `group=name` needs on top (the only required key: text_files' paths)."""
    extra = []
    if group == "data" and name == "text_files":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("hello world\n")
        extra.append(f"data.paths=[{corpus}]")
    return [f"{group}={name}", *extra]


def test_config_tree_is_the_checkout():
    assert (CONFIGS / "config.yaml").is_file()
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"
        assert group_options(group) == options(group)


@pytest.mark.parametrize("group, name", [(g, n) for g in GROUPS for n in options(g)])
def test_every_config_composes(group, name, tmp_path):
    cfg = compose(group_overrides(group, name, tmp_path))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "algo":
        assert cfg.algo.name == name
    if group == "data":
        assert cfg.data.name == name
        assert name in available_datasets()
    if group == "model":
        assert cfg.model.name == name
        assert cfg.model.hidden_dim % cfg.model.n_heads == 0


def test_every_algo_config_is_installed_and_every_installed_algo_has_a_config():
    assert set(options("algo")) == set(registry.plugins(registry.ALGO_GROUP))


def test_every_dataset_has_a_config():
    assert set(options("data")) == set(available_datasets())


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("algo", sorted(set(options("algo")) - TEACHER_ALGOS))
def test_experiment_overlays_compose_with_every_algo(experiment, algo):
    cfg = compose([f"experiment={experiment}", f"algo={algo}"])
    assert cfg.algo.name == algo  # the command line wins over the overlay's default


def tiny_algo_config(name: str, extra=()) -> dict:
    cfg = compose([f"algo={name}", "debug=cpu", "data=digits", "model.length=64", *extra])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(build_data(cfg.data, cfg.model.length))
    return config


@pytest.mark.parametrize("name", sorted(set(options("algo")) - TEACHER_ALGOS))
def test_algo_builds_from_its_composed_config(name):
    algo = registry.load_algo(name)(tiny_algo_config(name))
    assert isinstance(algo, AlgoBase)
    # 17 pixel values, plus a mask (mdlm) or start (ar) slot where the algo has one (not udlm).
    assert algo.backbone.config.vocab_size in (17, 18)
    assert algo.backbone.config.hidden_dim == 32 and algo.backbone.config.length == 64
    assert algo.ema is not None and algo.ema.decay == pytest.approx(0.9999)
    x = torch.randint(0, 17, (2, 64), generator=torch.Generator().manual_seed(0))
    total, count = algo.loss({"input_ids": x})
    assert torch.isfinite(total) and count == 2 * 64


@pytest.mark.parametrize("name", sorted(set(options("algo")) - TEACHER_ALGOS))
def test_algo_construction_validates(name):
    with pytest.raises(UserError, match="model.n_heads"):
        registry.load_algo(name)(tiny_algo_config(name, ["model.n_heads=3"]))
    config = tiny_algo_config(name)
    del config["vocab"]
    with pytest.raises(UserError, match="vocab.size"):
        registry.load_algo(name)(config)


@pytest.mark.parametrize("name", sorted(TEACHER_ALGOS & set(options("algo"))))
def test_distillation_algo_without_teacher_is_a_user_error(name):
    with pytest.raises(UserError, match="algo.teacher"):
        registry.load_algo(name)(tiny_algo_config(name))


def test_digits_builds():
    cfg = compose(["data=digits", "model.length=64"])
    data = build_data(cfg.data, cfg.model.length)
    assert data.vocab_size == 17 and data.modality == "image" and data.image_shape == (8, 8, 1)
    assert len(data.train) + len(data.valid) == 1797
    row = data.train[0]["input_ids"]
    assert row.shape == (64,) and 0 <= int(row.min()) and int(row.max()) <= 16


def test_shakespeare_builds_small():
    cfg = compose(["data=shakespeare", "data.max_documents=3", "model.length=64"])
    data = build_data(cfg.data, cfg.model.length)
    assert data.modality == "text" and data.vocab_size == 50257
    assert len(data.train) > 0 and len(data.valid) > 0
    row = data.train[0]["input_ids"]
    assert row.shape == (64,) and row[0] == data.bos_id and row[-1] == data.eos_id


def test_text_files_builds(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. " + "Some words to tokenize here. " * 30)
    cfg = compose(["data=text_files", f"data.paths=[{tmp_path}/*.txt]", "model.length=32"])
    data = build_data(cfg.data, cfg.model.length)
    assert len(data.train) > 0 and len(data.valid) > 0
    assert data.train[0]["input_ids"].shape == (32,)


@pytest.mark.parametrize("name", sorted(set(options("data")) - OFFLINE_DATA - IMAGE_HUB_DATA))
def test_hub_dataset_offline_is_one_line_user_error(name):
    cfg = compose([f"data={name}", "data.max_documents=3", "model.length=64"])
    with pytest.raises(UserError) as info:
        build_data(cfg.data, cfg.model.length)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and "hub" in message.lower()


def test_free_form_option_nodes_accept_new_keys():
    from mdlm_dmmd.cli import compose

    cfg = compose(["eval.metric_options={gradient_moment: {reference: 'a/b.ckpt', batch_size: 8}}",
                   "eval.metric_options.frechet.num_bootstrap=5", "study.student_overrides.lr_generator=3e-4"])
    assert cfg.eval.metric_options.gradient_moment.reference == "a/b.ckpt"
    assert cfg.eval.metric_options.frechet.num_bootstrap == 5
    assert cfg.study.student_overrides.lr_generator == 3e-4


@pytest.mark.parametrize("name, settings", [
    ("dmmd", "mdlm_dmmd.algos.dmmd:DMMDConfig"), ("sdtt", "mdlm_dmmd.algos.sdtt:SDTTConfig"),
    ("idlm", "mdlm_dmmd.algos.idlm:IDLMConfig"), ("bd3lm", "mdlm_dmmd.algos.bd3lm:BD3LMConfig"),
    ("udlm", "mdlm_dmmd.algos.udlm:UDLMConfig"),
])
def test_settings_dataclasses_mirror_their_yaml(name, settings):
    """The defaults an algo takes without Hydra (tests, plugins building it from a dict) are the
    documented ones: every key of configs/algo/NAME.yaml has the dataclass's default, and back."""
    import dataclasses
    import importlib

    module, cls = settings.split(":")
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    yaml = OmegaConf.to_container(OmegaConf.load(config_dir() / "algo" / f"{name}.yaml"))
    assert set(yaml) == set(fields)
    for key, value in yaml.items():
        default = list(fields[key]) if isinstance(fields[key], tuple) else fields[key]
        assert value == default, (key, value, default)
