"""One interface over local paths and s3:// URIs (MinIO, SeaweedFS, AWS)."""
