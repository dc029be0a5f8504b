"""Expert-shard side of moeshard: model-agnostic expert storage, paging and compute."""
