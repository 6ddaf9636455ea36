"""docs/config-reference.md, generated from the typed settings in raycv/config.py so it cannot drift.

    python -m raycv.config_reference > docs/config-reference.md

Every key of a search space: its dotted name, type and bounds, default, and what it does -- the field's
`description=` where it has one, else the comments written beside and above it in config.py.
tests/test_docs.py fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raycv import config as config_module
from raycv.config import BACKBONE_TYPES, Config, Dimension, Section

HEADER = """\
# Config reference

What it is for: every key a search space (or a `key=value` override) can set, with its type, bounds, default
and what it does. Generated from the typed settings in `raycv/config.py` by
`python -m raycv.config_reference > docs/config-reference.md`; do not edit it by hand
(`tests/test_docs.py` fails when it is stale). How spaces and overrides work: [search-spaces.md](search-spaces.md).
"""

BOUNDS = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("<=", "le"),
          annotated_types.Lt: ("<", "lt")}


def field_comments(cls: type) -> dict[str, str]:
    """field name -> the comments of its line in config.py: those on the lines right above it, then the one
    after it on its own line, joined into one text."""
    lines, start = inspect.getsourcelines(cls)
    source = "".join(lines)
    comments: dict[int, str] = {}  # line (1-based, within the class) -> its comment text
    own_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if not lines[row - 1][: tok.start[1]].strip():
                own_line.add(row)
    body = ast.parse(inspect.cleandoc(source) if source[0].isspace() else source).body[0].body
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in own_line:
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[node.end_lineno]] if node.end_lineno in comments and node.end_lineno not in own_line \
            else []
        out[node.target.id] = " ".join(above + trailing)
    return out


def type_name(annotation: Any) -> str:
    """A field's type as a search space writes it: int, float, text, one of "a" / "b", ..."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " / ".join(f'"{value}"' for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return f"[{', '.join(type_name(a) for a in args)}]" if origin is tuple else f"list of {type_name(args[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping {type_name(key)} -> {type_name(value)}"
    names = {type(None): "null", str: "text", int: "int", float: "float", bool: "bool", Any: "any"}
    if annotation in names:
        return names[annotation]
    if annotation is Dimension:
        return "distribution (below)"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return str(annotation)


def bounds(metadata: list) -> str:
    """pydantic's ge/gt/le/lt of a field as `>= 2, <= 50`."""
    return ", ".join(f"{BOUNDS[type(m)][0]} {getattr(m, BOUNDS[type(m)][1])}" for m in metadata if type(m) in BOUNDS)


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_rows(cls: type[Section], prefix: str) -> list[str]:
    """One table row per key of `cls` (and of the sections inside it, which come after it as their own rows)."""
    rows, nested = [], []
    comments = field_comments(cls)
    for name, field in cls.model_fields.items():
        key = prefix + name
        if key == "model.backbone":
            nested.append(("model.backbone", None))
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            nested.append((key, annotation))
            continue
        what = field.description or comments.get(name, "")
        kind = type_name(annotation) + (f" ({bounds(field.metadata)})" if bounds(field.metadata) else "")
        rows.append(f"| `{key}` | {cell(kind)} | `{cell(default_text(field))}` | {cell(what)} |")
    return rows, nested


def section_markdown(cls: type[Section], prefix: str, title: str, intro: str = "") -> list[str]:
    rows, nested = section_rows(cls, prefix)
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    out = [f"## `{title}`", ""]
    if intro or doc:
        out += [intro or " ".join(doc.split()), ""]
    if rows:
        out += ["| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    for key, sub in nested:
        if key == "model.backbone":
            out += backbone_markdown()
        else:
            out += section_markdown(sub, key + ".", key)
    return out


def backbone_markdown() -> list[str]:
    default = default_text(config_module.ModelConfig.model_fields["backbone"])
    out = ["## `model.backbone`", "",
           f"The model to fine-tune; `type` picks one of the kinds below and which other keys apply (default "
           f"`{default}`). Setting `model.backbone.type` to another kind in an override drops the file's keys "
           "of the old kind.", ""]
    for kind, cls in BACKBONE_TYPES.items():
        rows, _ = section_rows(cls, "model.backbone.")
        out += [f"### `type: {kind}`", "", "| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    return out


def dimension_markdown() -> list[str]:
    rows, _ = section_rows(Dimension, "")
    return ["## `search.params` values", "",
            "Each key under `search.params` is a dotted key under `model.` or `train.` (the folds stay fixed "
            "across trials); its value gives exactly one of these, as Ray Tune names them:", "",
            "| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]


def config_reference() -> str:
    """docs/config-reference.md as markdown."""
    out = [HEADER]
    for name, field in Config.model_fields.items():
        out += section_markdown(field.annotation, f"{name}.", name)
        if name == "search":
            out += dimension_markdown()
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
