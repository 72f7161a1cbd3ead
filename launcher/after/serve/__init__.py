"""Batched inference over HTTP (`python -m launcher.serve`) and offline (`python -m launcher.generate`).

engine.py turns one JSON request into model input and a batch of them into answers (text generation
through the recipe's `generator` hook, else tensor in, tensor out); batcher.py gathers concurrent
requests into batches; app.py is the aiohttp server; cli.py its command line (`launcher/serve.py`
runs it). generate.py, beside this folder, drives the same engine offline.
"""
