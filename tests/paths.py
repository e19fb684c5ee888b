"""Paths of the test data, importable from every test module (``from paths import ORIGINAL``)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"
# Checkpoints and outputs of the published VPT implementation: region/, clip/, golden.json.
ORIGINAL = DATA / "original"
