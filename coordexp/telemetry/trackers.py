"""wandb under the names of the metric registry (docs/metrics.md).

transformers' ``WandbCallback`` rewrites every key before logging it, as its TensorBoard callback does
(``rollout/f1`` -> ``train/rollout/f1``, ``eval_rollout/f1`` -> ``eval/rollout/f1``).
:class:`RegistryWandbCallback` is that callback (same setup, same offline run, same end-of-training summary
values) logging each key as it was logged. Its x axis stays transformers' ``train/global_step``.
"""

from __future__ import annotations

from transformers.integrations import WandbCallback

from coordexp.config.metric_names import HF_END_KEYS


class RegistryWandbCallback(WandbCallback):
    """transformers' wandb callback, logging each value under the key it was logged with."""

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if self._wandb is None:
            return
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero or not logs:
            return
        for key in HF_END_KEYS:  # one value per run: wandb's run summary, as transformers does
            if key in logs:
                self._wandb.run.summary[key] = logs[key]
        values = {k: v for k, v in logs.items() if k not in HF_END_KEYS}
        self._wandb.log({**values, "train/global_step": state.global_step})
