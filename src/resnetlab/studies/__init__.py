"""Studies that show why residual networks work: degradation, gradient flow, lesions and responses.

Each writes a figure, a CSV, ``report.md`` and ``summary.json`` into its folder and returns the summary.
"""

from resnetlab.studies.degradation import degradation_study
from resnetlab.studies.gradients import gradients_at_init, gradients_study
from resnetlab.studies.lesion import lesion_study, lesioned
from resnetlab.studies.responses import layer_response_stds, responses_study

__all__ = [
    "degradation_study", "gradients_at_init", "gradients_study", "layer_response_stds", "lesion_study",
    "lesioned", "responses_study",
]  # fmt: skip
