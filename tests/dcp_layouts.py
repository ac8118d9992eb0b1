"""Write DCP runs laid out as Megatron-Core (``--ckpt-format torch_dist``) and Accelerate FSDP
(``SHARDED_STATE_DICT``, HF Trainer's ``checkpoint-N/``) save them, for tests/formats/test_dcp_layouts.py,
and load merger's output back the way those frameworks would. Run under
``torchrun --standalone --nproc-per-node 2`` (gloo, CPU).

    tests/dcp_layouts.py megatron RUN          # iter_0000010, iter_0000020 (TP=2), iter_0000030 (PP=2)
    tests/dcp_layouts.py megatron-load MERGED OUT   # dcp.load the merge into TP=2 shards; OUT.<rank>.pt
    tests/dcp_layouts.py accelerate RUN        # checkpoint-10/20/30 by accelerate's save_fsdp_model/_optimizer
    tests/dcp_layouts.py accelerate-load MERGED OUT.pt   # accelerate's load_fsdp_model into 2-rank FSDP2
    tests/dcp_layouts.py megatron-core RUN     # megatron-core's own GPTModel + dist_checkpointing.save

``megatron`` writes with torch's own DCP writer what Megatron-Core writes (NVIDIA/Megatron-LM's
``megatron.core.dist_checkpointing.strategies.torch`` and ``megatron.training.checkpointing``):
the sharded state dict flattened to ShardedTensor keys, not state-dict paths (``_replace_state_dict_
keys_with_sharded_keys``): ``embedding.word_embeddings.weight``, ``decoder.layers.<module>.weight``
with the layers stacked along a leading dim (``TransformerBlock.sharded_state_dict``: the offset
``(0, layer, num_layers)``), ``output_layer.weight``; tensor-parallel chunks along the weight's dim 0
for column-parallel linears and the embedding, dim 1 for row-parallel ones
(``megatron.core.tensor_parallel.layers``); each (layer, TP rank) piece one chunk of a legacy
torch ``ShardedTensor`` (``sharded_tensor_to_torch_sharded_tensor``); ShardedObjects as pickled
bytes under ``<key>/shard_<offsets>_<shape>`` (``megatron.core.dist_checkpointing.mapping``'s
``unique_key``): the linears' ``_extra_state``, ``rng_state``, ``rerun_state_machine_state``
(``megatron.core.rerun_state_machine``), and in Megatron-Core >= 0.17 ``common_state`` (the
non-sharded rest), which older versions write to ``common.pt`` instead; the optimizer under
``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<param key>``
(``megatron.core.dist_checkpointing.optimizer``); the ranks' save plans in ``.metadata``'s
``all_local_plans`` (``megatron.core.dist_checkpointing.strategies.state_dict_saver``);
``metadata.json`` next to it (``megatron.core.dist_checkpointing.core``) and
``latest_checkpointed_iteration.txt`` in the run folder.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

H, F, V, S, L = 32, 64, 96, 32, 4  # hidden, ffn, vocab, positions, layers


def gpt_params() -> list[tuple[str, tuple[int, ...], int | None, str]]:
    """(ShardedTensor key, global shape, TP axis of the global tensor or None, pipeline stage) of a
    GPT with Megatron-Core's layer spec (the keys ``GPTModel.sharded_state_dict`` gives; layers
    stacked along dim 0, so a weight's TP dim is one further)."""
    layer = [("self_attention.linear_qkv.layer_norm_weight", (H,), None),
             ("self_attention.linear_qkv.layer_norm_bias", (H,), None),
             ("self_attention.linear_qkv.weight", (3 * H, H), 0), ("self_attention.linear_qkv.bias", (3 * H,), 0),
             ("self_attention.linear_proj.weight", (H, H), 1), ("self_attention.linear_proj.bias", (H,), None),
             ("mlp.linear_fc1.layer_norm_weight", (H,), None), ("mlp.linear_fc1.layer_norm_bias", (H,), None),
             ("mlp.linear_fc1.weight", (F, H), 0), ("mlp.linear_fc1.bias", (F,), 0),
             ("mlp.linear_fc2.weight", (H, F), 1), ("mlp.linear_fc2.bias", (H,), None)]
    return ([("embedding.word_embeddings.weight", (V, H), 0, "first"),
             ("embedding.position_embeddings.weight", (S, H), None, "first")]
            + [(f"decoder.layers.{n}", (L, *s), None if a is None else a + 1, "layers") for n, s, a in layer]
            + [("decoder.final_layernorm.weight", (H,), None, "last"),
               ("decoder.final_layernorm.bias", (H,), None, "last"), ("output_layer.weight", (V, H), 0, "last")])


