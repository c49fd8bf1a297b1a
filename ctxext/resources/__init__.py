"""What a run will need and whether this machine has it; no torch at import time.

- :mod:`~ctxext.resources.estimate`: memory and time of a workload on a model shape (pure),
  from :mod:`~ctxext.resources.shape` (the inputs), :mod:`~ctxext.resources.memory` and
  :mod:`~ctxext.resources.timing`;
- :mod:`~ctxext.resources.calibrate`: this machine's speeds and runtime size, measured once and
  cached;
- :mod:`~ctxext.resources.guard`: each command's workloads and the verdict against the memory
  available, the check every eval, finetune and run makes before loading weights (rendered by
  the CLI, and printed by `ctxext plan`).
"""
