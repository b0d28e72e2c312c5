"""The ``report`` stage: one page over the outputs of every other stage.

``dinov2 report`` reads the folders of prepare-default, dedup, retrieve, pretrain, distill and any number
of evaluate runs (each optional), and writes ``report.md`` + ``figures/``, a self-contained
``report.html`` and ``metrics.json`` (the headline numbers) into one folder, renamed into place when
complete, and logs them to MLflow experiment ``dinov2/report``.
"""
