"""The learner: Stage-2 trainer, Channel A/B sequence builders, losses, schedule, weight sync (learner side),
the learner process entry (``python -m coordexp.trainer.learner``)."""
