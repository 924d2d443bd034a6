"""``python -m editrl.scripts.config_doc [--check]``: write ``docs/CONFIG.md``, every key of the topology file (dotted
path, type, default, one line of meaning), generated from the config schema (the dataclasses of
:mod:`editrl.common.config` and :class:`editrl.common.security.SecurityConfig`; a field's meaning is its trailing
comment). ``--check`` exits 1 when the page and the schema disagree (the test suite runs it)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from editrl.common.config import TopologyConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
_FIELD = re.compile(r"^\s+(\w+): [^#]*?(?:#\s*(.*))?$")
HEADER = """# The topology file

Every key of the YAML topology file, generated from the config schema by `python -m editrl.scripts.config_doc`
(`tests/unit/scripts/test_config_doc.py` fails when this page and the schema disagree). Unknown keys are rejected
and a bad value stops every process at start-up naming its dotted path; relative paths are resolved against the
YAML file's folder. Sections: {sections}.

| key | type | default | meaning |
|---|---|---|---|
"""


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its trailing comment in the class source."""
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m and m.group(2) and not line.strip().startswith(("#", '"""', "def ")):
            out[m.group(1)] = m.group(2).strip()
    return out


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "mapping"
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(hint, str(hint))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, int | float):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def rows(cls: type = TopologyConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, meaning)`` of every key below ``cls``, in schema order."""
    hints, comments, out = typing.get_type_hints(cls), _comments(cls), []
    for field in dataclasses.fields(cls):
        if field.name == "source_path":  # set by load_config, not a key of the file
            continue
        key, hint = f"{prefix}{field.name}", hints[field.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint):
            out += rows(hint, f"{key}.")  # a section (or a subsection): its keys
            continue
        out.append((key, _type_name(hint), _show(_default(field)), comments.get(field.name, "")))
        if inner:  # an optional subsection (null = absent): its keys when given
            out += rows(inner[0], f"{key}.")
    return out


def render() -> str:
    sections = [f.name for f in dataclasses.fields(TopologyConfig) if f.name != "source_path"]
    body = "".join(f"| `{k}` | {t} | {d} | {m} |\n" for k, t, d, m in rows())
    return HEADER.format(sections=", ".join(f"`{s}`" for s in sections)) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editrl.scripts.config_doc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python -m editrl.scripts.config_doc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC} ({len(rows())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
