"""`mel config show CONFIG [key=value ...]`: the config a run would get (after `extends:` and the overrides),
every field with its value, its help, [P] (the paper fixes the default) or [C] (our choice), its allowed range,
and, where a value differs from the default, which file or override set it. `--plain`: the values alone, as a
YAML file that loads to the same config (and config hash)."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path
from typing import Any

WIDTH = 116  # comment lines are wrapped to this width (the repo's line length is 120)
TAGS = {"paper": "[P]", "choice": "[C]"}
OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def register(sub) -> None:
    """The subcommands of this module on `mel`'s parser."""
    cp = sub.add_parser("config", help="discover the configuration: `mel config show CONFIG [key=value ...]`")
    config_sub = cp.add_subparsers(dest="config_cmd", required=True)
    sp = config_sub.add_parser("show", help="the resolved config (extends, then overrides): every field with its "
                                            "value, help, [P]/[C] source, range and where a non-default came from")
    sp.add_argument("config", help="a YAML config (configs/*.yaml, or one of yours)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, as `mel run` takes them")
    sp.add_argument("--plain", action="store_true",
                    help="values only, loadable YAML: `mel config show X --plain > f.yaml; mel run --config f.yaml` "
                         "trains the same config (same config hash)")
    sp.set_defaults(fn=cmd_config_show)


def cmd_config_show(args) -> int:
    from mel_core import config as config_mod

    traced = config_mod.load_traced(args.config, args.overrides)
    print(render_plain(traced, args) if args.plain else render(traced, args), end="")
    return 0


# ------------------------------------------------------------------------------------------- rendering


def _yaml_value(value: Any) -> str:
    """`value` as YAML that reads back as itself on one line (flow style for lists and dicts)."""
    import yaml

    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    elif isinstance(value, dict):
        value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    text = yaml.safe_dump([value], default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text[1:-1]  # the one-element list's brackets: a scalar alone would end with yaml's '...' marker


def _show_path(p: str) -> str:
    """A file as the user would type it: relative to the working directory when it is below it."""
    rel = os.path.relpath(p)
    return p if rel.startswith("..") else rel


def _where(origin: str) -> str:
    return origin if origin.startswith("override ") else _show_path(origin)


def _range(meta: dict) -> str:
    parts = [f"{OPS[op]} {bound:g}" for op, bound in (meta.get("range") or {}).items()]
    if meta.get("one_of"):
        parts.append("one of " + " | ".join(map(str, meta["one_of"])))
    return ", ".join(parts)


def _comment(text: str, indent: str, first: str = "# ", rest: str = "# ") -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent), initial_indent=indent + first, subsequent_indent=indent + rest,
                         break_long_words=False, break_on_hyphens=False)


def file_notes(path: str) -> dict[str, str]:
    """The comment a config file writes after each value it sets, by dotted key (with its continuation lines:
    comment-only lines right after it, indented deeper than the key), e.g. '[C] at the paper's 1.0 ...'.
    Values spread over several lines get none."""
    import yaml

    text = Path(path).read_text()
    lines = text.splitlines()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    notes: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for key_node, value in node.value:
            key = f"{prefix}{key_node.value}"
            if isinstance(value, yaml.MappingNode) and value.flow_style is not True:
                walk(value, key + ".")
                continue
            line = key_node.start_mark.line
            if value.end_mark.line != line:  # a block list or a multi-line string
                continue
            after = lines[line][value.end_mark.column:].strip()
            if not after.startswith("#"):
                continue
            note = [after.lstrip("#").strip()]
            for nxt in lines[line + 1:]:
                body = nxt.lstrip()
                if not body.startswith("#") or len(nxt) - len(body) <= key_node.start_mark.column:
                    break
                note.append(body.lstrip("#").strip())
            notes[key] = " ".join(n for n in note if n)

    if isinstance(root, yaml.MappingNode):
        walk(root, "")
    return notes


def render(traced, args) -> str:
    """The annotated config: valid YAML too (everything but the values is a comment)."""
    from mel_core import config as config_mod

    cfg, origins = traced.config, traced.origins
    notes = {path: file_notes(path) for path in traced.files}
    command = " ".join(["mel config show", args.config, *args.overrides])
    chain = " <- ".join(["defaults", *map(_show_path, traced.files), *(f"'{o}'" for o in args.overrides)])
    out = [f"# {command}",
           f"# resolved: {chain}",
           f"# config hash: {config_mod.config_hash(cfg)} (with run.name, the run's identity)",
           "# Above each field: its help, [P] the paper fixes its default | [C] the default is our choice, and its",
           "# allowed range. After a value: '*' = it differs from the default, which follows; the file or override",
           "# that set it (a value equal to the default names it too), with that file's comment on the line.",
           "# `--plain` prints the values alone."]

    def walk(obj, default, indent: str, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            meta = f.metadata
            if dataclasses.is_dataclass(value):
                if not indent:
                    out.append("")
                out.extend(_comment(meta.get("help", ""), indent))
                out.append(f"{indent}{f.name}:")
                walk(value, getattr(default, f.name), indent + "  ", key + ".")
                continue
            tag, rng = TAGS.get(meta.get("source", ""), ""), _range(meta)
            head = (f"{tag} " if tag else "") + meta.get("help", "") + (f" (range: {rng})" if rng else "")
            out.extend(_comment(head, indent))
            line = f"{indent}{f.name}: {_yaml_value(value)}"
            where = config_mod.origin_of(key, origins)
            after = []
            if value != getattr(default, f.name):
                after.append(f"* default {_yaml_value(getattr(default, f.name))}")
            if where:
                after.append("set by " + ", ".join(map(_where, where)))
            note = next((notes[w][key] for w in where if w in notes and key in notes[w]), "")
            if after:
                line += "  # " + "; ".join(after) + (":" if note else "")
            if note and len(line) + 1 + len(note) <= WIDTH:
                line, note = f"{line} {note}", ""
            out.append(line)
            if note:
                out.extend(_comment(note, indent, "#   ", "#   "))

    walk(cfg, config_mod.MelConfig(), "", "")
    return "\n".join(out) + "\n"


def render_plain(traced, args) -> str:
    """The values alone, as YAML that `mel run --config` loads to the same config."""
    import yaml

    from mel_core import config as config_mod

    cfg = traced.config
    head = (f"# mel config show {' '.join([args.config, *args.overrides])} --plain  "
            f"(config hash {config_mod.config_hash(cfg)})\n")
    return head + yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False, width=float("inf"), allow_unicode=True)
