"""The job runtime: everything every job shares, and nothing of what any job does.

    a request from the train queue -> claim the job (its record's lease) -> heartbeat (message
    visibility, lease, progress, cancel) -> the kind's work, handed a narrow `JobContext` ->
    its `JobResult` -> the final record, the active slot freed, checkpoints dropped, the event

- `runner.JobRunner`: claim, attempts, duplicates and rolled-back deliveries, failures, stops
  (cancel, SIGTERM hand-back, lost lease, duration limit) and finishing;
- `heartbeat.Heartbeat`: the thread that keeps the message invisible and the lease fresh;
- `control.JobControl`: the `trainer.control.TrainingControl` a work consults between steps;
- `context`: what a work gets (`JobContext`) and gives back (`Succeeded`, `Stopped`).

What a job does lives in `trainer/jobs/`, one recipe per kind, found through the registry in
`contracts.job_kinds`. The job record in S3 is the truth about who owns a job: SQS caps a
message's invisibility at 12 hours, so a long job's message may come back while its worker is
alive; a worker owns a job while its lease, renewed by the heartbeat, has not expired.
"""
