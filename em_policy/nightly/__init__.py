"""The nightly EM pipeline: refresh calibrations, run the curated harness workload, store it,
measure drift, retrain and promote only a better model, publish the dashboard and alerts, with a
signed in-toto statement per step (``qai nightly``, ``qai audit lineage``)."""

from em_policy.nightly.drift import Thresholds
from em_policy.nightly.pipeline import CURATED, STEPS, NightlyConfig, run_once

__all__ = ["CURATED", "STEPS", "NightlyConfig", "Thresholds", "run_once"]
