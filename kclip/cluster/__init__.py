"""Clustering: the k-means that turns teacher caption embeddings into Knowledge-CLIP's concepts."""

from kclip.cluster.kmeans import IterationStats, KMeans, backend_info, lloyd, split_empty_clusters

__all__ = ["IterationStats", "KMeans", "backend_info", "lloyd", "split_empty_clusters"]
