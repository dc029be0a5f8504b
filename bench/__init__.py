"""moeshard benchmark suite: moeshard against transformers and accelerate (and llama.cpp where
llama-cpp-python is installed: bench/llama_cpp.py).

Entry points:

- ``python -m bench.make_checkpoint [--tiny]``: the synthetic "mix8x32" checkpoint (or a tiny one).
- ``python -m bench.run --scenario N``: one scenario (or ``--scenario all``); results go to
  ``bench/results/<date>-<machine>.json`` with a markdown table and PNG plots.
- ``python -m bench.report``: render the README benchmark table from the latest results.
"""
