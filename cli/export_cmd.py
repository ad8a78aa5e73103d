"""``ckpt-ledger export``: a consolidated, model-only state dict from a committed checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from cli.errors import CliError
from cli.options import check_run_dir, run_dir_argument
from ledger.progress import byte_progress, wanted


@click.command("export")
@run_dir_argument
@click.option("--checkpoint", "ref", default="latest", show_default=True, metavar="latest|best|ALIAS|ID",
              help="Which checkpoint to export (a user alias from `ckpt-ledger alias` works too).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output file.")
@click.option("--format", "fmt", type=click.Choice(("torch", "safetensors")), default="torch", show_default=True,
              help="torch: read with torch.load; safetensors: read with safetensors.torch.load_file.")
def export_command(run_dir: Path, ref: str, out: Path, fmt: str) -> None:
    """Write a checkpoint's model weights as one plain state dict (shard hashes verified first).

    Read-only on the run directory; the shards are read wherever the run keeps them
    (a directory or object storage, as recorded when it started). Exits 1 when the checkpoint does not exist or
    cannot be exported (not committed, a corrupt shard), 2 when there is no readable
    ledger.

    \b
    Examples:
      ckpt-ledger export runs/exp1 --checkpoint best --out model.pt
      ckpt-ledger export runs/exp1 --checkpoint step00000300-e1 --out model.safetensors --format safetensors
    """
    check_run_dir(run_dir)
    # Imported here: torch is heavy and only export (and train) need it.
    from trainer.errors import TrainerError
    from trainer.export import export_model

    try:
        with byte_progress("verifying shards", wanted()) as progress:
            result = export_model(run_dir, ref, out, fmt=fmt, progress=progress)
    except TrainerError as err:
        raise CliError(str(err), err.exit_code) from None
    click.echo(f"exported {result.checkpoint_id} (step {result.step}): {result.tensors} tensors, "
               f"{result.bytes} bytes -> {result.out}")
