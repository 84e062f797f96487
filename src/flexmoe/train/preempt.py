"""Preemption: finish the step, checkpoint, requeue.

SLURM sends a signal some time before the limit (`#SBATCH --signal=B:USR1@120`). torchrun's agent
dies on USR1, so the sbatch templates trap it in the batch shell and drop a `PREEMPT` file in the
run directory; a process started without torchrun gets the signal itself. Every rank checks both
after each step and all ranks agree through one all-reduce, so they stop at the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

from flexmoe.io.log import get_logger

log = get_logger(__name__)

FLAG = "PREEMPT"


class Preemption:
    def __init__(self, run_dir: str | Path, signal_name: str = "SIGUSR1", requeue: bool = True):
        self.flag = Path(run_dir) / FLAG
        self.requeue_enabled = requeue
        self._signalled = False
        if signal_name:
            sig = getattr(signal, signal_name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"trainer.preempt_signal={signal_name!r} is not a signal name (e.g. SIGUSR1)")
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the PREEMPT file still works
                log.warning(f"{signal_name} not handled (training off the main thread); "
                      f"preemption through {self.flag} only")

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signalled = True

    def requested(self) -> bool:
        """True on every rank once any rank saw the signal or the flag file."""
        local = self._signalled or self.flag.exists()
        if dist.is_initialized():
            t = torch.tensor([1.0 if local else 0.0])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return local

    def finish(self) -> str:
        """After the checkpoint: clear the flag and ask SLURM to requeue this job (rank 0)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return "stopped"
        self.flag.unlink(missing_ok=True)
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue_enabled and job):
            return "stopped"
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning(f"scontrol requeue {job} failed: {r.stderr.strip()}")
            return "requeue-failed"
        log.info(f"preempted: checkpoint written, job {job} requeued")
        return "requeued"
