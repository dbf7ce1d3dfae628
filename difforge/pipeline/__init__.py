"""difforge.pipeline: a model = components (denoiser, optional VAE) + one conditioning spec +
sampling defaults; strict loading; the one request resolver; decoding to pixels in one place."""

from difforge.pipeline.artifact import (
    CARD_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    PIPELINE_FILE,
    WEIGHTS_FILE,
    ModelIntegrityError,
    code_version,
    load_weights_strict,
    save_model,
    save_pipeline,
    sha256_file,
    verify_manifest,
)
from difforge.pipeline.conditioning import (
    ClassKey,
    ConditioningSpec,
    FieldProblem,
    LowResKey,
    SlotsKey,
    TextKey,
)
from difforge.pipeline.config import (
    FORMAT_V1,
    FORMAT_V2,
    ComponentRef,
    ModelConfig,
    NetSpec,
    PipelineConfig,
    SamplingDefaults,
    VAEConfig,
)
from difforge.pipeline.loading import load
from difforge.pipeline.model import (
    Model,
    Samples,
    build_denoiser,
    build_network,
    network_cost,
    to_uint8,
)
from difforge.pipeline.render import grid_metadata, save_grid_png, save_samples_png
from difforge.pipeline.request import (
    Plan,
    RequestInvalid,
    RequestLimits,
    SampleRequest,
    parse_request,
    resolve,
)

FORMAT = FORMAT_V1

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_V1",
    "FORMAT_V2",
    "MANIFEST_FILE",
    "PICKLE_SUFFIXES",
    "PIPELINE_FILE",
    "WEIGHTS_FILE",
    "ClassKey",
    "ComponentRef",
    "ConditioningSpec",
    "FieldProblem",
    "LowResKey",
    "Model",
    "ModelConfig",
    "ModelIntegrityError",
    "NetSpec",
    "PipelineConfig",
    "Plan",
    "RequestInvalid",
    "RequestLimits",
    "SampleRequest",
    "Samples",
    "SamplingDefaults",
    "SlotsKey",
    "TextKey",
    "VAEConfig",
    "build_denoiser",
    "build_network",
    "code_version",
    "grid_metadata",
    "load",
    "load_weights_strict",
    "network_cost",
    "parse_request",
    "resolve",
    "save_grid_png",
    "save_model",
    "save_pipeline",
    "save_samples_png",
    "sha256_file",
    "to_uint8",
    "verify_manifest",
]
