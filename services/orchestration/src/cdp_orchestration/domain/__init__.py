"""Orchestration's domain: journeys, instances, the arbiter and experiments. No I/O here."""
