"""Data curation, the LVD-142M recipe for any image collection: manifests, embeddings, faiss indexes,
self-dedup and relative dedup on k-NN graphs, sample-, cluster- and hierarchical-k-means retrieval."""
