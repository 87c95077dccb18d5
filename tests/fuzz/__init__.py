"""A hostile-client fuzzer for the OpenAI server (``hostile.py``; ``python -m tests.fuzz``)."""
