"""A griffe extension for the API reference: a dataclass field's `metadata={"help": ...}` becomes its docstring
and its `default=` the value shown.

GoatConfig keeps one help text per field (the command line shows it); with this, the API reference shows the same
text under each field instead of a second copy written as a docstring.
"""

from __future__ import annotations

import ast
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


class FieldHelp(Extension):
    def on_attribute_instance(self, *, node: Any, attr: Attribute, **kwargs: Any) -> None:
        keywords = field_call(node)
        text = help_text(keywords.get("metadata"))
        if text and attr.docstring is None:
            attr.docstring = Docstring(text.replace("*", r"\*"), parent=attr)  # plain text: 3*n*eta is no emphasis
        if "default" in keywords:  # show `r: int = 8`, not the whole field(...) call
            attr.value = ast.unparse(keywords["default"])
