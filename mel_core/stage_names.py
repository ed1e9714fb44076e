"""The stages of a MEL step, by name, and the version of each one's logic (a leaf: imports nothing of mel).

sample -> verify -> pair -> diagnose -> abstract -> replay -> update (docs/DESIGN.md, "The algorithm"), plus
``warm_start``, which builds the starting policy once per campaign.
"""

STAGES = ("sample", "verify", "pair", "diagnose", "abstract", "replay", "update")
ALL_STAGES = ("warm_start",) + STAGES

# Bump a stage's version when its logic changes, so cached results of the old logic are not reused.
STAGE_VERSIONS = {"warm_start": 1, "sample": 1, "verify": 2, "pair": 2, "diagnose": 2, "abstract": 3,
                  "replay": 1, "update": 1}
