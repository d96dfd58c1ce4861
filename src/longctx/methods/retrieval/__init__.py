"""Block retrieval, the machinery LongHeads and InfLLM share: the cache (cache.py), what a query attends to and where
(geometry.py), block summaries (summaries.py), selection (selection.py), the kernels (kernels.py: reference and
torch; triton_kernel.py), the attention function (attention.py) and the base method (method.py). The two methods
(methods/longheads.py, methods/infllm.py) choose their summaries, sharing and positions."""
