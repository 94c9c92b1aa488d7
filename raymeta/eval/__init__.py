"""Evaluation: option scoring (with prefix caching), metrics, and MetaICL's protocol."""
