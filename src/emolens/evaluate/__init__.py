"""Validation of emotion vectors: held-out accuracy, geometry, scenarios, steering."""
