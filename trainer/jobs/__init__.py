"""One recipe per job kind: what a job does once the runtime (`trainer.runtime`) has claimed it.

Each recipe is a callable `(JobContext) -> JobResult` that reads top to bottom, named in the
job-kind registry (`contracts.job_kinds`) and imported by the worker on first use:

- `train`: a training job; `training_setup` holds the steps every training method shares
  (configuration, base model, warm start, documents, checkpoint, dataset), then one of
  `lora` (LoRA and QLoRA on the worker's cached base), `full` (full fine-tuning of a private
  copy), `data_parallel` (LoRA on several GPUs through torchrun) or `preference` (`objective`
  dpo/kto: TRL's DPO or KTO on the avatar's feedback, on top of its current adapter) trains
  and publishes;
- `fuse`: an adapter version merged into its base;
- `generate`: an adapter version (or the base) tried on a prompt;
- `index` / `retrieve`: the avatar's vector index built / queried (RAG);
- `export`: an adapter version written in a serving format (GGUF for llama.cpp, PEFT files).

Recipes use the libraries beside this package (`trainer.training`, `trainer.evaluation`,
`trainer.artifacts`, `trainer.rag`, ...) and never write a job's final record themselves.
"""
