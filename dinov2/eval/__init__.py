"""Downstream evaluation of frozen features: kNN, linear probe, logistic regression, retrieval, dense heads."""
