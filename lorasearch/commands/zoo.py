"""``lorasearch zoo``: build the labelled style-zoo LoRA collection (issue 7)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

ZOO_HELP = """Build a labelled LoRA style zoo from nothing but packages (resumable).

Pre-trains a tiny text-conditioned pixel-space diffusion model (diffusers
UNet2DConditionModel, 32x32 RGB) on procedurally rendered content, then trains
LoRAs on deterministic style transforms grouped into genres (palette, hatching,
pixel, ink, dither, watercolour): --loras-per-style LoRAs per style, each with
its own hashed seed, rank, alpha, steps, learning rate and training subset,
written as peft / diffusers / kohya / LyCORIS LoHa / LoKr. --paper-subset adds
--paper-per-style LoRAs per style sharing one seed, rank and format (the paper's
setting); they differ only in their training images.

Writes DIR/labels.csv (file,genre,style,seed,rank,alpha,steps,lr,format,subset,
train_images,generated_images), DIR/model/, DIR/loras/, DIR/images/ and
DIR/README.md. Re-running the same command resumes: finished LoRAs are skipped.
"""


def register(app: typer.Typer) -> None:
    """Add the ``zoo`` command to ``app``."""
    from lorasearch.cli import _emit, _err, handles_errors

    @app.command(help=ZOO_HELP)
    @handles_errors
    def zoo(
        out: Path = typer.Option(..., "--out", help="zoo folder (created; resumed when it exists)"),
        genres: int = typer.Option(5, "--genres", min=1, max=6, help="number of genres (first of palette, hatching, "
                                   "pixel, ink, dither, watercolour)"),
        styles_per_genre: int = typer.Option(4, "--styles-per-genre", min=1, max=4, help="styles per genre"),
        loras_per_style: int = typer.Option(5, "--loras-per-style", min=1, help="mixed-collection LoRAs per style"),
        seed: int = typer.Option(0, "--seed", help="zoo seed: base model, content and every LoRA's hashed seed"),
        paper_subset: bool = typer.Option(True, "--paper-subset/--no-paper-subset",
                                          help="add LoRAs with one shared seed/rank/format (paper setting)"),
        paper_per_style: int = typer.Option(2, "--paper-per-style", min=1,
                                            help="paper-setting LoRAs per style (they differ in training images)"),
        quick: bool = typer.Option(False, "--quick", help="seconds-long sizes (tiny UNet, few steps): for tests"),
        workers: int = typer.Option(1, "--workers", min=1, help="processes training LoRAs in parallel"),
        json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    ) -> None:
        from lorasearch.errors import BadInput
        from lorasearch.zoo.build import build_zoo

        bar = _Bar()
        try:
            summary = build_zoo(out, genres, styles_per_genre, loras_per_style, seed, paper_subset, quick, workers,
                                command=" ".join(["lorasearch", *map(shlex.quote, sys.argv[1:])]),
                                progress=bar.update, log=_err, paper_per_style=paper_per_style)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        finally:
            bar.close()
        if json_out:
            _emit(summary)
        else:
            _err(f"{summary['out']}: {summary['rows']} LoRAs ({summary['built']} built, {summary['skipped']} "
                 f"already there) in {summary['seconds']:.0f} s")


class _Bar:
    """A tqdm progress bar on stderr, created on the first update."""

    def __init__(self) -> None:
        self.bar = None

    def update(self, done: int, total: int, stem: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=done, desc="zoo", unit="lora", file=sys.stderr)
            return
        self.bar.set_postfix_str(stem[:40])
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
