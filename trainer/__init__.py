"""The avatune trainer: an SQS-driven worker that trains QLoRA/LoRA adapters (`python -m trainer`)."""
