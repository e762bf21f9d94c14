"""Code that runs inside the rollout-server process: the ms-swift plugin, the weight-loading route and the
vLLM worker extension. The learner never imports it (the wire names it shares live in
:mod:`coordexp.protocol`)."""
