"""skrtl: scikit-learn compatible radiomics transfer learning.

Pretrained CNN features, harmonization, fine-tuning, label-shift calibration, Optuna tuning and
survival models for small multi-site medical imaging data sets. Importing skrtl has no side
effects: it changes neither scikit-learn's global configuration nor any random seed.
"""

from . import datasets
from ._adabn import AdaBN, bn_layers, reestimate_bn_stats
from ._advisor import StrategyAdvice, suggest_strategy
from ._auto_harmonize import HARMONIZER_CANDIDATES, AutoHarmonizer
from ._backbone import (
    DEFAULT_BACKBONE,
    EMBEDDED_BACKBONES,
    BackboneWeightsError,
    TransferLayer,
    backbone_data_config,
    describe_layers,
    get_transfer_layers,
    load_backbone,
)
from ._backends import InferenceBackendWarning, inference_backends
from ._base import HarmonizationWarning
from ._calibration import BiasCorrectedTemperatureScaling, TemperatureScaling, VectorScaling
from ._cohort import (
    COHORT_COLUMNS,
    Case,
    CohortError,
    is_lazy_frame,
    iter_cases,
    load_case,
    read_cohort,
)
from ._combat import ComBatHarmonizer, ComBatWarning
from ._cropper import LesionCropper
from ._da_scoring import DA_SCORERS, SiteDAScorer, make_site_da_scorer
from ._diagnostics import MMDResult, ShiftDiagnosis, diagnose_shift, mmd_test, proxy_a_distance
from ._domain_adaptation import (
    DA_ADAPTERS,
    DomainAdapter,
    SiteDAPipeline,
    make_site_da_pipeline,
)
from ._explain import SaliencyMaps, explain
from ._explain_checks import (
    RandomizationResult,
    randomization_test,
    randomized_copy,
    saliency_correlation,
)
from ._explain_display import SaliencyDisplay
from ._explain_views import SaliencyView
from ._extract import ExtractResult, extract_cohort, read_radiomics_params
from ._features import PretrainedCNNFeatures, clear_feature_cache, feature_cache_info
from ._finetune import FineTuneClassifier
from ._harmonize import (
    CT_WINDOWS,
    HistogramMatcher,
    IntensityStandardizer,
    IntensityWindow,
    SpacingResampler,
)
from ._imaging import case_cache_info, clear_case_cache, make_image_frame, read_image_frame
from ._io import (
    ImageHeader,
    ImageReadError,
    MaskGeometryError,
    MedicalImage,
    compare_geometry,
    list_dicom_series,
    read_header,
    read_image,
    read_mask,
    select_label,
    write_image,
)
from ._label_shift import (
    LabelShiftAdapter,
    LabelShiftWarning,
    adjust_posteriors,
    bbse_prior_estimate,
    em_prior_estimate,
    prior_shift_class_weight,
    prior_shift_sample_weight,
)
from ._lesion import (
    LesionCrop,
    adjacent_slices,
    crop_lesion,
    lesion_slice,
    orthogonal_planes,
)
from ._pruning import CVMedianPruner
from ._radiomics import RADIOMICS_FEATURE_CLASSES, RadiomicsFeatures, otsu_mask
from ._redundancy import CorrelationClusterSelector
from ._search import TransferSearchCV
from ._search_display import TransferSearchDisplay
from ._search_space import transfer_search_space
from ._survival import (
    CoxPHSurvival,
    SelectKBestSurvival,
    as_survival_target,
    breslow_cumulative_hazard,
    concordance_index,
    cox_score_test,
    kaplan_meier,
    make_survival_target,
    survival_target_to_frame,
)
from ._survival_finetune import (
    CoxPartialLikelihoodLoss,
    FineTuneSurvival,
    cox_partial_likelihood_loss,
)
from ._survival_fusion import SurvivalEnsemble, make_survival_fusion
from ._survival_metrics import (
    brier_score,
    concordance_scorer,
    integrated_brier_score,
    make_brier_scorer,
    make_concordance_scorer,
    make_time_dependent_auc_scorer,
    survival_function_at,
    time_dependent_auc,
)
from ._survival_plots import KaplanMeierDisplay, SurvivalCalibrationDisplay
from ._transfer import layerwise_param_groups
from ._volumetric import VOLUMETRIC_METHODS, convert_to_3d

