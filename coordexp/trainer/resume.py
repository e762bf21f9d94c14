"""Which checkpoint a run resumes from (``training.resume_from_checkpoint``), and what a resume records.

- ``latest`` stays inside the run's **lineage**: the run's own dir, and every run dir whose
  ``.hydra/overrides.yaml`` equals this run's overrides without the resume key and ``training.max_steps``
  (the same job started earlier: the first attempt of a preempted single run, the same sweep job of an
  earlier sweep, or a finished run trained on with a higher ``max_steps``). Run
  dirs are looked for next to the run's dir and, for a sweep job (``<sweep dir>/<job num>``), in the
  sibling sweep dirs; a job with other overrides (another ``b_ratio``) is never picked.
- a checkpoint dir resumes from it; a run dir from its newest checkpoint.
- a checkpoint without its optimizer, scheduler or RNG state (:func:`missing_state`: a partial copy, a kill
  while it was written) is refused by name; ``latest`` passes over such a one to the newest complete one and
  says so.
- a checkpoint at or past ``training.max_steps`` trains nothing: the run ends with exit 0 and says the run
  is already complete (:attr:`Resume.complete`).

Light on purpose (stdlib + yaml): the orchestrator resolves the checkpoint before it starts a server.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coordexp.errors import LearnerError
from coordexp.protocol import METADATA_NAME

RESUME_KEY = "training.resume_from_checkpoint"
#: keys a run's lineage ignores: how it resumes, and how far it trains (raising it trains the same run on)
LINEAGE_FREE_KEYS = (RESUME_KEY, "training.max_steps")
LATEST = "latest"
#: Where a run records the checkpoint it resumed from (a top-level key of run_metadata.json).
METADATA_KEY = "resumed_from"


@dataclass(frozen=True)
class Resume:
    checkpoint: Path
    global_step: int
    max_steps: int
    #: the lineage dirs ``latest`` searched (empty for an explicit path)
    searched: tuple[Path, ...] = ()
    #: newer checkpoints ``latest`` passed over, each with what it lacks (see :func:`missing_state`)
    skipped: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.global_step >= self.max_steps

    def describe(self) -> str:
        if self.complete:
            return (f"already complete: {self.checkpoint} is at step {self.global_step}, training.max_steps "
                    f"is {self.max_steps}; nothing to train (to train on: the same command with a higher "
                    f"training.max_steps and {RESUME_KEY}={LATEST})")
        skipped = f"; skipped the newer {', '.join(self.skipped)}" if self.skipped else ""
        return f"resuming from {self.checkpoint} (step {self.global_step} of {self.max_steps}){skipped}"

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "global_step": self.global_step,
                "max_steps": self.max_steps, "complete": self.complete}


def _overrides(run_dir: Path) -> list[str] | None:
    """The run's Hydra task overrides without :data:`LINEAGE_FREE_KEYS` (None when it has no .hydra
    record)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(items, list):
        return None
    return sorted(str(o) for o in items if str(o).lstrip("+~").split("=", 1)[0] not in LINEAGE_FREE_KEYS)


