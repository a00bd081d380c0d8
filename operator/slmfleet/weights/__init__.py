"""Weight manifests and digests, the safetensors header reader, S3 access and the verified loader."""
