"""The typed-configuration base that rl/ and carla_env/ share (both validate YAML into `Section`s).

It sits below both so that imports run one way: rl/ and callbacks/ use carla_env/, and
carla_env/ never imports rl/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message names the key."""


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `3e-4` is a string; YAML 1.2 (and every user) says float."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A key given twice is a mistake (the second silently won): refused, with both lines."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first on line {seen[key].line + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node)


_Yaml12FloatLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# A config is small; one that expands to more values than this through YAML aliases (the
# "billion laughs" bomb: nested anchors, each repeating the last) would hang whatever reads it.
MAX_EXPANDED_VALUES = 100_000


def load_yaml(text: str) -> Any:
    data = yaml.load(text, Loader=_Yaml12FloatLoader)
    if _expanded_size(data, {}) > MAX_EXPANDED_VALUES:
        raise yaml.YAMLError(
            f"its aliases (*name) expand to more than {MAX_EXPANDED_VALUES:,} values: refused "
            "(a config is never that large; nested aliases that repeat each other are a YAML bomb)"
        )
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark:
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).replace('in "<unicode string>", ', "at ").split())


def read_yaml_file(path: Path, kind: str) -> Any:
    """The YAML document in the file `path` (a `kind`, e.g. "config file", for the messages), or
    a ConfigError in one line naming the file and what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} not found" if not path.exists() else f"{path}: not a file")
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); is it the {kind}?") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """How many values `value` has once every alias is expanded; each shared object is counted
    once per reference, but computed once (memo), so a bomb is measured in linear time."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in memo:
        memo[id(value)] = 0  # a self-referencing alias: counted as empty, not followed forever
        items = value.items() if isinstance(value, dict) else enumerate(value)
        memo[id(value)] = 1 + sum(_expanded_size(v, memo) for _, v in items)
    return memo[id(value)]


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default), "1" is not
    # an int (YAML already gives the right types), and a float must be a number (.inf and .nan
    # are YAML floats too: an infinite learning rate or reward bound is always a mistake).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def format_errors(
    source: str, err: ValidationError, key_prefix: str = "", schema_file: str = "rl/config.py"
) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = key_prefix + ".".join(str(p) for p in e["loc"])
        key = key.rstrip(".") or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling; see {schema_file})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)
