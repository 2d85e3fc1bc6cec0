"""Retrieval-augmented generation, the trainer side: chunking, embeddings, the per-user LanceDB
vector store on S3, index and retrieve jobs, and `search()` for RAG generation."""
