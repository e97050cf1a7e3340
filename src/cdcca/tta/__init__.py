"""Device-only test-time adaptation baselines (TENT, EATA, CoTTA) and encoder BatchNorm re-estimation.

They answer the question a reader asks first: how much of what the cloud gives could the device have
had alone? Each method sees what a device sees — the visual tokens and questions of its requests,
never an answer — adapts online and returns its predictions over the answer candidates.
"""

from cdcca.tta.common import candidate_logits, entropy, norm_parameters
from cdcca.tta.cotta import CoTTA, CoTTAConfig
from cdcca.tta.eata import EATA, EATAConfig, fisher_information
from cdcca.tta.encoder_stats import EncoderStats
from cdcca.tta.tent import Tent, TentConfig

__all__ = ["EATA", "CoTTA", "CoTTAConfig", "EATAConfig", "EncoderStats", "Tent", "TentConfig",
           "candidate_logits", "entropy", "fisher_information", "norm_parameters"]
