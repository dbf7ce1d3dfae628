"""difforge.evaluation: feature extractors, pure metric functions, reference statistics.

Numbers are reproducible from a report alone: every report records the extractor name and weights
sha256, the reference dataset's content hash, sample counts, subset sizes and seeds.
"""

from difforge.evaluation.evaluate import DUP_FRACTION, METRIC_KEYS, evaluate_images
from difforge.evaluation.features import (
    Classifier,
    FeatureExtractor,
    FeatureNet,
    FeatureNetConfig,
    TorchFeatureExtractor,
    WeightsIntegrityError,
    default_features_dir,
    extract,
    load_feature_extractor,
    save_feature_net,
)
from difforge.evaluation.metrics import (
    diversity,
    feature_stats,
    fid,
    fid_from_stats,
    kid,
    knn_sq_dists,
    label_accuracy,
    memorization,
    nn_ratios,
    precision_recall,
)
from difforge.evaluation.reference import (
    ReferenceStats,
    compute_reference_stats,
    default_cache_dir,
    mnist_reference,
    reference_stats,
)

__all__ = [
    "DUP_FRACTION",
    "METRIC_KEYS",
    "Classifier",
    "FeatureExtractor",
    "FeatureNet",
    "FeatureNetConfig",
    "ReferenceStats",
    "TorchFeatureExtractor",
    "WeightsIntegrityError",
    "compute_reference_stats",
    "default_cache_dir",
    "default_features_dir",
    "diversity",
    "evaluate_images",
    "extract",
    "feature_stats",
    "fid",
    "fid_from_stats",
    "kid",
    "knn_sq_dists",
    "label_accuracy",
    "load_feature_extractor",
    "memorization",
    "mnist_reference",
    "nn_ratios",
    "precision_recall",
    "reference_stats",
    "save_feature_net",
]
