"""Data-parallel runs through accelerate: which process is rank 0, which GPU is this rank's, and the
launch behind ``qft finetune --num-gpus N``.

qft has no launcher of its own. ``--num-gpus N`` re-runs the same finetune under ``accelerate launch``
(torchrun underneath) with N processes, and launching it yourself works the same way, with any accelerate
setting (DDP by default; FSDP or DeepSpeed through ``--config_file``). Every rank trains on its own shard
of each batch (the global batch is N x --batch-size x --grad-accum); rank 0 alone prints, saves the adapter
and writes JSON. The ZO methods all-reduce one scalar per step and keep identical weights on every rank
(:mod:`qft.zo.trainer`).

    qft finetune --num-gpus 2 --method qlora --data train.jsonl
    accelerate launch --num_processes 2 -m qft.cli finetune --method qlora --data train.jsonl  # the same
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# set in the processes qft launches, so that they never launch again
LAUNCHED_ENV = "QFT_LAUNCHED"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """True inside a process started by a distributed launcher (accelerate launch, torchrun)."""
    return LAUNCHED_ENV in os.environ or "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    return rank() == 0


def local_cuda_device() -> int:
    """This rank's GPU: LOCAL_RANK under a launcher (each rank loads onto its own GPU), else the current one."""
    import torch

    if "LOCAL_RANK" in os.environ:
        return local_rank()
    return torch.cuda.current_device()


def main_process_log(log):
    """``log`` on rank 0, a no-op on the other ranks (each would print the same lines)."""
    return log if is_main_process() else (lambda *args, **kwargs: None)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the body first (e.g. converts and caches the default model), then the others do."""
    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_argv(num_processes: int, target: list[str], port: int | None = None) -> list[str]:
    """``accelerate launch`` (as ``python -m accelerate.commands.launch``) of ``target``, e.g.
    ``["-m", "qft.cli", "finetune", ...]`` or ``["script.py", ...]``, in ``num_processes`` processes.

    Options not given here come from the user's accelerate config, if any (``accelerate config``): that is how
    FSDP or DeepSpeed settings apply. Mixed precision is left to the Trainer (bf16 on GPU). On a machine
    without CUDA the ranks run on CPU over gloo (for tests).
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(port or free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *target]


def check_num_gpus(num_gpus: int) -> None:
    import torch

    from qft.errors import QftError

    if torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        raise QftError(f"--num-gpus {num_gpus} asks for more GPUs than this machine has ({torch.cuda.device_count()})",
                       f"pass --num-gpus {torch.cuda.device_count()} or less")


def launch_finetune(cfg, log=print) -> int:
    """Run ``cfg`` as ``accelerate launch --num_processes cfg.num_gpus -m qft.cli finetune --config <cfg>``.

    Returns the launcher's exit code. The resolved config travels as a YAML file, so the ranks run exactly
    the configuration this process validated; rank 0 prints and saves.
    """
    import dataclasses

    import yaml

    check_num_gpus(cfg.num_gpus)
    with tempfile.TemporaryDirectory(prefix="qft-launch-") as tmp:
        path = Path(tmp) / "finetune.yaml"
        path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        argv = accelerate_launch_argv(cfg.num_gpus, ["-m", "qft.cli", "finetune", "--config", str(path)])
        log(f"launching {cfg.num_gpus} processes: accelerate launch --num_processes {cfg.num_gpus} "
            f"-m qft.cli finetune ...")
        return subprocess.run(argv, env={**os.environ, LAUNCHED_ENV: "1"}).returncode


def finetune_launched(cfg, log=print):
    """:func:`qft.train.finetune` over ``cfg.num_gpus`` processes, from Python: launch, then read rank 0's record."""
    import json
    import time

    from qft.errors import QftError
    from qft.models import resolve_model
    from qft.train import FinetuneResult

    start = time.time()
    code = launch_finetune(cfg, log)
    out = Path(cfg.output)
    if code != 0 or not (out / "qft_run.json").exists():
        raise QftError(f"the {cfg.num_gpus}-process run failed (exit code {code})", "read the ranks' errors above")
    run = json.loads((out / "qft_run.json").read_text())
    metric = next(k.removesuffix("_before") for k in run if k.endswith("_before"))
    stats = run.get("stats", {})
    return FinetuneResult(
        output=out, adapter_bytes=sum(f.stat().st_size for f in out.glob("*.safetensors")), metric_name=metric,
        metric_before=run[metric + "_before"], metric_after=run[metric + "_after"],
        train_loss=stats.get("train_loss"), seconds=time.time() - start,
        base_model=cfg.model or resolve_model(None, log), stats=stats,
        is_adapter=(out / "adapter_config.json").exists(),
    )
