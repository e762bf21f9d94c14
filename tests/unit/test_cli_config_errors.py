"""Issue 14 item 4, as a user meets it: every entry point (train, preflight, eval, the server CLI) ends a bad
command line with exit 2 and one `error:` screen naming the key, never a traceback, and starts nothing."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

ENTRY_POINTS = ["coordexp.train", "coordexp.preflight", "coordexp.eval", "coordexp.launch.server"]


def run(module: str, *args: str):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "COORDEXP_SURELY_UNSET")}
    return subprocess.run([sys.executable, "-m", module, "+experiment=smoke/ab_mixed", "rollout=vllm_server",
                           *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)


def assert_one_screen(out, needle: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: Invalid coordexp config"), out.stderr[-2000:]
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) <= 12
    assert out.stdout == ""


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("arg,needle", [
    ("vllm.server.base_urls=[http://127.0.0.1:99999]",
     "  - vllm.server.base_urls[0]: 'http://127.0.0.1:99999' is not http(s)://host:port (Port out of range"),
    ("vllm.server.base_urls=[http://127.0.0.1:abc]",
     "  - vllm.server.base_urls[0]: 'http://127.0.0.1:abc' is not http(s)://host:port (Port could not be "),
    ("vllm.server.base_urls=[{host:a}]",
     "  - vllm.server.base_urls[0]: a mapping {'host': 'a'} is not a URL"),
    ("training.run_name=${oops", "  - training.run_name: cannot parse the value of override"),
    ("training.max_steps", "  - training.max_steps: not an override: write key=value"),
    ("training.run_name=${nope.key}", "  - training.run_name: Interpolation key 'nope.key' not found"),
    ("training.run_name=${oc.env:COORDEXP_SURELY_UNSET}",
     "  - training.run_name: KeyError raised while resolving interpolation"),
    ("rollout_matching.repeat_terminate.enabled=2",
     "  - rollout_matching.repeat_terminate.enabled: 2 is not a boolean: use true or false"),
    ("training.learning_rate=inf", "  - training.learning_rate: inf is not a finite number"),
    ("vllm.server.base_urls=http://127.0.0.1:8601",
     "str is not a ListConfig, list or tuple. Fix: write a list in brackets, vllm.server.base_urls=[a,b]"),
])
def test_bad_command_line_is_one_screen_with_the_key(module, arg, needle):
    assert_one_screen(run(module, arg), needle)


@pytest.mark.parametrize("module", ["coordexp.train", "coordexp.eval"])
@pytest.mark.parametrize("arg,needle", [
    ("training.run_name=${nope.key}", "  - training.run_name: Interpolation key 'nope.key' not found"),
    ("training.run_name=${oc.env:COORDEXP_SURELY_UNSET}",
     "  - training.run_name: KeyError raised while resolving interpolation"),
])
def test_cfg_job_with_an_unresolvable_interpolation(module, arg, needle):
    assert_one_screen(run(module, arg, "--cfg", "job"), needle)


@pytest.mark.parametrize("module", ["coordexp.train", "coordexp.eval"])
def test_a_run_dir_that_cannot_be_created_is_named_and_nothing_starts(module, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    out = run(module, f"hydra.run.dir={blocker}/run")
    assert_one_screen(out, f"  - hydra.run.dir: '{blocker}/run' cannot be created: '{blocker}' is a file")
    out = run(module, "hydra.run.dir=/proc/coordexp-run")
    assert_one_screen(out, "  - hydra.run.dir: '/proc/coordexp-run' is not writable (nothing can be created "
                           "in '/proc'): No such file or directory")


def test_a_sweep_is_checked_job_by_job_before_the_first_starts(tmp_path):
    out = run("coordexp.train", "-m", "stage2_ab.schedule.b_ratio=0.5,1.5", f"hydra.sweep.dir={tmp_path}/sw")
    assert_one_screen(out, "  - stage2_ab.schedule.b_ratio: 1.5 is outside [0, 1] (sweep job "
                           "stage2_ab.schedule.b_ratio=1.5)")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("url,needle", [
    ("http://127.0.0.1:abc",
     "  - --base-url: 'http://127.0.0.1:abc' is not http(s)://host:port (Port could not"),
    ("http://127.0.0.1:99999",
     "  - --base-url: 'http://127.0.0.1:99999' is not http(s)://host:port (Port out of"),
    # a host the server (bound to 127.0.0.1, no API key) would never answer: refused, not a 10-minute wait
    ("http://10.0.0.5:8652",
     "  - vllm.server.base_urls: http://10.0.0.5:8652 is not a loopback address, but the servers the "
     "launcher starts bind vllm.server.host=127.0.0.1"),
])
def test_the_server_cli_checks_its_base_url_before_building_anything(url, needle):
    assert_one_screen(run("coordexp.launch.server", "--base-url", url), needle)
