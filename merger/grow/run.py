"""The ``merger grow`` operation: small checkpoint in, grown Hugging Face folder out.

    from merger.grow import GrowOptions, grow
    result = grow("runs/tiny/step800", output="grown/tiny-2x", options=GrowOptions(width=2))

Every tensor of the grown model is ``λ · small`` at the small entries' positions (``arch.py``) plus
``σ · fresh`` everywhere (``init.py``); tensors of new layers are ``σ · fresh`` with their
residual-output weights and biases at 0, so each new layer starts as the identity. Tensors are
made and written one at a time (read with pread, float64 while mixed, then the small model's
dtype), so the working set is about 3 x the largest grown tensor in float64, whatever the model
size. The output goes through :class:`merger.output.folder.OutputDir` (partial folder, atomic publish).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from merger import __version__
from merger.formats.inputs import open_input
from merger.errors import CheckpointFormatError, PlanError, UsageError
from merger.formats import TensorInfo, read_checkpoint
from merger.grow import arch as A
from merger.grow.init import INITS, fresh_tensor, fresh_value
from merger.output.folder import OutputDir, write_failed
from merger.formats.reading import read_extents
from merger.formats.hf_folder import COPY_FILES
from merger.output.shards import ShardWriter, safetensors_header
from merger.sources import Source
from merger.sources.local import resolve_local
from merger.units import dtype_from_name, dtype_name, itemsize

# Defaults: μP init as in Mallik et al. 2024. Their text gives no single λ and σ to use, so these
# come from examples/warmstart.py (docs/results.md, "Warmstarting a wider model").
DEFAULT_SHRINK = 0.5
DEFAULT_PERTURB = 1.0
DEFAULT_INIT = "mup"


@dataclass(frozen=True)
class GrowOptions:
    """How to grow. ``width`` multiplies hidden size, heads and MLP size; ``depth`` the layers."""

    width: float = 2.0
    depth: float = 1.0
    shrink: float = DEFAULT_SHRINK  # λ
    perturb: float = DEFAULT_PERTURB  # σ
    seed: int = 0
    init: str = DEFAULT_INIT  # mup | standard
    max_shard_size: int = 5 * 10**9
    max_memory: int | None = None  # None: merger.plan.default_max_memory(), as for average

    def check(self) -> None:
        """Raises UsageError for values no growth can use (widths are checked against the model)."""
        import math

        if self.init not in INITS:
            raise UsageError(f"--init {self.init!r} is not one of {', '.join(INITS)}",
                             hint="pass --init mup or standard")
        if not math.isfinite(self.shrink):
            raise UsageError(f"--shrink {self.shrink} is not a finite number", hint="pass e.g. --shrink 0.5")
        if not math.isfinite(self.perturb) or self.perturb < 0:
            raise UsageError(f"--perturb {self.perturb} must be a finite number >= 0", hint="pass e.g. --perturb 1")
        if self.max_shard_size <= 0:
            raise UsageError("--max-shard-size must be positive", hint="pass e.g. --max-shard-size 5GB")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UsageError("--max-memory must be positive", hint="pass e.g. --max-memory 8GB")


MAX_LAYERS = 1 << 16  # sanity: more layers than any model has (--depth 1e7 would plan for minutes)
JOB_BYTES = 4096  # memory one planned tensor costs before anything is made (its Job, name, shapes)
WORK_FACTOR = 3 * 8  # bytes per element while a tensor is made: about 3 float64 copies (module docstring)


@dataclass(frozen=True)
class Job:
    """One tensor of the grown model: where its small part is (None in a new layer)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rule: A.Rule
    src: TensorInfo | None  # the small tensor; for a new layer's buffer, the template's
    small_shape: tuple[int, ...]
    new_layer: bool

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass
class GrowResult:
    """What a grow did; ``to_dict`` is the ``--json`` output and most of ``merger.json``."""

    output: str
    source: dict
    arch: str
    small: A.Sizes
    big: A.Sizes
    options: GrowOptions
    layer_map: list[int]
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    out_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        new = sorted(set(range(self.big.layers)) - set(self.layer_map))
        o = self.options
        return {"operation": "grow", "output": self.output, "source": self.source, "arch": self.arch,
                "shrink": o.shrink, "perturb": o.perturb, "seed": o.seed, "init": o.init,
                "width": o.width, "depth": o.depth, "small": asdict(self.small), "grown": asdict(self.big),
                "layer_map": self.layer_map, "new_layers": new, "files": self.files,
                "tensors": self.tensors, "out_bytes": self.out_bytes, "seconds": round(self.seconds, 3)}


