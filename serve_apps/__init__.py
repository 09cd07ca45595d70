"""Ray Serve applications over the `icm` library (see the serving issue)."""
