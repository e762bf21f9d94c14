"""Server-worker side of the file weight sync: load a safetensors file the learner wrote into a vLLM worker's
model, in place, and the vLLM ``worker_extension_cls`` that exposes it (:data:`~coordexp.protocol.
WORKER_METHOD`, reached by name over ``collective_rpc``, so no pickled callables).

Imported only inside the server's worker processes (vLLM resolves
:data:`~coordexp.protocol.WORKER_EXTENSION_FQCN`); vLLM, safetensors and ms-swift are imported
when a worker first needs them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["CoordexpWorkerExtension", "load_weights_file_into"]  # noqa: F822 - built on first access


def load_weights_file_into(worker, path: str) -> dict[str, Any]:
    """Server-worker side: load a weights file written by :func:`write_weights_file` into the vLLM worker's
    model, in place, through vLLM's own reload path (``Worker.reload_weights``: checkpoint-format HF names,
    layer-wise reload that re-runs each layer's post-load processing - needed on CPU, where vLLM repacks
    linear weights after loading, and for quantized layers). ``path``: one safetensors file, or the index of a
    bucketed push (``*.index.json``, :class:`~coordexp.trainer.sync_transport.FileBucketWriter`) whose shards
    are streamed, tensor by tensor, into the same single reload pass. Returns what was loaded, for the
    learner's log."""
    t0 = time.perf_counter()
    shards = _shard_paths(path)
    _check_shards(shards)  # before the reload: a failed reload leaves the model's weights unloaded
    counted = _Counted(_stream(shards))
    reload = getattr(worker, "reload_weights", None)
    if callable(reload):
        reload(weights_iterator=counted, is_checkpoint_format=True)
        how = "reload_weights"
        tied = _refresh_tied_heads(worker.model_runner.model)
    else:  # older vLLM: plain load_weights, then ms-swift's post-load processing
        model = worker.model_runner.model
        model.load_weights(weights=counted)
        from swift.rlhf_trainers.utils import finish_vllm_weight_reload

        finish_vllm_weight_reload(
            model, model_config=worker.model_runner.model_config, target_device=worker.device, strict=True
        )
        how = "load_weights"
        tied = _refresh_tied_heads(model)
    return {
        "path": path,
        "tensors": counted.n,
        "shards": counted.shards,
        "how": how,
        "tied_heads_refreshed": tied,
        "seconds": round(time.perf_counter() - t0, 4),
        "pid": os.getpid(),
    }


class _Counted:
    """An iterator of ``(name, tensor)`` that counts what was consumed (and the shard files opened)."""

    def __init__(self, source):
        self.source, self.n, self.shards = source, 0, 0

    def __iter__(self):
        for item in self.source:
            if item is None:  # a shard boundary marker from _stream
                self.shards += 1
                continue
            self.n += 1
            yield item


def _shard_paths(path: str) -> list[str]:
    """The shard files a push consists of: ``path`` itself, or for a Hugging Face sharded-checkpoint index
    (``*.index.json``, written by the learner's bucketed push: ``weight_map`` name -> shard file) its shards
    in the order they were written. A shard must be a plain file name next to the index."""
    if not path.endswith(".index.json"):
        return [path]
    with open(path) as fh:
        weight_map = json.load(fh)["weight_map"]
    folder = os.path.dirname(path)
    out: list[str] = []
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{path}: shard {shard!r} is not a file name next to the index")
        out.append(os.path.join(folder, shard))
    return out


def _check_shards(shards: list[str]) -> None:
    """Open every shard's safetensors header before anything is loaded (a missing, truncated or corrupt
    file raises here). vLLM's layer-wise reload moves each layer's weights off the model before it refills
    them, so a file that failed half-way through the reload would leave the server without weights."""
    from safetensors import safe_open

    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as fh:
            fh.keys()  # safetensors checks the header against the file's size when it opens it


def _stream(shards: list[str]):
    """``(name, tensor)`` of every shard of the push, one tensor at a time (a shard is never read whole),
    with None before each shard (counted by :class:`_Counted`). All shards load in one reload pass: vLLM's
    layer-wise reload needs every weight of a layer in the same pass (coordexp.trainer.sync_transport.
    FileBucketWriter says why)."""
    from safetensors import safe_open

    for shard in shards:
        yield None
        with safe_open(shard, framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, fh.get_tensor(name)


def _refresh_tied_heads(model) -> int:
    """Re-run post-load processing of an ``lm_head`` tied to the input embeddings.

    vLLM's layer-wise reload copies the new embedding values into the shared tensor, but the tied
    ``lm_head`` receives no weights of its own, so its derived state is not rebuilt: on CPU the oneDNN /
    packed GEMM handle made from the old weights keeps producing the old logits (the server's greedy output
    then differs from the learner's). Returns the number of heads refreshed."""
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    except ImportError:
        return 0
    embed_ptrs = {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding)
        and not isinstance(m, ParallelLMHead)
        and getattr(m, "weight", None) is not None
        and not m.weight.is_meta
    }
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        method = getattr(m, "quant_method", None)
        if (
            isinstance(m, ParallelLMHead)
            and w is not None
            and method is not None
            and w.data_ptr() in embed_ptrs
        ):
            method.process_weights_after_loading(m)
            n += 1
    return n


def _build_worker_extension():
    """The vLLM worker extension class, built on first access (imports ms-swift only in the worker)."""
    try:
        from swift.pipelines.infer.rollout import WeightSyncWorkerExtension as base
    except Exception:  # noqa: BLE001 - ms-swift absent: file-load method only
        base = object

    class CoordexpWorkerExtension(base):  # type: ignore[misc, valid-type]
        """Adds :data:`WORKER_METHOD` to the vLLM worker (keeps ms-swift's NCCL methods)."""

        def coordexp_load_weights(self, path: str) -> dict[str, Any]:
            return load_weights_file_into(self, path)

    CoordexpWorkerExtension.__module__ = __name__
    return CoordexpWorkerExtension


def __getattr__(name: str):  # PEP 562: vLLM resolves WORKER_EXTENSION_FQCN with getattr(module, name)
    if name == "CoordexpWorkerExtension":
        cls = _build_worker_extension()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
