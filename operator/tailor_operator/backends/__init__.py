"""Where a run executes: `kuberay` (RayJob, through tailor_operator.cluster) or `local` (subprocess).

Both offer the same operations to the handlers: observe(job, current) -> {run: RunObservation},
start(job, StartRun), stop(job, run), delete(job, run), cleanup(namespace, name); and for Dataset
validation observe(dataset, key), start(dataset, StartValidation), delete(dataset, key).
"""
