"""`--help-config`: every config key with its type, default, allowed values and one-line doc,
generated from the typed schema (mmpretrain.config), never written by hand.

The docs are the schema's own comments: the comment lines right above a field plus the comment
at the end of its line, read from the module source with `tokenize` (a comment cannot be seen at
run time otherwise, and the source is what people edit). A field without one falls back to the
same field in a base class; tests/test_cli_help.py fails when a key has none at all.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import MISSING

from mmpretrain import config as C

# tower sections (model.vision / .audio / .text): checks written in code (config._check_tower_init)
_TOWER_ALLOWED = {
    "init": "auto | random | hf | a path to an export or checkpoint",
    "unlock_last_n_layers": "[0, inf)",
    "lr_mult": "[0, 1000]",
    "dropout": "[0, 1] or null",
    "drop_path": "[0, 1)",
}
# other keys whose checks are written in code (config.validate)
_OTHER_ALLOWED = {
    "data.train[].weight": "(0, inf)",
    "data.image_mean": "3 numbers (R, G, B) or null",
    "data.image_std": "3 numbers (R, G, B), each > 0, or null",
    "model.text.decoder_depth": "[0, inf)",
    "eval.templates": "strings holding {} (the class name)",
    "eval.caption_attributes": "null | demo",
    "log.report_to": "a list of jsonl | tensorboard | wandb (config.REPORT_TO)",
}


@dataclass(frozen=True)
class KeyHelp:
    """One schema key: dotted name (`[]` = any list item), type annotation, default, allowed, doc."""

    key: str
    type: str
    default: Any
    allowed: str
    doc: str

    @property
    def default_text(self) -> str:
        return "(required)" if self.default is MISSING or self.default == "???" else yaml_value(self.default)


def yaml_value(v: Any) -> str:
    """A value as one line of YAML flow style (what a config file or an override would say)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


# ----------------------------------------------------------------------------- docs from comments


@functools.lru_cache(maxsize=None)
def _module_comments(module: str) -> Tuple[Dict[int, str], frozenset, Dict[str, Dict[str, Tuple[int, int]]]]:
    """(line -> comment text, lines holding only a comment, class -> field -> (first, last line))."""
    src = inspect.getsource(sys.modules[module])
    comments: Dict[int, str] = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    fields: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef):
            fields[node.name] = {s.target.id: (s.lineno, s.end_lineno or s.lineno) for s in node.body
                                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return comments, frozenset(set(comments) - code_lines), fields


def _own_doc(cls: type, name: str) -> str:
    """The comments of field `name` written in class `cls` itself ('' when none or no source)."""
    try:
        comments, comment_only, fields = _module_comments(cls.__module__)
    except (OSError, TypeError, SyntaxError, KeyError):  # no source (zipped / frozen install)
        return ""
    span = fields.get(cls.__qualname__, {}).get(name)
    if span is None:
        return ""
    first, last = span
    above: List[str] = []
    line = first - 1
    while line in comment_only:  # the comment block right above the field, up to a blank or code line
        above.insert(0, comments[line])
        line -= 1
    trailing = [comments[i] for i in range(first, last + 1) if i in comments]
    # the block above reads as one paragraph; a trailing comment adds a clause to it
    return "; ".join(t for t in (" ".join(above), " ".join(trailing)) if t)


def field_doc(cls: type, name: str) -> str:
    """The doc of field `name` of schema class `cls`: its own comments, else a base class's."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in getattr(klass, "__annotations__", {}):
            doc = _own_doc(klass, name)
            if doc:
                return doc
    return ""


def class_doc(cls: type) -> str:
    """A schema class's own docstring in one line ('' for the signature dataclasses make up)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


# ----------------------------------------------------------------------------- keys


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _item_class(f: dataclasses.Field, owner: type) -> Optional[type]:
    """The schema class of a `List[SomeConfig]` field's items, else None."""
    hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if hint.startswith("List[") and hint.endswith("]"):
        cls = getattr(sys.modules[owner.__module__], hint[5:-1], None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls
    return None


def _allowed(key: str, type_text: str) -> str:
    if key in C._CHOICES:
        return " | ".join("null" if v is None else str(v) for v in C._CHOICES[key])
    if key in C._RANGES:
        return C._range_text(key)
    if key in C._PAIR_RANGES:
        lo, hi = C._PAIR_RANGES[key]
        return f"[low, high] with {lo} <= low <= high <= {hi}"
    if key in _OTHER_ALLOWED:
        return _OTHER_ALLOWED[key]
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "model" and parts[1] in C.POOLINGS:
        section, name = parts[1], parts[2]
        if name == "pooling":
            return " | ".join(C.POOLINGS[section])
        if name == "kind":
            kinds = _tower_kinds(section)
            return " | ".join(kinds) if kinds else ""
        if name in _TOWER_ALLOWED:
            return _TOWER_ALLOWED[name]
    if key == "loss.pairs":
        from mmpretrain import modalities

        return f"pair -> weight >= 0; pairs: {', '.join(modalities.pair_names())}"
    return ""


def _tower_kinds(section: str) -> List[str]:
    from mmpretrain import modalities  # torch-free registry

    for m in modalities.all_modalities():
        if m.config_section == section:
            return sorted(m.towers)
    return []


def schema_keys(cls: type = C.Config, prefix: str = "") -> List[KeyHelp]:
    """Every leaf key of the schema, depth first in declaration order; a list of sections
    (`data.train`) contributes its item keys as `data.train[].name`, ..."""
    out: List[KeyHelp] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        type_text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if dataclasses.is_dataclass(default):
            out += schema_keys(type(default), key + ".")
            continue
        item = _item_class(f, cls)
        if item is not None:
            out.append(KeyHelp(key, type_text, default, "a list of sections (keys below)", field_doc(cls, f.name)))
            out += schema_keys(item, key + "[].")
            continue
        out.append(KeyHelp(key, type_text, default, _allowed(key, type_text), field_doc(cls, f.name)))
    return out


def sections(cls: type = C.Config, prefix: str = "") -> Dict[str, str]:
    """dotted section -> its doc (the field's comments, then the section class's docstring)."""
    out: Dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = _default(f)
        sub = type(default) if dataclasses.is_dataclass(default) else _item_class(f, cls)
        if sub is None:
            continue
        key = f"{prefix}{f.name}" + ("[]" if not dataclasses.is_dataclass(default) else "")
        out[key] = class_doc(sub) or field_doc(cls, f.name)
        out.update(sections(sub, key + "."))
    return out


def help_config(prefix: str = "", width: int = 100) -> str:
    """The --help-config text: every key starting with `prefix` (all when empty). ValueError when none does."""
    keys = [k for k in schema_keys() if k.key.startswith(prefix)]
    if not keys:
        top = sorted({k.key.split(".")[0] for k in schema_keys()})
        raise ValueError(f"no config key starts with {prefix!r}; sections: {', '.join(top)}")
    docs = sections()
    lines = ["Config keys (YAML file via --config, or key=value overrides after the flags; [] = each list item):"]
    shown = set()
    for k in keys:
        section = k.key.rsplit(".", 1)[0] if "." in k.key else ""
        if section and section not in shown:
            shown.add(section)
            lines += ["", f"{section}:"] + [f"  # {t}" for t in textwrap.wrap(docs.get(section, ""), width - 4)]
        head = f"  {k.key}: {k.type} = {k.default_text}"
        if k.allowed:
            head += f"   allowed: {k.allowed}"
        lines.append(head)
        lines += textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"
