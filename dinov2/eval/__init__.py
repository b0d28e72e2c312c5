"""Downstream evaluation of frozen features: kNN, linear probe, logistic regression, retrieval, dense heads."""

from dinov2.eval.features import extract_features
from dinov2.eval.knn import knn_classify

__all__ = ["extract_features", "knn_classify"]
