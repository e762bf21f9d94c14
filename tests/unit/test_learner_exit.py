"""How a learner process ends: a torchrun rank skips interpreter finalization (gloo worker threads can abort
it there), flushing what it printed; a plain process exits normally."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT, free_port

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch.distributed as dist
    from coordexp.trainer.learner import exit_rank

    if sys.argv[1] == "rank":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
        gathered = [None]
        dist.all_gather_object(gathered, {"loss": 1.0})
    atexit.register(lambda: print(" finalized", end=""))
    print("trained", end="")
    exit_rank(int(sys.argv[3]))
""")


def run_exit(mode: str, code: int):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(free_port()), str(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_rank_exits_with_its_code_flushed_and_without_finalization():
    out = run_exit("rank", 5)
    assert out.returncode == 5, out.stderr
    assert out.stdout == "trained"


def test_a_process_without_a_group_exits_normally():
    out = run_exit("plain", 4)
    assert out.returncode == 4, out.stderr
    assert out.stdout == "trained finalized"
