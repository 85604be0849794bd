"""candorlm.export: a model directory to other runtimes' formats and back.

hf.py writes and reads Hugging Face `transformers` checkpoints in the Qwen3 architecture;
gguf.py writes llama.cpp's GGUF (`qwen3` architecture); check.py refuses models either
format cannot express. Quantization and pruning are not here (compress/).
"""
