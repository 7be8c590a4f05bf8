"""Experiment configs: defaults, YAML recipes, ``--set key=value`` overrides, validation.

A config is a nested dict with the sections below. The defaults (no recipe) train LeNet-300-100
with Sparse Momentum at 5% density on scikit-learn's bundled digits, with the optimizer of the
Sparse Momentum paper (Dettmers & Zettlemoyer, Section 4: SGD, lr 0.1, Nesterov momentum 0.9,
weight decay 5e-4, batch 100, learning rate x0.1 every 25000 mini-batches) and 30 epochs, which
finish in seconds on two CPU cores (test accuracy 0.95-0.97 over seeds 0-2).

* ``model``: ``name`` (see ``sparselearn.experiments.models.list_models``); every other key is a
  keyword argument of the model factory (e.g. ``drop_rate`` for the WRNs).
* ``data``: ``name``, ``root``, ``download``, ``batch_size``, ``eval_batch_size`` (``null``: the
  training batch size), ``val_fraction`` (Section 4: a fixed 10%), ``split_seed`` (the seed of that
  fixed split, the same for every training seed), ``augment``, ``num_workers``, ``block_size``
  (tokens per sample of a text data set; ``null``: the data set's default).
* ``optim``: ``name`` (``sgd``, ``adam``, ``adamw``), ``lr``, ``momentum`` (SGD momentum, or
  Adam's ``beta1``), ``beta2``, ``nesterov``, ``weight_decay``, ``label_smoothing``.
* ``lr_schedule``: ``kind`` -- ``constant``; ``step`` (multiply by ``gamma`` every ``step_size``
  mini-batches, Section 4); ``multistep`` (multiply by ``gamma`` at each epoch of ``milestones``,
  Starfire Appendix 7.2); ``cosine`` (to ``min_lr`` at the end of training, Sparse Momentum
  Appendix C.1) -- and ``warmup_epochs`` (linear warm-up, any kind).
* ``sparsity``: ``algorithm`` (a name of ``sparselearn.core.algorithms.algorithms``, or ``dense``
  for no sparsifier), ``density``; every other key is passed to the algorithm as a keyword
  argument (``prune_rate``, ``grow``, ``redistribute``, ``distribution``, ``dense_layers``,
  ``fully_sparse``, ...).
* ``train``: ``epochs``, ``seed``, ``device`` (``auto``: CUDA when available), ``out_dir`` (root
  of the run folders), ``log_every`` (optimizer steps between plain progress lines), ``speed``,
  ``precision`` (``fp32``; ``bf16`` autocast; ``fp16`` autocast with a loss scaler -- see
  :mod:`sparselearn.experiments.precision`), ``compile`` (``torch.compile`` the training
  forward; bookkeeping: it changes how the run executes, not what it computes, up to rounding) and
  ``check_ranks`` (under torchrun: compare a checksum of the masks across ranks after every
  topology update and fail on a difference).
* Recorded by ``train`` (not read): ``train.world_size`` (processes, 1 without torchrun) and
  ``data.rank_batch_size`` (``data.batch_size / world_size``, each rank's share of the global batch).

A recipe is a YAML file in ``recipes/`` holding any subset of these keys; ``extends: <recipe>``
starts from another recipe. Top-level ``description`` says which paper setting it reproduces.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from sparselearn.experiments.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(UserError, ValueError):
    """A config key is unknown or has a bad value; the message names the key."""


#: Sections whose extra keys are keyword arguments of the model factory / the algorithm.
OPEN_SECTIONS = ("model", "sparsity")
#: Top-level keys that are not sections.
META_KEYS = ("recipe", "description")
#: Keys that change where and how a run is executed or logged, not what it computes: a run may be
#: resumed with different values, and they are left out of the config hash.
BOOKKEEPING_KEYS = (
    "description", "recipe", "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
    "train.device", "train.out_dir", "train.log_every", "train.compile",
    # issue 12: a run is defined by its global batch (data.batch_size); how many processes share it
    # is recorded, and a run may resume with another world size (the same global batches)
    "train.world_size", "data.rank_batch_size", "train.check_ranks",
)

#: Keys added to the schema after runs were made with it: at their default they are left out of the
#: hash and a saved config without them reads as having the default, so an earlier run keeps its
#: folder name and ``--resume`` still continues it.
ADDED_KEYS = ("train.precision",)

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "multistep", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


# ------------------------------------------------------------------------------------------------
# the schema: one Field per closed key


@dataclass(frozen=True)
class Field:
    """Default, type and range of one config key.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` or ``list`` (a list of ints); ``check`` returns
    an error message for a bad value, or ``None``.
    """

    kind: type
    default: Any = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit_open(v) -> str | None:  # [0, 1)
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _density(v) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1] (the fraction of weights kept)"


def _one_of(options: Sequence[str]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _milestones(v) -> str | None:
    if any(m < 0 for m in v):
        return "epochs must be >= 0"
    if list(v) != sorted(v):
        return "must be increasing"
    return None


def _device(v) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) else "must be auto, cpu, cuda, cuda:N or mps"


#: The schema: every closed key once, with its default, type and range (the defaults are the
#: Sparse Momentum paper's MNIST optimizer on digits; see the module docstring). The sections'
#: order here is the order of a saved config.yaml.
FIELDS: dict[str, Field] = {
    "model.name": Field(str, "lenet300-100"),
    "data.name": Field(str, "digits"),
    "data.root": Field(str, None, nullable=True),
    "data.download": Field(bool, False),
    "data.batch_size": Field(int, 100, check=_positive),
    "data.eval_batch_size": Field(int, None, nullable=True, check=_positive),
    "data.val_fraction": Field(float, 0.1, check=_unit_open),
    "data.split_seed": Field(int, 0),
    "data.augment": Field(bool, True),
    "data.num_workers": Field(int, 0, check=_non_negative),
    "data.block_size": Field(int, None, nullable=True, check=_positive),
    "optim.name": Field(str, "sgd", check=_one_of(OPTIMIZERS)),
    "optim.lr": Field(float, 0.1, check=_positive),
    "optim.momentum": Field(float, 0.9, check=_unit_open),
    "optim.beta2": Field(float, 0.999, check=_unit_open),
    "optim.nesterov": Field(bool, True),
    "optim.weight_decay": Field(float, 5e-4, check=_non_negative),
    "optim.label_smoothing": Field(float, 0.0, check=_unit_open),
    "lr_schedule.kind": Field(str, "step", check=_one_of(LR_SCHEDULES)),
    "lr_schedule.step_size": Field(int, 25000, check=_positive),
    "lr_schedule.milestones": Field(list, [], check=_milestones),
    "lr_schedule.gamma": Field(float, 0.1, check=_positive),
    "lr_schedule.warmup_epochs": Field(float, 0, check=_non_negative),
    "lr_schedule.min_lr": Field(float, 0.0, check=_non_negative),
    "sparsity.algorithm": Field(str, "sparse-momentum"),
    "sparsity.density": Field(float, 0.05, check=_density),
    "train.epochs": Field(int, 30, check=_positive),
    "train.seed": Field(int, 0),
    "train.device": Field(str, "auto", check=_device),
    "train.out_dir": Field(str, "runs"),
    "train.log_every": Field(int, 100, check=_positive),
    "train.speed": Field(str, "masked", check=_one_of(("masked", "auto", "kernels", "compact"))),
    "train.precision": Field(str, "fp32", check=_one_of(PRECISIONS)),
    "train.compile": Field(bool, False),
    "train.check_ranks": Field(bool, False),
    "train.world_size": Field(int, 1, check=_positive),
    "data.rank_batch_size": Field(int, None, nullable=True, check=_positive),
}


def _defaults() -> dict[str, Any]:
    """The nested default config, made from :data:`FIELDS` (the model and sparsity sections start
    with their closed keys only; their options have no defaults here)."""
    out: dict[str, Any] = {"recipe": None, "description": "sparselearn defaults (no recipe)"}
    for key, f in FIELDS.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = copy.deepcopy(f.default)
    return out


DEFAULTS: dict[str, Any] = _defaults()

_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, field: Field) -> Any:
    """``value`` converted to the field's type, or :class:`ConfigError` naming ``key``."""
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"config key {key!r} must not be null")
    kind = field.kind
    bad = ConfigError(f"config key {key!r} must be {_kind_name(field)}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            out = value.lower() in _TRUE
        else:
            raise bad
    elif kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            out = int(value)
        else:
            raise bad
    elif kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            out = float(value)
        else:
            raise bad
        if not math.isfinite(out):
            raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise bad
        out = value
    elif kind is list:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        out = [_coerce(f"{key}[{i}]", v, Field(int)) for i, v in enumerate(value)]
    else:  # pragma: no cover - schema error
        raise TypeError(kind)
    if field.check is not None:
        msg = field.check(out)
        if msg:
            raise ConfigError(f"config key {key!r} {msg}, got {value!r}")
    return out


def _kind_name(field: Field) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
            list: "a list of integers"}[field.kind]
    return name + (" or null" if field.nullable else "")


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``0.1``, ``true``, ``null``, ``[30, 60]``), with ``5e-4``-style
    numbers read as floats (YAML 1.1 reads them as strings)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    return value


def _open_value(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    return value


# ------------------------------------------------------------------------------------------------
# setting keys


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid keys: {', '.join(valid)})")


def _all_keys() -> list[str]:
    return sorted(set(FIELDS) | set(META_KEYS) | {f"{s}.<option>" for s in OPEN_SECTIONS})


def _switches_family(old: Any, new: Any) -> bool:
    """True if ``sparsity.algorithm`` changes to an algorithm that does not take ``old``'s options."""
    if old is None or old == new:
        return False
    from sparselearn.core.algorithms import algorithm_family

    return algorithm_family(str(old)) != algorithm_family(str(new))


def set_key(config: dict, key: str, value: Any) -> None:
    """Sets dotted ``key`` (``optim.lr``) in ``config`` in place, checking the key and the value.

    Raises:
        ConfigError: unknown key or bad value; the message names the key.
    """
    if key in META_KEYS:
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        config[key] = value
        return
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise _unknown_key(key, _all_keys())
    section, name = parts
    if section not in DEFAULTS or section in META_KEYS:
        raise _unknown_key(key, _all_keys())
    if key == "sparsity.algorithm" and _switches_family(config.get("sparsity", {}).get("algorithm"), value):
        # Options belong to the algorithm they were written for (a recipe's prune_rate means nothing to
        # SNIP): switching to another algorithm keeps only the density (a preset of the same algorithm,
        # such as starfire-window for starfire, keeps them); options set after the switch apply.
        config["sparsity"] = {k: v for k, v in config["sparsity"].items() if k == "density"}
    if key in FIELDS:
        config.setdefault(section, {})[name] = _coerce(key, value, FIELDS[key])
    elif section in OPEN_SECTIONS:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"config key {key!r}: option names must be Python identifiers")
        config.setdefault(section, {})[name] = _open_value(value)
    else:
        raise _unknown_key(key, [k for k in FIELDS if k.startswith(section + ".")])


def merge(config: dict, overlay: Mapping[str, Any], source: str = "") -> dict:
    """Applies a nested ``overlay`` (a recipe's dict) to ``config`` in place, key by key."""
    where = f" (in {source})" if source else ""
    for section, body in overlay.items():
        if section in META_KEYS:
            set_key(config, section, body)
        elif isinstance(body, Mapping):
            if section not in DEFAULTS or section in META_KEYS:
                raise ConfigError(f"unknown config section {section!r}{where}; valid: {', '.join(_sections())}")
            for name, value in body.items():
                try:
                    set_key(config, f"{section}.{name}", value)
                except ConfigError as e:
                    raise ConfigError(f"{e}{where}") from None
        elif section == "extends":
            continue
        else:
            raise ConfigError(
                f"config key {section!r}{where} must be a section (a mapping) or one of {', '.join(META_KEYS)}"
            )
    return config


def _sections() -> list[str]:
    return [k for k in DEFAULTS if k not in META_KEYS]


# ------------------------------------------------------------------------------------------------
# recipes


def list_recipes() -> list[str]:
    """Names of the bundled recipes (the YAML files in ``recipes/``), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe ``name``; a path to a ``.yaml`` file is accepted as well.

    Raises:
        ConfigError: unknown recipe; the message lists the bundled ones.
    """
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = RECIPES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name, list_recipes(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(list_recipes())})")


def load_recipe(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe as a nested dict, with its ``extends`` chain already merged in (the parent first)."""
    path = recipe_path(name)
    if str(path) in _seen:
        raise ConfigError(f"recipe {name!r}: 'extends' forms a cycle ({' -> '.join(_seen)})")
    try:
        body = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"recipe {path}: must be a mapping of sections")
    parent = body.get("extends")
    if parent is None:
        return body
    base = load_recipe(str(parent), _seen + (str(path),))
    merged = copy.deepcopy(base)
    for section, value in body.items():
        if section == "extends":
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(section), Mapping):
            inherited = merged[section]
            if section == "sparsity" and _switches_family(inherited.get("algorithm"), value.get("algorithm", inherited.get("algorithm"))):
                # a child recipe that switches algorithm inherits only the density (see set_key)
                inherited = {k: v for k, v in inherited.items() if k == "density"}
            merged[section] = {**inherited, **value}
        else:
            merged[section] = value
    return merged


def recipe_description(name: str) -> str:
    """The first line of the recipe's ``description`` (empty if it has none)."""
    lines = str(load_recipe(name).get("description") or "").strip().splitlines()
    return lines[0] if lines else ""


# ------------------------------------------------------------------------------------------------
# resolving


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=0.05), got {text!r}")
    return key.strip(), parse_value(value.strip())


def resolve_config(
    recipe: str | None = None,
    overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
    check_names: bool = True,
) -> dict:
    """The full config: defaults, then the recipe, then the overrides (dotted keys), validated.

    Args:
        recipe: a recipe name (see :func:`list_recipes`), a path to a YAML file, or ``None``.
        overrides: ``{"optim.lr": 0.05}`` or ``[("optim.lr", 0.05), ...]``, applied in order.
        check_names: also check that the model, data set and algorithm names are registered.

    Raises:
        ConfigError: unknown recipe or key, or a bad value; the message names the key.
    """
    config = copy.deepcopy(DEFAULTS)
    if recipe is not None:
        merge(config, load_recipe(recipe), source=f"recipe {recipe!r}")
        config["recipe"] = _recipe_label(recipe)
    else:
        # The quick start (no recipe) uses the sparsity-aware initialisation: on digits at 5% it leaves
        # the 2.30 plateau after 1 epoch instead of 4-5, at the same final accuracy (docs/results.md).
        # Paper recipes keep the paper's (dense) initialisation.
        config["sparsity"]["init_scale"] = "active-fan-in"
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, value in items:
        set_key(config, key, value)
    return validate(config, check_names=check_names)


def _recipe_label(recipe: str) -> str:
    p = Path(recipe)
    return p.stem if p.suffix in (".yaml", ".yml") else recipe


def validate(config: Mapping[str, Any], check_names: bool = True) -> dict:
    """Checks a full config (for example one read back from a run folder) and returns a copy.

    Raises:
        ConfigError: a missing, unknown or bad key; the message names it.
    """
    out = merge(copy.deepcopy(DEFAULTS), config)
    for key in FIELDS:
        section, name = key.split(".")
        out[section][name] = _coerce(key, out[section][name], FIELDS[key])
    out["data"]["name"] = out["data"]["name"].strip().lower().replace("_", "-")  # as load_dataset reads it
    if check_names:
        _check_names(out)
    return out


def _check_names(config: dict) -> None:
    from sparselearn.core.algorithms import algorithms
    from sparselearn.experiments.data import list_datasets
    from sparselearn.experiments.models import list_models

    model = config["model"]["name"]
    if model not in list_models():
        raise _bad_name("model.name", model, list_models())
    data = config["data"]["name"]
    if data not in list_datasets():
        raise _bad_name("data.name", config["data"]["name"], list_datasets())
    algorithm = config["sparsity"]["algorithm"]
    if algorithm != "dense" and algorithm not in algorithms:
        raise _bad_name("sparsity.algorithm", algorithm, ["dense", *algorithms.names()])


def _bad_name(key: str, value: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(value, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"config key {key!r}: unknown name {value!r}{hint} (valid: {', '.join(valid)})")


# ------------------------------------------------------------------------------------------------
# helpers for runs


def get_key(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` (``None`` when absent)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k not in ("extends",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def sparsity_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sparsity`` keys passed to the algorithm as keyword arguments (all but the name and
    the density)."""
    return {k: v for k, v in config["sparsity"].items() if k not in ("algorithm", "density")}


def model_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` keys passed to the model factory (all but the name)."""
    return {k: v for k, v in config["model"].items() if k != "name"}


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = ("train.seed",)) -> str:
    """A short hash of what the config computes: every key except :data:`BOOKKEEPING_KEYS` and
    ``ignore`` (by default the seed, so the runs of one setting with different seeds share it)."""
    skip = set(BOOKKEEPING_KEYS) | set(ignore)
    flat = {k: v for k, v in flatten(config).items()
            if k not in skip and not (k in ADDED_KEYS and v == FIELDS[k].default)}
    blob = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def changed_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys (outside :data:`BOOKKEEPING_KEYS`) whose values differ between ``a`` and ``b``."""
    added = {k: FIELDS[k].default for k in ADDED_KEYS}
    fa, fb = {**added, **flatten(a)}, {**added, **flatten(b)}
    return sorted(k for k in set(fa) | set(fb) if k not in BOOKKEEPING_KEYS and fa.get(k) != fb.get(k))


def run_name(config: Mapping[str, Any]) -> str:
    """``<recipe or data set>-<model>-<algorithm>-d<density>-<hash>`` (``...-dense-<hash>`` for
    dense runs): the folder under ``train.out_dir`` of this config's runs.

    The readable part is for people; the hash (the first 8 digits of :func:`config_hash`) covers
    every key that changes the result -- data set, learning rate, epochs, every option -- so two
    configs never share a folder, and the same config (whatever the seed, device or output
    settings) always finds its folder again for ``--resume``."""
    head = config.get("recipe") or config["data"]["name"]
    algorithm = config["sparsity"]["algorithm"]
    tail = "dense" if algorithm == "dense" else f"{algorithm}-d{config['sparsity']['density']:g}"
    return f"{head}-{config['model']['name']}-{tail}-{config_hash(config)[:8]}"


def to_yaml(config: Mapping[str, Any]) -> str:
    """The config as YAML, sections in schema order."""
    ordered = {k: config[k] for k in DEFAULTS if k in config}
    ordered.update({k: v for k, v in config.items() if k not in ordered})
    return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with lists on one line (``milestones: [30, 60, 90]``)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def load_config(path: str | Path, check_names: bool = True) -> dict:
    """Reads and validates a saved ``config.yaml`` (a run folder's resolved config)."""
    try:
        body = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({type(e).__name__}); restore it, or start "
                          f"the run over with --overwrite") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    return validate(body, check_names=check_names)
