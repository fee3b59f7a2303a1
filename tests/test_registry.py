"""Entry-point discovery: built-ins, the catalogue, unknown names, broken and third-party plugins."""

import sys
from importlib.metadata import EntryPoint

import pytest
import yaml

from mdlm_dmmd import cli, registry
from mdlm_dmmd.errors import UserError

from conftest import REPO


@pytest.fixture
def fake_plugins(monkeypatch):
    """Add entry points to what importlib.metadata reports, as if a package were installed."""
    real = registry._entry_points
    extra: dict[str, list[EntryPoint]] = {}

    def entry_points(group):
        return real(group) + extra.get(group, [])

    monkeypatch.setattr(registry, "_entry_points", entry_points)
    registry._load.cache_clear()
    yield extra
    registry._load.cache_clear()


def test_builtins_are_entry_points_and_load():
    algos = registry.available_algos()
    assert {"mdlm", "ar"} <= set(algos)
    import lightning as L
    assert all(issubclass(cls, L.LightningModule) for cls in algos.values())
    assert callable(registry.available_metrics()["entropy"])


def test_catalogue_equals_entry_points():
    catalogue = yaml.safe_load((REPO / "algo_registry.yaml").read_text())
    builtin = lambda group: {p.name: p.target for p in registry.plugins(group).values() if p.target.startswith("mdlm_dmmd.")}
    assert {a["name"]: a["entry_point"] for a in catalogue["algos"]} == builtin(registry.ALGO_GROUP)
    assert {m["name"]: m["entry_point"] for m in catalogue["metrics"]} == builtin(registry.METRIC_GROUP)
    for algo in catalogue["algos"]:
        assert (REPO / algo["config"]).is_file(), algo["config"]


def test_unknown_names_list_installed_and_suggest():
    with pytest.raises(UserError, match=r"unknown algo 'mdml'; installed: .*ar.*mdlm.*did you mean 'mdlm'"):
        registry.load_algo("mdml")
    with pytest.raises(UserError, match=r"unknown metric 'entrop'.*did you mean 'entropy'"):
        registry.load_metric("entrop")


def test_broken_plugin_does_not_stop_builtins(fake_plugins):
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("broken", "no_such_module_xyz:Algo", registry.ALGO_GROUP)]
    assert "broken" in registry.plugins(registry.ALGO_GROUP)
    with pytest.raises(UserError, match=r"algo 'broken' \(package .*\) failed to import"):
        registry.load_algo("broken")
    assert registry.load_algo("mdlm").__name__ == "MDLM"


def test_plugin_that_is_not_an_algo_class(fake_plugins):
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("notalgo", "os.path:join", registry.ALGO_GROUP)]
    with pytest.raises(UserError, match="not a lightning.LightningModule subclass"):
        registry.load_algo("notalgo")


TOY_ALGO = '''
"""A third-party algo: MDLM with an unweighted loss, registered as algo=toy."""
import torch
from mdlm_dmmd.algos.mdlm import MDLM


class ToyAlgo(MDLM):
    loads = 0

    def __init__(self, config):
        super().__init__(config)
        ToyAlgo.loads += 1

    def loss(self, batch):
        x = batch["input_ids"]
        t = torch.rand(x.shape[0], device=x.device).clamp_min(1e-3)
        z_t = self.process.corrupt(x, t)
        nll = -self.denoiser(self.backbone)(z_t, t).gather(-1, x[..., None])[..., 0]
        masked = (z_t == self.process.mask_id).float()
        return (nll * masked).sum() * self.cfg.algo.scale, torch.tensor(float(x.numel()))
'''


def make_toy_package(root):
    pkg = root / "toy_algo"
    (pkg / "configs" / "algo").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "algo.py").write_text(TOY_ALGO)
    (pkg / "configs" / "algo" / "toy.yaml").write_text("name: toy\nscale: 1.0\ntime_conditioning: false\n")
    return pkg


def test_third_party_algo_runs_through_the_host(fake_plugins, tmp_path, monkeypatch):
    make_toy_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("toy", "toy_algo.algo:ToyAlgo", registry.ALGO_GROUP)]
    run_dir = tmp_path / "run"
    code = cli.main(["algo=toy", "data=digits", "debug=cpu", "model.length=64", f"run_dir={run_dir}", "algo.scale=0.5"])
    assert code == 0
    assert (run_dir / "checkpoints" / "final.ckpt").is_file() and (run_dir / "report.md").is_file()
    assert sys.modules["toy_algo.algo"].ToyAlgo.loads == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"] == {"name": "toy", "scale": 0.5, "time_conditioning": False}


def test_the_first_distribution_of_a_name_wins(fake_plugins):
    """Two installs exposing the same entry point name (editable + regular): the first listed is kept."""
    catalogue = yaml.safe_load((REPO / "algo_registry.yaml").read_text())
    shipped = {a["name"]: a["entry_point"] for a in catalogue["algos"]}["mdlm"]
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("mdlm", "os.path:join", registry.ALGO_GROUP)]
    assert registry.plugins(registry.ALGO_GROUP)["mdlm"].target == shipped
    assert registry.load_algo("mdlm").__name__ == "MDLM"


def test_no_installed_plugin_is_said(monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda group: [])
    with pytest.raises(UserError, match=r"^unknown metric 'entropy'; installed: none$"):
        registry.check_metric_name("entropy")


def test_a_plugin_failing_with_any_error_at_import_is_one_line(fake_plugins, tmp_path, monkeypatch):
    pkg = tmp_path / "crashing_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "algo.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("crashing", "crashing_plugin.algo:Algo", registry.ALGO_GROUP)]
    with pytest.raises(UserError, match=r"algo 'crashing' \(package .*\) failed to import: boom at import"):
        registry.load_algo("crashing")


def test_plugins_of_the_wrong_kind_are_refused(fake_plugins):
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("plainclass", "collections:OrderedDict", registry.ALGO_GROUP)]
    fake_plugins[registry.METRIC_GROUP] = [EntryPoint("constant", "os:sep", registry.METRIC_GROUP)]
    with pytest.raises(UserError, match=r"algo 'plainclass' .*points to collections:OrderedDict, which is not a "
                                        r"lightning.LightningModule subclass"):
        registry.load_algo("plainclass")
    with pytest.raises(UserError, match=r"metric 'constant' \(package .*\) is not callable: os:sep"):
        registry.load_metric("constant")


def test_a_plugins_config_folder_is_found_without_arguments(fake_plugins, tmp_path, monkeypatch):
    """`algo_config` (a study's student algo) reads a third-party algo's config from its package;
    a package whose configs/ has no algo/ folder adds nothing to the search path."""
    for module in ("toy_algo", "toy_algo.algo"):  # imported from another folder by an earlier test
        monkeypatch.delitem(sys.modules, module, raising=False)
    make_toy_package(tmp_path)
    (tmp_path / "no_algo_configs" / "configs").mkdir(parents=True)
    (tmp_path / "no_algo_configs" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_plugins[registry.ALGO_GROUP] = [EntryPoint("toy", "toy_algo.algo:ToyAlgo", registry.ALGO_GROUP),
                                         EntryPoint("other", "no_algo_configs.algo:Other", registry.ALGO_GROUP)]
    assert registry.config_search_paths() == [f"file://{(tmp_path / 'toy_algo' / 'configs').resolve()}"]
    registry.check_algo_config("toy")
    assert dict(registry.algo_config("toy")) == {"name": "toy", "scale": 1.0, "time_conditioning": False}
