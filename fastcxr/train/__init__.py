"""Training: one network through a schedule of stages, and the run record it leaves.

* `learner` — the fastai `Learner` (vision_learner, splitter, loss, optimizer, speed).
* `callbacks` — the stage's callbacks, each owning its state (`state_dict`/`load_state_dict`).
* `schedule` — a stage: freeze_to, discriminative LRs, early stopping (`run_stage`).
* `checkpoint` — `NetworkState`, the typed checkpoint a killed run continues from.
* `network` — `train_network(job, net) -> NetworkResult`.
* `record` — `write_record`: metrics and the run-record files from the networks' results.

`fastcxr.study` puts them together (`train_formulation`, `compare`, `unfreeze_ablation`).
"""
