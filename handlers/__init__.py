"""The avatune HTTP API (FastAPI, served by uvicorn locally and Mangum on AWS Lambda).

Must stay light: nothing under `handlers` may import torch, transformers or peft.
"""
