"""Pretrained weights: where they come from (registry packages only), the cache, devices."""
