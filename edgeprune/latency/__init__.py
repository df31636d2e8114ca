"""The latency model: what a candidate costs per token (traffic), what this machine can do (host),
and the roofline prediction corrected by measurements, transferable to a target (model)."""

from edgeprune.latency.host import HostProfile, host_profile, measure_host
from edgeprune.latency.model import (
    Calibration,
    LatencyModel,
    Observation,
    Prediction,
    fit_efficiency,
    hopeless,
    roofline_fraction,
)
from edgeprune.latency.traffic import ModelTraffic

__all__ = ["Calibration", "HostProfile", "LatencyModel", "ModelTraffic", "Observation", "Prediction",
           "fit_efficiency", "hopeless", "host_profile", "measure_host", "roofline_fraction"]
