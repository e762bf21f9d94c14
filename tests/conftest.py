"""Shared test setup: run from the repo root, offline, with caches under .cache/."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (for a server or a rendezvous a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
