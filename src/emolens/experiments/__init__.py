"""Behavioural experiments: scenarios, items, graders and the judge."""
