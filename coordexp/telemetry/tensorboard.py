"""TensorBoard events under the names of the metric registry (docs/metrics.md).

transformers' ``TensorBoardCallback`` rewrites every key before writing it (``rollout/f1`` ->
``train/rollout/f1``, ``eval_rollout/f1`` -> ``eval/rollout/f1``, ``train/samples`` ->
``train/train/samples``), so TensorBoard would show names that metrics.jsonl and the docs do not.
:class:`RegistryTensorBoardCallback` is that callback (same writer, same directory, same text
records, found by ``isinstance`` like it) with the keys written as logged.
"""

from __future__ import annotations

import numbers

from transformers.integrations import TensorBoardCallback


class RegistryTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, writing each scalar under the key it was logged with."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        if self.tb_writer is None:
            return
        for key, value in logs.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.tb_writer.add_scalar(key, float(value), state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
        self.tb_writer.flush()
