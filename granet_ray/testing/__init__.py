"""Test helpers: the SeaweedFS S3 server and fault injection, for tests and benchmarks;
never imported by the runtime."""
