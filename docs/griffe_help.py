"""A griffe extension for the API reference: the help texts of the configuration dataclasses, shown once.

- A field `x: T = field(default=..., metadata={"help": ...})` (GoatConfig) gets the help text as its docstring and
  its default as the value shown: GoatConfig keeps one help text per field, which the command line shows too.
- `GoatTrainingArguments` is made by `dataclasses.make_dataclass` (its fields are generated from GoatConfig's), so
  static analysis sees an assignment: it is documented from the imported class, its docstring and the fields it
  adds to `TrainingArguments`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from typing import Any

from griffe import Attribute, Docstring, Extension


def field_call(node: Any) -> dict[str, ast.expr]:
    """The keywords of `x: T = field(...)` ({} for any other assignment)."""
    call = getattr(node, "value", None)
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "field"):
        return {}
    return {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}


def help_text(metadata: ast.expr | None) -> str | None:
    if isinstance(metadata, ast.Dict):
        for key, value in zip(metadata.keys, metadata.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "help" and isinstance(value, ast.Constant):
                return value.value
    return None


def made_dataclass_doc(module: str, name: str) -> str:
    """The docstring of an imported make_dataclass class, with a list of the fields it adds to its bases."""
    cls = getattr(importlib.import_module(module), name)
    inherited = {f.name for base in cls.__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    lines = [inspect.getdoc(cls) or "", "", "Fields added to its bases, each a command-line flag:", ""]
    for f in dataclasses.fields(cls):
        if f.name not in inherited:
            type_name = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_line = f.metadata.get("help", "").replace("*", r"\*")
            lines.append(f"- `{f.name}` (`{type_name}`, default `{default!r}`): {help_line}")
    return "\n".join(lines)


class FieldHelp(Extension):
    def on_attribute_instance(self, *, node: Any, attr: Attribute, **kwargs: Any) -> None:
        call = getattr(node, "value", None)
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("make_dataclass"):
            attr.docstring = Docstring(made_dataclass_doc(attr.module.path, attr.name), parent=attr)
            attr.value = None
            return
        keywords = field_call(node)
        text = help_text(keywords.get("metadata"))
        if text and attr.docstring is None:
            attr.docstring = Docstring(text.replace("*", r"\*"), parent=attr)  # plain text: 3*n*eta is no emphasis
        if "default" in keywords:  # show `r: int = 8`, not the whole field(...) call
            attr.value = ast.unparse(keywords["default"])
