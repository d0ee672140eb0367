"""Renderers: values (plans, outcomes, status reports) to text, JSON, HTML and metrics. No I/O to targets."""
