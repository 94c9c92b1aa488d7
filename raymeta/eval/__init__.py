"""Evaluation: option scoring (with prefix caching), metrics, adaptation, MetaICL's protocol, reports."""
