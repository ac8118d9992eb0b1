"""Write real DCP training checkpoints for tests/formats/test_dcp.py (and load merger's DCP output back).

A tiny GPT-NeoX, sharded with FSDP2 ``fully_shard`` on CPU/gloo, trained with AdamW;
``{"model": ..., "optim": ...}`` saved with ``torch.distributed.checkpoint.save`` every
``--every`` steps. Run under ``torchrun --standalone --nproc-per-node N`` or as a plain process
(``no_dist``: no process group, an unsharded model).

    torchrun --standalone --nproc-per-node 2 tests/dcp_train.py train RUN --steps 6 --every 2 [--tp DIR]
    torchrun --standalone --nproc-per-node 3 tests/dcp_train.py train RUN --steps 4 --every 2 --resume RUN/step-6
    python tests/dcp_train.py train RUN --no-dist --layout olmo
    torchrun --standalone --nproc-per-node 2 tests/dcp_train.py train RUN --hf   # sharded safetensors, model only
    torchrun --standalone --nproc-per-node 2 tests/dcp_train.py load MERGED OUT.pt   # round trip
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict


def build_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(cfg)


def shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.gpt_neox.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(args, distributed: bool) -> None:
    world = dist.get_world_size() if distributed else 1
    model = build_model()
    if distributed:
        shard(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=args.resume, no_dist=not distributed)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        start = int(Path(args.resume).name.split("-")[-1])
    gen = torch.Generator().manual_seed(1234 + start)
    for step in range(start + 1, start + args.steps + 1):
        ids = torch.randint(0, 96, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            msd, osd = get_state_dict(model, opt)
            name = f"step{step}/model_and_optim" if args.layout == "olmo" else f"step-{step}"
            if args.hf:  # the model alone, as sharded safetensors (NeMo AutoModel, torchtitan's sharded/)
                dcp.save(msd, storage_writer=_hf_writer(Path(args.run) / name), no_dist=not distributed)
            else:
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(args.run) / name),
                         no_dist=not distributed)
    if args.tp:
        tp(args.tp, hf=args.hf, seed=args.tp_seed)


def _hf_writer(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    return HuggingFaceStorageWriter(str(path), save_distributed=True)


def load(args, distributed: bool) -> None:
    """dcp.load a merged model part into the (sharded) model; rank 0 saves the full state dict."""
    model = build_model()
    if distributed:
        shard(model, dist.get_world_size())
    msd = get_model_state_dict(model)
    sd = {"model": msd}
    if args.hf:  # a flat safetensors folder (merger's output of a sharded-safetensors run)
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(msd, storage_reader=HuggingFaceStorageReader(args.run), no_dist=not distributed)
    else:
        dcp.load(sd, checkpoint_id=args.run, no_dist=not distributed)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd["model"])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed or dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in full.items()}, args.out)


def tp(folder: str, *, hf: bool = False, seed: int = 7) -> None:
    """Tensors cut along dim 1 and dim 2 (tensor-parallel style) plus one cut along dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(seed)
    full = {"w_col": torch.randn(6, 8, generator=g), "w_3d": torch.randn(2, 3, 5, generator=g),
            "w_row": torch.randn(5, 4, generator=g).to(torch.bfloat16)}
    placements = {"w_col": Shard(1), "w_3d": Shard(2), "w_row": Shard(0)}
    sd = {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in full.items()}
    if hf:
        dcp.save(sd, storage_writer=_hf_writer(Path(folder)))
    else:
        dcp.save({"model": sd, "optim": {"lr": torch.tensor(0.1)}}, checkpoint_id=folder)
    if dist.get_rank() == 0:
        torch.save(full, Path(folder) / "expected.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("train", "load"))
    ap.add_argument("run")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--resume")
    ap.add_argument("--layout", choices=("titan", "olmo"), default="titan")
    ap.add_argument("--no-dist", action="store_true")
    ap.add_argument("--tp", help="also save tensors cut along dim 1 and 2 (tensor-parallel style) here")
    ap.add_argument("--tp-seed", type=int, default=7, help="their values' seed")
    ap.add_argument("--hf", action="store_true", help="save (load) the model alone with HuggingFaceStorageWriter "
                                                      "(save_distributed=True; Reader): sharded safetensors")
    args = ap.parse_args()
    torch.set_num_threads(1)
    distributed = not args.no_dist and "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        (train if args.mode == "train" else load)(args, distributed)
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
