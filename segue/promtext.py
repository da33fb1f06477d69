"""Prometheus text read back as flat samples, for `segue chaos` and the tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def read_samples(text: str) -> dict[str, float]:
    """Every sample as {'name{label="v",...}': value} (labels sorted; bare name without)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
