"""The options every ccam command shares, declared once: ``--workdir``, ``--config``, ``--set``, ``--force``."""

from __future__ import annotations

import click

OPTIONS = {
    "workdir": (("--workdir", "-w"), dict(required=True, type=click.Path(file_okay=False), help="Work directory of the run.")),
    "config": (("--config", "config_file"), dict(type=click.Path(dir_okay=False), help="YAML settings (see configs/default.yaml).")),
    "set": (("--set", "sets"), dict(multiple=True, metavar="SECTION.KEY=VALUE", help="Override one setting (repeatable).")),
    "force": (("--force",), dict(is_flag=True, help="Run even if the stage is up to date (discards its partial state).")),
}


def params(*names: str, **overrides) -> list[click.Option]:
    """click.Option objects of the named shared options (``overrides``: name -> changed attributes)."""
    out = []
    for n in names:
        decls, attrs = OPTIONS[n]
        out.append(click.Option(list(decls), **{**attrs, **overrides.get(n, {})}))
    return out


def shared(*names: str, **overrides):
    """Decorator adding the named shared options to a click command (default: workdir, config, set)."""
    names = names or ("workdir", "config", "set")

    def deco(f):
        for n in reversed(names):
            decls, attrs = OPTIONS[n]
            f = click.option(*decls, **{**attrs, **overrides.get(n, {})})(f)
        return f

    return deco
