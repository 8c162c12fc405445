"""``robustdet audit``: find the label errors of a training split from out-of-fold detections.

``scores`` (the scores, pure numpy), ``folds`` (fold assignment, training and out-of-fold prediction),
``outputs`` (the csv files and cleaned.json), ``page`` (the static review page), ``run`` (the command).
"""