def pieces(shape, tp_axis, stage, rank: int, tp: int, pp: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of the chunks rank ``rank`` holds (rank = pp_rank * tp + tp_rank)."""
    pp_rank, tp_rank = divmod(rank, tp)
    if stage == "layers":
        per = L // pp
        base = [((lyr, *(0,) * (len(shape) - 1)), (1, *shape[1:])) for lyr in range(pp_rank * per, (pp_rank + 1) * per)]
    elif pp == 1 or (stage == "first" and pp_rank == 0) or (stage == "last" and pp_rank == pp - 1):
        base = [((0,) * len(shape), tuple(shape))]
    else:
        base = []
    if tp_axis is None or tp == 1:
        return base
    n = shape[tp_axis] // tp
    return [(off[:tp_axis] + (tp_rank * n,) + off[tp_axis + 1:], size[:tp_axis] + (n,) + size[tp_axis + 1:])
            for off, size in base]


def torch_sharded(full: torch.Tensor, local: list, every: list, rank: int):
    """A legacy torch ShardedTensor of ``full``'s chunks, as Megatron-Core builds it
    (``sharded_tensor_to_torch_sharded_tensor``): the local chunks, plus the others' metadata."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties

    def cut(off, size):  # the rank's own contiguous tensor, viewed with the leading layer dim (as Megatron does)
        return torch.empty(size, dtype=full.dtype).copy_(full[tuple(slice(o, o + s) for o, s in zip(off, size))])

    shards = [Shard.from_tensor_and_offsets(cut(o, s), list(o), rank) for o, s in local]
    mine = set(local)
    md = [ShardMetadata(list(o), list(s), f"rank:{rank if (o, s) in mine else (rank + 1) % 2}/cpu") for o, s in every]
    props = TensorProperties(dtype=full.dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    meta = ShardedTensorMetadata(shards_metadata=md, size=full.shape, tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, sharded_tensor_metadata=meta,
                                                                      process_group=None)


def sharded_object(key: str, data, shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[str, io.BytesIO]:
    """A Megatron ShardedObject as DCP saves it: ``key/shard_<offset>_<shape>`` -> torch.save([data])."""
    buf = io.BytesIO()
    torch.save([data], buf)
    buf.seek(0)
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}", buf


class MegatronPlanner(DefaultSavePlanner):
    """torch's planner, keeping the ranks' plans in the metadata as Megatron-Core's saver does."""

    def create_global_plan(self, all_plans):
        plans, md = super().create_global_plan(all_plans)
        md.all_local_plans = all_plans
        return plans, md


def megatron(args) -> None:
    rank = dist.get_rank()
    run = Path(args.run)
    for it, (tp, pp), common_inside in [(10, (2, 1), False), (20, (2, 1), False), (30, (1, 2), True)]:
        folder = run / f"iter_{it:07d}"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        gen = torch.Generator().manual_seed(it)
        sd: dict = {}
        for key, shape, axis, stage in gpt_params():
            local = pieces(shape, axis, stage, rank, tp, pp)
            every = list(dict.fromkeys(p for r in range(2) for p in pieces(shape, axis, stage, r, tp, pp)))
            sd[key] = torch_sharded(torch.randn(shape, generator=gen).to(torch.bfloat16), local, every, rank)
            for state in ("exp_avg", "exp_avg_sq", "fp32_param"):
                full = torch.randn(shape, generator=gen)
                sd[f"optimizer.state.{state}.{key}"] = torch_sharded(full, local, every, rank)
        pp_rank, tp_rank = divmod(rank, tp)
        for lyr in range(pp_rank * L // pp, (pp_rank + 1) * L // pp):
            for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
                k, b = sharded_object(f"decoder.layers.{m}._extra_state", None, (L,), (lyr,))
                sd[k] = b
        rng = {"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state(),
               "rng_tracker_states": {}}
        k, b = sharded_object("rng_state", [rng], (pp, tp), (pp_rank, tp_rank))
        sd[k] = b
        # megatron.core.rerun_state_machine: saved per rank whenever --rerun-mode is on (validate_results by default)
        k, b = sharded_object("rerun_state_machine_state", {"rerun_requested": False, "max_values": {}}, (2,), (rank,))
        sd[k] = b
        common = {"args": argparse.Namespace(num_layers=L, hidden_size=H, ckpt_format="torch_dist",
                                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                  "checkpoint_version": 3.0, "iteration": it, "num_floating_point_operations_so_far": 1e12 * it,
                  "optimizer": {"param_groups": [{"lr": 3e-4, "weight_decay": 0.1, "params": list(range(10))}]},
                  "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": it * 8}}
        if common_inside:  # Megatron-Core >= 0.17 (dist_checkpointing.serialization: ShardedObject "common_state")
            k, b = sharded_object("common_state", common, (1,), (0,))
            sd[k] = b
        elif rank == 0:  # older Megatron-Core: common.pt (dist_checkpointing.strategies.common)
            torch.save(common, folder / "common.pt")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(folder, thread_count=2),
                 planner=MegatronPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
        if rank == 0:
            config = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
            if not common_inside:
                config |= {"common_backend": "torch", "common_backend_version": 1}
            (folder / "metadata.json").write_text(json.dumps(config))
            (run / "latest_checkpointed_iteration.txt").write_text(str(it))
        dist.barrier()


def megatron_load(args) -> None:
    """Load the merge into this rank's TP=2 chunks (Megatron's way: ShardedTensors, no flattening)."""
    rank = dist.get_rank()
    sd = {}
    for key, shape, axis, stage in gpt_params():
        local = pieces(shape, axis, stage, rank, 2, 1)
        every = list(dict.fromkeys(p for r in range(2) for p in pieces(shape, axis, stage, r, 2, 1)))
        sd[key] = torch_sharded(torch.zeros(shape, dtype=torch.bfloat16), local, every, rank)
    dcp.load(sd, checkpoint_id=args.run, planner=DefaultLoadPlanner(flatten_state_dict=False))
    shards = {k: [(tuple(s.metadata.shard_offsets), s.tensor.clone()) for s in v.local_shards()] for k, v in sd.items()}
    torch.save(shards, f"{args.out}.{rank}.pt")


def accelerate(args) -> None:
    """A 2-rank FSDP2 GPT-NeoX trained 30 steps; every 10, HF Trainer's checkpoint-N/ for FSDP with
    SHARDED_STATE_DICT: accelerate's own save_fsdp_model / save_fsdp_optimizer (pytorch_model_fsdp_0/,
    optimizer_0/) and the Trainer's scheduler.pt, rng_state_<rank>.pth, trainer_state.json."""
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

    from dcp_train import build_model, shard

    accelerator, plugin = _accelerator()
    model = shard(build_model(), dist.get_world_size())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 40)
    gen = torch.Generator().manual_seed(1234)
    for step in range(1, 31):
        ids = torch.randint(0, 96, (4, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0:
            out = Path(args.run) / f"checkpoint-{step}"
            save_fsdp_model(plugin, accelerator, model, out)
            save_fsdp_optimizer(plugin, accelerator, opt, model, out)
            torch.save({"cpu": torch.random.get_rng_state(), "python": random.getstate()},
                       out / f"rng_state_{dist.get_rank()}.pth")
            if dist.get_rank() == 0:
                torch.save(sched.state_dict(), out / "scheduler.pt")
                (out / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 30}))
            dist.barrier()


def accelerate_load(args) -> None:
    """accelerate's load_fsdp_model of the merge (a folder named pytorch_model_fsdp_0) into FSDP2."""
    from accelerate.utils import load_fsdp_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dcp_train import build_model, shard

    accelerator, plugin = _accelerator()
    model = shard(build_model(), dist.get_world_size())
    load_fsdp_model(plugin, accelerator, model, args.run)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in full.items()}, args.out)


