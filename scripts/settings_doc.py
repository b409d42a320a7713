"""Write docs/settings.md, the reference of every setting, from the fields of app/settings.py.

    python scripts/settings_doc.py          # (re)write docs/settings.md
    python scripts/settings_doc.py --check  # exit 1 if docs/settings.md is not what this would write

Each setting's name, default, allowed values and description come from its `Field(...)`, so the
reference cannot drift from what the server accepts: tests/test_settings.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import types
import typing

import annotated_types
from pydantic import ByteSize

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402

DOC = ROOT / "docs" / "settings.md"
COMMAND = "python scripts/settings_doc.py"

HEADER = f"""# Settings

Every setting of the server, read from the environment (or a `.env` file in the working directory) when
it starts. A bad value stops it with one line naming the setting, the value and what is allowed. Choices
are case-insensitive.

Generated from `app/settings.py` by `{COMMAND}`; do not edit by hand.

| setting | default | allowed | description |
|---|---|---|---|
"""


def _optional(annotation) -> tuple[object, bool]:
    """The type inside `X | None`, and whether None (unset) is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(metadata) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f">= {item.ge:g}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt:g}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"<= {item.le:g}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt:g}")
    return ", ".join(parts)


def allowed(field) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    annotation, unset_allowed = _optional(field.annotation)
    if "allowed" in extra:
        text = str(extra["allowed"])
    elif typing.get_origin(annotation) is typing.Literal:
        text = ", ".join(str(a) for a in typing.get_args(annotation))
    elif annotation is bool:
        text = "true, false"
    elif annotation is ByteSize:
        text = "bytes, or a size with a unit (512MiB, 12GiB)"
    elif annotation in (int, float):
        kind = "integer" if annotation is int else "number"
        bounds = _bounds(field.metadata)
        text = f"{kind} {bounds}" if bounds else kind
    else:
        text = "text"
    return text + (", or unset" if unset_allowed else "")


def default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    rows = [
        f"| `{name.upper()}` | `{_cell(default(field))}` | {_cell(allowed(field))} | {_cell(field.description or '')} |"
        for name, field in Settings.model_fields.items()
    ]
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC.relative_to(ROOT)} is stale; regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)} ({len(Settings.model_fields)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
