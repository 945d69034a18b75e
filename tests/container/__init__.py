"""The container image: a hadolint check of the Dockerfile, and the opt-in smoke test (smoke.sh)."""
