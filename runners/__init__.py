"""Entry points, each ``python -m runners.<name>``:

- ``cl``: train a model on a stream of tasks (one run, or a sweep with ``-m``); ``dry_run=true``
  previews the jobs through ``preview``, before Hydra starts.
- ``report``: compare finished runs (tables, figures, paired intervals) from their results.json.
- ``plan``: the memory per GPU of a run before it runs, and what would fit.
- ``bench``: the framework's overhead against a bare PyTorch loop.
- ``bench_methods``: each method's step time, pass time and state against SFT's.
"""
