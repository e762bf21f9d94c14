"""Rollout side of coordexp: the repeat-terminate rule engine and its adapters, and the /infer/ client.

Import what you need from the submodules; this package imports nothing heavy (no torch, no vLLM):

* :mod:`coordexp.repeat_rules` (a top-level module: the config layer validates with it too) - pure,
  incremental rule engine + stateless ``triggered``
* :mod:`coordexp.rollout.hf_guard`      - transformers ``LogitsProcessor`` (HF backend)
* :mod:`coordexp.rollout.vllm_processor` - vLLM logits processors (V1 runner and Model Runner V2)
* :mod:`coordexp.rollout.server.swift_plugin`  - ``swift rollout --external_plugins`` file
* :mod:`coordexp.rollout.server_client` - learner-side ``/infer/`` client
* :mod:`coordexp.rollout.probe`         - startup activation probe
"""
