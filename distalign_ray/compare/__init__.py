"""The comparison job: datasets x seeds x methods x tasks x templates, one MLflow parent run with a
child run per cell.

First every trained method gets the same small Ray Tune budget (its learning rate, and beta where its
objective has one, scored on a dataset's held-out paraphrases). Then each seed trains every trained
method once (finetune.seed) and samples every cell once (estimate.seed); the attribute task is scored
per template, as the paper does. Resumable: the parent run is found again by its name, finished cells
(child runs with status FINISHED) are skipped, tuned values are reused from
`<storage>/compare/<name>/tuned/<method>.yaml` and trained adapters from
`<storage>/compare/<name>/<dataset>/<method>/seed-<seed>`.

Across machines, the report's `results.resume.yaml` and results.csv carry the finished cells and the
tuning to a fresh MLflow store (`record.py`).

`grid.py`: the config and the cells; `run.py`: tuning, training and estimating them as MLflow runs;
`report.py`: results.csv, the tables and the Markdown report; `record.py`: resuming from a report.
"""
