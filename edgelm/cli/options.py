"""Options shared by several commands."""

from __future__ import annotations

import click

kv_dtype_option = click.option(
    "--kv-dtype", type=click.Choice(["f16", "f32"]), default=None,
    help="KV-cache storage: f16 halves its memory and bandwidth (default on cpu), f32 (default on numpy).")
