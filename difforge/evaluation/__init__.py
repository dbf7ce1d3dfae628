"""difforge.evaluation: feature extractors, pure metric functions, reference statistics, and the
runs that write reports: `evaluate_model` (one sampler setting over seed repeats) and `nfe_sweep`
(samplers x NFE budgets).

Numbers are reproducible from a report alone: every report records the extractor name and weights
sha256, the reference dataset's content hash, sample counts, subset sizes and seeds.
"""

from difforge.evaluation.config import MIN_REPEATS, SEED_STRIDE, EvalConfig
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
from difforge.evaluation.records import write_json
from difforge.evaluation.reference import (
    ReferenceStats,
    compute_reference_stats,
    default_cache_dir,
    mnist_reference,
    reference_stats,
)
from difforge.evaluation.report import evaluate_model
from difforge.evaluation.sampling import image_seeds, make_labels
from difforge.evaluation.sweep import (
    DifforgeMethod,
    SweepConfig,
    SweepMethod,
    nfe_sweep,
    plot_sweep,
    steps_for_nfe,
)

__all__ = [
    "DUP_FRACTION",
    "METRIC_KEYS",
    "MIN_REPEATS",
    "SEED_STRIDE",
    "Classifier",
    "DifforgeMethod",
    "EvalConfig",
    "FeatureExtractor",
    "FeatureNet",
    "FeatureNetConfig",
    "ReferenceStats",
    "SweepConfig",
    "SweepMethod",
    "TorchFeatureExtractor",
    "WeightsIntegrityError",
    "compute_reference_stats",
    "default_cache_dir",
    "default_features_dir",
    "diversity",
    "evaluate_images",
    "evaluate_model",
    "extract",
    "feature_stats",
    "fid",
    "fid_from_stats",
    "image_seeds",
    "kid",
    "knn_sq_dists",
    "label_accuracy",
    "load_feature_extractor",
    "make_labels",
    "memorization",
    "mnist_reference",
    "nfe_sweep",
    "nn_ratios",
    "plot_sweep",
    "precision_recall",
    "reference_stats",
    "save_feature_net",
    "steps_for_nfe",
    "write_json",
]
