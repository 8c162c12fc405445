"""``robustdet audit``: find the label errors of a training split from out-of-fold detections.

``scores`` (the scores, pure numpy), ``split`` (the split as audited, its folds), ``folds`` (each fold's
training and out-of-fold prediction), ``outputs`` (the csv files, cleaned.json, the summary), ``page`` (the
static review page), ``run`` (the command and its folder). docs/audit.md.
"""
