"""Shared pytest configuration: hypothesis profiles.

`HYPOTHESIS_PROFILE=ci` (set by .ci/run) runs more examples; the default stays fast for
local runs.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
