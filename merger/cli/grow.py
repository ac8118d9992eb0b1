"""``merger grow``: the command function (registered in ``app.py``, with :data:`EXAMPLES` as its
epilog).

The command only declares options and calls :func:`merger.grow.grow`; the result is a short
summary on stdout, or ``result.to_dict()`` as JSON with ``--json``. Errors are
:class:`merger.errors.MergerError` subclasses; :class:`merger.cli.handler.MergerGroup` turns them
into ``Error: ...`` and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from merger.cli import ui
from merger.cli.options import OUTPUT, Debug, InitChoice, Json, examples, value

# the defaults live in merger.grow.run (imported lazily: torch); kept equal by test_grow.py
SHRINK, PERTURB, INIT = 0.5, 1.0, "mup"

SmallArg = Annotated[str, typer.Argument(
    metavar="SMALL", show_default=False,
    help="The trained small checkpoint: a Hugging Face folder, or a Hub REPO_ID@REVISION.")]
GROWTH, INITIALISATION = "Growth", "Initialisation"
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (a Hugging Face model).",
                                         show_default=False, rich_help_panel=OUTPUT)]
WidthOpt = Annotated[float, typer.Option(
    "--width", help="Multiply hidden size, heads and MLP size by this (head dim kept; heads x width must "
                    "be whole).", rich_help_panel=GROWTH)]
DepthOpt = Annotated[float, typer.Option(
    "--depth", help="Multiply the layers by this. New layers are interleaved, not stacked on top: old "
                    "layer i becomes layer floor(i*L'/L) and the new ones fill the gaps, each right after an old "
                    "one (--depth 2: one after every layer), so new capacity is spread through the stack. They "
                    "start as identities: their attention and MLP output weights and biases are 0.",
    rich_help_panel=GROWTH)]
ShrinkOpt = Annotated[float, typer.Option("--shrink", help="λ: the small weights are multiplied by this.",
                                                      rich_help_panel=INITIALISATION)]
PerturbOpt = Annotated[float, typer.Option(
    "--perturb", help="σ: every entry gets σ x a fresh init of the grown model added (0: plain zero-pad).",
    rich_help_panel=INITIALISATION)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the fresh init (same seed, same bytes).",
                                                  rich_help_panel=INITIALISATION)]
InitOpt = Annotated[InitChoice, typer.Option(
    "--init", case_sensitive=False, help="mup: μP fan-in scaling relative to the small width; standard: the config's "
                   "initializer_range.", rich_help_panel=INITIALISATION)]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard.", rich_help_panel=OUTPUT)]
MemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory the grow may use (e.g. 8GB); a growth that needs more is refused before it "
                         "starts. Default: as merger average (a quarter of RAM, at most 8 GB).", show_default=False,
    rich_help_panel=OUTPUT)]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Replace an existing output folder that merger wrote (it holds merger.json).",
    rich_help_panel=OUTPUT)]

EXAMPLES = examples(
    "merger grow tiny/step800 -o grown/tiny-2x --width 2",
    "merger grow EleutherAI/pythia-70m@step143000 -o grown/pythia-2x --seed 1",
    "# twice the layers, an exact zero-pad",
    "merger grow tiny/step800 -o deep --width 1 --depth 2 --shrink 1 --perturb 0",
)


def grow_command(small: SmallArg, output: OutputOpt = ..., width: WidthOpt = 2.0, depth: DepthOpt = 1.0,
                 shrink: ShrinkOpt = SHRINK, perturb: PerturbOpt = PERTURB, seed: SeedOpt = 0,
                 init: InitOpt = INIT, max_shard_size: ShardOpt = "5GB", max_memory: MemoryOpt = None,
                 force: ForceOpt = False, json_out: Json = False, debug: Debug = False) -> None:
    """Warmstart a wider (or deeper) model from a trained smaller checkpoint.

    Mallik et al. 2024: shrink the small weights by λ, zero-pad them into the larger shapes
    (following each architecture's tensor layout: GPT-NeoX's fused query_key_value by heads,
    GPT-2's c_attn by q/k/v blocks), add σ x a fresh μP initialisation of the larger model.
    --shrink 1 --perturb 0 is an exact zero-pad. Buffers (masks, rotary inv_freq) are rebuilt.
    Tensors are made and written one at a time (memory: about 3x the largest grown tensor in float64).
    Architectures: GPT-NeoX (Pythia) and GPT-2. λ, σ, seed and init go into merger.json.
    The defaults (λ 0.5, σ 1, μP) come from examples/warmstart.py (docs/results.md).
    """
    from merger.grow import GrowOptions, grow
    from merger.units import format_size, parse_size

    opts = GrowOptions(width=width, depth=depth, shrink=shrink, perturb=perturb, seed=seed, init=value(init),
                       max_shard_size=parse_size(max_shard_size, option="--max-shard-size"),
                       max_memory=parse_size(max_memory, option="--max-memory") if max_memory else None)
    result = grow(small, output=output, options=opts, force=force, command=sys.argv)
    if json_out:
        ui.print_json(result.to_dict())
        return
    s, b = result.small, result.big
    ui.out.print(f"grew {result.source.get('repo_id') or result.source['path']}"
                 f"{'@' + result.source['revision'] if result.source.get('revision') else ''} ({result.arch}) "
                 f"into {result.output}\n"
                 f"  hidden {s.hidden} -> {b.hidden}, heads {s.heads} -> {b.heads}, MLP {s.ffn} -> {b.ffn}, "
                 f"layers {s.layers} -> {b.layers}\n"
                 f"  λ {shrink:g}, σ {perturb:g}, init {value(init)}, seed {seed}; {result.tensors} tensors, "
                 f"{format_size(result.out_bytes)} in {result.seconds:.1f} s", markup=False, highlight=False)
