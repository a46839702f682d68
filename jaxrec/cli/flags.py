"""Config flags, generated from the config dataclasses' fields.

Every field of every section has a flag (`num_blocks` -> `--num-blocks`;
`model.name` is `--model`, `head.name` `--head`, `data.source` `--data`)
whose help is the field's own (`jaxrec.config.option`). The model and head
sections take the fields of every registered backbone and head; a flag the
chosen one lacks is refused in one line. A method's fields have the flags
its config names (`--skip-lambda` -> `methods.skiprec.lam`) or
`--METHOD-FIELD`; giving one turns that method on, and its switch value
(`--skip none`) turns it off. Three layers, later ones winning: the
dataclass defaults, `--config FILE`, flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jaxrec import config as config_lib
from jaxrec import heads, method_api, models
from jaxrec.errors import JaxrecError

ALIASES = {("model", "name"): "--model", ("head", "name"): "--head",
           ("data", "source"): "--data"}


def section_classes(section: str) -> list[type]:
  """Every dataclass a section can be: all backbones' or heads' configs."""
  if section == "model":
    return [models.get(n).config for n in models.names()]
  if section == "head":
    return [heads.get(n).config for n in heads.names()]
  if section == "methods":
    return [method_api.get(n).config for n in method_api.names()]
  return [config_lib.FIXED_SECTIONS[section]]


def flag_for(section: str, field_name: str) -> str:
  """The flag of a config field: (model, num_blocks) -> --num-blocks."""
  return ALIASES.get((section, field_name),
                     "--" + field_name.replace("_", "-"))


def method_flag(cls: type, field_name: str) -> str:
  """A method field's flag: its config's FLAGS entry, or --METHOD-FIELD."""
  return cls.FLAGS.get(field_name,
                       f"--{cls.NAME}-{field_name}".replace("_", "-"))


def fields_by_flag() -> dict[str, tuple[str, str, list[tuple[type, Any]]]]:
  """flag -> (section, field name, [(class, field)...] that have it); a
  method's field is keyed `methods.NAME.FIELD`."""
  out: dict[str, tuple[str, str, list]] = {}
  for section in config_lib.SECTIONS:
    for cls in section_classes(section):
      for field in dataclasses.fields(cls):
        if section == "methods":
          out[method_flag(cls, field.name)] = (
              section, f"{cls.NAME}.{field.name}", [(cls, field)])
          continue
        flag = flag_for(section, field.name)
        entry = out.setdefault(flag, (section, field.name, []))
        if entry[0] != section:
          raise AssertionError(f"{flag} is a field of both {entry[0]} and "
                               f"{section}: rename one")
        entry[2].append((cls, field))
  return out


def _default_text(owners: list[tuple[type, Any]], section: str) -> str:
  def show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value

  if len(owners) == 1 or section not in config_lib.NAMED_SECTIONS:
    return f"default: {show(owners[0][1].default)!r}"
  return "default: " + ", ".join(
      f"{cls.name} {show(field.default)!r}" for cls, field in owners)


def add_config_flags(parser: argparse.ArgumentParser,
                     only: set[tuple[str, str]] | None = None) -> None:
  """One flag per config field, default None (= keep file/default value);
  `only` limits them to some (section, field) pairs."""
  groups: dict[str, Any] = {}
  for flag, (section, name, owners) in fields_by_flag().items():
    if only is not None and (section, name) not in only:
      continue
    if section not in groups:
      groups[section] = parser.add_argument_group(f"{section} options")
    help_text = config_lib.help_of(owners[0][1])
    every = section_classes(section)
    if section in config_lib.NAMED_SECTIONS and len(owners) < len(every):
      help_text += f" [{', '.join(cls.name for cls, _ in owners)} only]"
    groups[section].add_argument(
        flag, dest=f"{section}.{name}", default=None,
        metavar=name.upper(),
        help=f"{help_text} ({_default_text(owners, section)})")


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  """Defaults, then `args.config`, then flags; every value coerced."""
  origin = getattr(args, "config", None) or "config"
  raw: dict[str, Any] = {}
  if getattr(args, "config", None):
    raw = config_lib.load_file(args.config)
    if not isinstance(raw, dict):
      raise JaxrecError(f"{origin}: expected a mapping with "
                                   f"sections {list(config_lib.SECTIONS)}")
  raw = config_lib.upgrade(dict(raw), origin)
  for section in config_lib.NAMED_SECTIONS:
    name = getattr(args, f"{section}.name", None)
    if name is not None:
      raw[section] = {**(raw.get(section) or {}), "name": name}
  cfg = config_lib.from_dict(raw, origin=origin)
  parts = {}
  flags = fields_by_flag()
  for section in ("model", "head", "data", "train"):
    current = getattr(cfg, section)
    own = {f.name: f for f in dataclasses.fields(current)}
    updates = {}
    for flag, (sec, name, _) in flags.items():
      value = getattr(args, f"{sec}.{name}", None)
      if sec != section or value is None or name == "name":
        continue
      if name not in own:
        raise JaxrecError(
            f"{flag}: not an option of {section} {current.name!r} (it has "
            f"{', '.join(flag_for(section, n) for n in own)})")
      updates[name] = config_lib.coerce(own[name], value, flag)
    parts[section] = dataclasses.replace(current, **updates)
  return _methods_from_args(args, flags, config_lib.Config(
      **parts, methods=cfg.methods))


def _methods_from_args(args: argparse.Namespace, flags: dict,
                       cfg: config_lib.Config) -> config_lib.Config:
  """Method flags: each turns its method on (with the options the file
  gave it), its SWITCH value turns it off."""
  updates: dict[str, dict[str, Any]] = {}
  for flag, (section, key, owners) in flags.items():
    value = getattr(args, f"{section}.{key}", None)
    if section != "methods" or value is None:
      continue
    cls, field = owners[0]
    updates.setdefault(cls.NAME, {})[field.name] = config_lib.coerce(
        field, value, flag)
  for name, values in updates.items():
    cls = method_api.get(name).config
    switch = cls.SWITCH
    if switch is not None and values.get(switch[0]) == switch[1]:
      cfg = cfg.without_method(name)
      continue
    current = cfg.method(name) or cls()
    cfg = cfg.with_method(dataclasses.replace(current, **values))
  return cfg
