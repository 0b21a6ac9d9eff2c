"""cdp orchestration: journeys, the per-person arbiter, experiments and channels."""
