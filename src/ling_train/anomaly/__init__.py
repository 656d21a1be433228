"""Training-anomaly handling: detectors, responses (skip, re-inject, lower LR, rollback, abort)
and the loader wrapper they need. See docs/anomaly.md."""

from ling_train.anomaly.config import RESPONSES, AnomalyConfig, AnomalyConfigError, anomaly_config
from ling_train.anomaly.detectors import Anomaly, ExpertCollapse, NonFinite, RobustWindow, RouterEntropy, Spike
from ling_train.anomaly.loader import AnomalyLoader
from ling_train.anomaly.monitor import AnomalyMonitor, Snapshot

__all__ = ["RESPONSES", "AnomalyConfig", "AnomalyConfigError", "anomaly_config", "Anomaly", "ExpertCollapse",
           "NonFinite", "RobustWindow", "RouterEntropy", "Spike", "AnomalyLoader", "AnomalyMonitor", "Snapshot"]
