"""Run a function on 2 CPU processes with a gloo process group (torch.multiprocessing), as
torchrun would."""
import os
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, done_dir, fn, args):
    # CUDA_VISIBLE_DEVICES="": CPU ranks on a GPU machine too (the scripts would pick CUDA and nccl)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    open(os.path.join(done_dir, str(rank)), "w").close()
    dist.destroy_process_group()


def run_on_two_ranks(fn, *args):
    """Run fn(rank, world, *args) on 2 ranks. Every rank must finish fn and the final barrier;
    a rank that dies after that, while gloo tears its sockets down (seen rarely here as a SIGABRT
    at exit), does not fail the test, since its work is already done and checked by the caller."""
    with tempfile.TemporaryDirectory() as done_dir:
        ctx = mp.spawn(_entry, args=(2, free_port(), done_dir, fn, args), nprocs=2, join=False)
        while True:
            try:
                if ctx.join():
                    break
            except mp.ProcessExitedException:
                if sorted(os.listdir(done_dir)) != ["0", "1"]:
                    raise
                break
