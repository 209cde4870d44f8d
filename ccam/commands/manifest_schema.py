"""`ccam manifest-schema`: write the data manifest's JSON Schema (generated from the pydantic model)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ccam.data.manifest import manifest_schema
from ccam.errors import UserError
from ccam.io.atomic import write_text


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"


@click.command("manifest-schema", short_help="Write the data manifest's JSON Schema.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="File to write (default: print to stdout).")
def manifest_schema_cmd(out) -> None:
    """Write the JSON Schema of a data manifest (DESIGN section 3), for editors and validators.

    \b
    Examples:
      ccam manifest-schema --out data_manifests/manifest.schema.json
      ccam manifest-schema > schema.json
    """
    text = schema_text()
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        write_text(Path(out), text)
    except OSError as e:
        raise UserError(f"cannot write the schema ({e.strerror})", path=str(out), fix="choose a writable --out")
    click.echo(f"manifest-schema: wrote {out}", err=True)


COMMANDS = [manifest_schema_cmd]
