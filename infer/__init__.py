"""Generation with the Orthrus draft-and-verify decoder (see the decoding issue)."""
