"""Process orchestration: rollout-server lifecycle (:mod:`coordexp.launch.server`) and the learner launch.

Nothing is imported here, so ``coordexp.launch.server`` stays importable without torch.
"""