__version__ = "0.1.0"

__all__ = [
    "COHORT_COLUMNS",
    "CT_WINDOWS",
    "DA_ADAPTERS",
    "DA_SCORERS",
    "DEFAULT_BACKBONE",
    "EMBEDDED_BACKBONES",
    "HARMONIZER_CANDIDATES",
    "RADIOMICS_FEATURE_CLASSES",
    "VOLUMETRIC_METHODS",
    "AdaBN",
    "AutoHarmonizer",
    "BackboneWeightsError",
    "BiasCorrectedTemperatureScaling",
    "CVMedianPruner",
    "Case",
    "CohortError",
    "ComBatHarmonizer",
    "ComBatWarning",
    "CorrelationClusterSelector",
    "CoxPHSurvival",
    "CoxPartialLikelihoodLoss",
    "DomainAdapter",
    "ExtractResult",
    "FineTuneClassifier",
    "FineTuneSurvival",
    "HarmonizationWarning",
    "HistogramMatcher",
    "ImageHeader",
    "ImageReadError",
    "IntensityStandardizer",
    "IntensityWindow",
    "InferenceBackendWarning",
    "KaplanMeierDisplay",
    "LabelShiftAdapter",
    "LabelShiftWarning",
    "LesionCrop",
    "LesionCropper",
    "MMDResult",
    "MaskGeometryError",
    "MedicalImage",
    "PretrainedCNNFeatures",
    "RadiomicsFeatures",
    "RandomizationResult",
    "SaliencyDisplay",
    "SaliencyMaps",
    "SaliencyView",
    "SelectKBestSurvival",
    "ShiftDiagnosis",
    "SiteDAPipeline",
    "SiteDAScorer",
    "SpacingResampler",
    "StrategyAdvice",
    "SurvivalCalibrationDisplay",
    "SurvivalEnsemble",
    "TemperatureScaling",
    "TransferLayer",
    "TransferSearchCV",
    "TransferSearchDisplay",
    "VectorScaling",
    "__version__",
    "adjacent_slices",
    "adjust_posteriors",
    "as_survival_target",
    "breslow_cumulative_hazard",
    "backbone_data_config",
    "bbse_prior_estimate",
    "bn_layers",
    "brier_score",
    "case_cache_info",
    "clear_case_cache",
    "clear_feature_cache",
    "compare_geometry",
    "concordance_index",
    "concordance_scorer",
    "convert_to_3d",
    "cox_partial_likelihood_loss",
    "cox_score_test",
    "crop_lesion",
    "datasets",
    "describe_layers",
    "diagnose_shift",
    "em_prior_estimate",
    "explain",
    "extract_cohort",
    "feature_cache_info",
    "get_transfer_layers",
    "inference_backends",
    "integrated_brier_score",
    "is_lazy_frame",
    "iter_cases",
    "kaplan_meier",
    "layerwise_param_groups",
    "lesion_slice",
    "list_dicom_series",
    "load_backbone",
    "load_case",
    "make_brier_scorer",
    "make_concordance_scorer",
    "make_image_frame",
    "make_site_da_pipeline",
    "make_site_da_scorer",
    "make_survival_fusion",
    "make_survival_target",
    "make_time_dependent_auc_scorer",
    "mmd_test",
    "orthogonal_planes",
    "otsu_mask",
    "prior_shift_class_weight",
    "prior_shift_sample_weight",
    "proxy_a_distance",
    "randomization_test",
    "randomized_copy",
    "read_cohort",
    "read_header",
    "read_image",
    "read_image_frame",
    "read_mask",
    "read_radiomics_params",
    "reestimate_bn_stats",
    "saliency_correlation",
    "select_label",
    "suggest_strategy",
    "survival_function_at",
    "survival_target_to_frame",
    "time_dependent_auc",
    "transfer_search_space",
    "write_image",
]
