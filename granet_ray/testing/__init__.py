"""Test helpers (the SeaweedFS S3 server), for tests and benchmarks; not imported by the runtime."""
