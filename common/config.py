"""The typed-configuration base that rl/ and carla_env/ share (both validate YAML into `Section`s).

It sits below both so that imports run one way: rl/ and callbacks/ use carla_env/, and
carla_env/ never imports rl/.
"""

from __future__ import annotations

import re
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


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12FloatLoader)


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default), and
    # "1" is not an int: YAML already gives the right types.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