def lineage(run_dir: Path) -> list[Path]:
    """The run's own dir, then every run dir with the same overrides (but :data:`LINEAGE_FREE_KEYS`)."""
    run_dir = Path(run_dir).resolve()
    mine = _overrides(run_dir)
    out = [run_dir]
    if mine is None:
        return out
    parent = run_dir.parent
    candidates = [p for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    if (parent / "multirun.yaml").is_file() or run_dir.name.isdigit():  # a sweep job: <sweep dir>/<num>
        candidates += [job for sweep in parent.parent.iterdir() if sweep.is_dir() and sweep != parent
                       for job in sweep.iterdir() if job.is_dir()]
    out += sorted(c.resolve() for c in candidates if c.resolve() != run_dir and _overrides(c) == mine)
    return out


def _step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LearnerError(f"{checkpoint}: trainer_state.json is unreadable; pick another checkpoint with "
                           f"{RESUME_KEY}=<checkpoint dir>") from None


def missing_state(checkpoint: Path) -> list[str]:
    """What of the training state a resume needs is not in ``checkpoint``: the optimizer state
    (``optimizer.pt``; FSDP: ``optimizer.bin`` or an ``optimizer_*`` folder), ``scheduler.pt`` and the RNG
    state (``rng_state*.pth``). transformers' Trainer skips a missing one without a word and restarts the
    optimizer, the learning-rate schedule (warmup again) or the data order, so a resume checks first."""
    checkpoint = Path(checkpoint)
    missing = []
    optimizer = ((checkpoint / "optimizer.pt").is_file() or (checkpoint / "optimizer.bin").is_file()
                 or any(p.is_dir() for p in checkpoint.glob("optimizer*")))
    if not optimizer:
        missing.append("optimizer.pt (the optimizer state)")
    if not (checkpoint / "scheduler.pt").is_file():
        missing.append("scheduler.pt (the learning-rate schedule)")
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth (the random state: data order, sampling)")
    return missing


def _newest_first(dirs: list[Path]) -> list[Path]:
    """The checkpoints in ``dirs``, the highest step first (the newer of two with one step)."""
    found = [c for d in dirs for c in Path(d).glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return sorted(found, key=lambda c: (_step(c), c.stat().st_mtime), reverse=True)


def _newest(dirs: list[Path]) -> Path | None:
    return next(iter(_newest_first(dirs)), None)


def _complete(picked: Path, spec: str) -> Path:
    missing = missing_state(picked)
    if missing:
        raise LearnerError(f"{RESUME_KEY}={spec}: {picked} lacks {', '.join(missing)}, so a resume would "
                           f"restart what it holds without a word. Fix: restore the file(s) (copy the whole "
                           f"checkpoint dir), or pass {RESUME_KEY}=<an earlier checkpoint dir>")
    return picked


def resolve(spec: str | None, run_dir: Path, max_steps: int) -> Resume | None:
    """The checkpoint ``training.resume_from_checkpoint`` names (None: a fresh run); LearnerError when there
    is none."""
    if not spec:
        return None
    if spec == LATEST:
        dirs = lineage(Path(run_dir))
        picked, skipped = None, []
        for candidate in _newest_first(dirs):
            missing = missing_state(candidate)
            if not missing:
                picked = candidate
                break
            skipped.append(f"{candidate.name} (lacks {', '.join(missing)})")  # e.g. a partial copy
        if picked is None and skipped:
            raise LearnerError(f"{RESUME_KEY}=latest: no complete checkpoint in this run's lineage; skipped "
                               f"{'; '.join(skipped)}. Start without the key, or restore the missing files")
        if picked is None:
            shown = "\n".join(f"  {d}" for d in dirs[:10])
            raise LearnerError(f"{RESUME_KEY}=latest: no checkpoint-* in this run's lineage (its own dir and "
                               f"the run dirs with the same overrides):\n{shown}\nStart without the key, or "
                               f"pass {RESUME_KEY}=<checkpoint dir or run dir>")
        return Resume(picked.resolve(), _step(picked), max_steps, tuple(dirs), tuple(skipped))
    path = Path(spec)
    picked = path if (path / "trainer_state.json").is_file() else (_newest([path]) if path.is_dir() else None)
    if picked is None:
        # the config made the value absolute against the cwd: compare the name the user typed
        typo = not path.exists() and difflib.get_close_matches(path.name, [LATEST], n=1, cutoff=0.6)
        hint = f" (did you mean {RESUME_KEY}={LATEST}?)" if typo else ""
        raise LearnerError(f"{RESUME_KEY}='{spec}' is neither a checkpoint dir nor a run dir with "
                           f"checkpoint-* inside{hint}")
    return Resume(_complete(picked, spec).resolve(), _step(picked), max_steps)


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """The run's run_metadata.json (written by the orchestrator), {} when it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(run_dir: Path, resume: Resume) -> None:
    """Add ``resumed_from`` to the run's run_metadata.json (read, update, write: other keys stay)."""
    data = read_metadata(run_dir)
    data[METADATA_KEY] = resume.to_dict()
    (Path(run_dir) / METADATA_NAME).write_text(json.dumps(data, indent=2, default=str) + "\n")


def tied_keys_loaded(model: Any, missing: list[str]) -> list[str]:
    """The keys of ``missing`` whose parameter is the very tensor of a parameter the checkpoint did load
    (tied embeddings: safetensors stores ``lm_head.weight`` once, as ``model.embed_tokens.weight``), so
    nothing is missing there. Exact: compares the tensors' storage, not names."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for k, p in params.items() if k not in missing}
    ptrs = {p.data_ptr() for k, p in params.items() if k not in missing}
    return [k for k in missing if k in params and (id(params[k]) in loaded or params[k].data_ptr() in ptrs)]


def checkpoint_names(model: Any) -> dict[str, str]:
    """``{name in a checkpoint the model saved: the model's state-dict name}`` for every name that
    transformers' save-time conversion renames (transformers 5 saves Qwen2-VL / Qwen2.5-VL / Qwen3-VL in the
    released checkpoints' layout, ``visual.*`` and ``model.layers.*``, while the classes name them
    ``model.visual.*`` and ``model.language_model.layers.*``;
    ``transformers.core_model_loading.revert_weight_conversion``). Names saved as they are, and names a
    converter (not a plain renaming) produces, are left out."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for name in model.state_dict():
        saved = revert_weight_conversion(model, {name: torch.empty(0)})
        if len(saved) == 1 and next(iter(saved)) != name:
            out[next(iter(saved))] = name
    return out


def load_renamed_checkpoint(model: Any, checkpoint: str | Path):
    """Load the weights of a full (non-adapter) Trainer checkpoint into ``model`` under the model's own names
    (:func:`checkpoint_names`), one safetensors shard at a time; returns torch's ``_IncompatibleKeys`` over
    all shards, or None when this model's checkpoints need no renaming or the checkpoint is not safetensors
    (the Trainer's own loading is right then). Why: transformers' ``Trainer._load_from_checkpoint`` loads the
    saved state dict with ``load_state_dict`` as it is, so a VL checkpoint (renamed on save) matched no key
    and a resumed run silently kept its initial weights."""
    import safetensors.torch
    from torch.nn.modules.module import _IncompatibleKeys

    folder = Path(checkpoint)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    elif index.is_file():
        shards = [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    else:
        return None
    names = checkpoint_names(model)
    if not names:
        return None
    expected = set(model.state_dict())
    loaded, unexpected = set(), []
    for shard in shards:
        state = {names.get(k, k): v for k, v in safetensors.torch.load_file(shard, device="cpu").items()}
        result = model.load_state_dict(state, strict=False)
        unexpected += result.unexpected_keys
        loaded |= set(state) & expected
        del state
    return _IncompatibleKeys(sorted(expected - loaded), unexpected)