def _accelerator():
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    # Accelerate runs FSDP on GPUs only; its FSDP save/load functions are called here directly with
    # a real plugin, on a model sharded by fully_shard as Accelerate's prepare does for fsdp_version=2
    return Accelerator(cpu=True), FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def _mcore_model():
    """megatron-core's own GPTModel, TP=2 over the 2 ranks, on CPU."""
    # a CPU-only torch: the saver and loader call these unconditionally (no CUDA work is involved)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=torch.float32, pipeline_dtype=torch.float32)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=V,
                    max_sequence_length=S)


def megatron_core_load(args) -> None:
    """megatron-core's own loader (``dist_checkpointing.load``, strict: every key the model has)
    reads ``RUN`` into a fresh TP=2 GPTModel; each rank saves its ShardedTensors' local tensors
    with their global offsets to ``OUT.<rank>.pt``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = _mcore_model()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, args.run,
                                     strict=StrictHandling.RAISE_ALL)  # megatron.training.checkpointing's nesting
    model.load_state_dict(loaded["model"])
    got: dict[str, list] = {}
    for sh in model.sharded_state_dict().values():
        if isinstance(sh, ShardedTensor):
            lead = sh.global_offset[: sh.prepend_axis_num]  # the layer's index in the stacked tensor
            got.setdefault(sh.key, []).append((tuple(sh.global_offset), lead, sh.data.detach().clone()))
    torch.save(got, f"{args.out}.{dist.get_rank()}.pt")


def megatron_core(args) -> None:
    """megatron-core's own GPTModel (TP=2, CPU) and dist_checkpointing.save with a non-distributed
    optimizer's sharded state (``optim_state_to_sharding_state``), as megatron.training.checkpointing's
    ``generate_state_dict`` assembles them: iter_0000010/20/30."""
    import itertools

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                           optim_state_to_sharding_state)

    model = _mcore_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = Path(args.run)
    for it in (10, 20, 30):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        model_sd = model.sharded_state_dict()
        params = list(itertools.chain.from_iterable(g["params"] for g in opt.param_groups))
        osd = opt.state_dict()
        optim_state_to_sharding_state(osd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys="step")
        rng = ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (1, 2),
                            (0, parallel_state.get_tensor_model_parallel_rank()), replica_id=0)
        sd = {"model": model_sd, "optimizer": osd, "rng_state": rng, "iteration": it, "checkpoint_version": 3.0,
              "args": argparse.Namespace(num_layers=L, hidden_size=H, ckpt_format="torch_dist")}
        folder = run / f"iter_{it:07d}"
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(sd, str(folder))
        if dist.get_rank() == 0:
            (run / "latest_checkpointed_iteration.txt").write_text(str(it))
        dist.barrier()


MODES = {"megatron": megatron, "megatron-load": megatron_load, "accelerate": accelerate,
         "accelerate-load": accelerate_load, "megatron-core": megatron_core, "megatron-core-load": megatron_core_load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=sorted(MODES))
    ap.add_argument("run")
    ap.add_argument("out", nargs="?")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        MODES[args.mode](args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
