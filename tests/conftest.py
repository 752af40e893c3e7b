import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, print_blob=True, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
