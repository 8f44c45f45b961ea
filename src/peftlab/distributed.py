"""One run on several processes: data parallel (DDP) through ``torch.distributed``.

A run whose model asks for ``gpus: N`` (N > 1) is started by ``torchrun``
(``python -m torch.distributed.run --standalone --nproc_per_node N``, ``launch``), one
process per GPU (NCCL), or, on a machine without one, N CPU processes (gloo: how the tests
run it). Every process reads the same data order; each global batch of
``batch_size x gradient_accumulation_steps x N`` rows is cut into N shards, one per process
(``ShardedBatches``), so N processes with ``batch_size`` b make the same update as one process
with batch N x b. Gradients are averaged by DDP.

Process 0 alone validates, writes records, weights and checkpoints, and logs to MLflow; the
others wait for it. Decisions that must be the same everywhere (stop, checkpoint now) are
taken together over a CPU (gloo) group, so they never wait for the GPU's queue.

``parallel: fsdp`` (a model's entry) shards full fine-tuning instead (FSDP,
``torch.distributed.fsdp.fully_shard``: each transformer block, then the rest): every process
holds 1/N of the weights, gradients and AdamW state, the ones a model too large for one GPU
cannot fit. A sharded model's forward needs every process, so all of them validate (on the
same rows; generation keeps them in step, ``synced_gpus``) and process 0's metrics decide;
checkpoints and weights hold the full tensors (gathered on process 0's host), so they read
the same as a single process's. The other methods train a small share of the weights: they
stay on DDP, the frozen base replicated (in bf16 on a GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, TrainingError
from .models import transformer_blocks

log = logging.getLogger(__name__)

PARALLEL = ("ddp", "fsdp")

# validation on process 0 (generation on a large set) may keep the others waiting long
TIMEOUT = datetime.timedelta(hours=3)


@dataclass
class Context:
    """This process's place in the run: rank, world size, and the groups to talk over."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP: weights, gradients and optimizer state split over the processes
    control = None  # a gloo group for decisions (CPU tensors, no GPU synchronisation)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, shard: bool = False) -> Context:
        """A single process, or (under torchrun, ``WORLD_SIZE`` > 1) this rank of a process group,
        initialised here: NCCL with a GPU per process, gloo on CPUs; ``shard``: FSDP, not DDP."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        ctx = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), shard)
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
        ctx.control = dist.new_group(backend="gloo", timeout=TIMEOUT)
        return ctx

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training forward runs through: the model itself, its DDP wrapper, or (sharded)
        the model, its parameters now this process's shards (on its device)."""
        if not self.active:
            return model
        import torch.distributed as dist

        for buffer in model.buffers():  # a method's index sets and masks: process 0's, everywhere
            dist.broadcast(buffer.data, 0, group=self.control if buffer.device.type == "cpu" else None)
        if self.sharded:  # every process loaded the same weights (a new head: the same seed)
            return shard(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, net: nn.Module):
        """A context in which backward accumulates gradients without reducing them."""
        return _gradient_sync_off(net) if self.sharded else net.no_sync()

    # a sharded model's full tensors (every process must call these; process 0 gets them)

    def full_state(self, model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
        """The full tensors of the parameters ``names``, on the host: on process 0 (others: {})."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
        return {k: v for k, v in state.items() if k in names}

    def load_full_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors (the same on every process) into the sharded ``model``."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_options(strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """``optimizer.state_dict()`` with full tensors: as a single process's (parameters by
        index), on process 0; None on the others."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
        if not self.main:
            return None
        index = {name: i for i, name in enumerate(_optimized_names(model, optimizer))}
        return {"state": {index[k]: v for k, v in state["state"].items()},
                "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an ``optimizer_state`` (the same on every process)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = _optimized_names(model, optimizer)
        state = {"state": {names[i]: v for i, v in state["state"].items()},
                 "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, state, options=_full_options())

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes (in place; the tensor on this process's device)."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def agree(self, flags: list[int]) -> list[int]:
        """The element-wise maximum of every process's ``flags`` (any process saying yes)."""
        if not self.active:
            return flags
        import torch.distributed as dist

        t = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return t.tolist()

    def agree_sum(self, n: int) -> int:
        """The sum of every process's ``n``."""
        if not self.active:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, group=self.control)
        return int(t[0])

    def gather(self, obj) -> list:
        """Every process's ``obj`` (a picklable value), in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.control)


def shard(model: nn.Module) -> nn.Module:
    """FSDP over the default process group: each transformer block a unit of its own (gathered
    for its forward and backward only), the root holding the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    try:
        blocks = transformer_blocks(model)
    except ModelError:  # no block list found: the root alone is one unit
        blocks = []
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def _gradient_sync_off(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _optimized_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order its state_dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class ShardedBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of ``batches`` (a batch sampler): contiguous
    shards as even as possible. A global batch with fewer rows than processes is dropped (a
    process with no rows could not join the gradient average)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if len(batch) < self.world:
                log.warning("a last batch of %d rows for %d processes is dropped", len(batch), self.world)
                continue
            base, extra = divmod(len(batch), self.world)
            start = self.rank * base + min(self.rank, extra)
            yield batch[start:start + base + (self.rank < extra)]


# ----------------------------------------------------------------------------------------
# Launching: the finetune job starts torchrun, which starts one worker per process
# ----------------------------------------------------------------------------------------


def finetune_processes(processes: int, key, model_entry: dict | None, experiments_dir, training: dict | None,
                       mask_path, data_dir, weights_path, record_path, threads: int | None, code: str = "",
                       stream=None, tuned: dict | None = None) -> dict:
    """``train.finetune`` of ``key`` on ``processes`` processes; returns process 0's record.
    ``tuned``: the tuning stage's settings (``load_experiment``'s)."""
    parallel_of(model_entry)  # a bad value fails here, not in every process
    job = {"key": [key.model, key.task, key.method, key.variant, key.seed], "model": model_entry,
           "trial": getattr(key, "trial", None), "tuned": tuned,
           "experiments_dir": str(experiments_dir), "training": training, "mask_path": mask_path,
           "data_dir": str(data_dir), "weights_path": str(weights_path), "record_path": str(record_path),
           "threads": max(1, threads // processes) if threads else None,  # the job's CPUs, shared out
           "code": code}
    record_path = Path(record_path)
    launch(job, processes, record_path.parent / ".launch" / f"{record_path.stem}.json", stream)
    return json.loads(record_path.read_text())


def parallel_of(model_entry: dict | None) -> str:
    """A model entry's ``parallel`` (default ddp); an unknown one is a ConfigError."""
    from .errors import ConfigError

    parallel = (model_entry or {}).get("parallel", "ddp")
    if parallel not in PARALLEL:
        raise ConfigError(f"models.<name>.parallel is {parallel!r}: use one of {', '.join(PARALLEL)}")
    return parallel


def launch(job: dict, processes: int, job_path: Path, stream=None) -> None:
    """Run ``worker`` for ``job`` on ``processes`` processes with torchrun (its standalone
    rendezvous: one node, a free port), its output to ``stream``; raises on a failure."""
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "peftlab.distributed", str(job_path)]
    log.info("launching %d processes: %s", processes, " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(job.get("threads") or 1)))
    done = subprocess.run(cmd, stdout=stream, stderr=stream, env=env)
    job_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        job_path.parent.rmdir()
    if done.returncode != 0:
        raise TrainingError(f"{processes}-process training exited with status {done.returncode} (see the log "
                            "above); run the job again to resume from its last checkpoint")


def worker(job_path: str) -> int:
    """One torchrun worker: the ``train.finetune`` call that ``job`` describes."""
    from .config import RunKey, TrialKey, load_experiment
    from .models import ModelSpec
    from .train import finetune

    job = json.loads(Path(job_path).read_text())
    experiment = load_experiment(job["experiments_dir"], job["key"][2], job["key"][3], job["training"],
                                 job.get("tuned"), task=job["key"][1])
    if job.get("mask_path"):
        experiment.method_params["mask_path"] = job["mask_path"]
    ident = (*job["key"][:4], int(job["key"][4]))
    key = RunKey(*ident) if job.get("trial") is None else TrialKey(*ident, trial=int(job["trial"]))
    spec = ModelSpec.from_config(job["key"][0], job["model"])
    finetune(key, spec, experiment, job["data_dir"], job["weights_path"], job["record_path"],
             threads=job.get("threads"), code_fingerprint=job.get("code", ""), parallel=parallel_of(job["model"]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _main(job_path: str) -> int:
    from .errors import PeftlabError

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s process {rank} %(levelname)s %(name)s: %(message)s")
    try:
        return worker(job_path)
    except PeftlabError as exc:
        print(f"peftlab finetune (process {rank}): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
