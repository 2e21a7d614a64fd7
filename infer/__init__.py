"""Generation with the Orthrus draft-and-verify decoder (see docs/decoding.md)."""
