"""Entry-point discovery of algos and metrics: the host knows no algo by name.

Every algo (built-in or third-party) is a Python entry point in the group `mdlm.algos`,
every metric one in `mdlm.metrics`. Listing reads package metadata only; a plugin is imported
when it is asked for, so a broken third-party plugin never stops `algo=mdlm` from running.

A plugin's Hydra config is `configs/algo/NAME.yaml` inside its top-level package; the host
adds that folder to Hydra's search path (`config_search_paths`) without importing the plugin.
The shipped tree (`config_dir`) and that search path are all that composing a config needs
(`compose_tree`: the CLI's config, a study's student algo).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable, Sequence

from mdlm_dmmd.errors import UserError

ALGO_GROUP = "mdlm.algos"
METRIC_GROUP = "mdlm.metrics"


@dataclass(frozen=True)
class Plugin:
    """One entry point and the distribution that declared it (pluggy keeps the same record)."""

    name: str
    group: str
    target: str  # "module:attr"
    package: str  # distribution name and version, e.g. "mdlm-dmmd 0.1.0"
    entry_point: EntryPoint

    @property
    def label(self) -> str:
        return f"{self.name} ({self.package})"


def _entry_points(group: str) -> list[EntryPoint]:
    """All entry points of `group`; a seam that tests replace to simulate installed plugins."""
    return list(entry_points(group=group))


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown package"
    return f"{dist.metadata['Name']} {dist.version}"


def plugins(group: str) -> dict[str, Plugin]:
    """Name -> Plugin for every installed entry point of `group` (nothing imported)."""
    found: dict[str, Plugin] = {}
    for ep in _entry_points(group):
        # Two distributions may expose the same metadata (e.g. an editable and a regular
        # install of this package); the first one wins, as importlib.metadata orders them.
        found.setdefault(ep.name, Plugin(ep.name, group, ep.value, _describe(ep), ep))
    return dict(sorted(found.items()))


def _unknown(kind: str, name: str, installed: list[str]) -> UserError:
    hint = difflib.get_close_matches(name, installed, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return UserError(f"unknown {kind} '{name}'; installed: {', '.join(installed) or 'none'}{suggestion}")


@lru_cache(maxsize=None)
def _load(group: str, name: str) -> Any:
    found = plugins(group)
    kind = "algo" if group == ALGO_GROUP else "metric"
    if name not in found:
        raise _unknown(kind, name, list(found))
    plugin = found[name]
    try:
        obj = plugin.entry_point.load()
    except Exception as err:  # any import-time failure of a plugin is the plugin's fault
        raise UserError(f"{kind} '{name}' (package {plugin.package}) failed to import: {err}") from err
    if group == ALGO_GROUP:
        _validate_algo(plugin, obj)
    elif not callable(obj):
        raise UserError(f"metric '{name}' (package {plugin.package}) is not callable: {plugin.target}")
    return obj


def _validate_algo(plugin: Plugin, obj: Any) -> None:
    """An algo must be a LightningModule subclass that takes the composed config."""
    import lightning as L  # imported here: listing plugins must stay cheap

    if not (isinstance(obj, type) and issubclass(obj, L.LightningModule)):
        raise UserError(
            f"algo '{plugin.name}' (package {plugin.package}) points to {plugin.target}, "
            "which is not a lightning.LightningModule subclass"
        )


def load_algo(name: str) -> type:
    """The algo class registered as `name` (imported on first use, then cached)."""
    return _load(ALGO_GROUP, name)


def load_metric(name: str) -> Callable[..., Any]:
    """The metric callable registered as `name`."""
    return _load(METRIC_GROUP, name)


def available_algos() -> dict[str, type]:
    """Name -> loaded algo class, for every installed algo that imports cleanly."""
    return {name: load_algo(name) for name in plugins(ALGO_GROUP)}


def available_metrics() -> dict[str, Callable[..., Any]]:
    """Name -> loaded metric callable, for every installed metric."""
    return {name: load_metric(name) for name in plugins(METRIC_GROUP)}


def check_algo_name(name: str) -> Plugin:
    """The Plugin for `name`, or a one-line error listing what is installed."""
    found = plugins(ALGO_GROUP)
    if name not in found:
        raise _unknown("algo", name, list(found))
    return found[name]


def check_metric_name(name: str) -> Plugin:
    found = plugins(METRIC_GROUP)
    if name not in found:
        raise _unknown("metric", name, list(found))
    return found[name]


def config_search_paths() -> list[str]:
    """Hydra search-path entries for every third-party algo package that ships `configs/`.

    The folder is found from the entry point's top-level module with `find_spec`, which
    locates a top-level package without importing it.
    """
    paths: list[str] = []
    for plugin in plugins(ALGO_GROUP).values():
        top = plugin.target.split(":")[0].split(".")[0]
        if top == "mdlm_dmmd":
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            folder = Path(location) / "configs"
            if (folder / "algo").is_dir():
                uri = f"file://{folder.resolve()}"
                if uri not in paths:
                    paths.append(uri)
    return paths


# -- the Hydra tree ------------------------------------------------------------------------------
def config_dir() -> Path:
    """The shipped Hydra tree: `mdlm_dmmd/configs` when installed, `<repo>/configs` in a checkout."""
    try:
        import mdlm_dmmd.configs as shipped

        return Path(next(iter(shipped.__path__))).resolve()
    except ImportError:
        return Path(__file__).resolve().parents[1] / "configs"


def group_options(group: str, search_paths: Sequence[str] = ()) -> list[str]:
    """Option names of a config group across the main tree and plugin search paths."""
    folders = [config_dir() / group] + [Path(p.removeprefix("file://")) / group for p in search_paths]
    return sorted({f.stem for folder in folders if folder.is_dir() for f in folder.glob("*.yaml")})


def compose_tree(overrides: Sequence[str]):
    """The main config (a DictConfig) composed by Hydra from the shipped tree and every plugin's
    config folder, for `overrides` in Hydra's grammar; values are not validated here."""
    from hydra import compose, initialize_config_dir  # imported here: listing plugins must stay cheap
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    search_paths = config_search_paths()
    extra = [f"hydra.searchpath=[{','.join(search_paths)}]"] if search_paths else []
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            return compose("config", overrides=[*overrides, *extra])
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"bad config override: {first}") from err


def check_algo_config(name: str, search_paths: Sequence[str] | None = None) -> None:
    """`name` is an installed algo with a config `algo/NAME.yaml` on the search path."""
    check_algo_name(name)
    if name not in group_options("algo", config_search_paths() if search_paths is None else search_paths):
        raise UserError(f"algo '{name}' is installed but has no config algo/{name}.yaml on the search path")


def algo_config(name: str):
    """The `algo` node of algo `name` as `algo=NAME` composes it (a DictConfig)."""
    check_algo_config(name)
    return compose_tree([f"algo={name}"]).algo
