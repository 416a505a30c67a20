"""How a sample travels, one module per stage, free of Ray:

read (tar members -> samples) -> decode (+ preprocess, or device_decode) -> batch (Chunk) -> encode
(towers -> embeddings) -> whiten (scores, ChunkResult) -> assemble (one row per sample) -> write
(Parquet + marker, or the fit's reference rows). :mod:`pipeline.executors` runs these stages, on Ray or
in worker processes (:func:`pipeline.flow.stage.assemble_shard`: the shard body).
"""
