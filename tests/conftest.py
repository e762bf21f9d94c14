"""Shared test setup: run from the repo root, offline, with caches under .cache/."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest

from coordexp.launch.process import ephemeral_port_range

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MODELSCOPE_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2 model, built once per session into the session's temp dir (every test that needs the
    real tiny checkpoint, tokenizer or model starts from this folder)."""
    from coordexp.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model-cache", arch="qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rules_config(**overrides):
    """A repeat-terminate config with every rule off except the ones given (rule-engine tests)."""
    from coordexp.repeat_rules import parse_config

    base = {"enabled": True, "min_new_tokens": 0, "max_consecutive_token_repeats": 0, "ngram_size": 0,
            "ngram_repeats": 0, "max_object_keys": None}
    base.update(overrides)
    return parse_config(base)


def read_jsonl(path):
    """The records of a JSONL file (metrics.jsonl, datasets), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


_PORTS = random.Random(os.urandom(8))  # not the global generator: a test may seed that one


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (for a server or a rendezvous a test starts),
    below the kernel's ephemeral range: a port from ``bind(0)`` can go to another process's ``bind(0)`` --
    vLLM's engine takes its internal ports so -- before the server the test starts binds it."""
    low = (ephemeral_port_range() or (32768, 60999))[0]
    for _ in range(100):
        port = _PORTS.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [20000, {low})")