def resolve_small(spec: str) -> Source:
    """SMALL as ``merger average`` reads one checkpoint: a local folder, or a Hub ``REPO_ID@REVISION``
    (from the HF cache, or downloaded).

    Raises:
        SourceError / UsageError: no such folder or repo, no revision, more than one checkpoint.
    """
    p = Path(spec).expanduser()
    if not p.exists():
        from merger.sources.hub import fetch, looks_like_repo_id, resolve_hub

        repo_id, _, revision = spec.partition("@")
        if looks_like_repo_id(repo_id):
            if not revision:
                raise UsageError(f"which revision of {repo_id}? merger grow reads one checkpoint",
                                 hint=f"pass {repo_id}@REVISION, e.g. {repo_id}@main")
            (src,) = resolve_hub(repo_id, revision, None)
            return src if src.path else fetch(src)
    srcs = resolve_local([spec], None, None)
    if len(srcs) != 1:
        raise UsageError(f"{spec} holds {len(srcs)} checkpoints ({srcs[0].name} ... {srcs[-1].name}); "
                         "merger grow reads one", hint=f"pass one of them, e.g. {Path(spec) / srcs[-1].name}")
    return srcs[0]


def read_config(folder: Path) -> dict:
    """``config.json`` of the small model.

    Raises:
        CheckpointFormatError: missing or unreadable.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{folder} has no config.json: merger grow needs it for the architecture "
                                    "and sizes", path=str(folder),
                                    hint="save the model with save_pretrained, or copy its config.json into the folder")
    try:
        config = json.loads(path.read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError, OSError):
        raise CheckpointFormatError(f"{path} is not a JSON object", path=str(path),
                                    hint="re-save the model with save_pretrained") from None
    return config


def plan_jobs(arch: A.Arch, infos: dict[str, TensorInfo], config: dict, small: A.Sizes, big: A.Sizes,
              *, where: str) -> tuple[list[Job], list[int]]:
    """The grown model's tensors in output order (non-layer tensors, then layer by layer).

    Raises:
        PlanError: tensors no rule knows, or layers that disagree with config.json.
    """
    unknown = [n for n in infos if arch.rule(n) is None]
    if unknown:
        raise PlanError(f"{where}: {len(unknown)} tensor(s) that merger grow's {arch.name} rules don't know",
                        problems=unknown[:20], hint="the checkpoint is not a plain "
                        f"{'/'.join(arch.classes)}; extend the rules in merger/grow/arch.py")
    by_layer: dict[int, list[str]] = {}
    top: list[str] = []
    for n in infos:
        i = arch.layer_of(n)
        (by_layer.setdefault(i, []) if i is not None else top).append(n)
    if sorted(by_layer) != list(range(small.layers)):
        raise PlanError(f"{where}: the weights hold layers {sorted(by_layer)[:8]}..., config.json says "
                        f"{small.layers}", problems=[f"{arch.layers} = {small.layers}"],
                        hint="the checkpoint does not match its config.json")

    def job(name: str, info: TensorInfo, *, new: bool) -> Job:
        rule = arch.rule(info.name)
        src = None if new and rule.role != "buffer" else info
        shape = A.grown_shape(rule, info.shape, small, big)
        if rule.role == "buffer":  # e.g. inv_freq's length follows the grown head dim
            like = torch.empty(info.shape, dtype=dtype_from_name(info.dtype))
            shape = tuple(A.rebuild_buffer(arch, name, like, config, big).shape)
        return Job(name, shape, info.dtype, rule, src, info.shape, new)

    jobs = [job(n, infos[n], new=False) for n in sorted(top)]
    lmap = A.layer_map(small.layers, big.layers)
    old_at = {j: i for i, j in enumerate(lmap)}
    for j in range(big.layers):
        i = old_at.get(j, 0)  # a new layer takes layer 0 as its template (names, shapes, dtypes)
        for n in by_layer[i]:
            jobs.append(job(arch.rename_layer(n, j), infos[n], new=j not in old_at))
    return jobs, lmap


def check_size(arch: A.Arch, infos: dict[str, TensorInfo], small: A.Sizes, big: A.Sizes, options: GrowOptions,
               *, where: str) -> None:
    """Refuse a growth that can't be made within ``--max-memory`` (or has more layers than
    :data:`MAX_LAYERS`), from the shapes alone, before any tensor is planned or made.

    Raises:
        UsageError: naming the size, the tensor, the budget and what to change.
    """
    from merger.plan import default_max_memory
    from merger.units import format_size

    o = options
    if big.layers > MAX_LAYERS:
        raise UsageError(f"--depth {o.depth:g} grows {where} from {small.layers} to {big.layers} layers, more "
                         f"than merger grow makes ({MAX_LAYERS})", hint="pass a smaller --depth, e.g. --depth 2")
    budget = o.max_memory or default_max_memory()
    per_layer = sum(1 for n in infos if arch.layer_of(n) == 0)
    n_jobs = sum(1 for n in infos if arch.layer_of(n) is None) + per_layer * big.layers
    largest, name, shape = 0, "", ()
    for n, info in infos.items():
        rule = arch.rule(n)
        if rule is None or rule.role == "buffer":  # unknown: plan_jobs names them; buffers keep their size
            continue
        grown = A.grown_shape(rule, info.shape, small, big)
        if math.prod(grown) > largest:
            largest, name, shape = math.prod(grown), n, grown
    need = largest * WORK_FACTOR + n_jobs * JOB_BYTES
    if need > budget:
        raise UsageError(f"growing {where} to hidden {big.hidden}, MLP {big.ffn}, {big.layers} layers needs about "
                         f"{format_size(need)} of memory (its largest tensor, {name} {list(shape)}, is "
                         f"{format_size(largest * itemsize(infos[name].dtype))}, made in float64; {n_jobs} tensors), "
                         f"more than --max-memory {format_size(budget)}",
                         hint="pass a smaller --width or --depth, or a larger --max-memory if the machine has it")


def finite(t: torch.Tensor | None) -> bool:
    return t is None or not t.is_floating_point() or bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, small_finite: bool, job: Job, options: GrowOptions) -> None:
    """A grown tensor must be finite in its dtype where the small one is: λ or σ this large overflow
    it. Buffers are rebuilt, not grown (GPT-NeoX's masked_bias may be -inf), and are not checked.

    Raises:
        UsageError: naming the tensor, λ and σ.
    """
    if job.rule.role == "buffer" or not t.is_floating_point():
        return
    if not small_finite:
        return  # inf or NaN already in the small checkpoint: carried, as before
    if not finite(t):
        raise UsageError(f"--shrink {options.shrink:g} and --perturb {options.perturb:g} make tensor {job.name!r} "
                         f"inf or NaN in {job.dtype}: nothing was written",
                         hint="pass a --shrink and --perturb near 1 (the defaults are --shrink 0.5 --perturb 1)")


def _read(info: TensorInfo, fds: dict[str, int]) -> torch.Tensor:
    for path in info.files:
        if path not in fds:
            fds[path] = open_input(path, what="weights file")
    dt = dtype_from_name(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dt)
    buf = bytearray(info.nbytes)
    read_extents(fds, info.extents, 0, memoryview(buf))
    return torch.frombuffer(buf, dtype=dt).reshape(info.shape)


def make_tensor(job: Job, small_t: torch.Tensor | None, *, arch: A.Arch, config: dict, small: A.Sizes,
                big: A.Sizes, options: GrowOptions, init_range: float) -> torch.Tensor:
    """One grown tensor: λ · small at its positions + σ · fresh (new layers: residual outputs 0)."""
    if job.rule.role == "buffer":
        return A.rebuild_buffer(arch, job.name, small_t, config, big)
    if options.perturb == 0:
        out = torch.zeros(job.shape, dtype=torch.float64)
    else:
        value = fresh_value(job.rule, job.shape, job.small_shape, init=options.init, init_range=init_range, big=big)
        out = fresh_tensor(value, job.shape, seed=options.seed, name=job.name).mul_(options.perturb)
    if small_t is not None:
        ix = torch.meshgrid(*[A.axis_index(k, n, small, big) for k, n in zip(job.rule.axes, small_t.shape)],
                            indexing="ij")
        part = small_t.double().mul_(options.shrink)
        if options.perturb != 0:  # with σ = 0 the small entries are λ · small exactly (-0.0 stays -0.0)
            part.add_(out[ix])
        out[ix] = part
    if job.new_layer and job.rule.resid_out:
        out.zero_()
    return out.to(dtype_from_name(job.dtype))


def _shards(jobs: list[Job], max_shard_size: int) -> list[list[Job]]:
    shards: list[list[Job]] = [[]]
    size = 0
    for j in jobs:
        if shards[-1] and size + j.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += j.nbytes
    return shards


def grow(small_spec: str, *, output: str | Path, options: GrowOptions = GrowOptions(), force: bool = False,
         progress: Callable[[int], None] | None = None, command: list[str] | None = None) -> GrowResult:
    """Grow a small checkpoint into a wider/deeper Hugging Face model folder.

    Args:
        small_spec: a checkpoint folder, or a Hub ``REPO_ID@REVISION``.
        output: the output folder (published atomically).
        options: width, depth, λ, σ, seed, init, shard size.
        force: replace an existing output folder.
        progress: called with the bytes of each grown tensor written.
        command: the command line, recorded in ``merger.json``.

    Returns:
        What was written (:class:`GrowResult`).

    Raises:
        MergerError: bad options or inputs, with a hint; nothing is left in ``output``.
    """
    t0 = time.perf_counter()
    options.check()
    src = resolve_small(small_spec)
    folder = Path(src.path)
    where = f"{src.repo_id}@{src.revision}" if src.repo_id else str(folder)
    config = read_config(folder)
    arch = A.detect(config, where=where)
    small = A.sizes(arch, config, where=where)
    big = A.grown_sizes(small, width=options.width, depth=options.depth)
    infos = read_checkpoint(folder)
    check_size(arch, infos, small, big, options, where=where)
    jobs, lmap = plan_jobs(arch, infos, config, small, big, where=where)
    new_config = A.grown_config(arch, config, big)
    init_range = float(config.get("initializer_range", 0.02))
    out = OutputDir(output, inputs=[str(folder)], force=force)
    result = GrowResult(str(out.final), src.to_dict(), arch.name, small, big, options, lmap)
    shards = _shards(jobs, options.max_shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    fds: dict[str, int] = {}
    tmp = out.create()
    try:
        for fname, shard in zip(names, shards):
            header = safetensors_header([(j.name, j.dtype, j.shape, j.nbytes) for j in shard])
            writer = ShardWriter(tmp / fname, header, sum(j.nbytes for j in shard), label=str(out.final / fname))
            try:
                off = 0
                for j in shard:
                    small_t = _read(j.src, fds) if j.src else None
                    small_finite = finite(small_t)  # before make_tensor: it may scale a float64 one in place
                    t = make_tensor(j, small_t, arch=arch, config=config, small=small, big=big, options=options,
                                    init_range=init_range)
                    assert tuple(t.shape) == j.shape and dtype_name(t.dtype) == j.dtype, j.name
                    check_finite(t, small_finite, j, options)
                    if j.nbytes:
                        writer.write(t.contiguous().reshape(-1).view(torch.uint8).numpy(), off)
                    off += j.nbytes
                    if progress:
                        progress(j.nbytes)
                writer.close()
            except BaseException:
                writer.abandon()
                raise
        if len(shards) > 1:
            wmap = {j.name: fname for fname, shard in zip(names, shards) for j in shard}
            index = {"metadata": {"total_size": sum(j.nbytes for j in jobs)}, "weight_map": dict(sorted(wmap.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        for f in COPY_FILES:  # tokenizer and generation config, byte for byte
            if f != "config.json" and (folder / f).is_file():
                shutil.copyfile(folder / f, tmp / f)
        result.files = sorted(p.name for p in tmp.iterdir()) + ["merger.json"]
        result.tensors = len(jobs)
        result.out_bytes = sum(j.nbytes for j in jobs)
        result.seconds = time.perf_counter() - t0
        manifest = {"merger_version": __version__, "torch_version": torch.__version__,
                    "command": command, **result.to_dict()}
        (tmp / "merger.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.publish()
    except OSError as e:
        out.discard()
        raise write_failed(f"growing into {out.final}", e) from e
    except BaseException:
        out.discard()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return result

